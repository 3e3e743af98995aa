"""The report's plots: panels that each draw one figure of a run on a matplotlib Axes, and ``draw``, which lays
the panels that have data out in a grid and saves it as a PNG.

Drawn with matplotlib's Agg canvas directly (no pyplot): no display needed, and no global backend set behind the
caller's back.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

from rlhf.outputs.rm_refresh_report import refresh_marks
from rlhf.outputs.run_data import RunData, is_number

BEFORE, AFTER = "#8c8c8c", "#1f77b4"  # evaluation before RL in grey, after in blue, in every plot
COMPONENT_COLOURS = ("#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")

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
        when = "after RL" if run.has_rl else "final policy"
        ax.scatter([last], [after], color="#d62728", s=50, zorder=3, label=f"held-out, {when} ({after:.2f})")
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


def loss_panel(name: str, title: str, color: str) -> Panel:
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
        bins = rm_bins(run, key)
        if not bins:
            return False
        ax.bar(range(len(bins)), [group["accuracy"] for _, group in bins], color="#2ca02c")
        ax.set_xticks(range(len(bins)), [level for level, _ in bins])
        ax.axhline(0.5, color="black", lw=0.8, ls=":")  # a coin flip ranks pairs at 0.5
        ax.set(title=title, xlabel=xlabel, ylabel="pairwise accuracy", ylim=(0, 1.02))
        return True

    return panel


def rm_bins(run: RunData, key: str) -> list[tuple[str, dict]]:
    bins = (run.summary.get("reward_model") or {}).get(key) or {}
    levels = sorted(bins, key=lambda level: float(level) if is_number(str(level)) else math.inf)
    return [(str(level), bins[level]) for level in levels]


rm_difficulty_panel = _rm_bins_panel("by_difficulty", "task difficulty", "RM on held-out pairs, per difficulty")
rm_cd_panel = _rm_bins_panel("by_cd", "teacher's difficulty (CD)", "RM on held-out pairs, per teacher CD")


def audit_panel(run: RunData, ax) -> bool:
    steps, agreement = run.series("audit/rm_teacher_agreement")
    refreshed = refresh_marks(run, ax)  # the RM refreshes (rlhf/outputs/rm_refresh_report.py)
    if not steps and not refreshed:
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


def component_panel(name: str, weight: float | None, colour: str) -> Panel:
    """One reward component's mean raw value per RL step (``reward/<name>``), its weight in the title."""
    def panel(run: RunData, ax) -> bool:
        steps, values = run.series(f"reward/{name}")
        if not steps:
            return False
        ax.plot(steps, values, color=colour)
        weighted = f" (weight {weight:g})" if weight is not None else ""
        ax.set(title=f"reward/{name}{weighted}", xlabel="RL step", ylabel="mean raw value")
        return True

    return panel


def component_panels(run: RunData) -> list[Panel]:
    return [component_panel(name, weight, COMPONENT_COLOURS[i % len(COMPONENT_COLOURS)])
            for i, (name, weight) in enumerate(run.components())]


def _stage_panel(names: tuple[tuple[str, str], ...], title: str, xlabel: str, ylabel: str) -> Panel:
    """Figures of a training stage before RL (stage_metrics.jsonl) against its own step count."""
    def panel(run: RunData, ax) -> bool:
        drawn = False
        for (name, label), colour in zip(names, (AFTER, "#d62728")):
            steps, values = run.stage_series(name)
            if steps:
                ax.plot(steps, values, color=colour, marker="o" if len(steps) < 3 else None, label=label)
                drawn = True
        if drawn:
            ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
            ax.legend(loc="best", fontsize=8)
        return drawn

    return panel


sft_loss_panel = _stage_panel((("sft/loss", "training"), ("sft/eval_loss", "held-out")), "SFT loss",
                              "SFT step", "cross-entropy per token")
warmup_loss_panel = _stage_panel((("warmup/loss", "training"),), "Warm-up loss", "warm-up step",
                                 "cross-entropy per token")
rm_training_panel = _stage_panel((("rm/loss", "loss"), ("rm/accuracy", "pair accuracy (batch)")),
                                 "Reward model training", "RM step", "value")


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

