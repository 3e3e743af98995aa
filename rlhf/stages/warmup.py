"""Warm-up distillation: supervised fine-tuning of the student on the teacher's worked solutions.

A plain in-process PyTorch loop: the warm-up is small next to RL, and a single process keeps it fast on a CPU
while the Ray actors have not started yet. Loss is on response tokens only (the prompt is given, not learned).
"""
from __future__ import annotations

import random
import time
from typing import Callable

import numpy as np
import torch

from reward.teachers.trace_select import target_fn
from rlhf.stages import curriculum, sft
from rlhf.core.data import think
from rlhf.core.config.run_config import RunConfig, ThinkConfig, WarmupConfig
from rlhf.core.progress import Progress
from rlhf.core.tasks import arithmetic
from rollout.environments.tool_env import CalculatorEnvironment


def teacher_examples(cfg: WarmupConfig, seed: int, think_cfg: ThinkConfig | None = None,
                     target: Callable[[float], float] | None = None) -> Callable[[int], list[tuple[str, str]]]:
    """A function giving the n (prompt, solution) pairs of the next batch: fresh problems from the task, each
    solved by the oracle teacher tersely (a ``terse_share`` of them) or with its steps written out; or, with a
    curriculum (``cfg.curriculum``), the RV/CD-selected traces (rlhf/stages/curriculum.py; ``target``: target RV as a
    function of CD, for ``matched``). With ``think_cfg.format`` the steps go in a ``<think>`` block, and a
    ``switch_fraction`` share of prompts carries ``/think`` or ``/no_think``, which the solution obeys."""
    rng = random.Random(seed)
    levels = range(arithmetic.MIN_LEVEL, arithmetic.MAX_LEVEL + 1)
    think_block = bool(think_cfg and think_cfg.format)
    if cfg.curriculum != "none":
        target = target_fn(cfg.curriculum) if target is None or cfg.curriculum != "matched" else target

    def next_batch(n: int) -> list[tuple[str, str]]:
        if cfg.curriculum != "none":
            pairs = curriculum.curriculum_batch(rng, n, target, cfg.curriculum_keep, think_block)
        else:
            problems = [arithmetic.make_problem(rng, rng.choice(levels)) for _ in range(n)]
            pairs = [(p.prompt, _tool_trace(p) if cfg.tool_fraction and rng.random() < cfg.tool_fraction
                      else arithmetic.solution(p, 0 if rng.random() < terse_share(cfg, p.level) else 1, think_block))
                     for p in problems]
        return [_switched(rng, prompt, response, think_cfg) for prompt, response in pairs] if think_block else pairs

    return next_batch


def terse_share(cfg: WarmupConfig, level: int) -> float:
    """The teacher's share of bare answers at a level: ``terse_fraction``, or its list read as shares at evenly
    spaced levels from the easiest to the hardest, linear in between."""
    shares = cfg.terse_fraction if isinstance(cfg.terse_fraction, list) else [cfg.terse_fraction]
    at_levels = np.linspace(arithmetic.MIN_LEVEL, arithmetic.MAX_LEVEL, len(shares))
    return float(np.interp(level, at_levels, shares))


def _switched(rng: random.Random, prompt: str, response: str, think_cfg: ThinkConfig) -> tuple[str, str]:
    """A ``switch_fraction`` share of think-format examples get a switch, half on, half off, and the solution
    obeys it: thinking on writes the steps in a block, off gives the bare answer."""
    if rng.random() >= think_cfg.switch_fraction:
        return prompt, response
    problem = arithmetic.parse_prompt(prompt)
    on = rng.random() < 0.5
    return think.with_switch(prompt, "on" if on else "off"), arithmetic.solution(problem, 1 if on else 0, True)


def _tool_trace(problem: arithmetic.Problem) -> list[tuple[str, bool]]:
    """The chain handed to the calculator, as the calculator environment shows it (rollout.environment)."""
    return CalculatorEnvironment.demonstration(problem.expression, problem.answer)


def _response_tokens(tokenizer, response: str | list[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
    """A response's ids, end-of-sequence after each model turn, and which ids are trained: a tool trace's
    (text, model turn?) segments train the model's turns only (observations are given, as in a multi-turn
    rollout, and tokenised on their own as there)."""
    segments = [(response, True)] if isinstance(response, str) else response
    ids: list[int] = []
    trained: list[bool] = []
    for text, model_turn in segments:
        piece = tokenizer(text, add_special_tokens=False).input_ids + ([tokenizer.eos_token_id] if model_turn else [])
        ids += piece
        trained += [model_turn] * len(piece)
    return ids, trained


def sft_batch(tokenizer, pairs: list[tuple[str, str | list[tuple[str, bool]]]]) -> dict[str, torch.Tensor]:
    """Right-padded input ids with labels on the response (and its end-of-sequence token) only; a tool trace's
    observations carry no label."""
    rows, prompt_lens, trained = [], [], []
    for prompt, response in pairs:
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        response_ids, response_trained = _response_tokens(tokenizer, response)
        rows.append(prompt_ids + response_ids)
        prompt_lens.append(len(prompt_ids))
        trained.append(response_trained)
    length = max(map(len, rows))
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full_like(input_ids, -100)
    attention_mask = torch.zeros_like(input_ids)
    for i, (row, start) in enumerate(zip(rows, prompt_lens)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        keep = torch.tensor(trained[i], dtype=torch.bool)
        labels[i, start : len(row)] = torch.where(keep, input_ids[i, start : len(row)], -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def run_warmup(model, tokenizer, cfg: WarmupConfig, seed: int, log: Callable[[str], None] = print,
               think_cfg: ThinkConfig | None = None, target: Callable[[float], float] | None = None,
               record: Callable[[dict, int], None] | None = None) -> dict:
    """Train ``model`` in place for ``cfg.steps`` steps; returns the final loss and the time taken. ``think_cfg``
    and ``target`` shape the teacher's data (``teacher_examples``). ``record`` receives each step's
    ``warmup/loss`` (and learning rate) with the step number, for TensorBoard."""
    torch.manual_seed(seed)
    next_batch = teacher_examples(cfg, seed, think_cfg, target)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    warm = max(1, cfg.steps // 10)
    # Linear warm-up then linear decay: stable from random init, and a settled model at the end.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warm) * max(0.05, 1.0 - s / max(1, cfg.steps)))
    model.train()
    start, loss = time.perf_counter(), float("nan")
    progress = Progress(cfg.steps, "warmup", "step", log)
    for step in range(cfg.steps):
        batch = sft_batch(tokenizer, next_batch(cfg.batch_size))
        out = model(**batch)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        loss = out.loss.item()
        if record is not None:
            record({"warmup/loss": loss, "warmup/lr": schedule.get_last_lr()[0]}, step + 1)
        progress.update(loss=loss)
    progress.close()
    model.eval()
    return {"loss": loss, "steps": cfg.steps, "wall_s": time.perf_counter() - start}


def warmup_stage(model, tokenizer, cfg: RunConfig, output_dir, custom_prompts: bool, log: Callable[[str], None],
                 log_metrics=None) -> tuple[dict, bool]:
    """The warm-up stage on ``model`` in place: distillation SFT on a traces dataset (``warmup.traces_file`` or the
    traces stage's output, rlhf/stages/sft.py) where the run has one, else the oracle teacher's curriculum
    (``run_warmup``). Returns its figures and whether it trained on traces."""
    traces = sft.traces_path(cfg, output_dir, custom_prompts, log)
    if traces is not None:
        return sft.run_sft(model, tokenizer, cfg, traces, log, log_metrics), True
    adaptive = cfg.reward.adaptive  # a matched curriculum aims at the adaptive reward's RV targets
    return run_warmup(model, tokenizer, cfg.warmup, cfg.seed, log, cfg.think,
                      target_fn("matched", adaptive.rv_at_cd0, adaptive.rv_at_cd9), log_metrics), False
