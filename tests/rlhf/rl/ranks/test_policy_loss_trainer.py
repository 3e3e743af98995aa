"""``algorithm.policy_loss`` on the DeepSpeed trainer ranks against a single-process update written from the papers'
sequence and token formulas (not the library's functions): GSPO on packed micro-batches, where a row holds several
sequences, and CISPO, whose clipped tokens keep their gradient. Two epochs, so the second sees ratios != 1."""
from __future__ import annotations

import pytest
import torch

ray = pytest.importorskip("ray")
transformers = pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

from rlhf.core.algorithms.aggregation import loss_token_weights  # noqa: E402
from rlhf.core.data.batch import TrainBatch  # noqa: E402
from rlhf.rl.ranks.policy import TrainerGroup  # noqa: E402
from tests.configs import run_config  # noqa: E402
from tests.rlhf.rl.ranks.test_trainer import CFG, assert_weights_equal, batch, model_dir, ray_cluster  # noqa: E402,F401

EPOCHS = 2


def _logprobs(model, batch: TrainBatch) -> torch.Tensor:
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    taken = torch.log_softmax(logits.float(), -1).gather(-1, batch.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return torch.nn.functional.pad(taken, (1, 0))


def _loss(name: str, logp, old, batch: TrainBatch) -> torch.Tensor:
    mask, adv = batch.response_mask, batch.advantages
    low, high = CFG["clip_low"], CFG["clip_high"]
    if name == "gspo":
        # GSPO's sequence objective: s_i = exp(mean over y_i of log-ratios), the PPO clip on s_i, one advantage per
        # sequence, averaged over sequences; the token form differs in value only off the response (0 there).
        s = (((logp - old) * mask).sum(1) / mask.sum(1)).exp()
        a = (adv * mask).sum(1) / mask.sum(1)
        return torch.maximum(-a * s, -a * s.clamp(1 - low, 1 + high)).mean()
    # CISPO: -sg(clip(r)) * A * logp per token, token-mean
    weight = (logp - old).exp().clamp(1 - low, 1 + high).detach()
    return (-weight * adv * logp * mask).sum() / mask.sum()


def single_process(model_dir: str, batch: TrainBatch, name: str) -> dict:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        old = _logprobs(model, batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=CFG["lr"], betas=(0.9, 0.999), eps=CFG["adam_eps"],
                                  weight_decay=CFG["weight_decay"])
    losses = []
    for _ in range(EPOCHS):
        loss = _loss(name, _logprobs(model, batch), old, batch)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CFG["max_grad_norm"])
        optimizer.step()
        losses.append(loss.item())
    return {"loss": sum(losses) / len(losses), "weights": {k: v.detach().clone() for k, v in model.state_dict().items()}}


@pytest.mark.parametrize("name, aggregation", [("gspo", "seq-mean"), ("cispo", "token-mean")])
def test_policy_loss_on_the_ranks_matches_the_papers_formula(ray_cluster, model_dir, batch, name, aggregation):
    """2 ZeRO-2 ranks x 4 rows in one packed micro-batch each (10 | 8 | 4+3 and 11 | 6+5 | 2 tokens)."""
    batch = batch.with_(loss_weights=loss_token_weights(batch.response_mask, aggregation, 8))
    want = single_process(model_dir, batch, name)
    cfg = {**CFG, "zero_stage": 2, "micro_batch_size": 4, "epochs": EPOCHS, "policy_loss": name,
           "loss_aggregation": aggregation}
    group = TrainerGroup(model_dir, run_config(cfg), num_ranks=2, timeout_s=120)
    try:
        metrics, weights = group.train_step(batch), group.full_state_dict()
    finally:
        group.shutdown()
    assert metrics["losses/policy_loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert_weights_equal(weights, want["weights"])


def test_sequence_level_masked_importance_weights_on_the_ranks(ray_cluster, model_dir, batch):
    """algorithm.tis_cap 2 with is_level geometric and is_mode mask, 2 ZeRO-2 ranks, packed micro-batches: each
    row's weight is the geometric mean of its trainer/sampler ratios, 0 outside [is_floor, tis_cap]."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    mask = batch.response_mask
    with torch.no_grad():
        old = _logprobs(model, batch)
    # The sampler's log-probs are the trainer's shifted by one amount per row and +-0.3 from token to token, so
    # each row's geometric ratio is exp(-mean shift): rows outside [0.5, 2] are masked whole.
    shift = torch.rand(mask.shape[0], 1, generator=torch.Generator().manual_seed(3)) * 2 - 1
    shift = shift + 0.3 * (torch.arange(mask.shape[1]) % 2 * 2 - 1)
    batch = batch.with_(rollout_logprobs=(old + shift) * mask)
    ratio = ((-shift * mask).sum(1) / mask.sum(1)).exp()
    weight = torch.where((ratio >= 0.5) & (ratio <= 2.0), ratio, 0.0)
    assert 0 < int((weight == 0).sum()) < mask.shape[0]  # both kinds of rows
    token_kept = ((-shift).exp() >= 0.5) & ((-shift).exp() <= 2.0)
    assert ((token_kept != (weight > 0).unsqueeze(1)) & mask.bool()).any()  # per token it would differ
    # One update: the PPO ratio is 1, so the loss is -A * w per token, weighted by the batch's loss weights.
    logp = _logprobs(model, batch)
    loss = (-batch.advantages * (logp - logp.detach()).exp() * weight.unsqueeze(1) * batch.loss_weights).sum()
    optimizer = torch.optim.AdamW(model.parameters(), lr=CFG["lr"], betas=(0.9, 0.999), eps=CFG["adam_eps"],
                                  weight_decay=CFG["weight_decay"])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CFG["max_grad_norm"])
    optimizer.step()
    cfg = {**CFG, "zero_stage": 2, "micro_batch_size": 4, "tis_cap": 2.0, "is_level": "geometric", "is_mode": "mask",
           "is_floor": 0.5}
    group = TrainerGroup(model_dir, run_config(cfg), num_ranks=2, timeout_s=120)
    try:
        metrics, weights = group.train_step(batch), group.full_state_dict()
    finally:
        group.shutdown()
    masked_tokens = (mask * (weight == 0).float().unsqueeze(1)).sum() / mask.sum()
    assert metrics["losses/tis_capped"] == pytest.approx(masked_tokens.item(), abs=1e-6)
    assert metrics["losses/policy_loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert_weights_equal(weights, {k: v.detach().clone() for k, v in model.state_dict().items()})
