"""The distilled reward model, its losses and its evaluation figures, against hand-computed numbers (CPU, tiny)."""
from __future__ import annotations

import math
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from reward.model.losses import (bradley_terry_loss, hard_to_probs, loss_counts, pointwise_regression_loss,  # noqa: E402
                           reward_model_loss, soft_label_kl)
from reward.model.distilled import DistilledRewardModel, RewardOutput, encode_pair, pad_right, score_texts  # noqa: E402
from reward.model.evaluate import average_ranks, calibration, evaluate_reward_model, spearman  # noqa: E402
from rlhf.core.models.build import build_tokenizer  # noqa: E402

NAN = float("nan")
LN3 = math.log(3.0)

# ------------------------------------------------------------------------------------------------------- losses


def test_bradley_terry_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    # -log sigmoid(1) = log(1 + e^-1), -log sigmoid(-1) = log(1 + e)
    plain = (math.log1p(math.exp(-1)) + math.log1p(math.e)) / 2
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(plain, rel=1e-6)
    # A margin of 0.5 on the first pair asks for a gap of 1.5; a NaN margin counts as none.
    with_margin = (math.log1p(math.exp(-0.5)) + math.log1p(math.e)) / 2
    assert bradley_terry_loss(chosen, rejected, torch.tensor([0.5, NAN])).item() == pytest.approx(with_margin, rel=1e-6)
    # denom: the share of a part of a larger batch (here 4 pairs in all).
    assert bradley_terry_loss(chosen, rejected, denom=4).item() == pytest.approx(plain / 2, rel=1e-6)


def test_pointwise_regression_masks_missing_targets():
    pred = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    target = torch.tensor([1.5, NAN, 5.0])
    loss = pointwise_regression_loss(pred, target)
    assert loss.item() == pytest.approx((0.25 + 4.0) / 2)
    loss.backward()
    # d/dpred of mean((pred - t)^2) over the 2 rows with targets; the NaN row gets exactly 0, not NaN.
    torch.testing.assert_close(pred.grad, torch.tensor([-0.5, 0.0, -2.0]))
    assert pointwise_regression_loss(pred, target, mask=torch.tensor([1, 1, 0])).item() == pytest.approx(0.25)
    assert pointwise_regression_loss(pred, target, denom=4).item() == pytest.approx(4.25 / 4)
    empty = pointwise_regression_loss(pred, torch.full((3,), NAN))
    assert empty.item() == 0.0 and empty.requires_grad


def test_soft_label_kl_and_hard_labels():
    logits = torch.zeros(3, 10, requires_grad=True)  # uniform: q = 0.1 everywhere
    half = torch.zeros(10)
    half[[2, 3]] = 0.5
    target = torch.stack([hard_to_probs(torch.tensor([4.0]))[0], torch.full((10,), NAN), half])
    # KL(one-hot || uniform) = log 10; KL(half-half || uniform) = log 5; the NaN row is left out of the mean.
    loss = soft_label_kl(logits, target)
    assert loss.item() == pytest.approx((math.log(10) + math.log(5)) / 2, rel=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[1].abs().sum() == 0
    assert soft_label_kl(logits, target, mask=torch.tensor([0, 1, 1])).item() == pytest.approx(math.log(5), rel=1e-6)
    assert soft_label_kl(torch.zeros(1, 10), torch.full((1, 10), 0.1)).item() == pytest.approx(0.0, abs=1e-6)

    probs = hard_to_probs(torch.tensor([3.0, NAN, 9.4, -1.0]))
    assert probs[0].argmax() == 3 and probs[0].sum() == 1
    assert torch.isnan(probs[1]).all()
    assert probs[2].argmax() == 9 and probs[3].argmax() == 0  # rounded, clipped to 0..9


def _output(quality, rv_logits=None, cd_logits=None) -> RewardOutput:
    quality = torch.tensor(quality)
    rv_logits = torch.zeros(len(quality), 10) if rv_logits is None else rv_logits
    cd_logits = torch.zeros(len(quality), 10) if cd_logits is None else cd_logits
    scores = torch.arange(10.0)
    return RewardOutput(quality=quality, rv_logits=rv_logits, cd_logits=cd_logits,
                        rv=(rv_logits.softmax(-1) * scores).sum(-1), cd=(cd_logits.softmax(-1) * scores).sum(-1))


@pytest.fixture
def pair_batch():
    """4 pairs: one with a wrong ranking, one tie; some targets absent."""
    soft = torch.full((4, 10), NAN)
    soft[0] = 0.1
    return {
        "margin": torch.tensor([0.0, 1.0, NAN, 0.0]),
        "chosen_quality": torch.tensor([1.0, 2.0, NAN, 0.0]),
        "rejected_quality": torch.tensor([0.0, NAN, NAN, 0.0]),
        "chosen_rv": torch.tensor([3.0, NAN, 5.0, 0.0]),
        "rejected_rv": torch.tensor([NAN, NAN, NAN, 9.0]),
        "chosen_cd": torch.tensor([1.0, 1.0, 1.0, 1.0]),
        "rejected_cd": torch.full((4,), NAN),
        "chosen_rv_probs": soft,
    }


def test_reward_model_loss_combines_the_terms(pair_batch):
    chosen, rejected = _output([1.0, 0.5, 0.0, 2.0]), _output([0.0, 1.0, 0.0, 1.0])
    weights = {"bt": 1.0, "quality": 0.5, "rv": 0.1, "cd": 0.2, "kl": 0.3}
    loss, metrics = reward_model_loss(chosen, rejected, pair_batch, weights)

    counts = loss_counts(pair_batch)
    # quality: 3 chosen + 2 rejected targets; rv: 3 + 1; cd: 4 + 0; rv KL: chosen row 0 (soft), rows 2, 3 (hard),
    # rejected row 3 (hard); cd KL: the 4 chosen hard scores.
    assert counts == {"pairs": 4.0, "quality": 5.0, "rv": 4.0, "cd": 4.0, "rv_kl": 4.0, "cd_kl": 4.0}
    bt = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.5)) + math.log(2.0) + math.log1p(math.exp(-1.0))) / 4
    quality = (0.0 + (0.5 - 2.0) ** 2 + (2.0 - 0.0) ** 2 + 0.0 + (1.0 - 0.0) ** 2) / 5
    # Uniform logits: expected score 4.5, KL to a one-hot log 10, to the uniform soft label 0.
    rv = ((4.5 - 3.0) ** 2 + (4.5 - 5.0) ** 2 + (4.5 - 0.0) ** 2 + (4.5 - 9.0) ** 2) / 4
    cd = (4.5 - 1.0) ** 2
    rv_kl = 3 * math.log(10) / 4
    cd_kl = math.log(10)
    assert metrics["rm/bt_loss"] == pytest.approx(bt, rel=1e-6)
    assert metrics["rm/quality_mse"] == pytest.approx(quality, rel=1e-6)
    assert metrics["rm/rv_mse"] == pytest.approx(rv, rel=1e-6) and metrics["rm/cd_mse"] == pytest.approx(cd, rel=1e-6)
    want = bt + 0.5 * quality + 0.1 * rv + 0.2 * cd + 0.3 * (rv_kl + cd_kl)
    assert metrics["rm/loss"] == pytest.approx(want, rel=1e-6) and loss.item() == pytest.approx(want, rel=1e-6)
    assert metrics["rm/accuracy"] == 0.5  # pair 1 is wrong, the tie in pair 2 is no win
    assert metrics["rm/reward_gap"] == pytest.approx((1.0 - 0.5 + 0.0 + 1.0) / 4)
    assert metrics["rm/rv_kl"] == pytest.approx(rv_kl, rel=1e-6)
    with pytest.raises(ValueError, match="unknown reward-model loss weights"):
        reward_model_loss(chosen, rejected, pair_batch, {"bradley": 1.0})


def test_parts_with_whole_batch_counts_sum_to_the_whole(pair_batch):
    """The trainer's split: each part divides by the whole batch's counts, so losses and metrics add up."""
    g = torch.Generator().manual_seed(0)
    chosen = _output(torch.randn(4, generator=g).tolist(), torch.randn(4, 10, generator=g),
                     torch.randn(4, 10, generator=g))
    rejected = _output(torch.randn(4, generator=g).tolist(), torch.randn(4, 10, generator=g),
                       torch.randn(4, 10, generator=g))
    whole, whole_metrics = reward_model_loss(chosen, rejected, pair_batch)
    counts = loss_counts(pair_batch)
    parts, summed = [], {}
    for rows in (slice(0, 1), slice(1, 4)):
        part = lambda out: RewardOutput(**{k: v[rows] for k, v in out.items()})  # noqa: E731
        loss, metrics = reward_model_loss(part(chosen), part(rejected), {k: v[rows] for k, v in pair_batch.items()},
                                          counts=counts)
        parts.append(loss)
        for k, v in metrics.items():
            summed[k] = summed.get(k, 0.0) + v
    assert sum(parts).item() == pytest.approx(whole.item(), rel=1e-6)
    for k, v in whole_metrics.items():
        assert summed[k] == pytest.approx(v, rel=1e-6, abs=1e-7), k


# ------------------------------------------------------------------------------------------------------- model


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("char")


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory, tokenizer):
    """A tiny causal LM (the 'warm-up student') with its tokenizer."""
    config = transformers.Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                      max_position_embeddings=64, tie_word_embeddings=True,
                                      eos_token_id=tokenizer.eos_token_id)  # no pad id: from_causal_lm adds it
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lm")
    transformers.Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def rm(lm_dir, tokenizer):
    model = DistilledRewardModel.from_causal_lm(lm_dir, pad_token_id=tokenizer.pad_token_id, seed=3)
    with torch.no_grad():  # heads start small; make them matter so comparisons below are not between ~zeros
        for head in (model.score, model.rv_head, model.cd_head):
            head.weight.mul_(20)
    return model.eval()


TEXTS = [("1+2=", "#3"), ("3+4-1=", "3+4=7;7-1=6;#6"), ("9-9+5=", "#5")]


def _batch(tokenizer):
    return pad_right([encode_pair(tokenizer, p, r) for p, r in TEXTS], tokenizer.pad_token_id)


def test_from_causal_lm(lm_dir, tokenizer, rm):
    lm = transformers.AutoModelForCausalLM.from_pretrained(lm_dir)
    torch.testing.assert_close(rm.model.state_dict(), lm.model.state_dict(), rtol=0, atol=0)
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == tokenizer.pad_token_id
    # Heads are fresh and small, and the same for the same seed whether built from a directory or a model.
    fresh = DistilledRewardModel.from_causal_lm(lm, seed=3)
    again = DistilledRewardModel.from_causal_lm(lm_dir, seed=3)
    assert fresh.rv_head.weight.abs().max() < 0.2 and fresh.rv_head.bias.abs().max() == 0
    torch.testing.assert_close(fresh.state_dict(), again.state_dict(), rtol=0, atol=0)
    assert not torch.equal(fresh.score.weight, DistilledRewardModel.from_causal_lm(lm, seed=4).score.weight)


def test_forward_shapes_and_expected_scores(rm, tokenizer):
    input_ids, attention_mask = _batch(tokenizer)
    out = rm(input_ids=input_ids, attention_mask=attention_mask)
    assert out.quality.shape == (3,) and out.rv.shape == (3,) and out.cd.shape == (3,)
    assert out.rv_logits.shape == (3, 10) and out.cd_logits.shape == (3, 10)
    torch.testing.assert_close(out.rv, (out.rv_logits.softmax(-1) * torch.arange(10.0)).sum(-1))
    assert ((out.cd >= 0) & (out.cd <= 9)).all()


def test_last_token_pooling_ignores_right_padding(rm, tokenizer):
    input_ids, attention_mask = _batch(tokenizer)
    assert attention_mask.sum(1).unique().numel() == 3  # every row a different length
    padded = rm(input_ids=input_ids, attention_mask=attention_mask)
    for row, (prompt, response) in enumerate(TEXTS):
        ids = torch.tensor([encode_pair(tokenizer, prompt, response)])
        alone = rm(input_ids=ids, attention_mask=torch.ones_like(ids))
        for name in ("quality", "rv", "cd"):
            torch.testing.assert_close(getattr(padded, name)[row], getattr(alone, name)[0], rtol=1e-5, atol=1e-5)
    # The index comes from the mask: padding with a real token id changes nothing.
    repadded = input_ids.masked_fill(attention_mask == 0, tokenizer.eos_token_id)
    torch.testing.assert_close(rm(input_ids=repadded, attention_mask=attention_mask).quality, padded.quality)


def test_score_texts_matches_forward(rm, tokenizer):
    input_ids, attention_mask = _batch(tokenizer)
    want = rm(input_ids=input_ids, attention_mask=attention_mask)
    for batch_size in (1, 2):
        got = score_texts(rm, tokenizer, [p for p, _ in TEXTS], [r for _, r in TEXTS], batch_size=batch_size)
        assert [set(g) for g in got] == [{"quality", "rv", "cd"}] * 3
        assert [g["quality"] for g in got] == pytest.approx(want.quality.tolist(), abs=1e-5)
        assert [g["rv"] for g in got] == pytest.approx(want.rv.tolist(), abs=1e-5)


def test_save_and_load_round_trip(rm, tokenizer, tmp_path):
    rm.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    files = os.listdir(tmp_path)
    assert any(f.endswith(".safetensors") for f in files) and not any(f.endswith((".bin", ".pt")) for f in files)
    assert transformers.AutoConfig.from_pretrained(tmp_path).architectures == ["Qwen2ForSequenceClassification"]

    restored = DistilledRewardModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(restored.state_dict(), rm.state_dict(), rtol=0, atol=0)

    input_ids, attention_mask = _batch(tokenizer)
    want = rm(input_ids=input_ids, attention_mask=attention_mask).quality
    plain = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(plain) is transformers.Qwen2ForSequenceClassification
    # Plain HF finds the last token from pad_token_id (saved in the config); the quality is the same score.
    got = plain(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------- rm_eval


def test_rank_correlation_by_hand():
    assert average_ranks([5, 7, 7, 9]).tolist() == [1, 2.5, 2.5, 4]
    assert average_ranks([3, 1, 3, 3]).tolist() == [3, 1, 3, 3]
    # No ties: 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6 * 2 / 60
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    # Ties: Pearson on ranks [1, 2.5, 2.5, 4] vs [1, 2, 3, 4] = 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [10, 20, 30, 40]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None and spearman([1], [1]) is None


def test_calibration_by_hand():
    quality = [0.0, 0.0, LN3, -LN3]  # sigmoid: 0.5, 0.5, 0.75, 0.25
    correct = [1, 0, 1, 0]
    result = calibration(quality, correct, bins=2)
    low, high = result["bins"]
    assert (low["count"], low["confidence"], low["fraction_correct"]) == (1, pytest.approx(0.25), 0.0)
    assert (high["count"], high["confidence"], high["fraction_correct"]) == (3, pytest.approx(7 / 12),
                                                                           pytest.approx(2 / 3))
    assert result["ece"] == pytest.approx(0.25 * 0.25 + 0.75 * (2 / 3 - 7 / 12))
    # Sorted by quality: (-ln3: wrong, 0: right) then (0: wrong, ln3: right).
    assert [b["fraction_correct"] for b in result["by_quantile"]] == [0.5, 0.5]
    assert result["by_quantile"][0]["quality_min"] == pytest.approx(-LN3)


def test_evaluate_reward_model_on_hand_made_rows():
    scores = {"a": {"quality": 2.0, "rv": 1.0, "cd": 5.0}, "b": {"quality": 1.0, "rv": 2.0, "cd": 5.0},
              "c": {"quality": 1.0, "rv": 3.0, "cd": 4.0}, "d": {"quality": 0.0, "rv": 4.0, "cd": 3.0}}

    def score_fn(prompts, responses):
        return [scores[r] for r in responses]

    pairwise = [
        {"prompt": "p", "chosen": "a", "rejected": "b", "cd": 2, "difficulty": 1},        # right
        {"prompt": "p", "chosen": "b", "rejected": "c", "chosen_cd": 2, "difficulty": 3},  # tie: a miss
        {"prompt": "p", "chosen": "c", "rejected": "a", "cd": 7, "difficulty": 3},        # wrong
        {"prompt": "p", "chosen": "a", "rejected": "d"},                                  # right, no CD
    ]
    pointwise = [
        {"prompt": "p", "response": "a", "quality": 9, "rv": 0, "cd": 5, "correct": True},
        {"prompt": "p", "response": "b", "quality": 5, "rv": 2, "cd": None, "correct": False},
        {"prompt": "p", "response": "c", "quality": 5, "rv": 1, "cd": 4, "correct": None},
        {"prompt": "p", "response": "d", "quality": 1, "rv": 3, "cd": 3, "correct": False},
    ]
    result = evaluate_reward_model(score_fn, pairwise, pointwise, calibration_bins=2)
    assert result["pairwise_accuracy"] == 0.5 and result["pairwise_count"] == 4
    assert result["by_cd"] == {2: {"accuracy": 0.5, "count": 2}, 7: {"accuracy": 0.0, "count": 1}}
    assert result["by_difficulty"] == {1: {"accuracy": 1.0, "count": 1}, 3: {"accuracy": 0.0, "count": 2}}
    # quality: predictions [2, 1, 1, 0] vs teacher [9, 5, 5, 1]: the same order, ties in the same place.
    assert result["spearman"] == pytest.approx(1.0)
    assert result["rv_spearman"] == pytest.approx(spearman([1, 2, 3, 4], [0, 2, 1, 3]))
    assert result["cd_spearman"] == pytest.approx(1.0)  # rows a, c, d (b has no teacher CD)
    assert sum(b["count"] for b in result["calibration"]["bins"]) == 3  # c has no correctness label

    # A plain float scorer (e.g. a remote reward server) gives the quality figures only.
    plain = evaluate_reward_model(lambda p, r: [scores[x]["quality"] for x in r], pairwise, pointwise)
    assert plain["pairwise_accuracy"] == 0.5 and plain["rv_spearman"] is None
    empty = evaluate_reward_model(score_fn, [], [])
    assert empty["pairwise_accuracy"] is None and empty["spearman"] is None and empty["calibration"] is None


def test_evaluate_with_model_and_tokenizer(rm, tokenizer):
    rows = [{"prompt": p, "response": r, "quality": float(i)} for i, (p, r) in enumerate(TEXTS)]
    result = evaluate_reward_model(rm, [{"prompt": "1+2=", "chosen": "#3", "rejected": "#4"}], rows, tokenizer)
    scored = score_texts(rm, tokenizer, [p for p, _ in TEXTS], [r for _, r in TEXTS])
    assert result["spearman"] == pytest.approx(spearman([s["quality"] for s in scored], [0, 1, 2]))
    assert result["pairwise_accuracy"] in (0.0, 1.0)


def test_correlations_only_for_the_heads_that_were_trained(rm, tokenizer, tmp_path):
    from rlhf.stages.reward_model import evaluate_rm_dir

    rows = [{"prompt": p, "response": r, "quality": q, "rv": rv, "cd": cd}
            for (p, r), q, rv, cd in zip(TEXTS, [1, 5, 9], [0, 4, 2], [1, 2, 3])]
    for heads, reported in ((None, {"rv", "cd"}), (["quality", "cd"], {"cd"}), (["quality"], set())):
        path = tmp_path / f"rm_{len(heads or [])}"
        if heads is not None:
            rm.config.trained_heads = heads
        rm.save_pretrained(path)
        tokenizer.save_pretrained(path)
        figures = evaluate_rm_dir(str(path), [], rows)
        assert figures["spearman"] is not None
        assert {name for name in ("rv", "cd") if figures[f"{name}_spearman"] is not None} == reported
    del rm.config.trained_heads


def test_a_llama_backbone_gets_the_same_heads_and_loads_as_a_stock_classifier(tmp_path):
    """SmolLM2 and Llama students are Llama: the RM builds on them, saves, and loads back with every head (and as a
    plain LlamaForSequenceClassification); a backbone of another kind is refused in one line."""
    from transformers import AutoModelForSequenceClassification, GPT2Config, LlamaConfig, LlamaForCausalLM

    from reward.model.distilled import DistilledLlamaRewardModel

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, pad_token_id=0))
    lm.save_pretrained(tmp_path / "lm")
    rm = DistilledRewardModel.from_causal_lm(str(tmp_path / "lm"), seed=1).eval()
    assert isinstance(rm, DistilledLlamaRewardModel)
    ids, mask = pad_right([[5, 6, 7], [8, 9]], 0)
    with torch.no_grad():
        out = rm(ids, attention_mask=mask)
    rm.save_pretrained(tmp_path / "rm")
    again = DistilledRewardModel.from_pretrained(str(tmp_path / "rm")).eval()
    stock = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm"), use_safetensors=True).eval()
    with torch.no_grad():
        reloaded, plain = again(ids, attention_mask=mask), stock(ids, attention_mask=mask).logits.squeeze(-1)
    assert type(stock).__name__ == "LlamaForSequenceClassification"
    torch.testing.assert_close(reloaded.rv, out.rv)
    torch.testing.assert_close(plain, out.quality)
    with pytest.raises(ValueError, match="needs a qwen2 or llama backbone, got model_type 'gpt2'"):
        DistilledRewardModel.from_causal_lm(transformers.GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2)))
