"""The run report: ``report.md`` and PNG plots in ``plots/``, from a run directory's files (rlhf/outputs/
run_data.py). Written at the end of every run, and again by ``distilrl report RUN_DIR``.

It is meant to be read on its own: what ran, the held-out results before and after RL (overall and per difficulty),
the warm-up/SFT loss, how reward (in all and per component), accuracy, response length and KL moved over the RL
steps, sampled completions to read, which reward model scored the run and how well it agrees with its teacher (on
held-out labels, and in the audits during RL), and where the time went. Whatever a run did not produce (no RL
steps, no reward model, no difficulty bins) is skipped with a sentence saying so. The plots: rlhf/outputs/plots.py.
"""
from __future__ import annotations

import json
from pathlib import Path

from rlhf.outputs.diagnostics import learning_warnings
from rlhf.outputs.plots import (PER_STEP_TIMES, Panel, accuracy_panel, audit_panel, component_panels,
                                difficulty_accuracy_panel, difficulty_length_panel, draw, kl_panel, length_panel,
                                loss_panel, reward_panel, rm_bins, rm_cd_panel, rm_difficulty_panel,
                                rm_training_panel, sft_loss_panel, stage_time_panel, step_time_panel,
                                warmup_loss_panel)
from rlhf.outputs.rm_refresh_report import refresh_lines
from rlhf.outputs.run_data import RunData, fmt
from rlhf.outputs.samples import SAMPLES_DIR

PLOTS_DIR = "plots"
OWN_DATA = "your preference data"  # reward_model.source of an RM evaluated on your own data alone
SAMPLE_TEXT = 80  # characters of a prompt or response shown in the sample table (the file has them whole)



def _image(lines: list[str], run: RunData, name: str, panels: list[Panel], missing: str, columns: int = 3,
           title: str | None = None) -> None:
    if draw(run.dir / PLOTS_DIR / name, run, panels, columns, title):
        lines += [f"![{name}]({PLOTS_DIR}/{name})", ""]
    else:
        (run.dir / PLOTS_DIR / name).unlink(missing_ok=True)  # a stale plot from an earlier report would mislead
        lines += [missing, ""]


def _first_last(values: list[float], k: int = 5) -> tuple[float, float]:
    """Mean of the first and of the last ``k`` values: a trend that one noisy step cannot fake."""
    k = max(1, min(k, len(values) // 2 or 1))
    return sum(values[:k]) / k, sum(values[-k:]) / k


def overview(run: RunData) -> list[str]:
    s, lines = run.summary, []
    stages = run.conf("stages") or []
    what = [f"stages {', '.join(stages)}" if stages else None,
            None if not run.has_rl else f"{s['steps']} RL steps" if "steps" in s else
            f"{len(run.steps)} RL steps logged",
            f"{fmt(s.get('wall_s'), 0)} s in all" if "wall_s" in s else "no summary.json (the run did not finish)"]
    lines.append("This run: " + "; ".join(w for w in what if w) + ".")
    if run.config:
        task, algo = run.conf("task.name", "?"), run.conf("algorithm", {}) or {}
        rewarded = ", ".join(f"{k} x {v:g}" for k, v in (run.conf("reward.components") or {}).items())
        lines.append(f"Task `{task}`; advantage `{algo.get('advantage', '?')}`, loss "
                     f"`{algo.get('loss_aggregation', '?')}`, KL coefficient {algo.get('kl_coef', '?')}; reward: "
                     f"{rewarded or '?'}; {run.conf('rollout.prompts_per_step', '?')} prompts x "
                     f"{run.conf('rollout.samples_per_prompt', '?')} samples per step. The full config is in "
                     f"`config.yaml`.")
    lines.append("")
    lines += _figures_table(run)
    rm = s.get("reward_model") or {}
    if rm:
        lines += [f"Distilled reward model against the teacher on held-out labels: pairwise accuracy "
                  f"{fmt(rm.get('pairwise_accuracy'))}, Spearman {fmt(rm.get('spearman'))} with the teacher's "
                  f"quality.", ""]
    return lines


def _figures_table(run: RunData) -> list[str]:
    """Held-out figures before and after RL and the RL reward's trend; a run without RL has one evaluation."""
    rows = []
    before, after = run.eval("before"), run.eval("after")
    named = (("accuracy", "held-out accuracy"), ("mean_response_tokens", "held-out response tokens"))
    if not run.has_rl:
        final = after or before
        rows = [f"| {name} | {fmt(final[key])} |" for key, name in named if key in final]
        return ["| figure | final policy (no RL stage) |", "|---|---|", *rows, ""] if rows else []
    for key, name in named:
        if key in before or key in after:
            change = (f"{after[key] - before[key]:+.3f}" if key in before and key in after else "")
            rows.append(f"| {name} | {fmt(before.get(key))} | {fmt(after.get(key))} | {change} |")
    steps, reward = run.series("reward/mean")
    if steps:
        first, last = _first_last(reward)
        rows.append(f"| RL reward (mean of first / last 5 steps) | {first:.3f} | {last:.3f} | {last - first:+.3f} |")
    return ["| figure | before RL | after RL | change |", "|---|---|---|---|", *rows, ""] if rows else []


def warnings_section(run: RunData) -> list[str]:
    """The signs that the run could not learn (rlhf/outputs/diagnostics.py), at the top where they cannot be missed."""
    warnings = learning_warnings(run.steps, run.config)
    if not warnings:
        return []
    return ["## Warnings: this run may not be learning", "", *[f"- **{w}**" for w in warnings], ""]


def evaluation_section(run: RunData) -> list[str]:
    lines = ["## Held-out evaluation, per difficulty", ""]
    before, after = run.eval("before"), run.eval("after")
    if not before and not after:
        return lines + ["No held-out evaluation in this run (add stage `eval`).", ""]
    when = "before and after RL" if run.has_rl else "once, at the end (this run has no RL stage)"
    lines += [f"Greedy answers to {before.get('n', after.get('n', '?'))} held-out prompts, checked by the "
              f"verifier, {when}.", ""]
    levels = run.difficulty_levels()
    if not levels:
        return lines + ["The prompts carry no difficulty, so there is no per-difficulty breakdown.", ""]
    if not run.has_rl:
        bins = (after or before).get("by_difficulty") or {}
        return lines + ["| difficulty | n | accuracy | response tokens |", "|---|---|---|---|",
                        *[f"| {level} | {bins[level].get('n', '')} | {fmt(bins[level].get('accuracy'))} | "
                          f"{fmt(bins[level].get('mean_response_tokens'), 1)} |" for level in levels if level in bins],
                        ""]
    lines += ["| difficulty | n | accuracy before | accuracy after | tokens before | tokens after |",
              "|---|---|---|---|---|---|"]
    b, a = before.get("by_difficulty") or {}, after.get("by_difficulty") or {}
    for level in levels:
        n = (a.get(level) or b.get(level) or {}).get("n", "")
        lines.append(f"| {level} | {n} | {fmt((b.get(level) or {}).get('accuracy'))} | "
                     f"{fmt((a.get(level) or {}).get('accuracy'))} | "
                     f"{fmt((b.get(level) or {}).get('mean_response_tokens'), 1)} | "
                     f"{fmt((a.get(level) or {}).get('mean_response_tokens'), 1)} |")
    lines.append("")
    _image(lines, run, "difficulty.png", [difficulty_accuracy_panel, difficulty_length_panel], "", 2)
    return lines


def training_section(run: RunData) -> list[str]:
    lines = ["## RL training curves", ""]
    if not run.steps:
        return lines + ["No RL step was logged (metrics.jsonl is missing or empty)." if run.has_rl else
                        "This run has no RL stage.", ""]
    lines += ["Reward and accuracy of the sampled rollouts at each step (the held-out figures before and after RL "
              "as dots), and the mean response length.", ""]
    _image(lines, run, "training.png", [reward_panel, accuracy_panel, length_panel], "")
    lines += ["### Policy update", ""]
    steps, _ = run.series("losses/kl")
    lines += ["KL to the reference policy (per token; a sharp rise means the policy is drifting fast), the clipped "
              "policy loss, the fraction of tokens clipped and the policy's entropy." if steps else
              "No KL to a reference was logged (`algorithm.kl_coef` is 0): the other update figures follow.", ""]
    _image(lines, run, "losses.png", [kl_panel, loss_panel("losses/policy_loss", "Policy loss", "#1f77b4"),
                                      loss_panel("losses/clipfrac", "Clip fraction", "#ff7f0e"),
                                      loss_panel("losses/entropy", "Entropy (nats per token)", "#2ca02c")],
           "No policy-update figures were logged.", 4)
    return lines


def sft_section(run: RunData) -> list[str]:
    """The warm-up or distillation SFT before RL: its figures and loss curve."""
    warm = run.summary.get("warmup") or {}
    if not warm and not run.stage_steps and not {"warmup", "sft"} & set(run.conf("stages") or []):
        return []
    lines = ["## Warm-up / SFT", ""]
    if "traces" in warm:
        lines += [f"Distillation SFT on `{warm['traces']}`: {warm.get('train_examples', '?')} training and "
                  f"{warm.get('eval_examples', '?')} held-out conversations, {warm.get('steps', '?')} steps; final "
                  f"training loss {fmt(warm.get('loss'))}, held-out loss {fmt(warm.get('eval_loss_before'))} before "
                  f"and {fmt(warm.get('eval_loss'))} after.", ""]
    elif warm:
        lines += [f"Warm-up on the task's teacher solutions: {warm.get('steps', '?')} steps, final loss "
                  f"{fmt(warm.get('loss'))}.", ""]
    _image(lines, run, "sft.png", [sft_loss_panel, warmup_loss_panel],
           f"No warm-up or SFT loss was logged (`{run.dir.name}/stage_metrics.jsonl` is missing).", 2)
    return lines


def components_section(run: RunData) -> list[str]:
    """Each reward component's mean raw value over the RL steps: which of them moved."""
    if not run.steps:
        return []
    lines = ["## Reward per component", ""]
    components = run.components()
    if not components:
        return lines + ["No per-component reward was logged.", ""]
    lines += ["Each component's mean raw value over a step's samples, before weighting (the RL reward is the "
              "weighted sum).", "", "| component | weight | first 5 steps | last 5 steps | change |",
              "|---|---|---|---|---|"]
    for name, weight in components:
        first, last = _first_last(run.series(f"reward/{name}")[1])
        lines.append(f"| {name} | {'not in config' if weight is None else f'{weight:g}'} | {first:.3f} | "
                     f"{last:.3f} | {last - first:+.3f} |")
    lines.append("")
    _image(lines, run, "components.png", component_panels(run), "")
    return lines


def samples_section(run: RunData) -> list[str]:
    """The newest step's saved samples as a table (rlhf/outputs/samples.py)."""
    if run.samples is None:
        return ["## Sampled completions", "", "No samples were saved (`log_samples` is 0).", ""] if run.steps else []
    step, records = run.samples
    lines = ["## Sampled completions", "",
             f"RL step {step}'s best, worst and randomly drawn rollouts, cut short here; every step's, whole, with "
             f"each component's reward and the advantage: `{SAMPLES_DIR}/step_N.jsonl`.", "",
             "| kind | reward | components | advantage | prompt (end) | response |", "|---|---|---|---|---|---|"]
    for r in records:
        parts = ", ".join(f"{name} {fmt(value, 2)}" for name, value in (r.get("rewards") or {}).items())
        lines.append(f"| {r.get('kind')} | {fmt(r.get('reward'))} | {parts} | {fmt(r.get('advantage'))} | "
                     f"{_cell(r.get('prompt', ''), from_end=True)} | {_cell(r.get('response', ''))} |")
    return lines + [""]


def _cell(text: str, from_end: bool = False) -> str:
    """Text as a table cell: one line, at most SAMPLE_TEXT characters (a prompt's end: the question is there), in
    a code span (chat-template tags would otherwise be taken for HTML)."""
    text = " ".join(str(text).split()).replace("`", "'")
    if len(text) > SAMPLE_TEXT:
        text = "..." + text[-SAMPLE_TEXT:] if from_end else text[:SAMPLE_TEXT] + "..."
    return f"`{text}`".replace("|", "\\|") if text else ""


def rm_used_lines(run: RunData) -> list[str]:
    """Which reward model scored RL: its path and version (recorded by the run, else read from its config)."""
    used = run.summary.get("reward_model_used") or _configured_rm(run)
    if not used:
        return []
    if used.get("url"):
        return [f"RL was scored by the reward server at {used['url']} (`reward.rm_endpoint`).", ""]
    path = Path(used["path"])
    here = path.resolve() == (run.dir / "reward_model").resolve()
    version = f", version `{used['version']}`" if used.get("version") else ""
    where = "trained in this run" if here else "trained elsewhere, given as `reward_model.path`"
    lines = [f"RL was scored by the reward model at `{path}` ({where}{version})."]
    own_run = path.parent / "summary.json"
    if not here and own_run.is_file():
        figures = _json_or_empty(own_run).get("reward_model") or {}
        figures = figures.get("own_data") or figures
        if figures.get("pairwise_accuracy") is not None:
            lines.append(f"The run that trained it measured a pairwise accuracy of "
                         f"{fmt(figures['pairwise_accuracy'])} on its held-out pairs ({own_run}).")
    return [" ".join(lines), ""]


def _configured_rm(run: RunData) -> dict | None:
    """A run that recorded no reward_model_used (older runs): the RM its config names, if RL used one."""
    if not (run.conf("reward.components") or {}).get("rm"):
        return None
    if run.conf("reward.rm_endpoint.url"):
        return {"url": run.conf("reward.rm_endpoint.url")}
    path = run.conf("reward_model.path") or (run.dir / "reward_model")
    return {"path": str(path)} if Path(path).is_dir() else None


def _json_or_empty(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def reward_model_section(run: RunData) -> list[str]:
    lines = ["## Reward model against the teacher", ""]
    rm = run.summary.get("reward_model") or {}
    steps, agreement = run.series("audit/rm_teacher_agreement")
    used = rm_used_lines(run)
    if not rm and not steps:
        return lines + (used + ["This run did not evaluate it and ran no teacher audit.", ""] if used else
                        ["This run trained no distilled reward model and ran no teacher audit.", ""])
    lines += used
    own = rm.get("own_data") or (rm if rm.get("source") == OWN_DATA else None)
    if own is not None:
        lines += [f"On your held-out preference data ({own.get('pairwise_count', '?')} pairs, "
                  f"{own.get('pointwise_count', '?')} scored responses) the RM scores the chosen response above the "
                  f"rejected one in {fmt(own.get('pairwise_accuracy'))} of the pairs (0.5 is chance); Spearman with "
                  f"the data's scores {fmt(own.get('spearman'))}.", ""]
    if rm and rm is not own:
        lines += [f"On held-out labelled samples ({rm.get('pairwise_count', '?')} pairs, "
                  f"{rm.get('pointwise_count', '?')} single responses) the RM orders "
                  f"{fmt(rm.get('pairwise_accuracy'))} of the teacher's pairs the same way (0.5 is chance); Spearman "
                  f"with the teacher's quality {fmt(rm.get('spearman'))}, with its reasoning verbosity (RV) "
                  f"{fmt(rm.get('rv_spearman'))}, with its cognitive difficulty (CD) "
                  f"{fmt(rm.get('cd_spearman'))}.", ""]
        quantiles = (rm.get("calibration") or {}).get("by_quantile") or []
        if quantiles:
            lines += ["Calibration: held-out responses sorted by RM score into equal groups, lowest first; the "
                      "fraction the verifier finds correct should rise: "
                      + ", ".join(fmt(q.get("fraction_correct"), 2) for q in quantiles) + ".", ""]
    if steps:
        low = min(agreement)
        lines += [f"During RL the teacher re-judged fresh rollouts {len(steps)} times: agreement with the RM from "
                  f"{agreement[0]:.3f} to {agreement[-1]:.3f} (lowest {low:.3f}). A falling agreement is the first "
                  f"sign that the policy exploits the RM.", ""]
        lines += audit_alarm_lines(run, steps, agreement)
    else:
        lines += ["No teacher audit ran during RL (`reward.audit_every` is 0).", ""]
    lines += refresh_lines(run)  # the RM's refreshes, if any (rlhf/outputs/rm_refresh_report.py)
    for key, name in (("by_difficulty", "task difficulty"), ("by_cd", "teacher's CD score")):
        bins = rm_bins(run, key)
        if bins:
            lines += [f"| {name} | pairs | RM pairwise accuracy |", "|---|---|---|",
                      *[f"| {level} | {group.get('count', '?')} | {fmt(group.get('accuracy'))} |"
                        for level, group in bins], ""]
    _image(lines, run, "reward_model.png", [rm_difficulty_panel, rm_cd_panel, audit_panel, rm_training_panel],
           "No per-difficulty RM figures and no audits to plot.", 3)
    return lines


def audit_alarm_lines(run: RunData, steps: list[int], agreement: list[float]) -> list[str]:
    """One line when an audit fell below ``reward.audit_warn_below``: where, and whether the run stopped there."""
    warn = run.conf("reward.audit_warn_below")
    alarms = [step for step, value in zip(steps, agreement) if warn is not None and value < warn]
    if not alarms:
        return []
    stopped = run.summary.get("audit_stopped_at")
    return [f"**Audit alarm** at step {', '.join(map(str, alarms))}: agreement below `reward.audit_warn_below` "
            f"({warn}); the policy may be exploiting the reward. "
            + (f"The run was stopped at step {stopped} (`reward.audit_stop_on_alarm`)." if stopped else
               "The run went on (set `reward.audit_stop_on_alarm` to stop it)."), ""]


def time_section(run: RunData) -> list[str]:
    lines = ["## Where the time went", ""]
    stages = run.summary.get("stage_s") or {}
    if stages:
        lines += ["| stage | seconds |", "|---|---|", *[f"| {k} | {v:.1f} |" for k, v in stages.items()], ""]
    means = []
    for name, label in PER_STEP_TIMES + (("perf/step_s", "whole step"),):
        _, values = run.series(name)
        if values:
            means.append(f"{label} {sum(values) / len(values):.2f} s")
    if means:
        lines += ["Mean per RL step: " + ", ".join(means) + ".", ""]
    _image(lines, run, "time.png", [stage_time_panel, step_time_panel], "No timings were recorded.", 2)
    return lines


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.md`` and ``plots/*.png`` into ``run_dir`` (an existing report is replaced); returns the path
    of report.md."""
    run = RunData(run_dir)
    lines = [f"# Run report: {run.dir.name}", ""]
    lines += overview(run)
    lines += warnings_section(run)
    _image(lines, run, "overview.png", [reward_panel, accuracy_panel, kl_panel, difficulty_accuracy_panel,
                                        difficulty_length_panel, audit_panel], "", 3, f"distilrl run {run.dir.name}")
    lines += evaluation_section(run)
    lines += sft_section(run)
    lines += training_section(run)
    lines += components_section(run)
    lines += samples_section(run)
    lines += reward_model_section(run)
    lines += time_section(run)
    lines += ["---", "Files: `summary.json` (the figures above), `metrics.jsonl` (one line per RL step), "
              "`stage_metrics.jsonl` (one line per warm-up/SFT and RM training step), `samples/` (sampled "
              "completions), "
              "`tensorboard/` (`tensorboard --logdir " + str(run.dir) + "`), `config.yaml` (what ran).", ""]
    path = run.dir / "report.md"
    path.write_text("\n".join(line for line in lines if line is not None))
    return path
