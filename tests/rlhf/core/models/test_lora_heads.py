"""LoRA on the models with heads (rlhf/core/models/lora.py): PPO's critic (``critic.lora``) and the distilled reward model
(``reward_model.lora``), each as one in-process DeepSpeed ZeRO-2 rank.

Only the adapters and the heads (peft's modules_to_save copies) may change in a step, and only they are in the
optimizer; the critic's checkpoint holds only them and resumes bit-exactly; the saved RM is merged, loads with
DistilledRewardModel (as the reward workers load it) and with plain transformers, and scores as the training-side
model does. A PPO run with a LoRA critic is in tests/rlhf/rl/ranks/test_critic.py.
"""
from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
deepspeed = pytest.importorskip("deepspeed")

from reward.model.distilled import DistilledRewardModel, score_texts  # noqa: E402
from reward.model.ranks import RewardModelTrainer, collate_pairs, load_reward_model  # noqa: E402
from rlhf.core.models import lora  # noqa: E402
from rlhf.core.config.training_config import LoraSettings  # noqa: E402
from rlhf.rl.ranks.critic import CriticTrainer  # noqa: E402
from tests.configs import run_config  # noqa: E402
from tests.rlhf.rl.ranks.test_critic import _batch as critic_batch  # noqa: E402
from tests.rlhf.core.models.test_lora import _free_port  # noqa: E402
from tests.reward.model.test_rm_trainer import (  # noqa: E402
    CFG as RM_CFG, lm_dir, rm_config, separable_rows, tokenizer)  # noqa: F401
from tests.rlhf.rl.ranks.test_trainer import model_dir  # noqa: E402,F401

LORA = {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "up_proj"]}


def _trained_names(rank) -> set[str]:
    """The parameters DeepSpeed's (ZeRO-2) optimizer holds, by name."""
    held = {id(p) for group in rank.engine.optimizer.bit16_groups for p in group}
    return {name for name, p in rank.engine.module.named_parameters() if id(p) in held}


def _state(rank) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in rank.engine.module.state_dict().items()}


def _moved(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def _is_adapter_or_head(name: str) -> bool:
    return ".lora_" in name or ".modules_to_save." in name


@pytest.fixture
def teardown_rank():
    yield
    deepspeed.comm.destroy_process_group()  # also drops DeepSpeed's cached groups, for the next rank in this process


def test_lora_critic_trains_adapters_and_head_only_and_resumes_bit_exactly(model_dir, tmp_path, teardown_rank):
    cfg = run_config({"lr": 1e-2, "adam_eps": 1e-4, "micro_batch_size": 4, "value_clip": 0.5, "timeout_s": 60},
                     role="critic")
    cfg.critic.lora = LoraSettings(**LORA)
    rank = CriticTrainer(0, 1, "127.0.0.1", _free_port(), model_dir, cfg)
    assert _trained_names(rank) == {n for n in _state(rank) if _is_adapter_or_head(n) and ".original_module." not in n}
    batch = critic_batch()

    def step() -> dict:
        return rank.train_step(batch.with_(old_values=rank.values(batch.inputs())))

    start = _state(rank)
    step()
    step()  # B != 0 after the first step, so the second one moves A too
    moved = _moved(start, _state(rank))
    assert moved == {n for n in start if _is_adapter_or_head(n) and ".original_module." not in n}

    path = str(tmp_path / "critic")
    rank.save_state(path)
    saved = _state(rank)
    expected = step()
    expected_weights = _state(rank)
    module = torch.load(os.path.join(path, "deepspeed", "mp_rank_00_model_states.pt"), weights_only=False)["module"]
    assert module.keys() == moved  # adapters and the head's trained copy: no frozen base weight

    rank.load_state(path)
    assert not _moved(saved, _state(rank))
    again = step()
    assert again == {**expected, "perf/critic_train_s": again["perf/critic_train_s"]}
    assert not _moved(expected_weights, _state(rank))


def test_lora_reward_model_saves_merged_and_scores_as_trained(lm_dir, tokenizer, tmp_path, teardown_rank):
    rank = RewardModelTrainer(0, 1, "127.0.0.1", _free_port(), lm_dir,
                              rm_config({**RM_CFG, "lora": LORA}), RM_CFG["seed"], 60)
    assert {n.split(".modules_to_save.")[0] for n in _trained_names(rank) if ".lora_" not in n} == {
        f"base_model.model.{head}" for head in ("score", "rv_head", "cd_head")}
    rows = separable_rows(16, seed=1)
    start = _state(rank)
    for first in (0, 8):
        rank.train_step(collate_pairs(tokenizer, rows[first:first + 8]))
    assert _moved(start, _state(rank)) == {n for n in start if _is_adapter_or_head(n) and
                                           ".original_module." not in n}

    path = tmp_path / "rm"
    rank.save_pretrained(str(path))
    held_out = separable_rows(6, seed=2)
    prompts, responses = [r["prompt"] for r in held_out] * 2, [r["chosen"] for r in held_out] + [
        r["rejected"] for r in held_out]
    rank.engine.eval()
    want = score_texts(rank.engine.module, tokenizer, prompts, responses)

    # As the reward workers load it (reward/scoring/components.py): a plain directory, every head restored, no peft.
    restored = DistilledRewardModel.from_pretrained(path).eval()
    assert not any("lora" in k or "modules_to_save" in k for k in restored.state_dict())
    for got, expected in zip(score_texts(restored, tokenizer, prompts, responses), want):
        assert got == pytest.approx(expected, abs=1e-5)
    plain = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
    ids = torch.tensor([tokenizer(prompts[0] + responses[0]).input_ids + [tokenizer.eos_token_id]])
    assert plain(input_ids=ids).logits.item() == pytest.approx(want[0]["quality"], abs=1e-5)
    # The adapter directory beside it carries the adapters and the trained heads for PEFT users.
    adapted = peft.PeftModel.from_pretrained(load_reward_model(lm_dir, seed=1), path / lora.ADAPTER_DIR).eval()
    for got, expected in zip(score_texts(adapted, tokenizer, prompts, responses), want):
        assert got == pytest.approx(expected, abs=1e-5)
