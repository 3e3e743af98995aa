"""Training the distilled reward model on 2 DeepSpeed ZeRO-2 ranks (Ray actors, gloo on CPU), tiny Qwen2.

One group does it all, to pay the start-up once: its first update is checked against a plain single-process update
of the same whole-batch loss, then it trains on separable pairs (chosen responses contain a "y", rejected ones
never do) until it ranks every pair right, and its checkpoint loads back.
"""
from __future__ import annotations

import os
import random

import pytest
import torch

ray = pytest.importorskip("ray")
transformers = pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

from reward.model.losses import reward_model_loss  # noqa: E402
from reward.model.distilled import DistilledRewardModel, score_texts  # noqa: E402
from reward.model.ranks import (RewardModelTrainerGroup, collate_pairs, load_reward_model,  # noqa: E402
                               train_reward_model)
from rlhf.core.models.build import build_tokenizer  # noqa: E402
from rlhf.core.config.run_config import RewardModelConfig  # noqa: E402

CFG = {
    "zero_stage": 2,
    "micro_batch_size": 2,  # 4 pairs per rank: two micro-batches, so accumulation is exercised
    "lr": 1e-2,
    "weight_decay": 0.1,
    # As in test_trainer.py: a larger eps keeps Adam's first step a smooth function of the gradient, so the weights
    # check the gradient (with 1e-8, gradients at rounding level would get arbitrary +-lr steps).
    "adam_eps": 1e-4,
    "max_grad_norm": 0.05,  # below the batch's gradient norm, so clipping is exercised
    "loss_weights": {"quality": 0.5, "rv": 0.05, "cd": 0.05, "kl": 0.5},
    "seed": 0,
    "threads": 1,
    "timeout_s": 120,
}


def rm_config(flat: dict) -> RewardModelConfig:
    """The reward_model section from CFG's flat settings (loss weights as the section's *_weight fields)."""
    engine = {k: v for k, v in flat.items() if k in RewardModelConfig.model_fields}
    weights = {f"{name}_weight": w for name, w in flat["loss_weights"].items()}
    return RewardModelConfig(**engine, **weights)


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("char")


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory, tokenizer):
    """The 'warm-up student': a tiny causal LM saved with its tokenizer and a generation config."""
    config = transformers.Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                      max_position_embeddings=64, tie_word_embeddings=True,
                                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("student"))
    transformers.Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    assert "generation_config.json" in os.listdir(path)
    return path


def separable_rows(n: int, seed: int) -> list[dict]:
    """Pairs whose chosen response contains a "y" somewhere and whose rejected one never does; teacher targets
    on some rows only (NaN / None elsewhere), soft RV labels on every other row."""
    rng = random.Random(seed)
    digits = lambda k: "".join(rng.choice("0123456789") for _ in range(k))  # noqa: E731
    rows = []
    for i in range(n):
        chosen = list(digits(rng.randint(1, 4)))
        chosen.insert(rng.randint(0, len(chosen)), "y")
        rows.append({
            "prompt": f"{digits(1)}+{digits(1)}=", "chosen": "".join(chosen), "rejected": digits(rng.randint(1, 5)),
            "margin": 0.5, "chosen_quality": 1.0, "rejected_quality": 0.0 if i % 3 else None,
            "chosen_rv": rng.randint(0, 9), "rejected_rv": None if i % 2 else rng.randint(0, 9),
            "chosen_cd": 3, "rejected_cd": 3,
            "chosen_rv_probs": [0.1] * 10 if i % 2 else None,
        })
    return rows


def single_process_update(lm_dir: str, batch: dict) -> dict:
    """The whole batch in one process: loss, pre-clip gradient norm, and the weights after one clipped AdamW step."""
    model = load_reward_model(lm_dir, seed=CFG["seed"])
    out_chosen = model(batch["chosen_input_ids"], batch["chosen_attention_mask"])
    out_rejected = model(batch["rejected_input_ids"], batch["rejected_attention_mask"])
    loss, metrics = reward_model_loss(out_chosen, out_rejected, batch, CFG["loss_weights"])
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CFG["max_grad_norm"])
    assert grad_norm > CFG["max_grad_norm"]
    torch.optim.AdamW(model.parameters(), lr=CFG["lr"], betas=(0.9, 0.999), eps=CFG["adam_eps"],
                      weight_decay=CFG["weight_decay"]).step()
    return {"metrics": metrics, "grad_norm": grad_norm.item(),
            "weights": {k: v.detach().clone() for k, v in model.state_dict().items()}}


@pytest.fixture(scope="module")
def batches(tokenizer):
    rows = separable_rows(16, seed=1)
    return [collate_pairs(tokenizer, rows[:8]), collate_pairs(tokenizer, rows[8:])]


@pytest.fixture(scope="module")
def expected(lm_dir, batches):
    return single_process_update(lm_dir, batches[0])


def assert_matches_single_process(metrics: dict, weights: dict, expected: dict):
    for name, want in expected["metrics"].items():
        assert metrics[name] == pytest.approx(want, rel=1e-5, abs=1e-7), name
    assert metrics["rm/grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-5)
    assert weights.keys() == expected["weights"].keys()
    for name, want in expected["weights"].items():
        torch.testing.assert_close(weights[name], want, rtol=1e-5, atol=1e-7, msg=name)


def test_two_ranks_match_one_process_then_learn_and_save(ray_cluster, lm_dir, tokenizer, batches, expected,
                                                         tmp_path):
    group = RewardModelTrainerGroup(lm_dir, rm_config(CFG), num_ranks=2, timeout_s=120)
    try:
        first = group.train_step(batches[0])
        weights = group.full_state_dict()
        history = [first] + [group.train_step(batches[step % 2]) for step in range(1, 16)]
        with pytest.raises(ValueError, match="does not split evenly across 2 trainer ranks"):
            group.train_step({k: v[:3] for k, v in batches[0].items()})
        path = str(tmp_path / "rm")
        group.save_pretrained(path)
        trained = group.full_state_dict()
    finally:
        group.shutdown()

    # 1. The 2-rank update is the whole-batch update: metrics, pre-clip gradient norm, weights.
    assert_matches_single_process(first, weights, expected)

    # 2. It learns the separable pairs: every pair ranked right (accuracy is measured before each update), the
    # pairwise loss well down, and the total too (its RV part chases random targets, so it falls less).
    assert [m["rm/accuracy"] for m in history[-3:]] == [1.0, 1.0, 1.0]
    assert max(m["rm/bt_loss"] for m in history[-2:]) < 0.6 * history[0]["rm/bt_loss"]
    assert max(m["rm/loss"] for m in history[-2:]) < 0.6 * history[0]["rm/loss"]

    # 3. The checkpoint: all heads restored, the tokenizer beside it, loadable by plain HF with the same quality.
    files = os.listdir(path)
    assert "tokenizer.json" in files and "generation_config.json" not in files
    restored = DistilledRewardModel.from_pretrained(path).eval()
    for name, want in trained.items():
        torch.testing.assert_close(restored.state_dict()[name], want, rtol=0, atol=0, msg=name)
    held_out = separable_rows(8, seed=2)
    loaded_tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    scores = score_texts(restored, loaded_tokenizer, [r["prompt"] for r in held_out] * 2,
                         [r["chosen"] for r in held_out] + [r["rejected"] for r in held_out])
    chosen, rejected = scores[:8], scores[8:]
    assert sum(c["quality"] > r["quality"] for c, r in zip(chosen, rejected)) >= 7
    plain = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
    ids = torch.tensor([tokenizer(held_out[0]["prompt"] + held_out[0]["chosen"]).input_ids + [tokenizer.eos_token_id]])
    assert plain(input_ids=ids).logits.item() == pytest.approx(chosen[0]["quality"], abs=1e-5)


def test_train_reward_model_zero3_one_pair_per_micro_batch(ray_cluster, lm_dir, batches, expected, tmp_path):
    """The convenience loop on ZeRO-3 (parameters partitioned, gathered in each forward) with 4 micro-batches per
    rank: one step over one batch is the same update, and the checkpoint it writes (gathered from the partitions)
    holds exactly that update."""
    cfg = {**CFG, "zero_stage": 3, "micro_batch_size": 1, "zero_options": {"stage3_param_persistence_threshold": 0}}
    logged = []
    history = train_reward_model([batches[0]], lm_dir, rm_config(cfg), num_ranks=2, out_dir=str(tmp_path / "rm"),
                                 log=logged.append, epochs=1, timeout_s=120)
    assert logged == history and len(history) == 1 and history[0]["rm/step"] == 1.0
    restored = DistilledRewardModel.from_pretrained(tmp_path / "rm")
    assert_matches_single_process(history[0], restored.state_dict(), expected)
