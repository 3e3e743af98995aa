"""The RolloutWorker Ray actor: holds the policy in a rollout engine (rollout/engines.py) and samples from it.

After every trainer update the driver sends new weights with a version number, as a state dict through Ray's object
store (``load_weights``) or by collective broadcast from trainer rank 0 (``join_weight_sync``, then
``receive_weights``: rlhf/core/distributed/weight_sync.py); ``generate`` is told which version the driver expects and refuses
to sample from stale weights rather than silently training off-policy. The worker times its engine's calls
(``timing``).

With partial rollouts (``rollout.partial_rollouts``; rollout/partial.py) the driver sends weights through
``load_weights`` in the actor's ``weights`` concurrency group, so they arrive while a batch is being generated:
they wait in ``_pending`` until the engine's current decoding step ends, and the rest of the batch is sampled from
them (each token's version recorded). ``generate`` then accepts any version at least the expected one.
"""
from __future__ import annotations

import threading
import time

import torch

from rlhf.core.config.run_config import RolloutConfig
from rlhf.core.checkpoints.resume import set_torch_rng_state, torch_rng_state
from rlhf.core.data.samples import Sample
from rlhf.core.distributed import threads
from rlhf.core.distributed.weight_sync import BroadcastGroup, TensorSpec
from rollout import vllm_engine  # noqa: F401 - registers the optional vllm engine (vllm itself loads when built)
from rollout import static_engine  # noqa: F401 - registers hf_static
from rollout.engines import ENGINES
from rollout.environments import ENVIRONMENTS
from rollout.multi_turn import MultiTurnRollout
from rollout.partial import generate_partial


SYNC_ARRIVAL_S = 120.0  # partial rollouts: how long a batch waits for the weights it was launched after
TRANSFER_CALLS = ("init_weight_transfer_engine", "start_weight_update", "update_weights", "finish_weight_update")


class StaleWeightsError(RuntimeError):
    pass


class RolloutWorker:
    def __init__(self, model_dir: str, rollout: RolloutConfig, seed: int, engine: type | None = None,
                 environment: type | None = None):
        """``rollout``: the run's rollout section (engine, threads); ``seed``: this worker's own sampling seed;
        ``engine`` and ``environment``: the classes ``rollout.engine`` and ``rollout.environment`` name, as the
        driver resolved them (by default looked up here)."""
        threads.apply("rollout worker", rollout.threads)
        torch.manual_seed(seed)
        self.engine = (engine or ENGINES[rollout.engine])(model_dir, rollout)
        self.tokenizer = self.engine.tokenizer
        # rollout.environment: each sample a multi-turn trajectory in it (token ids in and out); none: one response.
        self.multi_turn = None
        if rollout.environment != "none":
            make_env = environment or ENVIRONMENTS[rollout.environment]
            self.multi_turn = MultiTurnRollout(self.tokenizer, lambda: make_env(rollout.multi_turn), rollout.multi_turn)
        self.version = 0
        self.partial = rollout.partial_rollouts
        # Partial rollouts: weights that arrived during a generate call, installed between its decoding steps.
        self._lock = threading.Lock()
        self._generating = False
        self._pending: tuple[dict[str, torch.Tensor], int] | None = None
        self.bucket_bytes = int(rollout.sync_bucket_mb * 2**20)
        self._sync: BroadcastGroup | None = None
        self._manifest: list[TensorSpec] = []
        # The engine's last calls, timed here: generate_s and response_tokens of the last generate, load_weights_s
        # (and receive_s for a broadcast) of the last sync.
        self.last: dict[str, float] = {}

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> float:
        """Install new policy weights (or, while a partial rollout is generating, hand them to it: it installs them
        after its current decoding step); returns the seconds it took."""
        with self._lock:
            if self._generating:
                if self._pending is None or version > self._pending[1]:
                    self._pending = (state_dict, version)
                return 0.0
            return self._install(state_dict, version)

    def _install(self, state_dict: dict[str, torch.Tensor], version: int) -> float:
        start = time.perf_counter()
        self.engine.load_weights(state_dict)
        self.version = version
        self.last["load_weights_s"] = time.perf_counter() - start
        return self.last["load_weights_s"]

    def _install_pending(self) -> bool:
        """Install the weights that arrived during generation, if any (whether there were)."""
        with self._lock:
            if self._pending is None:
                return False
            self._install(*self._pending)
            self._pending = None
            return True

    def join_weight_sync(self, host: str, port: int, rank: int, size: int, generation: int,
                         manifest: list[TensorSpec], timeout_s: float) -> None:
        """Become member ``rank`` of generation ``generation`` of the weight-sync group (collective with the other
        members: trainer rank 0 hosts the store at host:port). Replaces any earlier generation."""
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self._sync = None
        self._sync = BroadcastGroup(None, host, port, rank, size, generation, timeout_s, device)
        self._manifest = manifest

    def receive_weights(self, version: int) -> float:
        """Receive and install the weights trainer rank 0 broadcasts as ``version``; returns the seconds it took.
        The hf engines take each bucket straight into their model (no second copy of it); a failure part-way
        leaves the version unchanged, so the worker refuses to sample until a sync or restore completes."""
        if self._sync is None:
            raise RuntimeError("receive_weights before join_weight_sync: the driver forms the group first")
        start = time.perf_counter()
        model = getattr(self.engine, "model", None)
        if model is not None:
            self._sync.receive_into(self._manifest, version, self.bucket_bytes, model.state_dict(keep_vars=True))
            self.version = version
        else:
            self.load_weights({name: tensor.clone() for bucket in self._sync.receive(
                self._manifest, version, self.bucket_bytes) for name, tensor in bucket}, version)
        self.last["receive_s"] = self.last["load_weights_s"] = time.perf_counter() - start
        return self.last["receive_s"]

    def weight_transfer(self, method: str, payload=None) -> None:
        """One of vLLM's weight-transfer calls, driven by the trainer ranks (rlhf/core/distributed/vllm_transfer.py)
        and passed to the engine; ``finish_weight_update`` carries the version the worker then holds."""
        if method not in TRANSFER_CALLS:
            raise ValueError(f"{method!r} is not one of vLLM's weight-transfer calls {TRANSFER_CALLS}")
        if method == "start_weight_update":
            self.engine.start_weight_update()
        elif method == "finish_weight_update":
            self.engine.finish_weight_update(str(payload))
            self.version = int(payload)
        else:
            getattr(self.engine, method)(payload)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights the engine samples with (CPU tensors), for checks that a sync arrived whole."""
        return self.engine.state_dict()

    def timing(self) -> dict[str, float]:
        return dict(self.last)

    def rng_state(self) -> dict:
        """The torch generators this worker samples with (a checkpoint stores them, so a resumed run draws the
        same samples as an uninterrupted one)."""
        return torch_rng_state()

    def set_rng_state(self, state: dict) -> None:
        set_torch_rng_state(state)

    def generate(self, prompts: list[str], n: int, max_new_tokens: int, temperature: float, greedy: bool,
                 expected_version: int) -> list[Sample]:
        if self.partial and not greedy:  # the weights may be newer than when the batch was launched
            return self._generate_partial(prompts, n, max_new_tokens, temperature, expected_version)
        if self.version != expected_version:
            raise StaleWeightsError(f"rollout worker holds weights v{self.version}, driver expects v{expected_version}")
        start = time.perf_counter()
        if self.multi_turn is None:
            samples = self.engine.generate(prompts, n, max_new_tokens, temperature, greedy)
        else:
            samples = self.multi_turn.run(lambda ids, k, new: self.engine.generate(ids, k, new, temperature, greedy),
                                          prompts, n, max_new_tokens)
        self.last["generate_s"] = time.perf_counter() - start
        self.last["response_tokens"] = float(sum(len(s.response_ids) for s in samples))
        return samples

    def _generate_partial(self, prompts: list[str], n: int, max_new_tokens: int, temperature: float,
                          expected_version: int) -> list[Sample]:
        """A batch sampled across weight swaps (rollout/partial.py), each token's version recorded."""
        with self._lock:
            self._generating = True
        try:
            # The sync the batch was launched after runs in the weights group: it may still be on its way.
            deadline = time.monotonic() + SYNC_ARRIVAL_S
            while True:
                self._install_pending()
                if self.version >= expected_version:
                    break
                if time.monotonic() > deadline:
                    raise StaleWeightsError(f"rollout worker holds weights v{self.version}, driver expects at least "
                                            f"v{expected_version} (not arrived within {SYNC_ARRIVAL_S:.0f} s)")
                time.sleep(0.005)
            start = time.perf_counter()
            samples = generate_partial(
                lambda ps, k, new, stop: self.engine.generate(ps, k, new, temperature, False, stop_early=stop),
                prompts, n, max_new_tokens, lambda: self.version, lambda: self._pending is not None,
                self._install_pending, lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True))
        finally:
            with self._lock:
                self._generating = False
            self._install_pending()  # weights that came with the last step: the next batch starts from them
        self.last["generate_s"] = time.perf_counter() - start
        self.last["response_tokens"] = float(sum(len(s.response_ids) for s in samples))
        return samples
