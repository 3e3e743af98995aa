"""Distillation SFT on a traces dataset: the warm-up stage (``sft``) trained on your data instead of the arithmetic
oracle's traces.

The dataset is ``distilrl traces``' output or any other (a ``save_to_disk`` directory, or a .jsonl, .json or
.parquet file) with a ``messages`` column (OpenAI format: every assistant turn is trained, the rest is context) or
``prompt``/``response`` columns (the prompt as a user turn, under ``task.system_prompt``). Conversations are
rendered with the student's chat template exactly as RL renders its prompts (rlhf/core/data/chat.py), so the student
learns to answer in the format RL will sample it in; think blocks in the responses are kept as they are.

The loss is the mean cross-entropy over the assistant tokens only (their closing end-of-turn token included);
the logits are computed for those tokens alone, which matters with a 150k vocabulary. Rows of a batch are packed
end to end (rlhf/core/data/packing.py) where that saves enough padding. A held-out share of the conversations gives
the held-out loss, logged as ``sft/eval_loss``.
"""
from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Callable

import torch

from rlhf.core.data.chat import (ChatFormatError, check_messages, make_renderer, template_override, uses_template,
                            with_system)
from rlhf.core.config.run_config import ConfigError, RunConfig, TaskConfig, WarmupConfig
from rlhf.core.data.datasets import DatasetError, load_rows, open_dataset, usable_rows
from rlhf.core.data.packing import PACKABLE_ATTENTION, micro_batches, model_inputs, zero_sequence_starts
from rlhf.core.models import lora
from rlhf.core.progress import Progress

TRACES_DATASET = Path("traces") / "dataset"  # where the traces stage writes, inside output_dir


def traces_path(cfg: RunConfig, output_dir: str | Path, custom_prompts: bool = False,
                log: Callable[[str], None] | None = None) -> str | None:
    """The traces dataset the warm-up trains on: ``warmup.traces_file``, else the traces stage's output in
    ``output_dir``; None for the arithmetic task's own warm-up. Any other task (or the ``sft`` stage) without
    traces is a ConfigError: never a silent fallback to arithmetic. Prompts passed in from Python to an arithmetic
    config keep the arithmetic warm-up (their prompts may well be sums), said in one ``log`` line."""
    if cfg.warmup.traces_file:
        return cfg.warmup.traces_file
    written = Path(output_dir) / TRACES_DATASET
    if "traces" in cfg.stages or written.is_dir():
        return str(written)
    if cfg.task.name != "arithmetic" or "sft" in cfg.stages:
        raise ConfigError(f"the warm-up on task {cfg.task.name} needs a traces dataset: set warmup.traces_file "
                          f"(e.g. from `distilrl traces`), or add stage traces before it")
    if custom_prompts and log is not None:
        log("warm-up: on the arithmetic task's oracle traces, not on train_dataset's prompts; to distil a teacher "
            "on them, set warmup.traces_file (or add stage traces)")
    return None


def traces_stage(cfg: RunConfig, output_dir: str | Path, log: Callable[[str], None] = print,
                 train_dataset=None) -> dict:
    """The ``traces`` stage: teacher traces on the training prompts (raw: the teacher applies its own chat
    template), graded and selected, into ``output_dir/traces`` (reward/teachers/traces.py); returns its summary."""
    from reward.teachers.traces import build_traces

    train, _ = load_rows(cfg.task, cfg.seed, train_dataset, None, log=log)
    return build_traces(cfg, train, Path(output_dir) / TRACES_DATASET.parent, log)


def load_conversations(path: str | Path, cfg: WarmupConfig, system_prompt: str | None = None,
                       log: Callable[[str], None] | None = print) -> list[list[dict]]:
    """One conversation per row of the traces dataset: its ``messages``, or its prompt and response as a user and
    an assistant turn (with ``system_prompt``). Rows without an assistant turn are skipped and counted."""
    path = Path(path)
    if not (path.is_dir() or path.is_file()):
        raise DatasetError(f"warmup.traces_file {path} does not exist: run `distilrl traces` first, or fix the path")
    # A save_to_disk directory of several splits: its train split (the traces stage writes a single Dataset).
    data = open_dataset(path, "train", "warmup.traces_file's split")
    conversations, problems = [], []
    for i, row in enumerate(data):
        try:
            conversations.append(_conversation(row, cfg, system_prompt))
        except (ChatFormatError, KeyError) as err:
            problems.append(f"row {i}: {err}")
    return usable_rows(conversations, problems, str(path), log)


def _conversation(row: dict, cfg: WarmupConfig, system_prompt: str | None) -> list[dict]:
    if row.get(cfg.messages_field) is not None:
        messages = check_messages(row[cfg.messages_field])
    elif isinstance(row.get(cfg.prompt_field), str) and isinstance(row.get(cfg.response_field), str):
        messages = with_system([{"role": "user", "content": row[cfg.prompt_field]},
                                {"role": "assistant", "content": row[cfg.response_field]}], system_prompt)
    else:
        raise ChatFormatError(f"has neither a {cfg.messages_field!r} column nor text {cfg.prompt_field!r} and "
                              f"{cfg.response_field!r} columns (set warmup.messages_field/prompt_field/response_field)")
    if not any(m["role"] == "assistant" for m in messages):
        raise ChatFormatError("has no assistant turn to train on")
    if next(m["role"] for m in messages if m["role"] != "system") != "user":
        raise ChatFormatError("starts with an assistant turn: a reply needs a user turn before it")
    return messages


def conversation_segments(messages: list[dict], tokenizer, task: TaskConfig) -> list[tuple[str, bool]]:
    """The conversation's text in pieces, each (text, trained?): rendered as ``make_renderer`` renders RL prompts,
    so every assistant turn follows exactly the prompt text RL would give. An assistant piece runs to the end of
    its turn (the template's end-of-turn mark included); context after the last assistant turn is left out."""
    render = make_renderer(task, tokenizer)
    plain = not uses_template(task, tokenizer)
    segments: list[tuple[str, bool]] = []
    rendered = ""
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render([""], [None], [messages[:k]])[0]
        if plain:  # the reply follows the prompt directly (tokenize_conversation adds end-of-sequence)
            full = prompt + message["content"]
        else:
            full = _template_text(tokenizer, task, messages[:k + 1])
        if not (prompt.startswith(rendered) and full.startswith(prompt)):
            raise ConfigError("the chat template does not render a conversation turn by turn (an earlier turn "
                              "changes when a later one is added): set task.chat_template to one that does")
        segments += [(prompt[len(rendered):], False), (full[len(prompt):], True)]
        rendered = full
    return segments


def _template_text(tokenizer, task: TaskConfig, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template_override(task), tokenize=False,
                                         add_generation_prompt=False, **task.chat_template_kwargs)


def tokenize_conversation(messages: list[dict], tokenizer, task: TaskConfig) -> tuple[list[int], list[int]]:
    """(token ids, loss mask: 1 on the assistant turns' tokens). Plain-text rendering ends each reply with the
    end-of-sequence token, which is trained too: the student learns where to stop."""
    ids, mask = [], []
    plain = not uses_template(task, tokenizer)
    for text, trained in conversation_segments(messages, tokenizer, task):
        piece = tokenizer(text, add_special_tokens=False).input_ids if text else []
        if trained and plain:
            piece = piece + [tokenizer.eos_token_id]
        ids += piece
        mask += [int(trained)] * len(piece)
    return ids, mask


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``loss_mask`` (B, L)."""
    width = max(len(ids) for ids, _ in examples)
    batch = {"input_ids": torch.full((len(examples), width), pad_id, dtype=torch.long),
             "attention_mask": torch.zeros((len(examples), width), dtype=torch.long),
             "loss_mask": torch.zeros((len(examples), width), dtype=torch.long)}
    for i, (ids, mask) in enumerate(examples):
        batch["input_ids"][i, :len(ids)] = torch.tensor(ids)
        batch["attention_mask"][i, :len(ids)] = 1
        batch["loss_mask"][i, :len(ids)] = torch.tensor(mask)
    return batch


def response_loss(model, batch: dict[str, torch.Tensor], pack: bool) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over the trained tokens, their count): each trained token predicted from the
    output one position before it, logits computed for those positions only."""
    can_pack = pack and getattr(model.config, "_attn_implementation", "sdpa") in PACKABLE_ATTENTION
    size = batch["input_ids"].shape[0]
    _, mb, _ = next(micro_batches(batch, size, model.device, can_pack))
    hidden = model.base_model(**model_inputs(mb)).last_hidden_state
    targets = zero_sequence_starts(mb["loss_mask"].float(), mb)[:, 1:].bool()
    logits = model.get_output_embeddings()(hidden[:, :-1][targets])
    loss = torch.nn.functional.cross_entropy(logits.float(), mb["input_ids"][:, 1:][targets], reduction="sum")
    return loss, int(targets.sum())


def sft_examples(conversations: list[list[dict]], tokenizer, task: TaskConfig, max_length: int,
                 log: Callable[[str], None] | None = print) -> list[tuple[list[int], list[int]]]:
    """Tokenised conversations; those longer than ``max_length`` tokens are dropped and counted."""
    examples, problems = [], []
    for i, messages in enumerate(conversations):
        ids, mask = tokenize_conversation(messages, tokenizer, task)
        if len(ids) > max_length:
            problems.append(f"conversation {i} has {len(ids)} tokens, over warmup.max_length={max_length}")
        elif sum(mask):
            examples.append((ids, mask))
    return usable_rows(examples, problems, "the traces", log)


def held_out_loss(model, examples: list, batch_size: int, pad_id: int, pack: bool) -> float:
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            loss, n = response_loss(model, collate(examples[start:start + batch_size], pad_id), pack)
            total, tokens = total + loss.item(), tokens + n
    model.train()
    return total / max(1, tokens)


def run_sft(model, tokenizer, cfg: RunConfig, path: str | Path, log: Callable[[str], None] = print,
            record: Callable[[dict, int], None] | None = None) -> dict:
    """Train ``model`` in place on the traces at ``path`` (``cfg.warmup``: steps, or epochs when steps is 0;
    batch_size, lr; with ``lora``, adapters merged into ``model`` at the end); returns the final training and
    held-out losses, the example counts and the time taken."""
    w = cfg.warmup
    # peft puts the adapters into model's own modules (and freezes the rest), so model trains them as it is;
    # merge_and_unload puts plain modules back, the adapters merged into their weights.
    adapters = lora.wrap(model, w.lora.model_dump(), key="warmup.lora") if w.lora else None
    torch.manual_seed(cfg.seed)
    examples = sft_examples(load_conversations(path, w, cfg.task.system_prompt, log), tokenizer, cfg.task,
                            w.max_length or model.config.max_position_embeddings, log)
    random.Random(cfg.seed).shuffle(examples)
    held = round(len(examples) * w.eval_fraction) if len(examples) > 1 else 0
    held_out, train = examples[:held], examples[held:]
    steps = w.steps or max(1, math.ceil(w.epochs * len(train) / w.batch_size))
    log(f"sft: {len(train)} training and {len(held_out)} held-out conversations from {path}; {steps} steps of "
        f"{w.batch_size}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=w.lr, weight_decay=0.0)
    warm = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warm) * max(0.05, 1.0 - s / steps))
    order, rng, start, figures = [], random.Random(cfg.seed + 1), time.perf_counter(), {}
    model.train()
    before = held_out_loss(model, held_out, w.batch_size, tokenizer.pad_token_id, w.pack) if held_out else None
    progress = Progress(steps, "sft", "step", log)
    for step in range(1, steps + 1):
        if len(order) < w.batch_size:  # a fresh pass, shuffled, once the current one runs out
            order += rng.sample(range(len(train)), len(train))
        batch, order = [train[i] for i in order[:w.batch_size]], order[w.batch_size:]
        loss, tokens = response_loss(model, collate(batch, tokenizer.pad_token_id), w.pack)
        optimizer.zero_grad(set_to_none=True)
        (loss / max(1, tokens)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        figures = {"sft/loss": loss.item() / max(1, tokens), "sft/lr": schedule.get_last_lr()[0]}
        if held_out and (step == steps or (w.eval_every and step % w.eval_every == 0)):
            figures["sft/eval_loss"] = held_out_loss(model, held_out, w.batch_size, tokenizer.pad_token_id, w.pack)
            log(f"sft step {step}: held-out loss {figures['sft/eval_loss']:.4f}")
        if record is not None:
            record(figures, step)
        progress.update(loss=figures["sft/loss"])
    progress.close()
    if adapters is not None:
        adapters.merge_and_unload()
    model.eval()
    return {"loss": figures.get("sft/loss"), "eval_loss_before": before, "eval_loss": figures.get("sft/eval_loss"),
            "steps": steps,
            "train_examples": len(train), "eval_examples": len(held_out), "traces": str(path),
            "wall_s": time.perf_counter() - start}
