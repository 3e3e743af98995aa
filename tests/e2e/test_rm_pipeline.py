"""The distilled-RM pipeline through the CLI and Ray: warm-up -> label -> train RM -> GRPO on RM scores -> eval."""
import json

import pytest
from transformers import AutoModelForSequenceClassification

from rlhf.cli import main
from tests.e2e.test_end_to_end import TINY

RM_STAGES = ["stages=[warmup,label,train_rm,rl,eval]", "reward.components={rm: 1.0}", "reward.audit_every=1",
             "label.prompts=16", "label.eval_prompts=8", "label.samples_per_prompt=4", "reward_model.batch_size=16",
             # The RM refreshed after every step (rlhf/rl/rm_refresh.py): one group to train on, one to check.
             "reward.refresh.enabled=true", "reward.refresh.every=1", "reward.refresh.teacher_calls=8"]


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory):
    """With LoRA on the RM (reward_model.lora): the merged RM is what labels RL and loads below; the full-fine-tuning RM
    trainer is tests/reward/model/test_rm_trainer.py's."""
    out = tmp_path_factory.mktemp("rm") / "run"
    assert main(["run", TINY, f"output_dir={out}", *RM_STAGES, "reward_model.lora.r=4"]) == 0
    return out


def test_labels_are_written_as_datasets(rm_run):
    from datasets import load_from_disk

    summary = json.loads((rm_run / "summary.json").read_text())
    assert summary["labels"]["train"]["prompts"] == 16 and summary["labels"]["eval"]["prompts"] == 8
    assert summary["labels"]["train"]["failed"] == 0
    pairs = load_from_disk(str(rm_run / "labels" / "train" / "pairwise"))
    assert len(pairs) == summary["labels"]["train"]["pairwise"] > 0
    assert {"prompt", "chosen", "rejected", "margin"} <= set(pairs.column_names)


def test_summary_reports_the_reward_model_against_the_teacher(rm_run):
    figures = json.loads((rm_run / "summary.json").read_text())["reward_model"]
    assert 0.0 <= figures["pairwise_accuracy"] <= 1.0
    assert figures["spearman"] is None or -1.0 <= figures["spearman"] <= 1.0


def test_rl_was_rewarded_by_the_rm_and_audited(rm_run):
    lines = [json.loads(line) for line in (rm_run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for m in lines:
        assert m["audit/pairs"] >= 0 and 0.0 <= m["audit/teacher_quality"] <= 9.0
        # Agreement is undefined (NaN, left out of metrics.jsonl) in a step whose audited groups hold no pair the
        # teacher tells apart, as a tiny random policy's all-wrong groups can.
        assert ("audit/rm_teacher_agreement" in m) == (m["audit/pairs"] > 0)


def test_the_rm_was_refreshed_after_each_step_and_each_batch_names_its_rm_version(rm_run):
    lines = [json.loads(line) for line in (rm_run / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["rm/version"] == 0  # the RM as trained scored the first batch
    for m in lines:
        assert m["rm_refresh/teacher_calls"] == 8 and m["rm_refresh/accepted"] + m["rm_refresh/rolled_back"] <= 1
    assert lines[1]["rm/version"] == lines[0]["rm_refresh/version"]  # hot-swapped in before the second batch
    assert lines[1]["rm_refresh/teacher_calls_total"] == 16


def test_reward_model_loads_as_a_sequence_classifier(rm_run):
    model = AutoModelForSequenceClassification.from_pretrained(rm_run / "reward_model")
    assert model.config.num_labels == 1
    assert not any("lora" in name for name in model.state_dict())  # merged; the adapters sit in adapter/
    assert (rm_run / "reward_model" / "adapter" / "adapter_model.safetensors").is_file()


def test_eval_rm_command_prints_the_figures(rm_run, capsys):
    assert main(["eval-rm", str(rm_run / "reward_model"), str(rm_run / "labels" / "eval")]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert "pairwise_accuracy" in figures and "spearman" in figures


def test_rm_reward_without_a_reward_model_is_refused(tmp_path, capsys):
    assert main(["run", TINY, f"output_dir={tmp_path / 'x'}", "reward.components={rm: 1.0}"]) == 2
    assert "train_rm" in capsys.readouterr().err
