"""The ``seqcls`` reward component: any Hugging Face ``AutoModelForSequenceClassification`` with one output, such
as a reward model trained by TRL's ``RewardTrainer``, scoring the prompt followed by the response."""
from __future__ import annotations

from pathlib import Path

import torch

from rlhf.base.models import ModelLoadError


def check_seqcls_dir(path: str | Path) -> None:
    """Refuse, in one line, a directory that is not a safetensors ``save_pretrained`` directory (before any actor
    starts and fails with a traceback)."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"reward.seqcls_path {path} does not exist: give a local model directory")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"reward.seqcls_path {path} has no config.json: give a save_pretrained directory")
    if not any(path.glob("*.safetensors")):
        raise ModelLoadError(f"reward.seqcls_path {path} has no .safetensors weights (only safetensors are loaded)")


class SeqClsReward:
    """Scores texts with a sequence-classification reward model: its single logit for ``prompt + response``."""

    def __init__(self, path: str | Path, threads: int = 1, batch_size: int = 16, max_length: int = 2048):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        check_seqcls_dir(path)
        torch.set_num_threads(threads)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=torch.float32, use_safetensors=True).eval()
        if self.model.config.num_labels != 1:
            raise ModelLoadError(f"reward.seqcls_path {path} has {self.model.config.num_labels} outputs; a reward "
                                  f"model has one (num_labels=1)")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # The model finds each row's last real token through its pad id: it must know the tokenizer's.
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.truncation_side = "left"  # an over-long text keeps its end: the response being scored
        self.batch_size, self.max_length = batch_size, max_length

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        texts = [p + r for p, r in zip(prompts, responses, strict=True)]
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                   truncation=True, max_length=self.max_length, add_special_tokens=False)
            scores += self.model(**batch).logits[:, 0].float().tolist()
        return scores
