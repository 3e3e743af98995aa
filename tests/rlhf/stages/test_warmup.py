"""Warm-up distillation: labels cover the response only, teacher data mixes verbosities, the loss falls."""
import pytest
from pydantic import ValidationError

from rlhf.core.config.run_config import ModelConfig, WarmupConfig
from rlhf.core.models.build import build_student, build_tokenizer
from rlhf.core.tasks.arithmetic import parse_prompt
from rlhf.stages.warmup import run_warmup, sft_batch, teacher_examples, terse_share


def test_sft_batch_labels_only_the_response_and_its_end_token():
    tokenizer = build_tokenizer("char")
    batch = sft_batch(tokenizer, [("1+2=", "#3"), ("9-1+1=", "9-1=8;8+1=9;#9")])
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert tokenizer.decode(ids[0, :4]) == "1+2="
    assert labels[0, :4].tolist() == [-100] * 4  # the prompt is given, not learned
    assert tokenizer.decode(labels[0, 4:6]) == "#3" and labels[0, 6] == tokenizer.eos_token_id
    assert labels[0, 7:].tolist() == [-100] * (ids.shape[1] - 7) and mask[0].sum() == 7
    assert mask[1].sum() == ids.shape[1]  # the longest row has no padding


def test_teacher_examples_mix_terse_and_worked_solutions():
    pairs = teacher_examples(WarmupConfig(terse_fraction=0.5), seed=0)(400)
    terse = sum(response.startswith("#") for _, response in pairs)
    assert 150 < terse < 250
    assert all(response.rsplit("#", 1)[1].isdigit() for _, response in pairs)


def test_terse_share_by_level():
    assert [terse_share(WarmupConfig(terse_fraction=0.3), level) for level in (1, 6)] == [0.3, 0.3]
    falling = WarmupConfig(terse_fraction=[0.5, 0.0])
    assert [terse_share(falling, level) for level in range(1, 7)] == pytest.approx([0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
    per_level = [0.6, 0.1, 0.0, 0.0, 0.0, 0.2]
    assert [terse_share(WarmupConfig(terse_fraction=per_level), level) for level in range(1, 7)] == per_level
    # Three points over six levels: 1 at level 1, 0 at level 3.5, 1 at level 6.
    assert [terse_share(WarmupConfig(terse_fraction=[1.0, 0.0, 1.0]), level) for level in range(1, 7)] == \
        pytest.approx([1.0, 0.6, 0.2, 0.2, 0.6, 1.0])
    assert terse_share(WarmupConfig(terse_fraction=[0.7]), 4) == 0.7
    # The teacher follows it: bare answers on about half the one-operation problems, never on six operations.
    pairs = teacher_examples(falling, seed=0)(1200)
    by_level = {1: [], 6: []}
    for prompt, response in pairs:
        level = parse_prompt(prompt).level
        if level in by_level:
            by_level[level].append(response.startswith("#"))
    assert 0.38 < sum(by_level[1]) / len(by_level[1]) < 0.62 and not any(by_level[6])
    for bad in ([0.5, 1.2], []):
        with pytest.raises(ValidationError, match="between 0 and 1"):
            WarmupConfig(terse_fraction=bad)


def test_warmup_lowers_the_loss():
    tokenizer = build_tokenizer("char")
    model = build_student(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                      intermediate_size=64), tokenizer, seed=0)
    cfg = WarmupConfig(steps=40, batch_size=16, lr=3e-3)
    first = run_warmup(model, tokenizer, WarmupConfig(steps=1, batch_size=16, lr=1e-9), seed=1, log=lambda s: None)
    result = run_warmup(model, tokenizer, cfg, seed=1, log=lambda s: None)
    assert result["steps"] == 40 and result["loss"] < 0.7 * first["loss"]
    assert not model.training  # left ready for evaluation
