"""The DeepSpeed trainer group against a plain single-process PyTorch update of the same whole-batch loss.

Two Ray actors run ZeRO-2 and ZeRO-3 over gloo on CPU with a tiny random Qwen2. Adam's first step barely depends
on the gradient's scale (m / sqrt(v) ~ sign(g)), so weights alone would not catch a wrongly scaled loss: the
pre-clip gradient norm is compared too.
"""
from __future__ import annotations

import os

import pytest
import torch

ray = pytest.importorskip("ray")
transformers = pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

from rlhf.core.algorithms.aggregation import loss_token_weights  # noqa: E402
from rlhf.core.algorithms.policy_losses import clipped_policy_loss  # noqa: E402
from rlhf.core.algorithms.tokens import masked_mean, token_logprobs  # noqa: E402
from rlhf.core.data.batch import TrainBatch  # noqa: E402
from rlhf.rl.ranks.policy import ASYNC_TRAINER_NICENESS, TrainerGroup  # noqa: E402
from tests.configs import run_config  # noqa: E402

CFG = {
    "lr": 1e-2,
    "weight_decay": 0.1,
    # With Adam's usual eps (1e-8) the first step is ~lr * sign(g): a gradient that is ~0 up to float rounding
    # gets an arbitrary +-lr update, so no split of the batch, even in one process, reproduces the weights to
    # 1e-5. A larger eps keeps the update a smooth function of the gradient, so weights check the gradient too.
    "adam_eps": 1e-4,
    "max_grad_norm": 0.05,  # below the batch's gradient norm, so clipping is exercised
    "micro_batch_size": 4,
    "clip_low": 0.2,
    "clip_high": 0.28,
    "kl_coef": 0.0,
    "seed": 0,
    "threads": 1,
    "timeout_s": 120,
    # Tiny tensors would otherwise stay unpartitioned under ZeRO-3 (default threshold 1e5 elements).
    "zero_options": {"stage3_param_persistence_threshold": 0},
}


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    config = transformers.Qwen2Config(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                                      tie_word_embeddings=True)
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("policy"))
    transformers.Qwen2ForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def batch():
    """8 right-padded rows of different prompt and response lengths, 4 per rank. In micro-batches of 4 both ranks'
    rows pack into 3 (rlhf/core/data/packing.py: 10 | 8 | 4+3 and 11 | 6+5 | 2 tokens), so those cases check the packed
    forward against the padded one of the single-process reference; in micro-batches of 1 or 2 nothing packs."""
    g = torch.Generator().manual_seed(1)
    lengths = [(3, 5), (2, 2), (2, 1), (4, 6), (4, 2), (5, 6), (1, 1), (2, 3)]  # (prompt, response) tokens
    width = max(p + r for p, r in lengths) + 1
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    response_mask = torch.zeros(len(lengths), width)
    for row, (p, r) in enumerate(lengths):
        input_ids[row, :p + r] = torch.randint(1, 32, (p + r,), generator=g)
        attention_mask[row, :p + r] = 1
        response_mask[row, p:p + r] = 1
    advantages = torch.randn(len(lengths), 1, generator=g).expand(-1, width) * response_mask
    return TrainBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_mask=response_mask,
        rollout_logprobs=(-torch.rand(len(lengths), width, generator=g)) * response_mask,
        advantages=advantages.contiguous(),
        loss_weights=loss_token_weights(response_mask, "token-mean", 8),
    )


@pytest.fixture(scope="module")
def expected(model_dir, batch):
    """``expected(entropy_coef)``: the single-process reference for that entropy bonus, computed once each."""
    cache: dict[float, dict] = {}

    def get(entropy_coef: float = 0.0) -> dict:
        if entropy_coef not in cache:
            cache[entropy_coef] = single_process_update(model_dir, batch, entropy_coef)
        return cache[entropy_coef]

    return get


def single_process_update(model_dir: str, batch: TrainBatch, entropy_coef: float) -> dict:
    """The whole batch in one process: loss, pre-clip grad norm, and the weights after one clipped AdamW step.

    Loss per token: pg - entropy_coef * H, with H from torch.distributions (not the trainer's own function)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logp = token_logprobs(logits, batch.input_ids)
    pg, _ = clipped_policy_loss(logp, logp.detach(), batch.advantages, CFG["clip_low"],
                                CFG["clip_high"])
    mask = batch.response_mask
    # Token t is drawn from the distribution predicted at t-1: entropies shift right by one.
    entropy = torch.distributions.Categorical(logits=logits[:, :-1]).entropy()
    entropy = torch.nn.functional.pad(entropy, (1, 0))
    loss = ((pg - entropy_coef * entropy) * batch.loss_weights).sum()
    with torch.no_grad():
        mean_entropy = masked_mean(entropy, mask)
        mismatch = masked_mean((logp - batch.rollout_logprobs).abs(), mask)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CFG["max_grad_norm"])
    assert grad_norm > CFG["max_grad_norm"]
    torch.optim.AdamW(model.parameters(), lr=CFG["lr"], betas=(0.9, 0.999), eps=CFG["adam_eps"],
                      weight_decay=CFG["weight_decay"]).step()
    return {"loss": loss.item(), "grad_norm": grad_norm.item(), "entropy": mean_entropy.item(),
            "mismatch": mismatch.item(), "weights": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def assert_weights_equal(actual: dict, expected: dict):
    assert actual.keys() == expected.keys()
    for name, want in expected.items():
        got = actual[name]
        assert got.shape == want.shape and got.dtype == want.dtype, name
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("zero_stage, micro_batch_size, entropy_coef", [(3, 4, 0.0), (3, 1, 0.0), (2, 4, 0.0),
                                                                       (3, 4, 0.1)])
def test_matches_single_process_update(ray_cluster, model_dir, batch, expected, zero_stage, micro_batch_size,
                                       entropy_coef):
    """2 ranks x 4 rows, in one packed micro-batch per rank or in several plain ones; the last case adds the
    entropy bonus."""
    cfg = {**CFG, "zero_stage": zero_stage, "micro_batch_size": micro_batch_size, "entropy_coef": entropy_coef}
    group = TrainerGroup(model_dir, run_config(cfg), num_ranks=2, timeout_s=120)
    try:
        metrics = group.train_step(batch)
        weights = group.full_state_dict()
    finally:
        group.shutdown()
    want = expected(entropy_coef)
    if entropy_coef:
        # Token-mean weights: the bonus moves the loss by -coef * mean entropy (~0.1 * ln 32 on a random model),
        # far beyond the tolerance below, so a trainer that dropped the bonus would fail.
        assert want["loss"] == pytest.approx(expected(0.0)["loss"] - entropy_coef * want["entropy"], rel=1e-6)

    assert metrics["losses/policy_loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert metrics["losses/grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
    assert metrics["losses/clipfrac"] == 0.0  # ratio is exactly 1 on the only update per rollout batch
    assert metrics["losses/entropy"] == pytest.approx(want["entropy"], rel=1e-5)
    assert metrics["perf/logprob_mismatch"] == pytest.approx(want["mismatch"], rel=1e-5)
    assert metrics["perf/train_s"] > 0
    assert all(isinstance(v, float) for v in metrics.values())
    assert_weights_equal(weights, want["weights"])


def test_rows_without_advantage_are_left_out_and_the_update_is_the_whole_batchs(ray_cluster, model_dir, batch):
    """Rows 1, 2 and 6 get advantage 0 (a GRPO group all right or all wrong): their gradient is exactly 0, so the
    group trains on the 5 others plus the shortest zero row (row 6, to split 6 rows over 2 ranks), and the loss,
    gradient norm and weights still equal the single-process update over all 8 rows."""
    batch = batch.with_(advantages=batch.advantages.clone())
    batch.advantages[[1, 2, 6]] = 0.0
    want = single_process_update(model_dir, batch, 0.0)
    group = TrainerGroup(model_dir, run_config({**CFG, "zero_stage": 2, "micro_batch_size": 2}), num_ranks=2,
                         timeout_s=120)
    try:
        metrics = group.train_step(batch)
        weights = group.full_state_dict()
    finally:
        group.shutdown()
    assert metrics["perf/skipped_rows"] == 2.0
    assert metrics["losses/policy_loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert metrics["losses/grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
    assert_weights_equal(weights, want["weights"])


def test_lr_warmup_rises_linearly_over_optimizer_steps(ray_cluster, model_dir, batch, expected):
    # Twice the lr warmed up over 2 steps: the first update runs at exactly CFG's lr, so it must give the
    # single-process AdamW weights; the second runs at the full lr.
    group = TrainerGroup(model_dir, run_config({**CFG, "zero_stage": 2, "micro_batch_size": 2, "lr": 2 * CFG["lr"],
                                                "lr_warmup_steps": 2}), num_ranks=2, timeout_s=120)
    try:
        first = group.train_step(batch)
        weights = group.full_state_dict()
        lrs = [first["charts/lr"]] + [group.train_step(batch)["charts/lr"] for _ in range(2)]
    finally:
        group.shutdown()
    assert lrs == pytest.approx([CFG["lr"], 2 * CFG["lr"], 2 * CFG["lr"]], rel=1e-12)
    assert_weights_equal(weights, expected()["weights"])


def test_kl_save_pretrained_and_uneven_batch(ray_cluster, model_dir, batch, expected, tmp_path):
    """One ZeRO-3 group for the rest: KL against the reference, the checkpoint round trip, the row check, and the
    ranks' lowered CPU priority (as asynchronous rollout asks for)."""
    want = expected()
    group = TrainerGroup(model_dir, run_config({**CFG, "zero_stage": 3, "kl_coef": 0.1, "asynchronous": True}),
                         num_ranks=2, timeout_s=120)
    try:
        nice = [ray.get(a.__ray_call__.remote(lambda self: os.getpriority(os.PRIO_PROCESS, 0))) for a in group.actors]
        worker = ray.get(ray.remote(num_cpus=0)(lambda: os.getpriority(os.PRIO_PROCESS, 0)).remote())  # any worker
        assert nice == [min(worker + ASYNC_TRAINER_NICENESS, 19)] * 2
        metrics = group.train_step(batch)
        # Policy == reference on the first step, so KL (k3) is 0 up to rounding.
        assert 0.0 <= metrics["losses/kl"] < 1e-6
        # ... and so is k3's gradient there: the update is the one without KL.
        assert metrics["losses/policy_loss"] == pytest.approx(want["loss"], rel=1e-5)

        with pytest.raises(ValueError, match="does not split evenly across 2 trainer ranks"):
            group.train_step(batch.rows(slice(0, 3)))

        weights = group.full_state_dict()
        assert_weights_equal(weights, want["weights"])
        path = str(tmp_path / "checkpoint")
        group.save_pretrained(path)
        group.save_pretrained(path)  # overwriting an existing checkpoint works too
    finally:
        group.shutdown()

    files = os.listdir(path)
    assert any(f.endswith(".safetensors") for f in files)
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files) and not os.path.exists(path + ".tmp")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert_weights_equal(loaded.state_dict(), weights)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    # The update moved the weights: the checkpoint is not just the initial model.
    initial = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert not torch.equal(initial.model.embed_tokens.weight, loaded.model.embed_tokens.weight)


def off_policy_updates(model_dir: str, batch: TrainBatch, mini_batches: int, epochs: int, tis_cap: float) -> dict:
    """The reference for several optimizer steps per rollout batch, in one process: old log-probs from the initial
    weights, then ``epochs`` passes over ``mini_batches`` contiguous row blocks, each one clipped AdamW step on
    sum(w_tis * pg * loss_weights) with the ratio against the old log-probs and w_tis = min(exp(old - rollout), cap)
    written out here (not the library's function)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        old = token_logprobs(model(input_ids=batch.input_ids,
                                   attention_mask=batch.attention_mask).logits, batch.input_ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=CFG["lr"], betas=(0.9, 0.999), eps=CFG["adam_eps"],
                                  weight_decay=CFG["weight_decay"])
    mask = batch.response_mask
    tis = torch.minimum((old - batch.rollout_logprobs).exp(), torch.tensor(tis_cap)) * mask
    size = batch.input_ids.shape[0] // mini_batches
    losses, norms, clipped_tokens = [], [], 0.0
    for _ in range(epochs):
        for first in range(0, batch.input_ids.shape[0], size):
            rows = slice(first, first + size)
            logits = model(input_ids=batch.input_ids[rows], attention_mask=batch.attention_mask[rows]).logits
            logp = token_logprobs(logits, batch.input_ids[rows])
            pg, clipped = clipped_policy_loss(logp, old[rows], batch.advantages[rows],
                                              CFG["clip_low"], CFG["clip_high"])
            loss = (pg * tis[rows] * batch.loss_weights[rows]).sum()
            optimizer.zero_grad()
            loss.backward()
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), CFG["max_grad_norm"]).item())
            optimizer.step()
            losses.append(loss.item())
            clipped_tokens += (clipped * mask[rows]).sum().item()
    tokens = mask.sum().item()
    return {"loss": sum(losses) / len(losses), "grad_norm": sum(norms) / len(norms),
            "clipfrac": clipped_tokens / (tokens * epochs), "tis_weight": tis.sum().item() / tokens,
            "tis_capped": ((tis >= tis_cap).float() * mask).sum().item() / tokens,
            "mismatch": ((old - batch.rollout_logprobs).abs() * mask).sum().item() / tokens,
            "weights": {k: v.detach().clone() for k, v in model.state_dict().items()}}


@pytest.mark.parametrize("mini_batches, micro_batch_size", [(2, 1), (1, 4)])
def test_mini_batches_epochs_and_tis_match_single_process_updates(ray_cluster, model_dir, batch, mini_batches,
                                                                   micro_batch_size):
    """``mini_batches`` x 2 epochs of optimizer steps on 2 ZeRO-3 ranks (one row per micro-batch, or 4 packed), the
    ratio against log-probs from before the first step, and TIS weights from rollout log-probs within e^+-1 of
    the trainer's, so the cap (1.5) binds on some tokens and not on others."""
    with torch.no_grad():
        initial = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        old = token_logprobs(initial(input_ids=batch.input_ids,
                                     attention_mask=batch.attention_mask).logits, batch.input_ids)
    g = torch.Generator().manual_seed(2)
    mask = batch.response_mask
    off_policy = batch.with_(
        rollout_logprobs=(old + torch.rand(old.shape, generator=g) * 2 - 1) * mask,
        # each mini-batch's token-mean weights sum to 1 (what make_train_batch(..., mini_batches) gives)
        loss_weights=torch.cat([loss_token_weights(part, "token-mean", 8)
                                for part in mask.split(len(mask) // mini_batches)]))
    want = off_policy_updates(model_dir, off_policy, mini_batches=mini_batches, epochs=2, tis_cap=1.5)
    assert 0 < want["tis_capped"] < 1 and want["clipfrac"] > 0  # the cap and the PPO clip are both exercised

    cfg = {**CFG, "zero_stage": 3, "micro_batch_size": micro_batch_size, "mini_batches": mini_batches, "epochs": 2,
           "tis_cap": 1.5}
    group = TrainerGroup(model_dir, run_config(cfg), num_ranks=2, timeout_s=120)
    try:
        metrics = group.train_step(off_policy)
        weights = group.full_state_dict()
        with pytest.raises(ValueError, match="does not split into 3 equal mini-batches"):
            group.train_step(off_policy, mini_batches=3)
    finally:
        group.shutdown()

    assert metrics["perf/optimizer_steps"] == 2.0 * mini_batches
    assert metrics["losses/policy_loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert metrics["losses/grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
    assert metrics["losses/clipfrac"] == pytest.approx(want["clipfrac"], abs=1e-9)
    assert metrics["losses/tis_weight"] == pytest.approx(want["tis_weight"], rel=1e-5)
    assert metrics["losses/tis_capped"] == pytest.approx(want["tis_capped"], abs=1e-9)
    assert metrics["perf/logprob_mismatch"] == pytest.approx(want["mismatch"], rel=1e-5)
    assert_weights_equal(weights, want["weights"])
