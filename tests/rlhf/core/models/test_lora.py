"""LoRA on the policy trainer (rlhf/core/models/lora.py): two DeepSpeed ranks against a single-process peft update, only the
adapters moving, the reference as the same model with its adapters off, exact resume, and the merged export.

The adapters start with B = 0 (peft's default), so the first step's gradient reaches only B; two steps are compared,
so that the second one checks A's gradient too.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch

ray = pytest.importorskip("ray")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
deepspeed = pytest.importorskip("deepspeed")

from rlhf.core.algorithms.policy_losses import clipped_policy_loss  # noqa: E402
from rlhf.core.algorithms.tokens import token_logprobs  # noqa: E402
from rlhf.core.data.batch import TrainBatch  # noqa: E402

from rlhf.core.models import lora
from rlhf.rl.ranks.policy import PolicyTrainer, TrainerGroup  # noqa: E402
from tests.configs import run_config  # noqa: E402
from tests.rlhf.rl.ranks.test_trainer import CFG, assert_weights_equal, batch, model_dir, ray_cluster  # noqa: E402,F401

LORA = {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]}


def _gathered_state_dicts(group: TrainerGroup) -> dict[str, torch.Tensor]:
    """The peft model's own state dict (adapters separate), gathered from every rank (collective under ZeRO-3)."""
    calls = [actor.__ray_call__.remote(lambda self: self._gathered_state_dict()) for actor in group.actors]
    return ray.get(calls)[0]


def peft_updates(model_dir: str, batch: TrainBatch, initial: dict[str, torch.Tensor], steps: int) -> dict:
    """The reference: one process, peft's own model from ``initial`` (the trainer's starting adapters), ``steps``
    clipped AdamW steps over the adapters on the whole batch's GRPO loss."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                                       target_modules=LORA["target_modules"]))
    model.load_state_dict(initial)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=CFG["lr"], betas=(0.9, 0.999), eps=CFG["adam_eps"],
                                  weight_decay=CFG["weight_decay"])
    losses, norms = [], []
    for _ in range(steps):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logp = token_logprobs(logits, batch.input_ids)
        pg, _ = clipped_policy_loss(logp, logp.detach(), batch.advantages, CFG["clip_low"],
                                    CFG["clip_high"])
        loss = (pg * batch.loss_weights).sum()
        optimizer.zero_grad()
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(params, CFG["max_grad_norm"]).item())
        optimizer.step()
        losses.append(loss.item())
    raw = {k: v.detach().clone() for k, v in model.state_dict().items()}
    merged = model.merge_and_unload()  # peft's own merge, against which lora.merged_state_dict is checked
    return {"losses": losses, "norms": norms, "raw": raw,
            "merged": {k: v.detach().clone() for k, v in merged.state_dict().items()}}


def test_lora_on_two_zero3_ranks_matches_a_single_process_peft_update(ray_cluster, model_dir, batch):
    cfg = {**CFG, "zero_stage": 3, "micro_batch_size": 4, "lora": LORA}
    group = TrainerGroup(model_dir, run_config(cfg), num_ranks=2, timeout_s=120)
    try:
        initial = _gathered_state_dicts(group)
        metrics = [group.train_step(batch) for _ in range(2)]
        raw = _gathered_state_dicts(group)
        merged = group.full_state_dict()
    finally:
        group.shutdown()
    want = peft_updates(model_dir, batch, initial, steps=2)

    assert [m["losses/policy_loss"] for m in metrics] == pytest.approx(want["losses"], rel=1e-5)
    # Gradient norms over the adapters alone: step 1 only B's (A's gradient is 0 while B = 0), step 2 both.
    assert [m["losses/grad_norm"] for m in metrics] == pytest.approx(want["norms"], rel=1e-5)
    assert_weights_equal(raw, want["raw"])
    assert_weights_equal(merged, want["merged"])  # HF names, adapters merged as peft merges them

    adapters = [k for k in raw if ".lora_" in k]
    assert adapters and all(not torch.equal(raw[k], initial[k]) for k in adapters)  # every adapter trained
    assert all(torch.equal(raw[k], initial[k]) for k in raw if k not in adapters)  # nothing else moved
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    moved = {k for k in base if not torch.equal(base[k], merged[k])}
    assert moved == {k for k in base if k.endswith(("q_proj.weight", "v_proj.weight", "up_proj.weight",
                                                    "down_proj.weight"))}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lora_rank(tmp_path_factory):
    """One ZeRO-2 LoRA policy rank in this process (world size 1, gloo), with a KL term (so a reference)."""
    config = transformers.Qwen2Config(vocab_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, intermediate_size=32, max_position_embeddings=32,
                                      tie_word_embeddings=True)
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("policy"))
    transformers.Qwen2ForCausalLM(config).save_pretrained(path)
    trainer = PolicyTrainer(0, 1, "127.0.0.1", _free_port(), path, run_config(
        {"zero_stage": 2, "lr": 1e-2, "micro_batch_size": 2, "timeout_s": 60, "kl_coef": 0.1,
         "lora": {**LORA, "target_modules": ["q_proj", "v_proj", "gate_proj"]}}))
    yield trainer
    deepspeed.comm.destroy_process_group()  # also drops DeepSpeed's cached groups, for the next rank in this process


def _small_batch(advantage: float) -> TrainBatch:
    ids = torch.tensor([[1, 2, 3, 4, 9], [5, 6, 7, 8, 3]])
    response = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=torch.float32)
    return TrainBatch(input_ids=ids, attention_mask=torch.ones_like(ids), response_mask=response,
                      rollout_logprobs=torch.zeros(2, 5), advantages=response * advantage,
                      loss_weights=response / response.sum())


def test_the_reference_pass_runs_without_dropout_and_leaves_training_mode_as_it_was():
    """A base model with dropout (attention_dropout 0.5), wrapped and in training mode as during an update: the
    adapters-off reference gives the same log-probs on every call, those of the base model in eval mode."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=64, attention_dropout=0.5)
    base = Qwen2ForCausalLM(config)
    inputs = {"input_ids": torch.randint(0, 40, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    with torch.no_grad():
        expected = base.eval()(**inputs).logits
    model = lora.wrap(base, {"r": 4, "alpha": 8, "dropout": 0.5, "target_modules": ["q_proj", "v_proj"]})
    model.train()
    reference = lora.AdaptersOff(model)
    first, second = reference(**inputs).logits, reference(**inputs).logits
    assert torch.equal(first, second)
    torch.testing.assert_close(first, expected)
    assert model.training and model.base_model.model.model.layers[0].self_attn.training


def test_reference_is_the_base_model_and_no_second_copy_is_loaded(lora_rank):
    lora_rank.train_step(_small_batch(1.0))
    lora_rank.train_step(_small_batch(-1.0))  # B != 0 now: the adapters change the outputs
    assert isinstance(lora_rank.reference, lora.AdaptersOff)
    batch = _small_batch(0.0)
    base = transformers.AutoModelForCausalLM.from_pretrained(lora_rank.model_dir, dtype=torch.float32)
    with torch.no_grad():
        want = token_logprobs(base(input_ids=batch.input_ids).logits, batch.input_ids)
    got = lora_rank.reference_logprobs(batch.inputs())
    torch.testing.assert_close(got[:, 1:], want[:, 1:], rtol=0, atol=1e-6)
    policy = lora_rank._logprobs(batch.inputs())
    assert (policy[:, 1:] - want[:, 1:]).abs().max() > 1e-4  # the trained policy differs from its reference


def test_lora_state_holds_only_adapters_and_resumes_bit_exactly(lora_rank, tmp_path):
    lora_rank.train_step(_small_batch(1.0))  # Adam moments that are not zero
    path = str(tmp_path / "trainer")
    lora_rank.save_state(path)
    saved = {k: v.clone() for k, v in lora_rank.engine.module.state_dict().items()}
    expected = lora_rank.train_step(_small_batch(-0.5))
    expected_weights = {k: v.clone() for k, v in lora_rank.engine.module.state_dict().items()}

    module_states = torch.load(os.path.join(path, "deepspeed", "mp_rank_00_model_states.pt"), weights_only=False)
    # Base weights left out (but the tied lm_head, which DeepSpeed sees only as the embedding, stays in).
    assert {k for k in module_states["module"] if ".lora_" not in k} == {"base_model.model.lm_head.weight"}

    lora_rank.load_state(path)
    assert all(torch.equal(v, saved[k]) for k, v in lora_rank.engine.module.state_dict().items())
    again = lora_rank.train_step(_small_batch(-0.5))
    assert again["losses/policy_loss"] == expected["losses/policy_loss"]
    assert again["losses/grad_norm"] == expected["losses/grad_norm"]
    assert again["losses/kl"] == expected["losses/kl"] and expected["losses/kl"] > 0
    assert all(torch.equal(v, expected_weights[k]) for k, v in lora_rank.engine.module.state_dict().items())


def test_merged_export_loads_with_plain_transformers_and_generates_the_same_tokens(lora_rank, tmp_path):
    lora_rank.train_step(_small_batch(1.0))
    path = tmp_path / "policy"
    lora_rank.save_pretrained(str(path))
    assert not any(f.endswith((".bin", ".pt")) for f in os.listdir(path))
    exported = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert not any("lora" in k for k in exported.state_dict())
    prompt = torch.tensor([[1, 2, 3]])
    settings = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    trained = lora_rank.engine.module
    trained.eval()
    with torch.no_grad():
        want = trained.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **settings)
        got = exported.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **settings)
        base = transformers.AutoModelForCausalLM.from_pretrained(lora_rank.model_dir, dtype=torch.float32)
        with_adapter = peft.PeftModel.from_pretrained(base, str(path / lora.ADAPTER_DIR))
        torch.testing.assert_close(with_adapter(input_ids=prompt).logits, exported(input_ids=prompt).logits,
                                   rtol=1e-5, atol=1e-6)
    assert torch.equal(got, want)


def test_adapter_input_casts_change_nothing_under_bf16_autocast():
    from rlhf.core.models import precision

    config = transformers.Qwen2Config(vocab_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    model = lora.wrap(transformers.Qwen2ForCausalLM(config), LORA)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountCopies(TorchDispatchMode):
        copies = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.copies += func is torch.ops.aten._to_copy.default
            return func(*args, **(kwargs or {}))

    ids = torch.randint(0, 32, (2, 6))
    results, copies = [], []
    for cast in (True, False):
        lora.cast_inputs(model, cast)
        model.zero_grad()
        with CountCopies() as counter:
            with precision.autocast("bf16"):
                logits = model(input_ids=ids).logits
        copies.append(counter.copies)
        logits.float().square().mean().backward()
        results.append((logits, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (want, want_grads), (got, got_grads) = results
    # Of the 4 adapted layers only down_proj gets a bf16 input (the MLP's product; the others read the float32
    # norm), which peft sent to float32 and autocast back to bf16: 2 copies fewer.
    assert copies[0] - copies[1] == 2
    assert torch.equal(got, want)
    for name, grad in want_grads.items():
        assert torch.equal(got_grads[name], grad), name
