"""One DeepSpeed policy rank in this process (ZeRO-2, world size 1, gloo): an update with a NaN loss is refused and
counted, and the rank's state (weights, Adam moments, step count, RNG) survives save_state/load_state exactly."""
from __future__ import annotations

import math

import pytest

from rlhf.core.guards import update_fault

NAN = float("nan")


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """One ZeRO-2 PolicyTrainer rank in this process (world size 1, gloo)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    deepspeed = pytest.importorskip("deepspeed")
    import socket

    from rlhf.rl.ranks.policy import PolicyTrainer
    from tests.configs import run_config

    config = transformers.Qwen2Config(vocab_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("policy"))
    transformers.Qwen2ForCausalLM(config).save_pretrained(path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    trainer = PolicyTrainer(0, 1, "127.0.0.1", port, path, run_config({"zero_stage": 2, "lr": 1e-2,
                                                                       "micro_batch_size": 2, "timeout_s": 60}))
    yield trainer
    deepspeed.comm.destroy_process_group()  # also drops DeepSpeed's cached groups, for the next rank in this process


def _batch(advantage: float):
    import torch

    from rlhf.core.data.batch import TrainBatch

    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    response = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.float32)
    return TrainBatch(input_ids=ids, attention_mask=torch.ones_like(ids), response_mask=response,
                      rollout_logprobs=torch.zeros(2, 4), advantages=response * advantage,
                      loss_weights=response / response.sum())


def test_a_nan_loss_gets_no_update_and_the_next_good_batch_does(one_rank):
    weights = {k: v.clone() for k, v in one_rank.engine.module.state_dict().items()}
    metrics = one_rank.train_step(_batch(NAN))
    assert math.isnan(metrics["losses/policy_loss"]) and metrics["faults/update_skipped"] == 1.0
    assert update_fault(metrics) == "non-finite policy loss nan"
    after = one_rank.engine.module.state_dict()
    assert all((after[k] == w).all() for k, w in weights.items())  # untouched, not NaN

    metrics = one_rank.train_step(_batch(1.0))
    assert metrics["faults/update_skipped"] == 0.0 and update_fault(metrics) is None
    after = one_rank.engine.module.state_dict()
    assert any((after[k] != w).any() for k, w in weights.items())
    assert all(after[k].isfinite().all() for k in after)


def test_a_ranks_state_round_trips_exactly(one_rank, tmp_path):
    import torch

    one_rank.train_step(_batch(1.0))  # Adam moments that are not zero
    one_rank.save_state(str(tmp_path / "trainer"))
    saved_weights = {k: v.clone() for k, v in one_rank.engine.module.state_dict().items()}
    expected_next = one_rank.train_step(_batch(-0.5))
    expected_weights = {k: v.clone() for k, v in one_rank.engine.module.state_dict().items()}
    torch.rand(3)  # move the RNG on too

    one_rank.load_state(str(tmp_path / "trainer"))
    assert all(torch.equal(v, saved_weights[k]) for k, v in one_rank.engine.module.state_dict().items())
    again = one_rank.train_step(_batch(-0.5))
    assert again["losses/policy_loss"] == expected_next["losses/policy_loss"]
    assert again["losses/grad_norm"] == expected_next["losses/grad_norm"]
    assert all(torch.equal(v, expected_weights[k]) for k, v in one_rank.engine.module.state_dict().items())


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # unpickling would create the marker file


def test_deepspeed_state_holding_a_pickled_payload_is_refused_and_never_runs(one_rank, tmp_path):
    """DeepSpeed reads its files with torch.load(weights_only=False); the rank forces the safe loader."""
    import glob

    import torch

    from rlhf.core.models.safe_load import UnsafeCheckpointError

    one_rank.save_state(str(tmp_path / "trainer"))
    one_rank.load_state(str(tmp_path / "trainer"))  # the real state passes the allow-list
    [model_states] = glob.glob(str(tmp_path / "trainer" / "**" / "*model_states.pt"), recursive=True)
    state = torch.load(model_states, weights_only=False)
    state["module_hook"] = _Payload(tmp_path / "ran")
    torch.save(state, model_states)
    with pytest.raises(UnsafeCheckpointError, match="model_states.pt holds objects"):
        one_rank.load_state(str(tmp_path / "trainer"))
    assert not (tmp_path / "ran").exists()
    assert torch.load is torch.serialization.load  # the patch is undone after a refusal too
