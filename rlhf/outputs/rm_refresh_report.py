"""What report.md says and draws about the distilled RM's refreshes during RL (``reward.refresh``,
rlhf/rl/rm_refresh.py): where each refresh happened, the RM-teacher agreement on its held-out slice before and
after, whether it was kept or rolled back, and what it cost in teacher calls and seconds. ``run`` is the report's
RunData (``series(name) -> (steps, values)`` over metrics.jsonl)."""
from __future__ import annotations

REFRESH = "#9467bd"


def refresh_marks(run, ax) -> bool:
    """A dashed line at each refresh's step on the agreement panel, and the held-out agreement after each kept
    refresh; False where the run made none."""
    steps, _ = run.series("rm_refresh/teacher_calls")
    for i, step in enumerate(steps):
        ax.axvline(step, color=REFRESH, lw=0.8, ls="--", label="RM refresh" if i == 0 else None)
    kept = dict(zip(*run.series("rm_refresh/accepted")))
    after = [(step, value) for step, value in zip(*run.series("rm_refresh/agreement_after")) if kept.get(step)]
    if after:
        ax.plot([s for s, _ in after], [v for _, v in after], ls="none", marker="^", color=REFRESH,
                label="after refresh (its held-out slice)")
    return bool(steps)


def refresh_lines(run) -> list[str]:
    """A paragraph and a table of the run's refreshes; nothing where it made none."""
    steps, calls = run.series("rm_refresh/teacher_calls")
    if not steps:
        return []
    figures = {name: dict(zip(*run.series(f"rm_refresh/{name}")))
               for name in ("agreement_before", "agreement_after", "accepted", "seconds", "version")}
    kept = sum(1 for step in steps if figures["accepted"].get(step))
    seconds = [figures["seconds"][s] for s in steps if s in figures["seconds"]]
    times = "once" if len(steps) == 1 else f"{len(steps)} times"
    lines = [f"The RM was refreshed {times} on fresh rollouts judged by the teacher (`reward.refresh`): "
             f"{kept} kept, {len(steps) - kept} rolled back because the held-out slice of the new labels would have "
             f"agreed less with the teacher. {int(sum(calls))} teacher calls in all"
             + (f", {sum(seconds) / len(seconds):.1f} s per refresh" if seconds else "") + ".", "",
             "| step | teacher calls | held-out agreement before | after | kept | RM version |",
             "|---|---|---|---|---|---|"]
    for step, count in zip(steps, calls):
        lines.append(f"| {step} | {int(count)} | {_fmt(figures['agreement_before'].get(step))} | "
                     f"{_fmt(figures['agreement_after'].get(step))} | "
                     f"{'yes' if figures['accepted'].get(step) else 'no'} | {_fmt(figures['version'].get(step), 0)} |")
    return lines + [""]


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
