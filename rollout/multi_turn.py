"""Multi-turn rollouts, token in and token out, over any rollout engine.

Each trajectory keeps the token ids the policy actually saw and sampled: its prompt ids, then per model turn the
sampled ids (loss mask 1, the sampler's log-probs), then the environment's observation as ids (loss mask 0,
log-prob 0), and so on. The next turn is sampled from exactly those ids, never from re-tokenised text, so the
trainer's forward over ``prompt_ids + response_ids`` scores the very tokens the sampler drew (re-tokenising the
conversation can give other tokens: a merge across a turn boundary, a special token lost in decoding).

All live trajectories of a batch advance one turn per engine call. A trajectory ends with ``stop`` (the
environment says the episode is over), ``length`` (a turn hit max_new_tokens, or the trajectory its total token
budget), ``max_turns``, or ``tool_error`` (its tool time or tool errors ran out).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from rlhf.core.data.samples import Sample

# (prompt id lists, samples per prompt, max new tokens) -> samples, grouped by prompt: the engine with its
# sampling settings bound (rollout/worker.py).
SampleFn = Callable[[list[list[int]], int, int], list[Sample]]
ENV_THREADS = 8  # environments stepped at once (their tools run as processes)


@dataclass
class _Trajectory:
    prompt_index: int
    env: object
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)     # model turns and observations, in order
    turns: int = 0
    last_turn: str = ""
    info: dict = field(default_factory=lambda: {"tool_calls": 0, "tool_errors": 0, "tool_s": 0.0, "turn_reward": 0.0})
    finish: str | None = None

    def sample(self) -> Sample:
        episode = {"turns": self.turns, **self.info}
        return Sample(self.prompt_index, self.prompt_ids, self.ids, self.logprobs, self.finish or "length",
                      "".join(self.texts), loss_mask=self.mask, final_text=self.last_turn, episode=episode)


class MultiTurnRollout:
    """``make_env()``: a fresh environment per trajectory; ``limits``: the run's ``rollout.multi_turn`` section
    (max_turns, max_total_tokens, max_tool_seconds, max_tool_errors)."""

    def __init__(self, tokenizer, make_env: Callable[[], object], limits):
        self.tokenizer, self.make_env, self.limits = tokenizer, make_env, limits

    def run(self, sample: SampleFn, prompts: list[str], n: int, max_new_tokens: int) -> list[Sample]:
        """``n`` trajectories per prompt, grouped by prompt as an engine's samples are."""
        trajectories = []
        for index, prompt in enumerate(prompts):
            for _ in range(n):
                env = self.make_env()
                ids = self._encode(env.reset(prompt))
                trajectories.append(_Trajectory(index, env, ids))
        # The first turn shares each prompt's prefill among its n samples where the n first observations agree.
        firsts = [trajectories[i * n:(i + 1) * n] for i in range(len(prompts))]
        if all(len({tuple(t.prompt_ids) for t in group}) == 1 for group in firsts):
            outs = sample([group[0].prompt_ids for group in firsts], n, self._turn_budget(trajectories, max_new_tokens))
            self._advance(trajectories, outs)
        else:
            self._turn(sample, trajectories, max_new_tokens)
        while live := [t for t in trajectories if t.finish is None]:
            self._turn(sample, live, max_new_tokens)
        return [t.sample() for t in trajectories]

    def _turn(self, sample: SampleFn, live: list[_Trajectory], max_new_tokens: int) -> None:
        outs = sample([t.prompt_ids + t.ids for t in live], 1, self._turn_budget(live, max_new_tokens))
        self._advance(live, outs)

    def _turn_budget(self, live: list[_Trajectory], max_new_tokens: int) -> int:
        """One engine call's max new tokens: the turn limit, or less where every row's total budget is smaller."""
        return max(1, min(max_new_tokens, max(self.limits.max_total_tokens - len(t.ids) for t in live)))

    def _advance(self, live: list[_Trajectory], outs: list[Sample]) -> None:
        """Each trajectory's sampled turn appended; the environments answer the turns that ended, side by side
        (a tool call mostly waits on its process: a slow one does not hold up the others)."""
        for t, out in zip(live, outs, strict=True):
            room = self.limits.max_total_tokens - len(t.ids)
            turn_ids, logprobs, reason = out.response_ids[:room], out.logprobs[:room], out.finish_reason
            if len(out.response_ids) > room:
                reason = "length"
            t.ids += turn_ids
            t.logprobs += logprobs
            t.mask += [1] * len(turn_ids)
            t.turns += 1
            t.last_turn = self.tokenizer.decode(turn_ids, skip_special_tokens=True)
            t.texts.append(t.last_turn)
            if reason != "stop":
                t.finish = "length"
        answered = [t for t in live if t.finish is None]
        # Only the environments run in threads: a fast tokenizer must not encode from two threads at once.
        with ThreadPoolExecutor(max_workers=min(ENV_THREADS, max(1, len(answered)))) as pool:
            results = list(pool.map(lambda t: t.env.step(t.last_turn), answered))
        for t, result in zip(answered, results):
            self._observe(t, result)

    def _observe(self, t: _Trajectory, result) -> None:
        """The environment's answer to the turn just taken: the end of the episode, or an observation appended."""
        for key in t.info:
            t.info[key] += result.info.get(key, 0)
        limits = self.limits
        if result.done:
            t.finish = "stop"
        elif t.turns >= limits.max_turns:
            t.finish = "max_turns"
        elif t.info["tool_s"] > limits.max_tool_seconds or t.info["tool_errors"] >= limits.max_tool_errors:
            t.finish = "tool_error"
        else:
            observation = self._encode(result.observation)
            if len(t.ids) + len(observation) >= limits.max_total_tokens:
                t.finish = "length"  # no room left for the model to answer the observation
                return
            t.ids += observation
            t.logprobs += [0.0] * len(observation)
            t.mask += [0] * len(observation)
            t.texts.append(result.observation)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids


def episode_figures(samples: list[Sample]) -> dict[str, float]:
    """Tool use of multi-turn samples, per sample: turns, tool_calls, tool_errors, model_tokens; and the share of
    each finish reason. Empty for single-turn samples."""
    episodes = [s for s in samples if s.episode is not None]
    if not episodes:
        return {}
    n = len(episodes)
    figures = {key: round(sum(s.episode[key] for s in episodes) / n, 4)
               for key in ("turns", "tool_calls", "tool_errors")}
    figures["model_tokens"] = round(sum(sum(s.loss_mask) for s in episodes) / n, 2)
    for reason in ("stop", "length", "max_turns", "tool_error"):
        figures[f"finish_{reason}"] = round(sum(s.finish_reason == reason for s in episodes) / n, 4)
    return figures
