"""Joining Ray clusters and placing actors on them: a real two-node Ray cluster on this machine (Ray's own
multi-node test utility: a head and a worker node, each its own raylet with its own CPUs and a custom resource),
trainer ranks on different nodes matching the single-process update, a whole run on the cluster, and
`distilrl run ... cluster.address=auto` against a cluster `ray start --head` made beforehand."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("deepspeed")
from ray.cluster_utils import Cluster  # noqa: E402
from ray.util import placement_group_table  # noqa: E402

import rlhf  # noqa: E402
from rlhf.core.distributed import cluster  # noqa: E402
from rlhf.core.distributed.threads import run_budget  # noqa: E402
from rlhf.core.config.run_config import ConfigError, load_config  # noqa: E402
from rlhf.rl.ranks.policy import TrainerGroup  # noqa: E402
from tests.configs import run_config  # noqa: E402
from tests.rlhf.rl.ranks.test_trainer import (  # noqa: E402
    CFG, assert_weights_equal, batch, model_dir, single_process_update)  # noqa: F401
from tests.paths import REPO  # noqa: E402



def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("address", ["local", "auto", "10.0.0.1:6379", "ray://head:10001"])
def test_address_forms_accepted(address):
    assert load_config(None, [f"cluster.address={address}"]).cluster.address == address


def test_malformed_address_refused():
    with pytest.raises(ConfigError, match="cluster.address must be local, auto, host:port"):
        load_config(None, ["cluster.address=my-head-node"])


def test_unreachable_cluster_is_one_clear_line_within_the_timeout():
    address = f"127.0.0.1:{_free_port()}"  # nobody listens there
    start = time.perf_counter()
    with pytest.raises(cluster.ClusterError, match=f"cannot reach the Ray cluster at {address} within 2 s"):
        cluster.connect(address, num_cpus=1, timeout_s=2, env_vars={})
    assert time.perf_counter() - start < 10
    assert not ray.is_initialized()


def test_auto_without_a_running_cluster(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(cluster, "_address_from_ray_start", lambda: None)
    with pytest.raises(cluster.ClusterError, match="found no running Ray cluster on this node"):
        cluster.connect("auto", num_cpus=1, timeout_s=2, env_vars={})


def test_a_local_instance_runs_its_workers_at_the_drivers_niceness():
    # Ray's default (workers at niceness 15) let any ordinary process take the cores from rollout and training.
    if ray.is_initialized():
        ray.shutdown()
    cluster.connect("local", num_cpus=1, timeout_s=30, env_vars={})
    try:
        worker = ray.get(ray.remote(lambda: os.getpriority(os.PRIO_PROCESS, 0)).remote())
    finally:
        ray.shutdown()
    assert worker == os.getpriority(os.PRIO_PROCESS, 0)


# ------------------------------------------------------------------------------------------- a two-node cluster


@pytest.fixture(scope="module")
def two_nodes():
    """Head and worker node, 2 CPUs each; each can host one trainer rank (custom resource trainer_slot)."""
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"trainer_slot": 1}})
    nodes.add_node(num_cpus=2, resources={"trainer_slot": 1})
    nodes.wait_for_nodes()
    yield nodes
    if ray.is_initialized():
        ray.shutdown()
    nodes.shutdown()


@pytest.fixture
def connected(two_nodes):
    ray.init(address=two_nodes.address, log_to_driver=False)
    yield two_nodes
    ray.shutdown()


def test_trainer_ranks_on_two_nodes_match_the_single_process_update(connected, model_dir, batch):
    """One rank per node (STRICT_SPREAD, and each rank takes a node's only trainer_slot): the ranks rendezvous at
    rank 0's node address, and the update is the single-process one."""
    cfg = {**CFG, "zero_stage": 3}
    group = TrainerGroup(model_dir, run_config(cfg), num_ranks=2, timeout_s=300,
                         resources=cluster.Resources(1, 0, {"trainer_slot": 1}), strategy="STRICT_SPREAD")
    try:
        nodes = placement_group_table(group.placement_group)["bundles_to_node_id"]
        assert len(set(nodes.values())) == 2
        metrics = group.train_step(batch)
        weights = group.full_state_dict()
    finally:
        group.shutdown()
    want = single_process_update(model_dir, batch, 0.0)
    assert metrics["losses/policy_loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert metrics["losses/grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
    assert_weights_equal(weights, want["weights"])


def test_asking_more_than_the_cluster_has_names_the_role_and_resource(connected, model_dir):
    with pytest.raises(cluster.ClusterError, match=r"lacks the resources for 2 trainer actor\(s\): asks GPU 2 "
                                                   r"\(cluster has 0\)"):
        TrainerGroup(model_dir, run_config(CFG), num_ranks=2, timeout_s=60, resources=cluster.Resources(1, 1))
    with pytest.raises(cluster.ClusterError, match="could not place 3 trainer actor.*STRICT_SPREAD.*2 node"):
        cluster.reserve("trainer", 3, cluster.Resources(1), "STRICT_SPREAD", timeout_s=3)


def test_role_resources_from_config_or_defaults(connected):
    cfg = load_config(REPO / "configs/tiny.yaml", ["cluster.rollout={num_cpus: 0.5, resources: {trainer_slot: 0.1}}"])
    share = run_budget(cfg)  # each actor's thread share rides along with what it asks Ray for
    assert cluster.role_resources(cfg, "rollout") == cluster.Resources(0.5, 0.0, {"trainer_slot": 0.1},
                                                                       threads=share["rollout"])
    assert cluster.role_resources(cfg, "trainer") == cluster.Resources(cfg.trainer.threads, 0,  # no GPUs here
                                                                       threads=share["trainer"])
    assert cluster.role_resources(cfg, "reward") == cluster.Resources(0, threads=share["reward"])


def test_a_whole_run_on_the_two_node_cluster(two_nodes, tmp_path):
    cfg = load_config(REPO / "configs/tiny.yaml", [
        f"output_dir={tmp_path / 'run'}", f"cluster.address={two_nodes.address}",
        "cluster.trainer_strategy=STRICT_SPREAD", "cluster.trainer={num_cpus: 1, resources: {trainer_slot: 1}}"])
    result = rlhf.run(cfg, log=lambda line: None)
    assert result.summary["steps"] == 2
    assert (result.policy_dir / "model.safetensors").exists()
    assert not ray.is_initialized()  # the run joined the cluster and left it; the cluster itself lives on
    assert two_nodes.head_node.remaining_processes_alive()


# ------------------------------------------------------------------------------- `ray start --head` beforehand


RAY_CLI = [sys.executable, "-c", "from ray.scripts.scripts import main; main()"]  # the `ray` command


@pytest.fixture
def ray_start_head(request):
    """A cluster started the way users start one, in the foreground (--block), so stopping it stops only it.
    Yields (GCS address, dashboard address or None); parametrise indirectly with True for a dashboard."""
    dashboard = getattr(request, "param", False)
    temp_dir = tempfile.mkdtemp(prefix="ray_", dir="/tmp")  # short: Ray's socket paths have a length limit
    port, dashboard_port = _free_port(), _free_port()
    head = subprocess.Popen([*RAY_CLI, "start", "--head", f"--port={port}", "--num-cpus=4", "--block",
                             f"--include-dashboard={str(dashboard).lower()}", f"--dashboard-port={dashboard_port}",
                             f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    while not (cluster._answers("127.0.0.1", port, 1)
               and (not dashboard or cluster._answers("127.0.0.1", dashboard_port, 1))):
        assert head.poll() is None and time.time() < deadline, "ray start --head did not come up"
        time.sleep(1)
    yield f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard_port}" if dashboard else None
    os.killpg(head.pid, signal.SIGTERM)
    try:
        # `ray start --block` rarely exits on SIGTERM within 30 s (measured: the whole wait, every time); the
        # cluster is this test's own session, so after a short grace the group is killed.
        head.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_distilrl_run_joins_a_ray_start_cluster_with_address_auto(ray_start_head, tmp_path):
    """The quickstart config, shrunk to seconds, with cluster.address=auto; RAY_ADDRESS names the cluster, as
    `ray job submit` does for the jobs it starts."""
    out = tmp_path / "run"
    env = {**os.environ, "RAY_ADDRESS": ray_start_head[0]}
    shrink = ["warmup.steps=5", "label.prompts=8", "label.eval_prompts=8", "label.samples_per_prompt=2",
              "reward_model.epochs=1", "reward_model.batch_size=8", "reward.audit_every=0",
              "model.hidden_size=32", "model.num_layers=1", "model.intermediate_size=64",
              "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2", "algorithm.steps=1",
              "task.eval_prompts=8", "eval.max_new_tokens=8", "rollout.max_new_tokens=8"]
    done = subprocess.run([sys.executable, "-m", "rlhf.cli", "run", str(REPO / "configs/quickstart.yaml"),
                           f"output_dir={out}", "cluster.address=auto", *shrink],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1 and "reward_model" in summary


# --------------------------------------------------------------------------------------------------- recipes

RECIPE_GPUS = {"qwen2.5-7b_grpo_2x8gpu.yaml": 16, "qwen2.5-0.5b_grpo_1gpu.yaml": 1, "qwen2.5-7b_grpo_lora_8gpu.yaml": 8,
               "qwen2.5-0.5b_grpo_lora_1gpu.yaml": 1}


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "configs/recipes").glob("*.yaml")))
def test_every_recipe_validates_and_asks_for_the_gpus_it_says(recipe):
    """Each recipe loads, names its GPU layout per role, and fills exactly the GPUs its header promises."""
    cfg = load_config(REPO / "configs/recipes" / recipe)
    c = cfg.cluster
    assert c.trainer and c.rollout and c.reward, "a recipe states every role's resources"
    gpus = (cfg.trainer.num_ranks * c.trainer.num_gpus + cfg.rollout.num_workers * c.rollout.num_gpus
            + cfg.reward.num_workers * c.reward.num_gpus)
    assert gpus == pytest.approx(RECIPE_GPUS[recipe])
    assert cfg.trainer.bf16 and cfg.model.model_name_or_path
    assert cfg.rollout.engine == "vllm" and cfg.rollout.dtype == "bfloat16"
    header = (REPO / "configs/recipes" / recipe).read_text().split("\noutput_dir:")[0]
    # Each states its memory and step time, and that the step time is an estimate until a GPU run measures it.
    assert "Memory estimate" in header and "Expected step time" in header
    assert "no GPU run has measured it yet" in header


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "configs/recipes").glob("*.yaml")))
def test_every_recipe_prints_its_plan_without_a_gpu(recipe, capsys):
    """`distilrl run RECIPE --dry-run`: the placement, the weight transfer and the memory, nothing started."""
    from rlhf.cli import main

    assert main(["run", str(REPO / "configs/recipes" / recipe), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"placement on {RECIPE_GPUS[recipe]} GPU(s)" in out and "weight sync: broadcast via vLLM's" in out
    assert "trainer rank:" in out and "rollout worker (vLLM)" in out
    colocated = "0.5b" in recipe
    assert ("CUDA IPC" in out) == colocated and ("yes (colocated)" in out) == colocated


def test_trainer_gpu_options():
    cfg = load_config(None, ["trainer.zero_stage=3", "trainer.offload=optimizer+params"])
    assert cfg.trainer.zero_section() == {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                                          "offload_param": {"device": "cpu", "pin_memory": True}}
    assert load_config(None, []).trainer.zero_section() == {"stage": 2}
    # Offloaded optimizer state steps with DeepSpeedCPUAdam (torch_adam off), on the device with torch's AdamW.
    assert cfg.trainer.optimizer_section()["params"]["torch_adam"] is False
    assert load_config(None, []).trainer.optimizer_section()["params"]["torch_adam"] is True
    with pytest.raises(ConfigError, match="trainer: offload optimizer\\+params needs zero_stage 3"):
        load_config(None, ["trainer.zero_stage=2", "trainer.offload=optimizer+params"])
