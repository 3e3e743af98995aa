"""The distilled-RM stages of a run: label with the teacher, train the reward model, evaluate it.

The run calls these in pipeline order (the audit during RL is rlhf/rl/audit.py); each takes the run config and writes under the run directory:
``labels/train``, ``labels/eval`` (judged rows plus ``pointwise``/``pairwise`` datasets) and ``reward_model/``.
"""
from __future__ import annotations

import functools
import random
from pathlib import Path
from typing import Callable

from reward.model.labelling import judged_rows, label, make_pairs, write_datasets
from reward.model.distilled import with_reference
from reward.teachers import make_teacher
from rlhf.core.config.run_config import RunConfig
from rlhf.core.data.datasets import PromptRow, worked_solution
from rlhf.core.progress import Progress
from rlhf.rl.groups.rollout import generate
from rlhf.core.tasks import arithmetic



def teacher_solutions(row: PromptRow, think_block: bool = False, answer_field: str = "answer") -> list[str]:
    """The oracle's own worked solutions (terse, with steps, with a check) for arithmetic prompts: correct
    responses of every verbosity, so the RM sees good answers the student rarely writes yet. ``think_block``: the
    steps in a ``<think>`` block, as the student writes them when ``think.format`` is on. A dataset row's own
    worked solution (GSM8K's) where it has one."""
    try:
        problem = arithmetic.parse_prompt(row.prompt)
    except ValueError:
        solution = worked_solution(row, answer_field)
        return [solution] if solution else []
    return [arithmetic.solution(problem, verbosity, think_block) for verbosity in (0, 1, 2)]


def label_stage(cfg: RunConfig, rollout: list, train_pool: list[PromptRow], eval_set: list[PromptRow], out: Path,
                log: Callable[[str], None]) -> dict:
    """Label ``label.prompts`` training prompts and ``label.eval_prompts`` held-out ones (disjoint from both the
    labelled training prompts and the policy's evaluation set) with student samples judged by the teacher."""
    lc = cfg.label
    teacher = make_teacher(lc, out / "labels" / "teacher_cache")
    rng = random.Random(cfg.seed + 7)
    policy_eval = {r.prompt for r in eval_set}
    pool = [r for r in train_pool if r.prompt not in policy_eval]
    rng.shuffle(pool)
    train_rows, held_out = pool[: lc.prompts], pool[lc.prompts: lc.prompts + lc.eval_prompts]
    if len(held_out) < lc.eval_prompts // 2:
        raise ValueError(f"task.train_prompts={cfg.task.train_prompts} leaves too few prompts to label "
                         f"{lc.prompts} + {lc.eval_prompts}: raise task.train_prompts")

    def sample(prompts: list[str], n: int) -> list[list[str]]:
        samples = generate(rollout, prompts, n, lc.max_new_tokens, lc.temperature, False, 0,
                                  cfg.call_timeout_s)
        return [[s.text for s in samples[i * n:(i + 1) * n]] for i in range(len(prompts))]

    figures = {}
    solutions = functools.partial(teacher_solutions, think_block=cfg.think.format, answer_field=cfg.task.answer_field)
    # The teacher judges against the worked solution where the data has one (a judge's rubric, the reference
    # teacher's CD); the rows keep the final answer as their reference.
    def reference_of(row: PromptRow) -> str:
        return worked_solution(row, cfg.task.answer_field) or row.answer

    for name, rows, solve in (("train", train_rows, solutions if lc.teacher_solutions else None),
                              ("eval", held_out, None)):
        report = label(rows, sample, teacher, out / "labels" / name, lc.samples_per_prompt, solve, log=log,
                       reference_of=reference_of)
        sizes = write_datasets(out / "labels" / name, cfg.seed)
        figures[name] = {"prompts": report.prompts, "judged": report.judged, "failed": report.failed, **sizes}
    return figures


def reward_model_stage(cfg: RunConfig, init_dir: str, out: Path, log: Callable[[str], None],
                       labels_dir: Path | None = None,
                       record: Callable[[dict, int], None] | None = None) -> tuple[str, dict]:
    """Train the distilled RM on ``labels/train`` and on your own preference data (``reward_model.train_file``),
    either or both (unless ``reward_model.path`` names an RM), and evaluate it on what is held out of each;
    returns (RM directory, figures for summary.json: against the teacher where there are labels, with your data's
    figures under ``own_data``; your data's alone otherwise). ``labels_dir``: the labels to use (default
    ``out/labels``); ``record``: receives each training step's ``rm/*`` figures."""
    rc = cfg.reward_model
    labels = Path(labels_dir) if labels_dir is not None else out / "labels"
    has_labels = all((labels / name / "rows.jsonl").exists() for name in ("train", "eval"))
    if not has_labels and (labels_dir is not None or not rc.train_file):
        raise FileNotFoundError(f"stage train_rm needs labels in {labels}/train and /eval: add stage label before "
                                f"it (labelling resumes where an earlier run in this output_dir stopped), or give "
                                f"your own preference data (reward_model.train_file, train-rm --data)")
    own_train, own_eval = own_preference_data(cfg, init_dir, log) if rc.train_file else (None, None)
    rm_dir = rc.path
    if rm_dir is None:
        rm_dir = str(out / "reward_model")
        pairs, sources = [], []
        if has_labels:
            rows = judged_rows(labels / "train")
            pairs += make_pairs(rows, cfg.seed)
            sources.append(f"{len(pairs)} pairs from {len(rows)} teacher-judged responses")
        if own_train is not None:
            pairs += own_train.pairs
            sources.append(f"{len(own_train.pairs)} of your own ({own_train.layout})")
        log(f"training the distilled RM on {' and '.join(sources)} ({rc.epochs} epochs, {rc.batch_size} pairs per "
            f"step, {rc.num_ranks} DeepSpeed ranks)")
        train_rm(pairs, init_dir, cfg, rm_dir, log, record)
    figures = {}
    if has_labels:
        held_out = judged_rows(labels / "eval")
        figures = evaluate_rm_dir(rm_dir, make_pairs(held_out, cfg.seed + 1), held_out)
        log(f"reward model vs teacher on held-out samples: {_figures_line(figures)}")
    if own_eval is not None:
        own = evaluate_rm_dir(rm_dir, own_eval.pairs, own_eval.pointwise)
        log(f"reward model on your held-out preference data: {_figures_line(own)}")
        figures = {**figures, "own_data": own} if has_labels else {**own, "source": "your preference data"}
    return rm_dir, figures


def own_preference_data(cfg: RunConfig, init_dir: str, log: Callable[[str], None], section=None):
    """(train, held out) ``PreferenceData`` from ``reward_model.train_file`` and ``eval_file`` (or a held-out
    fraction of the training file's prompts), conversational prompts rendered as the run renders its prompts.
    ``section``: the config section with those three keys (default reward_model; the dpo stage gives dpo)."""
    from transformers import AutoTokenizer

    from reward.model.preference_data import fit_warnings, load_preference_data, message_renderer, tokenizer_fit
    from rlhf.core.data.chat import template_override

    rc = section or cfg.reward_model
    tokenizer = AutoTokenizer.from_pretrained(init_dir)
    render = message_renderer(tokenizer, template_override(cfg.task), cfg.task.chat_template_kwargs,
                              plain=cfg.task.chat_template == "plain")
    data = load_preference_data(rc.train_file, render, cfg.seed, log)
    # Text the RM's tokenizer garbles, or cuts to its end, trains an RM on something else than the data: said.
    for line in fit_warnings(tokenizer_fit(data.pairs, tokenizer, rc.max_length), rc.train_file, rc.max_length):
        log(line)
    if rc.eval_file:
        return data, load_preference_data(rc.eval_file, render, cfg.seed + 1, log)
    return data.held_out(rc.eval_fraction, cfg.seed)


def _figures_line(figures: dict) -> str:
    named = (("pairwise accuracy", "pairwise_accuracy"), ("spearman", "spearman"))
    return ", ".join(f"{name} {figures[key]:.3f}" for name, key in named if figures.get(key) is not None) \
        or "nothing to score"


def train_rm(pairs: list[dict], init_dir: str, cfg: RunConfig, rm_dir: str, log: Callable[[str], None],
             record: Callable[[dict, int], None] | None = None) -> None:
    """Shuffled pairs in batches of ``reward_model.batch_size`` (cut to a multiple of the ranks) through the
    DeepSpeed reward-model trainer group."""
    from transformers import AutoTokenizer

    from reward.model.ranks import train_reward_model

    rc = cfg.reward_model
    tokenizer = AutoTokenizer.from_pretrained(init_dir)
    # A reference answer in the input only where the pairs have one (teacher labels do; your own data may not).
    use_reference = rc.use_reference and any(p.get("reference") is not None for p in pairs)
    if use_reference:
        pairs = [referenced_pair(p) for p in pairs]
    random.Random(cfg.seed + 11).shuffle(pairs)
    batches = pair_batches(tokenizer, pairs, rc)
    progress = Progress(len(batches) * rc.epochs, "reward model", "step", log)

    def on_step(m: dict) -> None:
        if record is not None:
            record({k: v for k, v in m.items() if k != "rm/step"}, int(m["rm/step"]))
        progress.update(loss=m["rm/loss"], pair_acc=m["rm/accuracy"])

    engine = rc.model_copy(update={"micro_batch_size": batch_pairs(rc) // rc.num_ranks, "use_reference": use_reference})
    with progress:
        train_reward_model(batches, init_dir, engine, rc.num_ranks, rm_dir, on_step, rc.epochs,
                           cfg.call_timeout_s, cfg.seed, trained_heads(pairs, rc))


def batch_pairs(rc) -> int:
    """Pairs per RM optimizer step: ``reward_model.batch_size`` cut to a multiple of the ranks (at least one each)."""
    return max(rc.num_ranks, rc.batch_size - rc.batch_size % rc.num_ranks)


def pair_batches(tokenizer, pairs: list[dict], rc) -> list[dict]:
    """``pairs``, in order, as tokenised batches of ``batch_pairs`` (a last one that does not split evenly across the
    ranks is left out)."""
    from reward.model.ranks import collate_pairs

    size = batch_pairs(rc)
    return [collate_pairs(tokenizer, pairs[i:i + size], rc.max_length)
            for i in range(0, len(pairs) - len(pairs) % rc.num_ranks, size) if len(pairs[i:i + size]) % rc.num_ranks == 0]


def trained_heads(pairs: list[dict], rc) -> list[str]:
    """The RM heads this training teaches: quality always; RV and CD where some pair has that target (a score
    or a soft label) and a loss weight on it is non-zero."""
    heads = ["quality"]
    for name, weight in (("rv", rc.rv_weight), ("cd", rc.cd_weight)):
        if (weight or rc.kl_weight) and any(p.get(f"{side}_{name}{suffix}") is not None for p in pairs
                                            for side in ("chosen", "rejected") for suffix in ("", "_probs")):
            heads.append(name)
    return heads


def evaluate_rm_dir(rm_dir: str, pairs: list[dict], pointwise: list[dict]) -> dict:
    from transformers import AutoTokenizer

    from reward.model.distilled import DistilledRewardModel, uses_reference
    from reward.model.evaluate import evaluate_reward_model

    model = DistilledRewardModel.from_pretrained(rm_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(rm_dir)
    if uses_reference(model):
        pairs = [referenced_pair(p) for p in pairs]
        pointwise = [{**r, "response": with_reference(r["response"], r.get("reference"))} for r in pointwise]
    figures = evaluate_reward_model(model, pairs, pointwise, tokenizer=tokenizer, batch_size=64)
    trained = getattr(model.config, "trained_heads", None)
    for name in ("rv", "cd"):
        if trained is not None and name not in trained:
            figures[f"{name}_spearman"] = None  # an untrained head's correlation is noise, not a finding
    return figures


def referenced_pair(pair: dict) -> dict:
    """A pair as a reference-guided RM sees it: both responses followed by the reference answer."""
    ref = pair.get("reference")
    return {**pair, "chosen": with_reference(pair["chosen"], ref), "rejected": with_reference(pair["rejected"], ref)}
