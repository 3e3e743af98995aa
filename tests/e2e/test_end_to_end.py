"""The whole pipeline through the CLI and Ray: warm-up, GRPO on 2 ZeRO-3 trainer ranks, evaluation, run directory."""
import json

import pytest
import yaml

from rlhf.cli import main
from rlhf.core.tasks.arithmetic import MAX_LEVEL, MIN_LEVEL
from tests.paths import REPO

TINY = str(REPO / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "tiny"
    assert main(["run", TINY, f"output_dir={out}"]) == 0
    return out


def test_run_directory_has_the_documented_files(tiny_run):
    for name in ("config.yaml", "metrics.jsonl", "summary.json"):
        assert (tiny_run / name).is_file(), name
    assert yaml.safe_load((tiny_run / "config.yaml").read_text())["trainer"]["zero_stage"] == 3


def test_metrics_one_line_per_step_with_namespaced_figures(tiny_run):
    lines = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    for m in lines:
        for key in ("reward/mean", "losses/policy_loss", "losses/kl", "perf/logprob_mismatch", "perf/sync_s",
                    "perf/generate_s", "charts/response_tokens"):
            assert key in m, key
        # The trainer recomputes the rollout's log-probs on the same weights: they must agree closely.
        assert m["perf/logprob_mismatch"] < 1e-3
    assert [m["charts/weights_version"] for m in lines] == [1, 2]


def test_summary_has_before_and_after_evaluation_per_difficulty(tiny_run):
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["wall_s"] > 0
    for key in ("eval_before", "eval_after"):
        figures = summary[key]
        assert 0.0 <= figures["accuracy"] <= 1.0 and figures["mean_response_tokens"] > 0 and figures["n"] == 20
        assert set(figures["by_difficulty"]) == {str(level) for level in range(MIN_LEVEL, MAX_LEVEL + 1)}


def test_final_policy_loads_with_plain_transformers(tiny_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy = tiny_run / "policy"
    assert sorted(p.suffix for p in policy.glob("*.safetensors")) == [".safetensors"]
    assert not list(policy.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(policy)
    tokenizer = AutoTokenizer.from_pretrained(policy)
    assert model.config.model_type == "qwen2"
    ids = tokenizer("3+4=", return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] == len(tokenizer)


def test_a_finished_run_is_not_overwritten(tiny_run, capsys):
    before = (tiny_run / "summary.json").read_text()
    assert main(["run", TINY, f"output_dir={tiny_run}"]) == 2
    assert "holds a finished run" in capsys.readouterr().err
    assert (tiny_run / "summary.json").read_text() == before


def test_report_tensorboard_and_eval_command_on_the_run(tiny_run, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    report = (tiny_run / "report.md").read_text()
    assert "## RL training curves" in report and "## Held-out evaluation, per difficulty" in report
    for name in ("overview.png", "training.png", "difficulty.png", "losses.png", "time.png"):
        assert (tiny_run / "plots" / name).read_bytes().startswith(b"\x89PNG"), name
    events = EventAccumulator(str(tiny_run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"reward/mean", "losses/kl", "perf/step_s", "charts/response_tokens", "eval/accuracy",
            "eval/difficulty_1/accuracy", "warmup/loss", "perf/stage_rl_s"} <= tags
    assert [e.step for e in events.Scalars("reward/mean")] == [1, 2]
    assert [e.step for e in events.Scalars("eval/accuracy")] == [0, 2]  # before and after RL
    # Each step's best, worst and random samples with their rewards and advantages; per component and SFT curves.
    samples = [json.loads(line) for line in (tiny_run / "samples" / "step_2.jsonl").read_text().splitlines()]
    assert [s["kind"] for s in samples] == ["best"] * 2 + ["worst"] * 2 + ["random"] * 2
    assert all(set(s["rewards"]) == {"verifier"} and isinstance(s["advantage"], float) for s in samples)
    assert samples[0]["reward"] >= samples[-1]["reward"] >= samples[2]["reward"]
    for part in ("## Reward per component", "| verifier | 1 |", "## Sampled completions", "(plots/sft.png)"):
        assert part in report, part

    # `distilrl eval` of the saved policy, in-process, with the run's own config: the run's after-RL figures.
    assert main(["eval", str(tiny_run / "policy")]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures == json.loads((tiny_run / "summary.json").read_text())["eval_after"]
