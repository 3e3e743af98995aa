"""What a run's figures say about whether it can learn: pure functions of the per-step metrics.

``component_figures``: each reward component's mean raw value over a step's samples (``reward/verifier``,
``reward/rm``, ...), so a run rewarded by several components shows which of them moves. ``learning_warnings``: the
signs of a run that cannot learn, read from the metrics history (metrics.jsonl's lines): most rollouts truncated,
most groups without signal, a zero gradient for several steps; each warning names the likely cause and the setting
to change. The console (after a step, each sign once while it lasts: ``fresh_warnings``) and report.md show them.
"""
from __future__ import annotations

import math

# Over the last WINDOW steps: most rollouts truncated, most groups with one reward for all their samples.
WINDOW = 5
TRUNCATED_MOST = 0.5
NO_SIGNAL_MOST = 0.75
ZERO_GRAD_STEPS = 3  # this many last steps in a row with a zero gradient norm
ZERO_GRAD = 1e-12


def component_figures(scores: list[dict]) -> dict[str, float]:
    """``reward/<component>``: the mean of each component's raw (unweighted) value over the samples that have a
    finite one, from the reward workers' per-sample ``parts``."""
    sums: dict[str, list[float]] = {}
    for score in scores:
        for name, value in (score.get("parts") or {}).items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                sums.setdefault(name, []).append(float(value))
    return {f"reward/{name}": sum(values) / len(values) for name, values in sums.items()}


def learning_warnings(history: list[dict], settings: dict | None = None) -> list[str]:
    """One line per sign that the run cannot learn, over the recent steps of ``history`` (per-step metric dicts,
    oldest first). ``settings``: the run's config as a nested dict (config.yaml), to quote the values to change."""
    recent = history[-WINDOW:]
    if not recent:
        return []
    conf = settings or {}
    span = _span(recent)
    warnings = []
    truncated = _mean(recent, "charts/truncated_rate")
    if truncated is not None and truncated >= TRUNCATED_MOST:
        warnings.append(
            f"most rollouts are truncated ({truncated:.0%} of responses hit the token limit, {span}): they end "
            f"before an answer the reward can credit; raise rollout.max_new_tokens "
            f"(now {setting(conf, 'rollout.max_new_tokens')}) or set algorithm.overlong_buffer to penalise length "
            f"before the cut")
    no_signal = _mean(recent, "reward/zero_signal_groups")
    if no_signal is not None and no_signal >= NO_SIGNAL_MOST:
        warnings.append(f"most groups have no learning signal ({no_signal:.0%} of groups gave every sample the same "
                        f"reward, {span}): their advantages are zero; "
                        + _no_signal_cause(_mean(recent, "reward/accuracy"), truncated, conf))
    norms = [m.get("losses/grad_norm") for m in history[-ZERO_GRAD_STEPS:]]
    if len(norms) == ZERO_GRAD_STEPS and all(isinstance(n, (int, float)) and abs(n) < ZERO_GRAD for n in norms):
        cause = ("every update came from groups without signal (above)" if no_signal is not None
                 and no_signal >= NO_SIGNAL_MOST else f"check trainer.lr (now {setting(conf, 'trainer.lr')}) and that "
                 f"the reward varies between a prompt's samples (reward/std)")
        warnings.append(f"the gradient has been zero for the last {ZERO_GRAD_STEPS} steps "
                        f"({_span(history[-ZERO_GRAD_STEPS:])}): the policy is not changing; {cause}")
    return warnings


def fresh_warnings(history: list[dict], settings: dict | None, said: set[str]) -> list[str]:
    """The warnings for the console after a step: ``learning_warnings`` less those already said while their sign
    lasted. ``said`` (kept by the caller between steps) is updated: a sign that went away may be said again when it
    comes back."""
    warnings = learning_warnings(history, settings)
    kinds = {_kind(w): w for w in warnings}
    fresh = [w for kind, w in kinds.items() if kind not in said]
    said.intersection_update(kinds)
    said.update(kinds)
    return fresh


def _kind(warning: str) -> str:
    """What a warning is about, without its figures: the words before its first parenthesis."""
    return warning.split(" (", 1)[0]


def _no_signal_cause(accuracy: float | None, truncated: float | None, conf: dict) -> str:
    if truncated is not None and truncated >= TRUNCATED_MOST:
        return "mostly because responses are cut off before answering (see the truncation warning)"
    if accuracy is not None and accuracy <= 0.05:
        return ("the prompts are too hard for the policy (rollout accuracy "
                f"{accuracy:.0%}): warm it up first (stage warmup), give easier prompts, or add a graded reward "
                "component beside the verifier (reward.components: rm, seqcls or custom)")
    if accuracy is not None and accuracy >= 0.95:
        return (f"the prompts are too easy for the policy (rollout accuracy {accuracy:.0%}): give harder prompts, or "
                f"set algorithm.dynamic_sampling to drop the solved groups")
    return (f"raise rollout.samples_per_prompt (now {setting(conf, 'rollout.samples_per_prompt')}) or "
            f"rollout.temperature (now {setting(conf, 'rollout.temperature')}) so that a prompt's samples differ")


def _mean(steps: list[dict], name: str) -> float | None:
    values = [m[name] for m in steps if isinstance(m.get(name), (int, float)) and math.isfinite(m[name])]
    return sum(values) / len(values) if values else None


def _span(steps: list[dict]) -> str:
    first, last = steps[0].get("step", "?"), steps[-1].get("step", "?")
    return f"step {first}" if first == last else f"steps {first}-{last}"


def setting(tree: dict, dotted: str, default="?"):
    """A value of a nested config dict by its dotted key (``rollout.max_new_tokens``); ``default`` where absent."""
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node
