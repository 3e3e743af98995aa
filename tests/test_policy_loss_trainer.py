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
from rlhf.rl.ranks.policy import TrainerGroup  # noqa: E402
from tests.configs import run_config  # noqa: E402
from tests.test_trainer import CFG, assert_weights_equal, batch, model_dir, ray_cluster  # noqa: E402,F401

EPOCHS = 2


def _logprobs(model, batch: dict) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    taken = torch.log_softmax(logits.float(), -1).gather(-1, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
    return torch.nn.functional.pad(taken, (1, 0))


def _loss(name: str, logp, old, batch: dict) -> torch.Tensor:
    mask, adv = batch["response_mask"], batch["advantages"]
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


def single_process(model_dir: str, batch: dict, name: str) -> dict:
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
    batch = {**batch, "loss_weights": loss_token_weights(batch["response_mask"], aggregation, 8)}
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
