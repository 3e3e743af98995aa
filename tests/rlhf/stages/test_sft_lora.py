"""SFT on traces with LoRA (``warmup.lora``, rlhf/stages/sft.py): only the adapters train, and the student comes
out a plain model with the adapters merged into its weights."""
from __future__ import annotations

import torch

from rlhf.core.config.run_config import RunConfig
from rlhf.core.models.build import build_student
from rlhf.core.models.char_tokenizer import build_char_tokenizer
from rlhf.stages.sft import run_sft
from tests.rlhf.stages.test_sft import TINY, _messages_dataset


def test_lora_sft_learns_and_leaves_a_plain_merged_student(tmp_path):
    tok = build_char_tokenizer()
    path = _messages_dataset(tmp_path)
    cfg = RunConfig(output_dir=str(tmp_path / "run"), stages=["sft"], model=TINY.model_dump(),
                    warmup={"traces_file": path, "steps": 30, "batch_size": 8, "lr": 0.01, "eval_fraction": 0.25,
                            "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj", "up_proj",
                                                                             "down_proj"]}})
    model = build_student(cfg.model, tok, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    figures = run_sft(model, tok, cfg, path, log=lambda line: None)
    assert figures["eval_loss"] < figures["eval_loss_before"] - 0.2  # measured: 4.43 -> 4.05 in 30 steps
    after = model.state_dict()
    assert set(after) == set(before)  # no adapter tensors left: a plain model
    assert not any("lora" in name for name, _ in model.named_modules())
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # The adapted projections moved (merged adapters); what LoRA does not touch stayed as it was.
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight", "up_proj.weight", "down_proj.weight"))
                           for k in changed)
