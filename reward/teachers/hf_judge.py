"""A local Hugging Face causal LM as an LLM judge, read through its next-token distribution.

For each row and each score (quality, rv, cd) the judge gets the grading prompt ending where the digit goes
("Quality score (0-9): "); its next-token probabilities over the tokens "0".."9", renormalised, are the soft
label, and their expected value is the score. Nothing is generated or parsed, so even a weak judge gives a
well-formed verdict for every row, and the soft labels carry its uncertainty into the distilled reward model.

``parse_verdict`` (free-text verdicts, used by the HTTP judge) lives in ``parsing.py`` and is re-exported here.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch

from reward.teachers.base import CORRECT_THRESHOLD, Verdict, check_rows, failed, one_line
from reward.teachers.parsing import parse_verdict
from reward.teachers.prompts import SCORE_PREFIXES, SCORE_QUESTIONS, rubric
from rlhf.core.models.safetensors_dir import load_pretrained

__all__ = ["HFJudgeTeacher", "parse_verdict", "digit_token_ids"]

FIELDS = ("quality", "rv", "cd")


class HFJudgeTeacher:
    """``HFJudgeTeacher(model_dir)`` or ``HFJudgeTeacher((model, tokenizer))``.

    ``batch_size`` counts forward-pass rows (three per judged response). ``max_length`` caps a judging prompt in
    tokens (default: the model's ``max_position_embeddings``); a longer one is an error row, not a silent cut.
    """

    def __init__(self, model: str | Path | tuple[Any, Any], batch_size: int = 8, max_length: int | None = None,
                 device: str | torch.device | None = None, dtype: torch.dtype = torch.float32):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if isinstance(model, (str, Path)):
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            model, tokenizer = load_judge(model, dtype)
            model = model.to(device)
        elif isinstance(model, tuple) and len(model) == 2:
            model, tokenizer = model
        else:
            raise ValueError("HFJudgeTeacher takes a model directory or a (model, tokenizer) pair")
        self.model = model.eval()  # dropout off: the same row must get the same verdict
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.digit_ids = digit_token_ids(tokenizer)
        self.max_length = max_length or getattr(model.config, "max_position_embeddings", None)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = pad if pad is not None else 0  # masked out anyway; any id will do
        self.use_template = bool(getattr(tokenizer, "chat_template", None))
        # Only the last position's logits are needed; with a 150k vocabulary the full tensor would dominate memory.
        self._forward_kwargs = ({"logits_to_keep": 1}
                                if "logits_to_keep" in inspect.signature(model.forward).parameters else {})

    def judge(self, prompts: list[str], responses: list[str], references: list[str | None]) -> list[Verdict]:
        check_rows(prompts, responses, references)
        errors: dict[int, str] = {}
        queries: list[tuple[int, str, list[int]]] = []  # (row, field, token ids)
        for row, (prompt, response, reference) in enumerate(zip(prompts, responses, references)):
            try:
                encoded = [(field, self._encode(prompt, response, reference, field)) for field in FIELDS]
            except Exception as err:  # a tokenizer failure on one odd row must not sink the batch
                errors[row] = f"hf judge: cannot build the judging prompt: {one_line(err, 120)}"
                continue
            longest = max(len(ids) for _, ids in encoded)
            if self.max_length and longest > self.max_length:
                errors[row] = f"hf judge: judging prompt over the model's limit of {self.max_length} tokens"
                continue
            queries += [(row, field, ids) for field, ids in encoded]

        probs: dict[tuple[int, str], list[float]] = {}
        # Similar lengths together: less padding per batch.
        queries.sort(key=lambda q: len(q[2]))
        for start in range(0, len(queries), self.batch_size):
            batch = queries[start:start + self.batch_size]
            try:
                batch_probs = self._digit_probs([ids for _, _, ids in batch])
            except Exception as err:  # e.g. out of memory: these rows fail, the rest of the call goes on
                for row, _, _ in batch:
                    errors[row] = f"hf judge: forward pass failed: {type(err).__name__}: {one_line(err, 120)}"
                continue
            for (row, field, _), p in zip(batch, batch_probs):
                probs[(row, field)] = p

        verdicts = []
        for row in range(len(prompts)):
            if row in errors:
                verdicts.append(failed(errors[row]))
                continue
            dists = {field: probs[(row, field)] for field in FIELDS}
            scores = {field: sum(i * p for i, p in enumerate(dist)) for field, dist in dists.items()}
            verdicts.append(Verdict(
                quality=scores["quality"], correct=scores["quality"] >= CORRECT_THRESHOLD,
                rv=scores["rv"], cd=scores["cd"],
                quality_probs=dists["quality"], rv_probs=dists["rv"], cd_probs=dists["cd"]))
        return verdicts

    def _encode(self, prompt: str, response: str, reference: str | None, field: str) -> list[int]:
        question = rubric(prompt, response, reference) + "\n" + SCORE_QUESTIONS[field]
        if self.use_template:
            # enable_thinking=False: templates that know it (Qwen3) then open the answer directly, where the digit
            # is read; other templates ignore the extra variable.
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                      add_generation_prompt=True, enable_thinking=False)
            return self.tokenizer(text + SCORE_PREFIXES[field], add_special_tokens=False).input_ids
        return self.tokenizer(question + "\n" + SCORE_PREFIXES[field]).input_ids

    @torch.inference_mode()
    def _digit_probs(self, rows: list[list[int]]) -> list[list[float]]:
        """Renormalised next-token probabilities over "0".."9" after each (left-padded) row."""
        width = max(map(len, rows))
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([[self.pad_id] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        # Left padding shifts positions: derive them from the mask so a padded row scores as it would alone.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False,
                         **self._forward_kwargs)
        digit_logits = out.logits[:, -1, :].double()[:, self.digit_ids]
        return torch.softmax(digit_logits, dim=-1).tolist()


def digit_token_ids(tokenizer) -> list[int]:
    """The ids of the single tokens "0".."9"; a tokenizer without them cannot be read this way."""
    ids = []
    for digit in "0123456789":
        encoded = tokenizer(digit, add_special_tokens=False).input_ids
        if len(encoded) != 1:
            token_id = tokenizer.convert_tokens_to_ids(digit)
            if token_id is None or token_id == tokenizer.unk_token_id:
                raise ValueError(f"the judge tokenizer has no single token for the digit {digit!r}")
            encoded = [token_id]
        ids.append(encoded[0])
    if len(set(ids)) != 10:
        raise ValueError("the judge tokenizer maps two digits to the same token")
    return ids


def load_judge(path: str | Path, dtype: torch.dtype = torch.float32):
    """A causal LM and tokenizer from a local directory: safetensors only, never remote code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"judge model directory {path} does not exist (a local Hugging Face directory is needed)")
    if not (path / "config.json").is_file():
        raise ValueError(f"judge model directory {path} has no config.json: is it a save_pretrained directory?")
    model = load_pretrained(AutoModelForCausalLM, path, "judge model", dtype=dtype, trust_remote_code=False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"cannot load the judge model in {path}: {one_line(err, 200)}") from None
    return model, tokenizer
