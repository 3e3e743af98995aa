"""The distilled reward model: a Qwen2 (or Llama) backbone with three heads that imitate the teacher's judgments.

  quality: a scalar reward (the ``score`` layer of the stock ``Qwen2ForSequenceClassification`` or
           ``LlamaForSequenceClassification`` with num_labels=1, so a saved model loads with plain
           ``AutoModelForSequenceClassification`` and gives this score);
  rv, cd:  logits over the teacher's 0-9 reasoning-verbosity and cognitive-difficulty scores; the predicted score
           is the expectation under their softmax.

Every head reads the hidden state of the sequence's last real token. A sequence is prompt tokens, response tokens
and EOS (``encode_pair``), the same layout as warm-up and rollout, right-padded in batches.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, LlamaForSequenceClassification, PreTrainedModel, Qwen2ForSequenceClassification
from transformers.utils import ModelOutput

from rlhf.core.models.safetensors_dir import check_weights, quiet_loading_report, refuse_missing

NUM_SCORES = 10  # the teacher's RV and CD scales are 0..9
HEADS = ("score.", "rv_head.", "cd_head.")
# A plain sequence-classification reward model (TRL's, say) has a score but no RV/CD heads: they load fresh.
EXTRA_HEADS = ("rv_head.", "cd_head.")


@dataclass
class RewardOutput(ModelOutput):
    """The heads' outputs. A ``ModelOutput`` (a dict underneath) so that DeepSpeed ZeRO-3's hooks, which look for
    tensors in tuples and dicts, see them."""

    quality: torch.Tensor | None = None    # (B,)
    rv_logits: torch.Tensor | None = None  # (B, 10)
    cd_logits: torch.Tensor | None = None  # (B, 10)
    rv: torch.Tensor | None = None         # (B,) expected RV under softmax(rv_logits)
    cd: torch.Tensor | None = None         # (B,)


class _DistilledHeads:
    """The distilled RM over a stock ``...ForSequenceClassification`` (num_labels=1: its ``score`` is the quality
    head) plus ``rv_head`` and ``cd_head``. Build and load through ``DistilledRewardModel``'s ``from_pretrained`` /
    ``from_causal_lm``: they pick the class for the backbone's ``model_type``."""

    stock_architecture: str  # what a saved config names, so that AutoModelForSequenceClassification loads it

    def __init__(self, config):
        if config.num_labels != 1:
            raise ValueError(f"a distilled reward model has one quality output, config says num_labels="
                             f"{config.num_labels}")
        super().__init__(config)
        hidden = config.get_text_config().hidden_size
        self.rv_head = nn.Linear(hidden, NUM_SCORES)
        self.cd_head = nn.Linear(hidden, NUM_SCORES)
        # Again, now that the extra heads exist: Hugging Face's initialisation (and, when loading, its bookkeeping
        # of which weights came from the file) covers only modules present at post_init; done ones are skipped.
        self.post_init()

    def init_heads(self, seed: int) -> None:
        """Fresh, small heads (normal with the config's initializer_range, zero bias), from their own generator
        so that every rank and a single-process reference get the same heads whatever else used the RNG."""
        g = torch.Generator().manual_seed(seed)
        std = getattr(self.config, "initializer_range", 0.02)
        with torch.no_grad():
            for layer in (self.score, self.rv_head, self.cd_head):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * std)
                if layer.bias is not None:
                    layer.bias.zero_()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                read_index: torch.Tensor | None = None, **kwargs) -> RewardOutput:
        """Scores each row at its last real token; or, given ``read_index`` (N, 2) of (row, position), at those
        positions (packed rows: ``reward.model.pair_packing``, whose 4D boolean mask comes with position_ids)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.dim() == 4 and self.config._attn_implementation == "eager":
            # Eager attention adds the mask to the scores; sdpa takes the boolean mask as it is.
            attention_mask = torch.zeros(attention_mask.shape, dtype=self.dtype, device=attention_mask.device
                                         ).masked_fill(~attention_mask, torch.finfo(self.dtype).min)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                            **kwargs).last_hidden_state
        if read_index is None:
            read_index = torch.stack([torch.arange(hidden.shape[0], device=hidden.device),
                                      last_token_index(attention_mask)], dim=1)
        pooled = hidden[read_index[:, 0], read_index[:, 1]]
        rv_logits = self.rv_head(pooled).float()
        cd_logits = self.cd_head(pooled).float()
        return RewardOutput(quality=self.score(pooled).squeeze(-1).float(), rv_logits=rv_logits,
                            cd_logits=cd_logits, rv=expected_score(rv_logits), cd=expected_score(cd_logits))

    # ----------------------------------------------------------------------------------------------- building

    @classmethod
    def from_pretrained(cls, path, *args, allow_missing: tuple[str, ...] = EXTRA_HEADS,
                        key: str = "reward model", **kwargs) -> "DistilledRewardModel":
        """Hugging Face's ``from_pretrained`` from safetensors only (``safetensors_dir.check_weights``: never a
        pickle, whatever the caller asks), refusing files that lack weights other than ``allow_missing``."""
        check_weights(path, key)
        target = _class_for(kwargs.get("config") or AutoConfig.from_pretrained(path))
        kwargs.update(use_safetensors=True, output_loading_info=True)
        with quiet_loading_report():  # Hugging Face's loader, bound to the class for this backbone
            model, info = PreTrainedModel.from_pretrained.__func__(target, path, *args, **kwargs)
        refuse_missing(info, path, key, allow_missing)
        return model

    @classmethod
    def from_causal_lm(cls, path_or_model: str | Path | PreTrainedModel, pad_token_id: int | None = None,
                       seed: int = 0) -> "DistilledRewardModel":
        """A reward model on a causal LM's backbone (commonly the SFT / warm-up student), heads fresh.

        ``pad_token_id`` is recorded in the config where the LM's has none: plain
        ``AutoModelForSequenceClassification`` finds the last token from it and refuses batches without it.
        """
        if isinstance(path_or_model, PreTrainedModel):
            config = _reward_config(path_or_model.config, pad_token_id)
            model = _class_for(config)(config)
            model.model.load_state_dict(path_or_model.model.state_dict())
        else:
            config = _reward_config(AutoConfig.from_pretrained(path_or_model), pad_token_id)
            # Straight from the LM's files: its backbone loads into ``model.*``; lm_head is left out.
            model = cls.from_pretrained(path_or_model, config=config, dtype=torch.float32, allow_missing=HEADS,
                                        key="reward model's initial backbone")
        model.init_heads(seed)
        return model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Hugging Face save (safetensors: backbone, score, rv_head and cd_head in one file), with the config naming
        the stock class (``stock_architecture``) so that plain AutoModelForSequenceClassification loads it (it
        ignores the rv/cd head weights); ``DistilledRewardModel.from_pretrained`` restores all heads."""
        kwargs.setdefault("safe_serialization", True)
        super().save_pretrained(save_directory, *args, **kwargs)
        # Hugging Face writes this class's own name into ``architectures``; name the stock class instead.
        config_file = Path(save_directory) / "config.json"
        config = json.loads(config_file.read_text())
        config["architectures"] = [self.stock_architecture]
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


class DistilledRewardModel(_DistilledHeads, Qwen2ForSequenceClassification):
    """The distilled RM on a Qwen2 backbone, and the entry point for every backbone (``from_pretrained``,
    ``from_causal_lm``)."""

    stock_architecture = "Qwen2ForSequenceClassification"


class DistilledLlamaRewardModel(_DistilledHeads, LlamaForSequenceClassification):
    """The distilled RM on a Llama backbone (SmolLM2, Llama 3)."""

    stock_architecture = "LlamaForSequenceClassification"


_BY_MODEL_TYPE = {"qwen2": DistilledRewardModel, "llama": DistilledLlamaRewardModel}


def _class_for(config) -> type:
    if config.model_type not in _BY_MODEL_TYPE:
        raise ValueError(f"the distilled reward model needs a {' or '.join(_BY_MODEL_TYPE)} backbone, got "
                         f"model_type {config.model_type!r}")
    return _BY_MODEL_TYPE[config.model_type]


def _reward_config(lm_config, pad_token_id: int | None):
    config = copy.deepcopy(lm_config)
    config.num_labels = 1
    config.architectures = [_class_for(lm_config).stock_architecture]
    config.use_cache = False
    if config.pad_token_id is None:
        config.pad_token_id = pad_token_id
    return config


def is_reward_model_dir(path: str | Path) -> bool:
    """True for a saved sequence-classification model (an RM), False for a causal LM."""
    architectures = AutoConfig.from_pretrained(path).architectures or []
    return any(name.endswith("ForSequenceClassification") for name in architectures)


# --------------------------------------------------------------------------------------------------- tensors


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position whose mask is 1, per row (right padding: length - 1). Taken from the mask, not
    from pad_token_id, because the pad token may also be a real token (e.g. EOS used as pad)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(dim=1)


def expected_score(logits: torch.Tensor) -> torch.Tensor:
    """Expectation of the 0..9 score under softmax(logits) (B, 10) -> (B,)."""
    scores = torch.arange(logits.shape[-1], dtype=logits.dtype, device=logits.device)
    return (logits.softmax(dim=-1) * scores).sum(dim=-1)


def encode_pair(tokenizer, prompt: str, response: str, max_length: int | None = None) -> list[int]:
    """Token ids of prompt + response + EOS. Too long: the start is cut off, because the end of the response (the
    final answer) matters most to the judgment and the last token is where the heads read."""
    ids = (tokenizer(prompt, add_special_tokens=False).input_ids
           + tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id])
    return ids[-max_length:] if max_length else ids


def pad_right(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, longest) long, rows right-padded with ``pad_id``."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, :len(row)] = 1
    return input_ids, attention_mask


# ------------------------------------------------------------------------------------------------- inference


REFERENCE_MARK = " ref "


def with_reference(response: str, reference: str | None) -> str:
    """The RM's view of a response when the dataset has a reference answer: the reference right after the
    response's own final answer, where comparing the two is a short-range job for a small model."""
    return response if reference is None else f"{response}{REFERENCE_MARK}{reference}"


def uses_reference(model: DistilledRewardModel) -> bool:
    """Whether this RM was trained with the reference answer in its input (saved in its config)."""
    return bool(getattr(model.config, "reference_in_input", False))


@torch.no_grad()
def score_texts(model: DistilledRewardModel, tokenizer, prompts: list[str], responses: list[str],
                batch_size: int = 16, max_length: int | None = None) -> list[dict[str, float]]:
    """One dict(quality, rv, cd) per (prompt, response), in order, scored ``batch_size`` at a time."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    results = []
    try:
        for start in range(0, len(prompts), batch_size):
            rows = [encode_pair(tokenizer, p, r, max_length)
                    for p, r in zip(prompts[start:start + batch_size], responses[start:start + batch_size])]
            input_ids, attention_mask = pad_right(rows, pad_id)
            out = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
            results += [{"quality": q, "rv": rv, "cd": cd}
                        for q, rv, cd in zip(out.quality.tolist(), out.rv.tolist(), out.cd.tolist())]
    finally:
        model.train(was_training)
    return results
