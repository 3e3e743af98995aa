"""Batched sampling from a causal LM with a KV cache, returning what RL needs: token ids, the sampler's
log-probability of each token, and why each response ended. ``generate``: Hugging Face ``generate``;
``generate_compacting``: our own decode loop that drops finished rows from the batch and the cache."""
from __future__ import annotations

from typing import Callable

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from rlhf.core.data.samples import Sample


def truncate(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """``logits`` with every token outside the ``top_k`` most likely (0: no limit; ties at the k-th all stay) and
    outside the top-p nucleus (the fewest most likely tokens whose probability reaches ``top_p``; 1: all) set to
    -inf: softmax of the result is the distribution sampling draws from, log_softmax its log-probs."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        outside = probs.cumsum(-1) - probs >= top_p  # the tokens before it already reach top_p
        logits = logits.masked_fill(outside.scatter(-1, order, outside), float("-inf"))
    return logits


class TokenLogprobs(LogitsProcessor):
    """Applies the temperature and top-k/top-p truncation (``generate`` asks Hugging Face for neither, so they
    happen here, after any processor of the model's saved generation config) and records each sampled token's
    log-probability under the resulting distribution, the one it was sampled from, keeping one decoding step of
    log-probs at a time: ``output_logits`` would keep every step's (rows, vocab) logits until the end, gigabytes at
    a 151k vocabulary. The token drawn at step t is the last column of ``input_ids`` when step t+1's scores
    arrive; ``finish`` takes the last step's token from the final sequences."""

    def __init__(self, temperature: float, top_k: int = 0, top_p: float = 1.0):
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.pending: torch.Tensor | None = None  # the last step's log-probs, waiting for the token drawn from them
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._take(input_ids[:, -1])
        scores = truncate(scores.float() / self.temperature, self.top_k, self.top_p)
        self.pending = torch.log_softmax(scores, dim=-1)
        return scores

    def _take(self, tokens: torch.Tensor) -> None:
        if self.pending is not None:
            self.steps.append(self.pending.gather(-1, tokens.unsqueeze(-1)).squeeze(-1))
            self.pending = None

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """(rows, steps) log-probs of the generated tokens (rows that ended early carry padding's afterwards)."""
        self._take(sequences[:, -1])
        return torch.stack(self.steps, dim=1)


def _left_padded(model, tokenizer, prompts: list[str], n: int) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
    """Each prompt's ids ``n`` times, and the batch's input ids and attention mask, left-padded so every row's next
    token is at the same column."""
    # A prompt given as token ids is taken as is (multi-turn rollouts continue from the ids sampled so far).
    encoded = [p if isinstance(p, list) else tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    rows = [ids for ids in encoded for _ in range(n)]
    width, pad = max(map(len, rows)), tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long, device=model.device)
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long,
                                  device=model.device)
    return rows, input_ids, attention_mask


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], n: int, max_new_tokens: int, temperature: float = 1.0,
             greedy: bool = False, top_p: float = 1.0, top_k: int = 0) -> list[Sample]:
    """``n`` responses per prompt, grouped: samples for prompt i are at [i*n, (i+1)*n)."""
    rows, input_ids, attention_mask = _left_padded(model, tokenizer, prompts, n)
    width, pad = input_ids.shape[1], tokenizer.pad_token_id
    # Temperature and truncation are TokenLogprobs' (so it records what is sampled from): none in generate's own.
    sampling = {} if greedy else {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
    recorder = TokenLogprobs(1.0, 0, 1.0) if greedy else TokenLogprobs(temperature, top_k, top_p)
    out = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
        do_sample=not greedy, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
        return_dict_in_generate=True, use_cache=True, logits_processor=LogitsProcessorList([recorder]), **sampling)
    new_tokens = out.sequences[:, width:].cpu()
    token_logprobs = recorder.finish(out.sequences).cpu()

    return _samples(tokenizer, rows, n, new_tokens.tolist(), token_logprobs.tolist())


def _samples(tokenizer, rows: list[list[int]], n: int, tokens: list[list[int]], logprobs: list[list[float]]):
    """Samples from each row's generated tokens and their log-probs, cut after the first end-of-sequence."""
    samples, eos = [], tokenizer.eos_token_id
    for row, (row_tokens, logps) in enumerate(zip(tokens, logprobs)):
        length, reason = len(row_tokens), "length"
        if eos in row_tokens:
            length, reason = row_tokens.index(eos) + 1, "stop"
        text = tokenizer.decode(row_tokens[:length], skip_special_tokens=True)
        samples.append(Sample(row // n, rows[row], row_tokens[:length], logps[:length], reason, text))
    return samples


@torch.no_grad()
def generate_compacting(model, tokenizer, prompts: list[str], n: int, max_new_tokens: int,
                        temperature: float = 1.0, greedy: bool = False, top_p: float = 1.0,
                        top_k: int = 0, stop_early: Callable[[], bool] | None = None) -> list[Sample]:
    """What ``generate`` returns, from a decode loop that takes finished rows out of the batch and the KV cache
    (once at least an eighth of the batch has finished, so the cache is not copied every step): with responses of
    varying length most rows stop well before the longest, and ``generate`` would keep computing them to the end.
    Each prompt's forward runs once for its ``n`` samples (``generate`` runs it ``n`` times).
    Sampling is multinomial at the temperature after top-k/top-p ``truncate``, as in ``generate``. Of the model's
    saved generation config it reads ``min_new_tokens`` only (end-of-sequence impossible before then, the log-probs
    those of the distribution without it, as ``generate`` records them); the rest is ``generate``'s alone.
    ``stop_early``, asked after every decoding step, ends the call there when it says so: the unfinished rows come
    back with the tokens they have, all the same number (partial rollouts continue them: rollout/partial.py)."""
    prompt_rows, input_ids, attention_mask = _left_padded(model, tokenizer, prompts, 1)
    rows = [ids for ids in prompt_rows for _ in range(n)]
    eos, scale = tokenizer.eos_token_id, 1.0 if greedy else temperature
    min_new_tokens = getattr(model.generation_config, "min_new_tokens", None) or 0
    cache = DynamicCache(config=model.config)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    # Each prompt is computed once; its n samples start from copies of its keys and values.
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                   cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1].repeat_interleave(n, dim=0)
    cache.batch_repeat_interleave(n)
    attention_mask = attention_mask.repeat_interleave(n, dim=0)
    live = torch.arange(len(rows), device=model.device)  # the original row of each batch row
    done = torch.zeros(len(rows), dtype=torch.bool, device=model.device)
    next_position = attention_mask.sum(-1)
    tokens: list[list[int]] = [[] for _ in rows]
    logprobs: list[list[float]] = [[] for _ in rows]
    for step in range(max_new_tokens):
        logits = logits.float() / scale
        if step < min_new_tokens:
            logits[:, eos] = float("-inf")
        if not greedy:
            logits = truncate(logits, top_k, top_p)
        logp = torch.log_softmax(logits, dim=-1)
        token = logp.argmax(-1) if greedy else torch.multinomial(logp.exp(), 1).squeeze(-1)
        chosen = logp.gather(-1, token[:, None]).squeeze(-1)
        for row, t, lp, finished in zip(live.tolist(), token.tolist(), chosen.tolist(), done.tolist()):
            if not finished:
                tokens[row].append(t)
                logprobs[row].append(lp)
        done |= token == eos
        if step == max_new_tokens - 1 or bool(done.all()) or (stop_early is not None and stop_early()):
            break
        if int(done.sum()) >= max(1, len(live) // 8):
            keep = (~done).nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            live, done, token = live[keep], done[keep], token[keep]
            attention_mask, next_position = attention_mask[keep], next_position[keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(live), 1)], dim=1)
        logits = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=next_position[:, None],
                       cache=cache, use_cache=True).logits[:, -1]
        next_position = next_position + 1
    return _samples(tokenizer, rows, n, tokens, logprobs)
