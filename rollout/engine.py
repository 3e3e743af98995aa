"""Batched sampling from a causal LM with Hugging Face ``generate`` (KV cache), returning what RL needs:
token ids, the sampler's log-probability of each token, and why each response ended."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sample:
    prompt_index: int          # index into the prompts of the call
    prompt_ids: list[int]
    response_ids: list[int]    # includes the end-of-sequence token when the model produced one
    logprobs: list[float]      # sampler's log-prob of each response token (at the sampling temperature)
    finish_reason: str         # "stop" (end-of-sequence) or "length" (hit max_new_tokens)
    text: str                  # the response decoded, special tokens dropped


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], n: int, max_new_tokens: int, temperature: float = 1.0,
             greedy: bool = False) -> list[Sample]:
    """``n`` responses per prompt, grouped: samples for prompt i are at [i*n, (i+1)*n)."""
    encoded = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    rows = [ids for ids in encoded for _ in range(n)]
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    # Left padding so every row's next token is at the same column; generate derives positions from the mask.
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    sampling = {} if greedy else {"temperature": temperature, "top_k": 0, "top_p": 1.0}
    out = model.generate(
        input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
        max_new_tokens=max_new_tokens, do_sample=not greedy, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
        return_dict_in_generate=True, output_logits=True, use_cache=True, **sampling)
    new_tokens = out.sequences[:, width:]
    # Raw logits per step, scaled as the sampler scaled them, give the sampling distribution's log-probs.
    logits = torch.stack(out.logits, dim=1).float()
    if not greedy:
        logits = logits / temperature
    token_logprobs = (logits.gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1))

    samples = []
    eos = tokenizer.eos_token_id
    for row, (tokens, logps) in enumerate(zip(new_tokens.tolist(), token_logprobs.tolist())):
        length, reason = len(tokens), "length"
        if eos in tokens:
            length, reason = tokens.index(eos) + 1, "stop"
        text = tokenizer.decode(tokens[:length], skip_special_tokens=True)
        samples.append(Sample(row // n, rows[row], tokens[:length], logps[:length], reason, text))
    return samples
