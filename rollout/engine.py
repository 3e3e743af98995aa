"""Batched sampling from a causal LM with Hugging Face ``generate`` (KV cache), returning what RL needs:
token ids, the sampler's log-probability of each token, and why each response ended."""
from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from rlhf.base.samples import Sample


class TokenLogprobs(LogitsProcessor):
    """Records each sampled token's log-probability under the distribution it was sampled from (logits /
    temperature), keeping one decoding step of log-probs at a time: ``output_logits`` would keep every step's
    (rows, vocab) logits until the end, gigabytes at a 151k vocabulary. The token drawn at step t is the last column
    of ``input_ids`` when step t+1's scores arrive; ``finish`` takes the last step's token from the final sequences.
    Leaves the scores unchanged (it runs before the temperature warper, hence its own scaling)."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.pending: torch.Tensor | None = None  # the last step's log-probs, waiting for the token drawn from them
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._take(input_ids[:, -1])
        self.pending = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def _take(self, tokens: torch.Tensor) -> None:
        if self.pending is not None:
            self.steps.append(self.pending.gather(-1, tokens.unsqueeze(-1)).squeeze(-1))
            self.pending = None

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """(rows, steps) log-probs of the generated tokens (rows that ended early carry padding's afterwards)."""
        self._take(sequences[:, -1])
        return torch.stack(self.steps, dim=1)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], n: int, max_new_tokens: int, temperature: float = 1.0,
             greedy: bool = False) -> list[Sample]:
    """``n`` responses per prompt, grouped: samples for prompt i are at [i*n, (i+1)*n)."""
    encoded = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    rows = [ids for ids in encoded for _ in range(n)]
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    # Left padding so every row's next token is at the same column; generate derives positions from the mask.
    device = model.device
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long, device=device)
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long,
                                  device=device)
    sampling = {} if greedy else {"temperature": temperature, "top_k": 0, "top_p": 1.0}
    recorder = TokenLogprobs(1.0 if greedy else temperature)
    out = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
        do_sample=not greedy, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
        return_dict_in_generate=True, use_cache=True, logits_processor=LogitsProcessorList([recorder]), **sampling)
    new_tokens = out.sequences[:, width:].cpu()
    token_logprobs = recorder.finish(out.sequences).cpu()

    samples = []
    eos = tokenizer.eos_token_id
    for row, (tokens, logps) in enumerate(zip(new_tokens.tolist(), token_logprobs.tolist())):
        length, reason = len(tokens), "length"
        if eos in tokens:
            length, reason = tokens.index(eos) + 1, "stop"
        text = tokenizer.decode(tokens[:length], skip_special_tokens=True)
        samples.append(Sample(row // n, rows[row], tokens[:length], logps[:length], reason, text))
    return samples
