"""Joining a Ray cluster and placing a run's actors on it.

``cluster.address`` says where Ray runs: ``local`` starts a private instance in this process (the laptop case),
``auto`` joins the cluster ``ray start`` made on this node (or the one ``RAY_ADDRESS`` names, as under
``ray job submit``), and ``host:port`` or ``ray://host:port`` join that cluster. Joining checks that the address
answers within ``cluster.connect_timeout_s`` first, so a wrong address is one clear line instead of a long hang.

Each role (trainer, critic, rollout, reward) asks for CPUs, GPUs and custom node resources per actor
(``cluster.<role>``). Trainer ranks are reserved together as one placement group (``cluster.trainer_strategy``:
PACK keeps them on as few nodes as possible, STRICT_SPREAD puts each on its own node), and rank 0's node address
is the rendezvous point of the DeepSpeed process group, so ranks on different nodes find each other. A request
the cluster cannot meet stops the run at start with the role, what it asked for and what the cluster has.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlhf.core.config.run_config import ConfigError
from rlhf.core.distributed import reaper, threads

if TYPE_CHECKING:
    from rlhf.core.config.run_config import RunConfig


# vLLM 0.34's SamplingParams refuses temperatures above this (rollout/vllm_params.py); checked here, at start.
VLLM_MAX_TEMPERATURE = 2.0


class ClusterError(RuntimeError):
    """The Ray cluster cannot be reached, or cannot give a role what it asks for."""


@dataclass(frozen=True)
class Resources:
    """What one actor of a role asks Ray for."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    custom: dict[str, float] = field(default_factory=dict)
    threads: int | None = None  # the actor's thread share (threads.run_budget), set in its environment at start

    def bundle(self) -> dict[str, float]:
        """The placement-group bundle holding one such actor (Ray refuses empty bundles: a CPU-less actor's bundle
        still asks for a sliver of CPU, which it then does not hold on to)."""
        wanted = {"CPU": self.num_cpus, "GPU": self.num_gpus, **self.custom}
        wanted = {k: v for k, v in wanted.items() if v}
        return wanted or {"CPU": 0.01}

    def options(self) -> dict:
        """Keyword arguments of ``ray.remote``/``.options`` for one actor of the role."""
        options = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "resources": dict(self.custom)}
        if self.threads is not None:  # Ray merges these into the job's environment variables
            options["runtime_env"] = {"env_vars": threads.thread_env(self.threads)}
        return options


# ---------------------------------------------------------------------------------------------------- joining


# Ray starts its workers at niceness 15 to keep its own daemons responsive. Here the workers are the job: at 15 they
# lose the cores to any ordinary process (measured: generation 2-3x slower beside one busy process at niceness 0),
# while the driver only waits on them. 0 leaves them at the driver's own niceness. A cluster started by `ray start`
# keeps its own setting: start it with RAY_worker_niceness=0 for the same effect.
LOCAL_SYSTEM_CONFIG = {"worker_niceness": 0}
_REAPER = None  # the watcher of the local instance's processes (rlhf/core/distributed/reaper.py): kept while we run


def connect(address: str, num_cpus: int, timeout_s: float, env_vars: dict[str, str]) -> None:
    """Start or join Ray as ``address`` says (see the module doc). ``num_cpus`` sizes a local instance only."""
    if ray.is_initialized():
        return
    runtime_env = {"env_vars": env_vars}
    quiet = {"log_to_driver": False, "logging_level": "error", "configure_logging": True}
    if address == "local":
        # address="local": always a fresh instance; without it ray.init joins any cluster `ray start` left running.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env,
                 _system_config=LOCAL_SYSTEM_CONFIG, **quiet)
        global _REAPER
        _REAPER = reaper.watch_ray_processes()  # its agents end with this process, even one killed (see reaper)
        return
    target = os.environ.get("RAY_ADDRESS") if address == "auto" else address
    if address == "auto" and not target:
        target = _address_from_ray_start()
        if target is None:
            raise ClusterError("cluster.address=auto found no running Ray cluster on this node: start one with "
                               "`ray start --head` (or set RAY_ADDRESS), or use cluster.address=local")
    host, port = _host_port(target)
    if not _answers(host, port, timeout_s):
        raise ClusterError(f"cannot reach the Ray cluster at {target} within {timeout_s:.0f} s: check that "
                           f"`ray start --head` runs there and the port is open (cluster.connect_timeout_s)")
    _use_token_auth_if_set_up()
    try:
        ray.init(address=target, runtime_env=runtime_env, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ClusterError(f"could not join the Ray cluster at {target}: {' '.join(str(err).split())}") from None


def _use_token_auth_if_set_up() -> None:
    """`ray start` turns on token authentication when this node has a token (~/.ray/auth_token), but a driver
    joining the cluster sends it only in token mode: without this, joining fails with a bare "Failed to connect".
    Ray's own rule (a token on this node and RAY_AUTH_MODE unset: token mode), applied before ray.init."""
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available

    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _address_from_ray_start() -> str | None:
    """The GCS address `ray start --head` recorded on this node, if a cluster it started is still recorded."""
    from ray._private.utils import read_ray_address

    return read_ray_address()


def _host_port(address: str) -> tuple[str, int]:
    url = urlparse(address if "://" in address else f"gcs://{address}")
    if not url.hostname or not url.port:
        raise ClusterError(f"cluster.address {address!r} is not local, auto, host:port or ray://host:port")
    return url.hostname, url.port


def _answers(host: str, port: int, timeout_s: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------------- placing


def check_fits(role: str, count: int, each: Resources) -> None:
    """Refuse at once a role whose total ask exceeds the whole cluster (a placement group would only wait)."""
    have = ray.cluster_resources()
    ask = {"CPU": each.num_cpus * count, "GPU": each.num_gpus * count,
           **{k: v * count for k, v in each.custom.items()}}
    short = [f"{k} {v:g} (cluster has {have.get(k, 0):g})" for k, v in ask.items() if v > have.get(k, 0) + 1e-9]
    if short:
        raise ClusterError(f"the cluster lacks the resources for {count} {role} actor(s): asks "
                           f"{', '.join(short)}; lower cluster.{role} or add nodes")


def reserve(role: str, count: int, each: Resources, strategy: str, timeout_s: float) -> PlacementGroup:
    """A placement group of ``count`` bundles for ``role``, ready; refused with a clear error if it cannot be."""
    check_fits(role, count, each)
    group = placement_group([each.bundle() for _ in range(count)], strategy=strategy)
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(group)
        raise ClusterError(f"could not place {count} {role} actor(s) of {each.bundle()} with strategy {strategy} "
                           f"within {timeout_s:.0f} s: the cluster has {_nodes_summary()}; free resources, add "
                           f"nodes, or relax cluster.{role}_strategy / cluster.{role}")
    return group


def in_bundle(group: PlacementGroup, index: int) -> dict:
    """``.options`` placing an actor or task in bundle ``index`` of ``group``."""
    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index)}


def rendezvous_address(group: PlacementGroup) -> tuple[str, int]:
    """The address and a free port of the node holding bundle 0, where trainer rank 0 will host the process
    group's rendezvous: ranks on other nodes must reach it there, not at 127.0.0.1."""
    probe = ray.remote(num_cpus=0)(_node_address).options(**in_bundle(group, 0))
    return ray.get(probe.remote(), timeout=60)


def release(group: PlacementGroup | None) -> None:
    if group is not None:
        remove_placement_group(group)


def _node_address() -> tuple[str, int]:
    host = ray.util.get_node_ip_address()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return host, s.getsockname()[1]


def _nodes_summary() -> str:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    parts = []
    for n in nodes:
        res = {k: v for k, v in n["Resources"].items() if not k.startswith(("node:", "memory", "object_store"))}
        parts.append(", ".join(f"{k} {v:g}" for k, v in sorted(res.items())))
    return f"{len(nodes)} node(s): " + "; ".join(f"[{p}]" for p in parts)


def node_endpoint() -> tuple[str, int]:
    """This node's address and a free port on it (for a rendezvous that other nodes reach)."""
    return _node_address()


def role_resources(cfg: "RunConfig", role: str) -> Resources:
    """What one actor of ``role`` asks for: ``cluster.<role>`` if set, else the defaults ``ClusterConfig`` lists
    for the GPUs the cluster has."""
    share = threads.run_budget(cfg)[role]
    chosen = getattr(cfg.cluster, role)
    if chosen is not None:
        return Resources(chosen.num_cpus, chosen.num_gpus, dict(chosen.resources), share)
    return replace(default_resources(cfg, role, ray.cluster_resources().get("GPU", 0)), threads=share)


def default_resources(cfg: "RunConfig", role: str, gpus: float) -> Resources:
    """The defaults on a cluster of ``gpus`` GPUs: a trainer rank one GPU when there is one per rank; a rollout
    worker ``rollout.tensor_parallel_size`` GPUs (one for hf engines) when the trainer ranks leave them. A
    cluster with GPUs too few for that is refused, not run with rollouts on the CPU: ``cluster.rollout`` says how
    to share (a fraction of the trainer's GPUs) or, with num_gpus 0, that CPU rollouts are meant."""
    ranks = cfg.trainer.num_ranks
    if role in ("trainer", "critic"):
        return Resources(num_cpus=cfg.trainer.threads, num_gpus=1 if gpus >= ranks else 0)
    if role == "rollout":
        each = cfg.rollout.tensor_parallel_size if cfg.rollout.engine == "vllm" else 1
        need = ranks + cfg.rollout.num_workers * each
        if gpus >= need:
            return Resources(num_cpus=1, num_gpus=each)
        if gpus > 0 or cfg.rollout.engine == "vllm":
            raise ClusterError(f"{cfg.rollout.num_workers} rollout worker(s) of {each} GPU(s) beside {ranks} trainer "
                               f"rank(s) need {need} GPUs and the cluster has {gpus:g}: set cluster.rollout (e.g. "
                               f"num_gpus: 0.5 to share the trainer's GPUs, 0 for CPU rollouts) or fewer workers")
        return Resources(num_cpus=1, num_gpus=0)
    return Resources(num_cpus=0)  # reward: scores while the rollout workers and trainer ranks wait


def colocated(trainer: Resources, rollout: Resources) -> bool:
    """Whether trainer ranks and rollout workers share GPUs: both ask for a fraction of one."""
    return 0 < trainer.num_gpus < 1 and 0 < rollout.num_gpus < 1


def weight_transfer(cfg: "RunConfig", trainer: Resources, rollout: Resources) -> str | None:
    """How ``rollout.weight_sync: broadcast`` carries the weights with this placement: vLLM's ``ipc`` backend
    where trainer and rollout share GPUs, its ``nccl`` one across GPUs (None: the object store, or our own
    process group for the hf engines). Refuses what cannot work, in one line, before anything starts."""
    r = cfg.rollout
    if r.engine == "vllm":
        if rollout.num_gpus <= 0:
            raise ClusterError("rollout.engine vllm needs a GPU: cluster.rollout.num_gpus is 0")
        if r.tensor_parallel_size > 1 and rollout.num_gpus != r.tensor_parallel_size:
            raise ClusterError(f"rollout.tensor_parallel_size {r.tensor_parallel_size} needs that many whole GPUs "
                               f"per rollout worker; cluster.rollout.num_gpus is {rollout.num_gpus:g}")
    if r.weight_sync != "broadcast":
        return None
    if r.engine == "vllm":
        chosen = "ipc" if colocated(trainer, rollout) else "nccl"
        if r.weight_transfer not in (None, chosen):
            raise ClusterError(f"rollout.weight_transfer {r.weight_transfer} cannot carry the weights here (trainer "
                               f"and rollout {'share' if chosen == 'ipc' else 'do not share'} GPUs: {chosen}); "
                               f"leave it unset")
        return chosen
    if colocated(trainer, rollout):
        raise ClusterError("rollout.weight_sync broadcast cannot run where trainer and rollout share GPUs (NCCL "
                           "refuses two ranks on one GPU): use weight_sync object_store, or rollout.engine vllm "
                           "(CUDA IPC)")
    return None


def rollout_settings(cfg: "RunConfig", trainer: Resources, rollout: Resources) -> "RunConfig":
    """``cfg`` with what the rollout workers need to know of the placement filled in: the transfer backend
    (``weight_transfer``) and, for vLLM, the longest row (``max_model_len``: the prompt bound plus the longest
    response asked for, where task.max_prompt_tokens sets a bound)."""
    if cfg.rollout.engine == "vllm" and cfg.rollout.temperature > VLLM_MAX_TEMPERATURE:
        raise ConfigError(f"the vllm engine samples at temperatures up to {VLLM_MAX_TEMPERATURE:g} (vLLM's limit), "
                          f"not rollout.temperature {cfg.rollout.temperature:g}: lower it or use rollout.engine=hf")
    update = {"weight_transfer": weight_transfer(cfg, trainer, rollout)}
    if cfg.rollout.max_model_len is None and cfg.task.max_prompt_tokens:
        update["max_model_len"] = cfg.task.max_prompt_tokens + max(cfg.rollout.max_new_tokens,
                                                                    cfg.eval.max_new_tokens)
    return cfg.model_copy(update={"rollout": cfg.rollout.model_copy(update=update)})
