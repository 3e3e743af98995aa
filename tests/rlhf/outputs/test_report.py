"""The run report (rlhf/outputs/report.py, plots.py, run_data.py) and the metrics sinks (rlhf/outputs/metrics.py),
from hand-written run directories."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from rlhf.cli import main
from rlhf.core.config.run_config import ConfigError, RunConfig
from rlhf.outputs.metrics import RunMetrics, check_wandb, eval_scalars, scalars
from rlhf.outputs.report import write_report
from rlhf.outputs.samples import save_step_samples

STEPS = 12


def _eval(acc: list[float], tokens: list[float]) -> dict:
    bins = {str(level + 1): {"accuracy": a, "mean_response_tokens": t, "n": 10}
            for level, (a, t) in enumerate(zip(acc, tokens))}
    return {"accuracy": sum(acc) / len(acc), "mean_response_tokens": sum(tokens) / len(tokens), "n": 10 * len(acc),
            "by_difficulty": bins}


def write_run(run: Path, steps: int = STEPS, audit: bool = True, summary: bool = True) -> Path:
    """A run directory as a quickstart-like run leaves it: rising reward, audits every 4 steps, a trained RM."""
    run.mkdir(parents=True)
    lines = []
    for step in range(1, steps + 1):
        m = {"step": step, "reward/mean": 0.2 + 0.05 * step, "reward/std": 0.3, "reward/accuracy": 0.4 + 0.04 * step,
             "charts/response_tokens": 8 + step, "losses/policy_loss": 0.01 * math.sin(step), "losses/kl": 1e-4 * step,
             "losses/clipfrac": 0.01, "losses/entropy": 1.5 - 0.05 * step, "perf/generate_s": 1.0, "perf/score_s": 0.2,
             "perf/train_s": 1.5, "perf/sync_s": 0.1, "perf/step_s": 2.9}
        if audit and step % 4 == 0:
            m.update({"audit/rm_teacher_agreement": 0.95 - 0.01 * step, "audit/pairs": 40})
        lines.append(json.dumps(m))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run / "config.yaml").write_text(yaml.safe_dump(RunConfig(stages=["warmup", "label", "train_rm", "rl", "eval"],
                                                              reward={"components": {"rm": 1.0}, "audit_every": 4}
                                                              ).model_dump()))
    if summary:
        (run / "summary.json").write_text(json.dumps({
            "warmup": {"loss": 0.4, "steps": 400, "wall_s": 80.0},
            "eval_before": _eval([0.9, 0.7, 0.5, 0.3], [3.0, 4.0, 5.0, 6.0]),
            "eval_after": _eval([1.0, 0.95, 0.8, 0.6], [10.0, 18.0, 26.0, 34.0]),
            "reward_model": {"pairwise_accuracy": 0.96, "spearman": 0.71, "rv_spearman": 0.5, "cd_spearman": None,
                             "pairwise_count": 900, "pointwise_count": 1500,
                             "by_difficulty": {"1": {"accuracy": 0.99, "count": 100},
                                               "3": {"accuracy": 0.9, "count": 80}},
                             "calibration": {"ece": 0.1, "bins": [], "by_quantile": [
                                 {"fraction_correct": 0.1}, {"fraction_correct": 0.5}, {"fraction_correct": 0.9}]}},
            "steps": steps, "stage_s": {"warmup": 80.0, "label": 25.0, "train_rm": 129.0, "eval": 8.0, "rl": 151.0},
            "wall_s": 400.0}))
    return run


def image_content(path: Path) -> tuple[float, float]:
    """(pixel standard deviation, fraction of pixels that differ from the most common colour) of a PNG."""
    import matplotlib.image

    pixels = matplotlib.image.imread(str(path))[..., :3]
    flat = pixels.reshape(-1, 3)
    colours, counts = np.unique(flat.round(3), axis=0, return_counts=True)
    background = colours[counts.argmax()]
    return float(pixels.std()), float((np.abs(flat - background).sum(axis=1) > 0.05).mean())


def test_report_has_every_section_and_real_plots(tmp_path):
    run = write_run(tmp_path / "run")
    report = write_report(run).read_text()
    for heading in ("# Run report: run", "## Held-out evaluation, per difficulty", "## RL training curves",
                    "### Policy update", "## Reward model against the teacher", "## Where the time went"):
        assert heading in report, heading
    assert "| held-out accuracy | 0.600 | 0.838 | +0.238 |" in report
    assert "| 4 | 10 | 0.300 | 0.600 | 6.0 | 34.0 |" in report
    assert "pairwise accuracy 0.960" in report and "3 times: agreement with the RM from 0.910 to 0.830" in report
    assert "| train_rm | 129.0 |" in report
    plots = sorted(p.name for p in (run / "plots").glob("*.png"))
    assert plots == ["difficulty.png", "losses.png", "overview.png", "reward_model.png", "time.png", "training.png"]
    for name in plots:
        assert f"(plots/{name})" in report
        data = (run / "plots" / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        std, drawn = image_content(run / "plots" / name)
        # White background with axes, lines, bars and text: clearly not blank, not noise.
        assert std > 0.05 and 0.03 < drawn < 0.7, (name, std, drawn)


def test_missing_data_is_skipped_with_a_sentence(tmp_path):
    run = write_run(tmp_path / "no_summary", audit=False, summary=False)
    report = write_report(run).read_text()
    assert "No held-out evaluation in this run" in report
    assert "no summary.json (the run did not finish)" in report
    assert "This run trained no distilled reward model and ran no teacher audit." in report
    assert (run / "plots" / "training.png").is_file() and not (run / "plots" / "difficulty.png").exists()

    bare = tmp_path / "bare"  # a run with evaluation only: no RL step, no RM, no difficulty
    bare.mkdir()
    (bare / "summary.json").write_text(json.dumps({"eval_before": {"accuracy": 0.5, "mean_response_tokens": 4.0,
                                                                    "n": 8}, "steps": 0, "wall_s": 3.0}))
    report = write_report(bare).read_text()
    assert "No RL step was logged" in report and "The prompts carry no difficulty" in report
    assert "trained no distilled reward model" in report and "No timings were recorded." in report
    assert [p.name for p in (bare / "plots").glob("*.png")] == ["overview.png"]  # the held-out dot alone


def test_report_command(tmp_path, capsys):
    run = tmp_path / "run"  # evaluation only: one small plot to draw, this test is about the command
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"eval_before": {"accuracy": 0.5, "n": 8}, "steps": 0}))
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report.md")
    assert main(["report", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "nothing has no summary.json or metrics.jsonl" in err


# ------------------------------------------------------------------------------------------------------ metrics


def test_scalars_flatten_and_keep_finite_numbers():
    assert scalars({"a/x": 1, "a/y": float("nan"), "b": {"c": 2.5, "d": "text"}, "flag": True}) == {"a/x": 1.0,
                                                                                                     "b/c": 2.5}
    figures = _eval([1.0, 0.5], [3.0, 5.0])
    assert eval_scalars(figures) == {"eval/accuracy": 0.75, "eval/mean_response_tokens": 4.0, "eval/n": 20.0,
                                     "eval/difficulty_1/accuracy": 1.0, "eval/difficulty_1/mean_response_tokens": 3.0,
                                     "eval/difficulty_2/accuracy": 0.5, "eval/difficulty_2/mean_response_tokens": 5.0}


def read_events(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_events_read_back(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 0\n")
    sink = RunMetrics(run, RunConfig())
    sink.log({"warmup/loss": 2.0}, 1)
    for step in (1, 2):
        sink.rl_step({"step": step, "reward/mean": 0.5 * step, "losses/kl": 0.01, "faults/retries": 0})
    sink.log(eval_scalars(_eval([1.0], [3.0])), 2)
    sink.close()
    tags = read_events(run)
    assert tags["reward/mean"] == [(1, 0.5), (2, 1.0)] and tags["faults/retries"] == [(1, 0.0), (2, 0.0)]
    assert tags["warmup/loss"] == [(1, 2.0)] and tags["eval/difficulty_1/accuracy"] == [(2, 1.0)]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_wandb_is_optional_and_offline(tmp_path, monkeypatch):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(ConfigError, match="config key wandb: the wandb package is not installed"):
        check_wandb(RunConfig(wandb=True))
    check_wandb(RunConfig())  # off: nothing needed

    calls = []

    class FakeRun:
        def log(self, values):
            calls.append(("log", values))

        def finish(self):
            calls.append(("finish",))

    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)) or FakeRun())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    check_wandb(RunConfig(wandb=True))
    (tmp_path / "run").mkdir()
    sink = RunMetrics(tmp_path / "run", RunConfig(wandb=True))
    sink.rl_step({"step": 3, "reward/mean": 0.25})
    sink.close()
    assert calls[0][0] == "init" and calls[0][1]["mode"] == "offline" and calls[0][1]["dir"] == str(tmp_path / "run")
    assert calls[1:] == [("log", {"reward/mean": 0.25, "step": 3}), ("finish",)]


def test_step_axes_have_whole_ticks_and_one_step_is_visible():
    from matplotlib.figure import Figure

    from rlhf.outputs.plots import finish_axes

    ax = Figure().add_subplot()
    ax.plot([1, 2], [0.1, 0.2])
    ax.set(xlabel="RL step")
    finish_axes(ax)
    assert all(float(t).is_integer() for t in ax.get_xticks())
    one = Figure().add_subplot()
    one.plot([3], [0.5])
    one.set(xlabel="RL step")
    finish_axes(one)
    assert list(one.get_xticks()) == [3] and one.get_lines()[0].get_marker() == "o"


def test_rm_accuracy_per_task_difficulty_and_teacher_cd_are_separate_tables(tmp_path):
    run = write_run(tmp_path / "run")
    summary = json.loads((run / "summary.json").read_text())
    summary["reward_model"]["by_cd"] = {"5": {"accuracy": 0.75, "count": 40}}
    (run / "summary.json").write_text(json.dumps(summary))
    report = write_report(run).read_text()
    assert "| task difficulty | pairs | RM pairwise accuracy |\n|---|---|---|\n| 1 | 100 | 0.990 |" in report
    assert "| teacher's CD score | pairs | RM pairwise accuracy |\n|---|---|---|\n| 5 | 40 | 0.750 |" in report


def test_rm_figures_on_your_own_preference_data_are_said_so(tmp_path):
    run = write_run(tmp_path / "run")
    summary = json.loads((run / "summary.json").read_text())
    summary["reward_model"] = {"pairwise_accuracy": 0.8, "spearman": None, "pairwise_count": 50,
                               "pointwise_count": 0, "source": "your preference data"}
    (run / "summary.json").write_text(json.dumps(summary))
    report = write_report(run).read_text()
    assert "On your held-out preference data (50 pairs, 0 scored responses)" in report
    assert "of the teacher's pairs" not in report


def test_an_audit_below_the_threshold_gets_an_alarm_line(tmp_path):
    from rlhf.outputs.report import audit_alarm_lines
    from rlhf.outputs.run_data import RunData

    run = RunData(write_run(tmp_path / "run", steps=16))  # agreement 0.91, 0.87, 0.83, then 0.79 at step 16
    steps, agreement = run.series("audit/rm_teacher_agreement")
    [line, _] = audit_alarm_lines(run, steps, agreement)
    assert line.startswith("**Audit alarm** at step 16: agreement below `reward.audit_warn_below` (0.8)")
    assert line.endswith("The run went on (set `reward.audit_stop_on_alarm` to stop it).")
    assert audit_alarm_lines(run, steps[:3], agreement[:3]) == []


# ------------------------------------------------------------------------------- components, SFT, samples, RM


def with_components_sft_and_samples(run: Path) -> Path:
    """A run whose steps log reward/verifier and reward/rm, whose warm-up was an SFT, with step 12's samples."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for m in lines:
        m.update({"reward/verifier": 0.1 * m["step"], "reward/rm": 0.5, "reward/zero_signal_groups": 0.0})
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["reward"]["components"] = {"verifier": 1.0, "rm": 0.5}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "stage_metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "sft/loss": 2.0 / s, **({"sft/eval_loss": 2.2 / s} if s % 5 == 0 else {})}) + "\n"
        for s in range(1, 11)) + json.dumps({"step": 1, "rm/loss": 0.7, "rm/accuracy": 0.5}) + "\n")
    summary = json.loads((run / "summary.json").read_text())
    summary["warmup"] = {"loss": 0.2, "eval_loss_before": 2.5, "eval_loss": 0.44, "steps": 10, "train_examples": 40,
                         "eval_examples": 10, "traces": "runs/t/traces/dataset", "wall_s": 5.0}
    (run / "summary.json").write_text(json.dumps(summary))
    save_step_samples(run / "samples", 12, [
        {"kind": "best", "prompt": "<|im_start|>user\nWhat is 1+1?", "response": "It is | 2", "reward": 1.5,
         "rewards": {"verifier": 1.0, "rm": 1.0}, "advantage": 0.71},
        {"kind": "worst", "prompt": "q", "response": "x" * 200, "reward": None, "rewards": {}, "advantage": None}])
    return run


def test_report_has_a_table_and_plot_per_component_the_sft_curve_and_a_sample_table(tmp_path):
    run = with_components_sft_and_samples(write_run(tmp_path / "run"))
    report = write_report(run).read_text()
    assert "## Reward per component" in report
    assert "| verifier | 1 | 0.300 | 1.000 | +0.700 |" in report and "| rm | 0.5 | 0.500 | 0.500 | +0.000 |" in report
    assert "(plots/components.png)" in report and "(plots/sft.png)" in report
    assert "Distillation SFT on `runs/t/traces/dataset`: 40 training and 10 held-out conversations, 10 steps" in report
    assert "held-out loss 2.500 before and 0.440 after" in report
    assert "## Sampled completions" in report and "RL step 12's best, worst" in report
    assert "| best | 1.500 | verifier 1.00, rm 1.00 | 0.710 | `<\\|im_start\\|>user What is 1+1?` | `It is \\| 2` |" \
        in report
    assert "| worst | n/a |  | n/a | `q` | `" + "x" * 80 + "...` |" in report
    for name in ("components.png", "sft.png"):
        std, drawn = image_content(run / "plots" / name)
        assert std > 0.05 and 0.03 < drawn < 0.7, (name, std, drawn)


def test_a_reward_model_given_by_path_is_named_with_its_version_and_own_figures(tmp_path):
    rm_run = tmp_path / "rm_run"
    (rm_run / "reward_model").mkdir(parents=True)
    (rm_run / "summary.json").write_text(json.dumps({"reward_model": {"pairwise_accuracy": 0.87,
                                                                      "source": "your preference data"}}))
    run = write_run(tmp_path / "run", audit=False)
    summary = json.loads((run / "summary.json").read_text())
    del summary["reward_model"]
    summary["reward_model_used"] = {"path": str(rm_run / "reward_model"), "version": "sha256:0123456789ab"}
    (run / "summary.json").write_text(json.dumps(summary))
    report = write_report(run).read_text()
    assert "trained no distilled reward model" not in report
    assert (f"RL was scored by the reward model at `{rm_run / 'reward_model'}` (trained elsewhere, given as "
            f"`reward_model.path`, version `sha256:0123456789ab`). The run that trained it measured a pairwise "
            f"accuracy of 0.870") in report


def test_a_run_without_rl_reports_one_evaluation_and_no_rl_figures(tmp_path):
    run = tmp_path / "sft_only"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"stages": ["sft", "eval"]}))
    (run / "summary.json").write_text(json.dumps({"eval_after": _eval([0.5, 0.25], [3.0, 5.0]), "steps": 0,
                                                  "warmup": {"loss": 0.3, "steps": 4}, "wall_s": 9.0}))
    (run / "stage_metrics.jsonl").write_text('{"step": 1, "sft/loss": 2.0}\n{"step": 2, "sft/loss": 1.0}\n')
    report = write_report(run).read_text()
    assert "| figure | final policy (no RL stage) |" in report and "| held-out accuracy | 0.375 |" in report
    assert "before RL" not in report and "after RL" not in report
    assert "once, at the end (this run has no RL stage)" in report
    assert "| 2 | 10 | 0.250 | 5.0 |" in report and "This run has no RL stage." in report
    assert "(plots/sft.png)" in report and "## Sampled completions" not in report


def test_stage_figures_go_to_stage_metrics_jsonl_and_rl_steps_do_not(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    sink = RunMetrics(run, RunConfig())
    sink.log({"sft/loss": 1.5, "sft/lr": 1e-4}, 1)
    sink.log({"rm/loss": 0.7}, 1)
    sink.log(eval_scalars(_eval([1.0], [3.0])), 0)
    sink.rl_step({"step": 1, "reward/mean": 0.5})
    sink.close()
    lines = [json.loads(line) for line in (run / "stage_metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "sft/loss": 1.5, "sft/lr": 1e-4}, {"step": 1, "rm/loss": 0.7}]


def test_the_reward_model_used_is_recorded_with_a_version_that_follows_its_weights(tmp_path):
    from rlhf.outputs.provenance import model_version, reward_model_record

    rm = tmp_path / "rm"
    rm.mkdir()
    (rm / "config.json").write_text("{}")
    (rm / "model.safetensors").write_bytes(b"a" * 3_000_000)
    version = model_version(rm)
    assert version.startswith("sha256:") and len(version) == 19 and model_version(rm) == version
    (rm / "model.safetensors").write_bytes(b"a" * 2_999_999 + b"b")  # the last bytes moved: another version
    assert model_version(rm) != version and model_version(tmp_path) is None
    cfg = RunConfig(reward={"components": {"rm": 1.0}}, reward_model={"path": str(rm)})
    assert reward_model_record(cfg, rm) == {"reward_model_used": {"path": str(rm.resolve()),
                                                                  "version": model_version(rm)}}
    assert reward_model_record(RunConfig(), rm) == {}  # no rm component: nothing to name
