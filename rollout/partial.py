"""Partial rollouts: generation that takes new policy weights between decoding steps instead of waiting for them.

Fully asynchronous RL (``rollout.partial_rollouts``) never makes generation wait for an update: when new weights
reach a rollout worker in the middle of a batch, the engine's decode loop stops after its current step
(``stop_early``), the worker installs the weights, and the unfinished responses continue from them. A continuation
is a fresh call on the prompt plus the tokens sampled so far (token ids in, so nothing is re-tokenised): its
prefill recomputes the keys and values with the new weights, so every token is drawn from exactly one policy
version given exactly its prefix, and that version is recorded per token (``Sample.token_versions``). The
sampler's log-probs are therefore the behaviour policy's, token by token, which is what the importance-sampling
correction (``algorithm.tis_cap``) needs, and what tests/rollout/test_partial_rollouts.py recomputes.

The same idea runs in AReaL's interruptible generation and in the partial rollouts of Kimi k1.5 and slime; those
keep the old keys and values after a swap, this recomputes them (one prefill per swap, exact behaviour log-probs).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

from rlhf.core.data.samples import Sample

# generate(prompts, n, max_new_tokens, stop_early) -> samples: an interruptible engine's call, other settings bound
Generate = Callable[[list, int, int, Callable[[], bool]], list[Sample]]


def generate_partial(generate: Generate, prompts: list, n: int, max_new_tokens: int, version: Callable[[], int],
                     weights_waiting: Callable[[], bool], install_weights: Callable[[], None],
                     decode: Callable[[list[int]], str]) -> list[Sample]:
    """``n`` samples per prompt, continued across weight swaps: ``weights_waiting`` says new weights have
    arrived (the engine stops after its current decoding step), ``install_weights`` installs them (``version()``
    then says the new version), and the unfinished responses go on from their tokens so far. ``decode`` turns a
    whole response's ids into its text."""
    samples = [_versioned(s, version()) for s in generate(prompts, n, max_new_tokens, weights_waiting)]
    open_rows = [i for i, s in enumerate(samples) if _cut(s, max_new_tokens)]
    while open_rows:
        install_weights()
        done = len(samples[open_rows[0]].response_ids)  # unfinished rows decode in step: all have as many tokens
        continued = generate([samples[i].prompt_ids + samples[i].response_ids for i in open_rows], 1,
                             max_new_tokens - done, weights_waiting)
        for i, more in zip(open_rows, continued):
            samples[i] = _joined(samples[i], more, version(), decode)
        open_rows = [i for i in open_rows if _cut(samples[i], max_new_tokens)]
    return samples


def _cut(sample: Sample, max_new_tokens: int) -> bool:
    """Stopped early: neither at end-of-sequence nor at the length limit."""
    return sample.finish_reason == "length" and len(sample.response_ids) < max_new_tokens


def _versioned(sample: Sample, version: int) -> Sample:
    return replace(sample, token_versions=[version] * len(sample.response_ids))


def _joined(head: Sample, more: Sample, version: int, decode: Callable[[list[int]], str]) -> Sample:
    ids = head.response_ids + more.response_ids
    return replace(head, response_ids=ids, logprobs=head.logprobs + more.logprobs, finish_reason=more.finish_reason,
                   text=decode(ids), token_versions=head.token_versions + [version] * len(more.response_ids))
