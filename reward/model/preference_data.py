"""Your own preference data for the distilled RM: TRL's dataset layouts turned into the trainer's pairs.

Pairwise rows, in any of TRL's four preference layouts:
  explicit prompt, plain text:      {"prompt": str, "chosen": str, "rejected": str}
  implicit prompt, plain text:      {"chosen": str, "rejected": str}  (the shared start of both is the prompt)
  explicit prompt, conversational:  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
  implicit prompt, conversational:  {"chosen": [messages], "rejected": [messages]}  (the shared leading messages)
optionally with ``margin`` (TRL's: the Bradley-Terry gap asked for), ``score_chosen``/``score_rejected`` (any
scale, e.g. UltraFeedback's), and the labelling run's own columns (``reference``, ``difficulty``,
``{chosen,rejected}_{rv,cd}`` and their ``_probs`` soft labels).

Pointwise rows: {"prompt", "completion" (or "response"), "score"} on any scale, or TRL's unpaired
{"prompt", "completion", "label": bool}; responses to the same prompt whose scores differ become pairs, as
teacher-judged samples do (``reward.model.labelling.make_pairs``).

Scores are mapped linearly onto the teacher's 0-9 quality scale (the dataset's lowest score to 0, highest to 9),
so the quality regression and a margin derived from scores (difference / 9, where no ``margin`` column is given)
mean the same as for teacher labels, and both kinds of data can be mixed. Conversational prompts are rendered with
the chat template the run renders its prompts with (``render``), ending with the assistant's turn opened.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from reward.model.labelling import make_pairs
from rlhf.core.data.datasets import DatasetError, open_dataset

# messages -> the prompt text, the assistant's turn opened (as the policy's prompts are rendered for RL).
RenderFn = Callable[[list[dict]], str]

# Columns a pair carries over as they are (the names make_pairs gives teacher-labelled pairs).
PASS_THROUGH = ("reference", "difficulty") + tuple(
    f"{side}_{name}{suffix}" for side in ("chosen", "rejected") for name in ("rv", "cd") for suffix in ("", "_probs"))
SCORE_COLUMNS = ("score_chosen", "score_rejected")


@dataclass
class PreferenceData:
    """Pairs in the trainer's format (``reward.model.ranks.collate_pairs``) and scored responses in the labelling
    rows' format (for held-out Spearman), plus how they were read."""

    pairs: list[dict] = field(default_factory=list)
    pointwise: list[dict] = field(default_factory=list)
    layout: str = ""

    def held_out(self, fraction: float, seed: int) -> tuple["PreferenceData", "PreferenceData"]:
        """(train, held out): ``fraction`` of the prompts, drawn by ``seed``, with all their pairs and rows held
        out, so no held-out prompt was seen in training."""
        prompts = sorted({r["prompt"] for r in self.pairs} | {r["prompt"] for r in self.pointwise})
        count = max(1, round(len(prompts) * fraction))
        if count >= len(prompts):
            raise DatasetError(f"reward_model.eval_fraction={fraction} of {len(prompts)} prompts leaves none to "
                               f"train on: lower it or give reward_model.eval_file")
        held = set(random.Random(seed).sample(prompts, count))
        parts = [PreferenceData(layout=self.layout), PreferenceData(layout=self.layout)]
        for name in ("pairs", "pointwise"):
            for row in getattr(self, name):
                getattr(parts[row["prompt"] in held], name).append(row)
        return parts[0], parts[1]


def load_preference_data(path: str | Path, render: RenderFn, seed: int = 0,
                         log: Callable[[str], None] | None = None) -> PreferenceData:
    """The pairs (and scored rows) of a preference dataset file or ``save_to_disk`` directory, in any layout the
    module describes; a file in none of them stops with a ``DatasetError`` naming its columns."""
    dataset = open_dataset(path, "train", "a DatasetDict's train split")
    records = [dict(r) for r in dataset]
    if not records:
        raise DatasetError(f"{path} has no rows")
    if _layout_kind(path, set(records[0])) == "pairs":
        data = _pairwise(records, render)
    else:
        data = _pointwise(records, render, seed)
    if not data.pairs:
        raise DatasetError(f"{path}: no pair to train on ({data.layout}; scored responses pair up only where one "
                           f"prompt has responses with different scores)")
    if log is not None:
        log(f"preference data {path}: {data.layout}, {len(data.pairs)} pairs"
            + (f" from {len(data.pointwise)} scored responses" if data.pointwise else ""))
    return data


def check_preference_file(path: str | Path, key: str) -> None:
    """Refuse, before a run writes anything, a preference file that is missing, empty or in no layout this module
    reads (``key``: the setting that names it)."""
    if not Path(path).exists():
        raise DatasetError(f"{key} {path} does not exist")
    dataset = open_dataset(path, "train", "a DatasetDict's train split")
    if len(dataset) == 0:
        raise DatasetError(f"{path} has no rows")
    _layout_kind(path, set(dataset.column_names))


def _layout_kind(path: str | Path, columns: set[str]) -> str:
    """"pairs" or "scored" by a dataset's columns; a DatasetError naming them when they fit neither."""
    if {"chosen", "rejected"} <= columns:
        return "pairs"
    if "prompt" in columns and ({"completion", "response"} & columns) and ({"score", "label"} & columns):
        return "scored"
    raise DatasetError(f"{path} has columns {sorted(columns)}: give chosen/rejected (with or without prompt) for "
                       f"pairs, or prompt/completion with score or label for scored responses")


def tokenizer_fit(pairs: list[dict], tokenizer, max_length: int) -> dict[str, int]:
    """How the RM's tokenizer takes ``pairs``: ``garbled``, the pairs with a text that does not come back from
    encode and decode (characters outside its vocabulary become unknown tokens, spaces may go: the character
    tokenizer of the built students knows little beyond arithmetic); ``truncated``, those longer than
    ``max_length`` tokens, whose start the RM never sees (``encode_pair`` keeps the end); ``pairs``, all."""
    garbled = truncated = 0
    for pair in pairs:
        texts = (pair["prompt"], pair["chosen"], pair["rejected"])
        ids = [tokenizer(text, add_special_tokens=False).input_ids for text in texts]
        if any(_words(tokenizer.decode(i, clean_up_tokenization_spaces=False)) != _words(t)
               for t, i in zip(texts, ids)):
            garbled += 1
        if len(ids[0]) + max(len(ids[1]), len(ids[2])) + 1 > max_length:  # + end-of-sequence
            truncated += 1
    return {"pairs": len(pairs), "garbled": garbled, "truncated": truncated}


def fit_warnings(fit: dict[str, int], name: str, max_length: int) -> list[str]:
    """One warning line per problem ``tokenizer_fit`` counted in preference data ``name``."""
    lines = []
    if fit["garbled"]:
        lines.append(f"warning: {fit['garbled']} of {fit['pairs']} pairs of {name} do not survive the RM's tokenizer "
                     f"(characters it does not know become <unk>): the RM cannot read them as written; start it "
                     f"from a model with a tokenizer for your text (model.model_name_or_path)")
    if fit["truncated"]:
        lines.append(f"warning: {fit['truncated']} of {fit['pairs']} pairs of {name} are longer than "
                     f"reward_model.max_length={max_length} tokens: the RM sees only their last {max_length} "
                     f"tokens; raise reward_model.max_length")
    return lines


def _words(text: str) -> list[str]:
    return text.split()


# ---------------------------------------------------------------------------------------------------- pairwise


def _pairwise(records: list[dict], render: RenderFn) -> PreferenceData:
    conversational = isinstance(records[0]["chosen"], list)
    explicit = "prompt" in records[0]
    scale = _score_scale([r[k] for r in records for k in SCORE_COLUMNS if r.get(k) is not None])
    pairs = []
    for i, record in enumerate(records):
        prompt, chosen, rejected = _split_pair(record, conversational, explicit, render, i)
        pair = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        pair.update({k: record[k] for k in PASS_THROUGH if record.get(k) is not None})
        if record.get("score_chosen") is not None and record.get("score_rejected") is not None:
            pair["chosen_quality"], pair["rejected_quality"] = scale(record["score_chosen"]), scale(
                record["score_rejected"])
            pair["margin"] = (pair["chosen_quality"] - pair["rejected_quality"]) / 9.0
        if record.get("margin") is not None:
            pair["margin"] = float(record["margin"])
        pairs.append(pair)
    prompt = "an explicit" if explicit else "an implicit"
    text = "conversational" if conversational else "plain text"
    return PreferenceData(pairs=pairs, layout=f"pairs with {prompt} prompt, {text}")


def _split_pair(record: dict, conversational: bool, explicit: bool, render: RenderFn, index: int
                ) -> tuple[str, str, str]:
    """(prompt text, chosen response, rejected response) of one pairwise record."""
    chosen, rejected = record["chosen"], record["rejected"]
    if not conversational:
        if explicit:
            return str(record["prompt"]), str(chosen), str(rejected)
        start = _shared_text_prefix(chosen, rejected)
        return chosen[:start], chosen[start:], rejected[start:]
    if explicit:
        prompt = _messages(record["prompt"], index, "prompt")
    else:
        chosen, rejected = _messages(chosen, index, "chosen"), _messages(rejected, index, "rejected")
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    return render(prompt), _reply_text(chosen, index, "chosen"), _reply_text(rejected, index, "rejected")


def _shared_text_prefix(a: str, b: str) -> int:
    """Where the responses start in an implicit-prompt pair: after the two texts' common start, cut back to the
    last whitespace in it so that no word is split between prompt and response."""
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    while length > 0 and not a[length - 1].isspace():
        length -= 1
    return length


def _messages(value, index: int, column: str) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(m, dict) and "content" in m for m in value):
        raise DatasetError(f"row {index}: {column} is not a list of messages with role and content")
    return value


def _reply_text(messages: list[dict], index: int, column: str) -> str:
    """The response as the RM reads it: the assistant messages' text (one, in TRL's datasets)."""
    return "\n".join(str(m["content"]) for m in _messages(messages, index, column))


# --------------------------------------------------------------------------------------------------- pointwise


def _pointwise(records: list[dict], render: RenderFn, seed: int) -> PreferenceData:
    key = "completion" if "completion" in records[0] else "response"
    scored = "score" in records[0]
    scale = _score_scale([r["score"] for r in records if r.get("score") is not None]) if scored else None
    rows = []
    for i, record in enumerate(records):
        prompt, response = record["prompt"], record[key]
        if isinstance(prompt, list):
            prompt = render(_messages(prompt, i, "prompt"))
        if isinstance(response, list):
            response = _reply_text(response, i, key)
        row = {"prompt": prompt, "response": response, "reference": record.get("reference"),
               "difficulty": record.get("difficulty"), "correct": None}
        if scored:
            row["quality"] = scale(record["score"])
        else:
            row["quality"] = 9.0 if record["label"] else 0.0
            row["correct"] = bool(record["label"])
        for name in ("rv", "cd"):
            row[name], row[f"{name}_probs"] = record.get(name), record.get(f"{name}_probs")
        row["quality_probs"] = None
        rows.append(row)
    layout = "scored responses" if scored else "responses labelled good/bad (TRL unpaired)"
    return PreferenceData(pairs=make_pairs(rows, seed), pointwise=rows, layout=layout)


def _score_scale(scores: list) -> Callable[[float], float]:
    """A linear map of the dataset's scores onto 0-9 (lowest to 0, highest to 9); all equal: the middle, 4.5."""
    values = [float(s) for s in scores]
    low, high = (min(values), max(values)) if values else (0.0, 0.0)
    if high == low:
        return lambda score: 4.5
    return lambda score: 9.0 * (float(score) - low) / (high - low)


def message_renderer(tokenizer, template: str | None = None, template_kwargs: dict | None = None,
                     plain: bool = False) -> RenderFn:
    """Prompt messages rendered as the run renders its prompts (rlhf/core/data/chat.py): with the tokenizer's chat
    template or ``template``, the assistant's turn opened; ``plain`` or no template: the contents, blank-line
    separated."""
    if plain or (template is None and not getattr(tokenizer, "chat_template", None)):
        return lambda messages: "\n\n".join(str(m["content"]) for m in messages)
    return lambda messages: tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                          add_generation_prompt=True, **(template_kwargs or {}))
