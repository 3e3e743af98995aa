"""The run report: ``report.md`` and PNG plots in ``plots/``, from a run directory's ``summary.json``,
``metrics.jsonl`` and ``config.yaml``. Written at the end of every run, and again by ``distilrl report RUN_DIR``.

It is meant to be read on its own: what ran, the held-out results before and after RL (overall and per difficulty),
how reward, accuracy, response length and KL moved over the RL steps, how well the distilled reward model agrees
with its teacher (on held-out labels, and in the audits during RL), and where the time went. Whatever a run did
not produce (no RL steps, no reward model, no difficulty bins) is skipped with a sentence saying so.

Plots are drawn with matplotlib's Agg canvas directly (no pyplot): no display needed, and no global backend set
behind the caller's back.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import yaml

from rlhf.outputs.diagnostics import learning_warnings, setting

PLOTS_DIR = "plots"
OWN_DATA = "your preference data"  # reward_model.source of an RM evaluated on your own data alone
BEFORE, AFTER = "#8c8c8c", "#1f77b4"  # evaluation before RL in grey, after in blue, in every plot


class RunData:
    """What a run directory holds, read leniently: a missing or cut-short file gives empty data, not an error."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        has_summary, has_metrics = (self.dir / "summary.json").is_file(), (self.dir / "metrics.jsonl").is_file()
        if not (has_summary or has_metrics):
            raise FileNotFoundError(f"{self.dir} has no summary.json or metrics.jsonl: give the output_dir of a "
                                    f"distilrl run")
        self.summary: dict = json.loads((self.dir / "summary.json").read_text()) if has_summary else {}
        self.steps: list[dict] = []
        if has_metrics:
            for line in (self.dir / "metrics.jsonl").read_text().splitlines():
                try:
                    self.steps.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a line cut short by a crash: the steps before it still count
        config = self.dir / "config.yaml"
        self.config: dict = (yaml.safe_load(config.read_text()) or {}) if config.is_file() else {}

    def series(self, name: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one metric over the RL steps that logged a finite value of it."""
        points = [(int(m.get("step", i + 1)), float(m[name])) for i, m in enumerate(self.steps)
                  if isinstance(m.get(name), (int, float)) and math.isfinite(m[name])]
        return [s for s, _ in points], [v for _, v in points]

    def eval(self, when: str) -> dict:
        return self.summary.get(f"eval_{when}") or {}

    def difficulty_levels(self) -> list[str]:
        levels = {*(self.eval("before").get("by_difficulty") or {}), *(self.eval("after").get("by_difficulty") or {})}
        return sorted(levels, key=lambda level: (float(level) if _is_number(level) else math.inf, level))

    def conf(self, dotted: str, default=None):
        return setting(self.config, dotted, default)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------------------------- plot panels
# A panel draws on one matplotlib Axes and returns False when the run has nothing for it (the axes is then dropped).

Panel = Callable[[RunData, object], bool]


def reward_panel(run: RunData, ax) -> bool:
    steps, mean = run.series("reward/mean")
    if not steps:
        return False
    ax.plot(steps, mean, color=AFTER, label="mean")
    _, std = run.series("reward/std")
    if len(std) == len(mean) == 1:  # one step: a band through one point is invisible, an error bar is not
        ax.errorbar(steps, mean, yerr=std, color=AFTER, capsize=4, label="± std")
    elif len(std) == len(mean):
        ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=AFTER, alpha=0.15, label="± std")
    ax.set(title="Reward per RL step", xlabel="RL step", ylabel="reward")
    ax.legend(loc="best", fontsize=8)
    return True


def accuracy_panel(run: RunData, ax) -> bool:
    steps, acc = run.series("reward/accuracy")
    before, after = run.eval("before").get("accuracy"), run.eval("after").get("accuracy")
    if not steps and before is None and after is None:
        return False
    if steps:
        ax.plot(steps, acc, color=AFTER, alpha=0.6, label="rollouts (sampled)")
    last = steps[-1] if steps else run.summary.get("steps", 0)
    if before is not None:
        ax.scatter([0], [before], color=BEFORE, s=50, zorder=3, label=f"held-out before RL ({before:.2f})")
    if after is not None:
        ax.scatter([last], [after], color="#d62728", s=50, zorder=3, label=f"held-out after RL ({after:.2f})")
    ax.set(title="Accuracy", xlabel="RL step", ylabel="fraction correct", ylim=(-0.02, 1.02))
    ax.legend(loc="best", fontsize=8)
    return True


def length_panel(run: RunData, ax) -> bool:
    steps, tokens = run.series("charts/response_tokens")
    if not steps:
        return False
    ax.plot(steps, tokens, color=AFTER)
    ax.set(title="Response length (rollouts)", xlabel="RL step", ylabel="mean tokens")
    return True


def kl_panel(run: RunData, ax) -> bool:
    steps, kl = run.series("losses/kl")
    if not steps:
        return False
    ax.plot(steps, kl, color="#9467bd")
    ax.set(title="KL to the reference policy", xlabel="RL step", ylabel="KL (per token)")
    return True


def _loss_panel(name: str, title: str, color: str) -> Panel:
    def panel(run: RunData, ax) -> bool:
        steps, values = run.series(name)
        if not steps:
            return False
        ax.plot(steps, values, color=color)
        ax.set(title=title, xlabel="RL step")
        return True

    return panel


def _difficulty_panel(key: str, title: str, ylabel: str) -> Panel:
    def panel(run: RunData, ax) -> bool:
        levels = run.difficulty_levels()
        if not levels:
            return False
        width = 0.4
        for offset, when, color in ((-width / 2, "before", BEFORE), (width / 2, "after", AFTER)):
            bins = run.eval(when).get("by_difficulty") or {}
            if bins:
                values = [bins.get(level, {}).get(key, math.nan) for level in levels]
                ax.bar([i + offset for i in range(len(levels))], values, width, color=color, label=f"{when} RL")
        ax.set_xticks(range(len(levels)), levels)
        ax.set(title=title, xlabel="difficulty", ylabel=ylabel)
        ax.legend(loc="best", fontsize=8)
        return True

    return panel


difficulty_accuracy_panel = _difficulty_panel("accuracy", "Held-out accuracy per difficulty", "fraction correct")
difficulty_length_panel = _difficulty_panel("mean_response_tokens", "Held-out response length per difficulty",
                                            "mean tokens")


def _rm_bins_panel(key: str, xlabel: str, title: str) -> Panel:
    """The RM's held-out pairwise accuracy per bin of ``reward_model[key]`` (task difficulty or teacher CD)."""
    def panel(run: RunData, ax) -> bool:
        bins = _rm_bins(run, key)
        if not bins:
            return False
        ax.bar(range(len(bins)), [group["accuracy"] for _, group in bins], color="#2ca02c")
        ax.set_xticks(range(len(bins)), [level for level, _ in bins])
        ax.axhline(0.5, color="black", lw=0.8, ls=":")  # a coin flip ranks pairs at 0.5
        ax.set(title=title, xlabel=xlabel, ylabel="pairwise accuracy", ylim=(0, 1.02))
        return True

    return panel


def _rm_bins(run: RunData, key: str) -> list[tuple[str, dict]]:
    bins = (run.summary.get("reward_model") or {}).get(key) or {}
    levels = sorted(bins, key=lambda level: float(level) if _is_number(str(level)) else math.inf)
    return [(str(level), bins[level]) for level in levels]


rm_difficulty_panel = _rm_bins_panel("by_difficulty", "task difficulty", "RM on held-out pairs, per difficulty")
rm_cd_panel = _rm_bins_panel("by_cd", "teacher's difficulty (CD)", "RM on held-out pairs, per teacher CD")


def audit_panel(run: RunData, ax) -> bool:
    steps, agreement = run.series("audit/rm_teacher_agreement")
    if not steps:
        return False
    ax.plot(steps, agreement, marker="o", color="#2ca02c", label="audit of fresh rollouts")
    held_out = (run.summary.get("reward_model") or {}).get("pairwise_accuracy")
    if held_out is not None:
        ax.axhline(held_out, color=BEFORE, ls="--", label=f"held-out labels ({held_out:.2f})")
    warn = run.conf("reward.audit_warn_below")
    if warn is not None:
        ax.axhline(warn, color="#d62728", lw=0.8, ls=":", label=f"warning below {warn:g}")
    ax.set(title="RM-teacher agreement during RL", xlabel="RL step", ylabel="pairwise agreement", ylim=(0, 1.02))
    ax.legend(loc="best", fontsize=8)
    return True


PER_STEP_TIMES = (("perf/generate_s", "generate"), ("perf/score_s", "score"), ("perf/train_s", "train"),
                  ("perf/sync_s", "weight sync"))


def stage_time_panel(run: RunData, ax) -> bool:
    stages = run.summary.get("stage_s") or {}
    if not stages:
        return False
    names = list(stages)
    ax.barh(range(len(names)), [stages[n] for n in names], color="#ff7f0e")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set(title="Time per stage", xlabel="seconds")
    return True


def step_time_panel(run: RunData, ax) -> bool:
    parts = [(label, run.series(name)) for name, label in PER_STEP_TIMES]
    parts = [(label, steps, values) for label, (steps, values) in parts if steps]
    if not parts:
        return False
    steps = parts[0][1]
    if len(steps) == 1 and all(s == steps for _, s, _ in parts):  # one step: stacked bars (a stack plot is empty)
        bottom = 0.0
        for label, s, v in parts:
            ax.bar(s, v, 0.5, bottom=bottom, label=label, alpha=0.8)
            bottom += v[0]
    elif all(s == steps for _, s, _ in parts):
        ax.stackplot(steps, *[v for _, _, v in parts], labels=[label for label, _, _ in parts], alpha=0.8)
    else:
        for label, s, v in parts:
            ax.plot(s, v, label=label)
    ax.set(title="Time per RL step", xlabel="RL step", ylabel="seconds")
    ax.legend(loc="upper left", fontsize=8)
    return True


def draw(path: Path, run: RunData, panels: list[Panel], columns: int = 3, title: str | None = None) -> bool:
    """The panels that have data, in a grid of ``columns``, saved as a PNG; False (and no file) when none has."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    probe = Figure()
    drawable = [panel for panel in panels if panel(run, probe.add_subplot())]  # which panels have data
    if not drawable:
        return False
    columns = min(columns, len(drawable))
    rows = math.ceil(len(drawable) / columns)
    width, height = 4.2 * columns, 3.3 * rows + (0.3 if title else 0.0)
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    # Fixed margins in inches (room for tick labels, axis labels and titles) instead of a layout engine: on a
    # small CPU, constrained layout costs more than drawing the panels.
    figure.subplots_adjust(left=0.95 / width, right=1 - 0.2 / width, bottom=0.55 / height,
                           top=1 - (0.75 if title else 0.4) / height, wspace=0.45, hspace=0.55)
    for i, panel in enumerate(drawable):
        ax = figure.add_subplot(rows, columns, i + 1)
        panel(run, ax)
        finish_axes(ax)
    if title:
        figure.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return True


def finish_axes(ax) -> None:
    """What every panel gets: a light grid; on an RL-step axis whole-number ticks (no 1.5 between two steps, one
    tick at a one-step run's step); a marker on a line through a single point (a one-step run), which a plain
    line would leave invisible."""
    from matplotlib.ticker import MaxNLocator

    ax.grid(alpha=0.3)
    if ax.get_xlabel() == "RL step":
        low, high = ax.dataLim.intervalx
        if math.isfinite(low) and high - low < 1:
            ax.set_xlim(low - 1, high + 1)
            ax.set_xticks(sorted({round(low), round(high)}))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for line in ax.get_lines():
        if len(line.get_xdata()) == 1 and line.get_marker() in ("None", "", None):
            line.set_marker("o")


# ------------------------------------------------------------------------------------------------ the markdown


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
            f"{s['steps']} RL steps" if "steps" in s else f"{len(run.steps)} RL steps logged",
            f"{_fmt(s.get('wall_s'), 0)} s in all" if "wall_s" in s else "no summary.json (the run did not finish)"]
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
    rows = []
    before, after = run.eval("before"), run.eval("after")
    for key, name in (("accuracy", "held-out accuracy"), ("mean_response_tokens", "held-out response tokens")):
        if key in before or key in after:
            change = (f"{after[key] - before[key]:+.3f}" if key in before and key in after else "")
            rows.append(f"| {name} | {_fmt(before.get(key))} | {_fmt(after.get(key))} | {change} |")
    steps, reward = run.series("reward/mean")
    if steps:
        first, last = _first_last(reward)
        rows.append(f"| RL reward (mean of first / last 5 steps) | {first:.3f} | {last:.3f} | {last - first:+.3f} |")
    if rows:
        lines += ["| figure | before RL | after RL | change |", "|---|---|---|---|", *rows, ""]
    rm = s.get("reward_model") or {}
    if rm:
        lines += [f"Distilled reward model against the teacher on held-out labels: pairwise accuracy "
                  f"{_fmt(rm.get('pairwise_accuracy'))}, Spearman {_fmt(rm.get('spearman'))} with the teacher's "
                  f"quality.", ""]
    return lines


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
    lines.append(f"Greedy answers to {before.get('n', after.get('n', '?'))} held-out prompts, checked by the "
                 f"verifier, before and after RL.")
    lines.append("")
    levels = run.difficulty_levels()
    if not levels:
        return lines + ["The prompts carry no difficulty, so there is no per-difficulty breakdown.", ""]
    lines += ["| difficulty | n | accuracy before | accuracy after | tokens before | tokens after |",
              "|---|---|---|---|---|---|"]
    b, a = before.get("by_difficulty") or {}, after.get("by_difficulty") or {}
    for level in levels:
        n = (a.get(level) or b.get(level) or {}).get("n", "")
        lines.append(f"| {level} | {n} | {_fmt((b.get(level) or {}).get('accuracy'))} | "
                     f"{_fmt((a.get(level) or {}).get('accuracy'))} | "
                     f"{_fmt((b.get(level) or {}).get('mean_response_tokens'), 1)} | "
                     f"{_fmt((a.get(level) or {}).get('mean_response_tokens'), 1)} |")
    lines.append("")
    _image(lines, run, "difficulty.png", [difficulty_accuracy_panel, difficulty_length_panel], "", 2)
    return lines


def training_section(run: RunData) -> list[str]:
    lines = ["## RL training curves", ""]
    if not run.steps:
        return lines + ["No RL step was logged (metrics.jsonl is missing or empty).", ""]
    lines += ["Reward and accuracy of the sampled rollouts at each step (the held-out figures before and after RL "
              "as dots), and the mean response length.", ""]
    _image(lines, run, "training.png", [reward_panel, accuracy_panel, length_panel], "")
    lines += ["### Policy update", ""]
    steps, _ = run.series("losses/kl")
    lines += ["KL to the reference policy (per token; a sharp rise means the policy is drifting fast), the clipped "
              "policy loss, the fraction of tokens clipped and the policy's entropy." if steps else
              "No KL to a reference was logged (`algorithm.kl_coef` is 0): the other update figures follow.", ""]
    _image(lines, run, "losses.png", [kl_panel, _loss_panel("losses/policy_loss", "Policy loss", "#1f77b4"),
                                      _loss_panel("losses/clipfrac", "Clip fraction", "#ff7f0e"),
                                      _loss_panel("losses/entropy", "Entropy (nats per token)", "#2ca02c")],
           "No policy-update figures were logged.", 4)
    return lines


def reward_model_section(run: RunData) -> list[str]:
    lines = ["## Reward model against the teacher", ""]
    rm = run.summary.get("reward_model") or {}
    steps, agreement = run.series("audit/rm_teacher_agreement")
    if not rm and not steps:
        return lines + ["This run trained no distilled reward model and ran no teacher audit.", ""]
    own = rm.get("own_data") or (rm if rm.get("source") == OWN_DATA else None)
    if own is not None:
        lines += [f"On your held-out preference data ({own.get('pairwise_count', '?')} pairs, "
                  f"{own.get('pointwise_count', '?')} scored responses) the RM scores the chosen response above the "
                  f"rejected one in {_fmt(own.get('pairwise_accuracy'))} of the pairs (0.5 is chance); Spearman with "
                  f"the data's scores {_fmt(own.get('spearman'))}.", ""]
    if rm and rm is not own:
        lines += [f"On held-out labelled samples ({rm.get('pairwise_count', '?')} pairs, "
                  f"{rm.get('pointwise_count', '?')} single responses) the RM orders "
                  f"{_fmt(rm.get('pairwise_accuracy'))} of the teacher's pairs the same way (0.5 is chance); Spearman "
                  f"with the teacher's quality {_fmt(rm.get('spearman'))}, with its reasoning verbosity (RV) "
                  f"{_fmt(rm.get('rv_spearman'))}, with its cognitive difficulty (CD) "
                  f"{_fmt(rm.get('cd_spearman'))}.", ""]
        quantiles = (rm.get("calibration") or {}).get("by_quantile") or []
        if quantiles:
            lines += ["Calibration: held-out responses sorted by RM score into equal groups, lowest first; the "
                      "fraction the verifier finds correct should rise: "
                      + ", ".join(_fmt(q.get("fraction_correct"), 2) for q in quantiles) + ".", ""]
    if steps:
        low = min(agreement)
        lines += [f"During RL the teacher re-judged fresh rollouts {len(steps)} times: agreement with the RM from "
                  f"{agreement[0]:.3f} to {agreement[-1]:.3f} (lowest {low:.3f}). A falling agreement is the first "
                  f"sign that the policy exploits the RM.", ""]
        lines += audit_alarm_lines(run, steps, agreement)
    else:
        lines += ["No teacher audit ran during RL (`reward.audit_every` is 0).", ""]
    for key, name in (("by_difficulty", "task difficulty"), ("by_cd", "teacher's CD score")):
        bins = _rm_bins(run, key)
        if bins:
            lines += [f"| {name} | pairs | RM pairwise accuracy |", "|---|---|---|",
                      *[f"| {level} | {group.get('count', '?')} | {_fmt(group.get('accuracy'))} |"
                        for level, group in bins], ""]
    _image(lines, run, "reward_model.png", [rm_difficulty_panel, rm_cd_panel, audit_panel],
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
    lines += training_section(run)
    lines += reward_model_section(run)
    lines += time_section(run)
    lines += ["---", "Files: `summary.json` (the figures above), `metrics.jsonl` (one line per RL step), "
              "`tensorboard/` (`tensorboard --logdir " + str(run.dir) + "`), `config.yaml` (what ran).", ""]
    path = run.dir / "report.md"
    path.write_text("\n".join(line for line in lines if line is not None))
    return path
