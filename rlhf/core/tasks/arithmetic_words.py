"""The arithmetic task asked in words, as a chat dataset a small pretrained model can already partly answer.

Chains of additions and subtractions like the quickstart's (rlhf/core/tasks/arithmetic.py), over a wider range
(a first number 1..20, steps of 1..12, running totals within 0..40, so there are enough distinct one-operation
problems for a held-out set), written as questions ("What is 7 plus 5 minus 3?"), with a worked solution in words
("7 plus 5 is 12. 12 minus 3 is 9.") and the answer after ``####``, GSM8K's layout, so the whole DistilQwen chain
reads them as any prompt dataset: the worked solutions are the teacher's traces, the verifier ``last_number``
checks the last number of a response (a pretrained chat model answers in a sentence, not in ``#### N``), and the
difficulty field (the number of operations) gives per-level figures and the adaptive reward's difficulty.

    python -m rlhf.core.tasks.arithmetic_words OUT_DIR [--train 2000] [--test 400] [--levels 1-3] [--seed 0]

writes OUT_DIR/train.jsonl and OUT_DIR/test.jsonl (fields question, answer, difficulty), no problem in both.
configs/smollm2_distil.yaml reads the copy in configs/data/arithmetic_words (written with the defaults).
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from rlhf.core.tasks.arithmetic import Problem

WORDS = {"+": "plus", "-": "minus"}
FIRST, STEP, TOTAL = 20, 12, 40  # largest first number, step and running total


def make_problem(rng: random.Random, level: int) -> Problem:
    """``level`` operations whose running totals stay within 0..TOTAL."""
    operands, ops = [rng.randint(1, FIRST)], []
    total = operands[0]
    for _ in range(level):
        x = rng.randint(1, STEP)
        op = rng.choice("+-")
        if (op == "+" and total + x > TOTAL) or (op == "-" and total - x < 0):
            op = "-" if op == "+" else "+"
        total = total + x if op == "+" else total - x
        operands.append(x)
        ops.append(op)
    return Problem(tuple(operands), tuple(ops))


def question(problem: Problem) -> str:
    """``What is 7 plus 5 minus 3?``"""
    terms = [str(problem.operands[0])] + [f"{WORDS[op]} {x}" for op, x in zip(problem.ops, problem.operands[1:])]
    return f"What is {' '.join(terms)}?"


def worked_answer(problem: Problem) -> str:
    """Each step's running total in words, then ``#### answer``."""
    totals = problem.running_totals()
    steps = [f"{a} {WORDS[op]} {x} is {b}." for a, op, x, b in zip(totals, problem.ops, problem.operands[1:],
                                                                   totals[1:])]
    return f"{' '.join(steps)}\n#### {problem.answer}"


def records(count: int, levels: range, rng: random.Random, exclude: set[str], distinct: bool) -> list[dict]:
    """``count`` problems, levels in turn, none whose question is in ``exclude``; ``distinct``: no two alike (each
    question is then added to ``exclude``)."""
    rows: list[dict] = []
    tries = 0
    while len(rows) < count:
        tries += 1
        if tries > 100 * count:
            raise ValueError(f"only {len(rows)} distinct problems of levels {levels.start}-{levels.stop - 1}")
        level = levels[len(rows) % len(levels)]
        problem = make_problem(rng, level)
        text = question(problem)
        if text in exclude:
            continue
        if distinct:
            exclude.add(text)
        rows.append({"question": text, "answer": worked_answer(problem), "difficulty": level})
    return rows


def write(out: Path, train: int, test: int, levels: range, seed: int) -> None:
    """The held-out problems (distinct) are drawn first, so the test set does not depend on ``train``; training
    problems may repeat, never a held-out one."""
    if levels.start < 1:
        raise ValueError("levels start at 1 operation")
    rng, held = random.Random(seed), set()
    held_out = records(test, levels, rng, held, distinct=True)
    training = records(train, levels, rng, held, distinct=False)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("test", held_out), ("train", training)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=400)
    parser.add_argument("--levels", default="1-3", help="operations per problem, FIRST-LAST")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    first, _, last = args.levels.partition("-")
    try:
        levels = range(int(first), int(last or first) + 1)
        write(args.out, args.train, args.test, levels, args.seed)
    except ValueError as err:
        parser.error(str(err))


if __name__ == "__main__":
    main()
