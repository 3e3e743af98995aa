"""The ``seqcls`` reward component: any Hugging Face ``AutoModelForSequenceClassification`` with one output, such
as a reward model trained by TRL's ``RewardTrainer``, scoring the prompt followed by the response."""
from __future__ import annotations

from pathlib import Path

import torch

from reward.model.distilled import pad_right
from rlhf.core.models.build import ModelLoadError
from rlhf.core.models.safetensors_dir import check_weights, load_pretrained

KEY = "reward.seqcls_path"


def check_seqcls_dir(path: str | Path) -> None:
    """Refuse, in one line, a directory that is not a safetensors ``save_pretrained`` directory (before any actor
    starts and fails with a traceback)."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"reward.seqcls_path {path} does not exist: give a local model directory")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"reward.seqcls_path {path} has no config.json: give a save_pretrained directory")
    check_weights(path, KEY)


TEXT_FORMATS = ("auto", "chat", "plain")


class SeqClsReward:
    """Scores texts with a sequence-classification reward model: its single logit for the prompt and response,
    tokenized as TRL's ``RewardTrainer`` tokenized its training pairs, so the model sees what it was trained on.

    ``text_format``: ``chat`` renders ``[user: prompt, assistant: response]`` with the tokenizer's chat template
    (TRL's conversational datasets); ``plain`` scores ``prompt + response + eos`` with the tokenizer's own special
    tokens (TRL's plain-text datasets: it appends the end-of-sequence token); ``auto`` picks ``chat`` when the
    saved tokenizer has a chat template. A prompt that the run has already rendered with the same template (it
    ends with the template's generation prompt, as a chat student's prompts do) is not wrapped twice: the response
    and the template's end of turn follow it."""

    def __init__(self, path: str | Path, threads: int = 1, batch_size: int = 16, max_length: int = 2048,
                 text_format: str = "auto"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        check_seqcls_dir(path)
        if text_format not in TEXT_FORMATS:
            raise ValueError(f"seqcls text format {text_format!r}: use one of {', '.join(TEXT_FORMATS)}")
        torch.set_num_threads(threads)
        self.model = load_pretrained(AutoModelForSequenceClassification, path, KEY, dtype=torch.float32).eval()
        if self.model.config.num_labels != 1:
            raise ModelLoadError(f"reward.seqcls_path {path} has {self.model.config.num_labels} outputs; a reward "
                                  f"model has one (num_labels=1)")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token_id is None:  # what TRL pads with when the tokenizer names no pad token
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # The model finds each row's last real token through its pad id: it must know the tokenizer's.
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        if text_format == "auto":
            text_format = "chat" if getattr(self.tokenizer, "chat_template", None) else "plain"
        self.text_format = text_format
        self._turn = _assistant_turn(self.tokenizer) if text_format == "chat" else None
        self.batch_size, self.max_length = batch_size, max_length

    def token_ids(self, prompt: str, response: str) -> list[int]:
        """One sample's ids as TRL's RewardTrainer builds them for the text format; an over-long sample keeps its
        last ``max_length`` ids (the response being scored; TRL drops such pairs from training instead)."""
        if self.text_format == "chat" and self._turn is not None and prompt.endswith(self._turn[0]):
            ids = self.tokenizer(text=prompt + response + self._turn[1], add_special_tokens=False)["input_ids"]
        elif self.text_format == "chat":
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            ids = self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        else:
            text = prompt + response
            eos = self.tokenizer.eos_token
            if eos is not None and not text.endswith(eos):
                text += eos
            ids = self.tokenizer(text=text)["input_ids"]
        return list(ids)[-self.max_length:]

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        rows = [self.token_ids(p, r) for p, r in zip(prompts, responses, strict=True)]
        scores: list[float] = []
        for start in range(0, len(rows), self.batch_size):
            input_ids, attention_mask = pad_right(rows[start:start + self.batch_size], self.tokenizer.pad_token_id)
            scores += self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float().tolist()
        return scores


def _assistant_turn(tokenizer) -> tuple[str, str] | None:
    """(generation prompt, end of turn) of the tokenizer's chat template: what opens the assistant's turn after a
    user message and what closes it after the response, e.g. ChatML's ``<|im_start|>assistant\\n`` and
    ``<|im_end|>\\n``. None when the template does not render a conversation as prompt + response + end."""
    user, answer = [{"role": "user", "content": "PROMPT"}], "RESPONSE"
    try:
        opened = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        closed = tokenizer.apply_chat_template(user, tokenize=False)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": answer}], tokenize=False)
    except Exception:  # noqa: BLE001 - a template that needs more than this: always render whole conversations
        return None
    if not (opened.startswith(closed) and full.startswith(opened + answer)) or opened == closed:
        return None
    return opened[len(closed):], full[len(opened) + len(answer):]
