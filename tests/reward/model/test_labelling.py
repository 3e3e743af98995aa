"""Labelling: teacher verdicts into rows, resumable after a crash, errors counted; pairs; audit agreement."""
import json
from dataclasses import dataclass

from rlhf.rl.audit import pairwise_agreement
from rlhf.stages.reward_model import teacher_solutions
from reward.model.labelling import judged_rows, label, make_pairs, write_datasets
from rlhf.core.data.datasets import PromptRow


@dataclass
class FakeVerdict:  # the fields labelling reads from reward.teachers.Verdict
    quality: float | None
    correct: bool | None = None
    rv: float | None = None
    cd: float | None = None
    quality_probs: list | None = None
    rv_probs: list | None = None
    cd_probs: list | None = None
    error: str | None = None


class CountingTeacher:
    """Quality = the response's number of characters; a response 'bad' cannot be judged."""

    def __init__(self):
        self.judged = 0

    def judge(self, prompts, responses, references):
        self.judged += len(responses)
        return [FakeVerdict(None, error="unparseable reply") if r == "bad" else FakeVerdict(float(len(r)), len(r) > 2)
                for r in responses]


def sampler(prompts, n):
    return [[f"{p}" + "x" * i for i in range(n - 1)] + ["bad"] for p in prompts]


ROWS = [PromptRow(f"{i}+1=", str(i + 1), 1) for i in range(5)]


def test_label_writes_judged_rows_and_counts_failures(tmp_path):
    teacher = CountingTeacher()
    report = label(ROWS, sampler, teacher, tmp_path, samples_per_prompt=3, chunk_prompts=2, log=lambda s: None)
    assert (report.prompts, report.judged, report.failed) == (5, 10, 5)
    assert report.errors == {"unparseable reply": 5}
    assert "5 failed (5 x unparseable reply)" in report.line()
    rows = judged_rows(tmp_path)
    assert len(rows) == 10 and {r["quality"] for r in rows} == {4.0, 5.0}
    assert rows[0]["prompt"] == "0+1=" and rows[0]["source"] == "student"


def test_label_resumes_without_judging_twice(tmp_path):
    label(ROWS[:3], sampler, CountingTeacher(), tmp_path, 3, chunk_prompts=2, log=lambda s: None)
    teacher = CountingTeacher()
    report = label(ROWS, sampler, teacher, tmp_path, 3, chunk_prompts=2, log=lambda s: None)
    assert report.resumed_prompts == 3 and teacher.judged == 2 * 3
    assert len({r["prompt"] for r in judged_rows(tmp_path)}) == 5


def test_a_chunk_cut_short_by_a_crash_is_redone(tmp_path):
    label(ROWS[:2], sampler, CountingTeacher(), tmp_path, 3, chunk_prompts=2, log=lambda s: None)
    with open(tmp_path / "rows.jsonl", "a") as f:  # half a chunk, then the crash: no done_prompts record
        f.write(json.dumps({"prompt": "2+1=", "response": "zz", "quality": 1.0}) + "\n" + '{"prompt": "3+')
    assert len(judged_rows(tmp_path)) == 4  # the unfinished chunk's rows are not trusted
    teacher = CountingTeacher()
    label(ROWS, sampler, teacher, tmp_path, 3, chunk_prompts=2, log=lambda s: None)
    assert teacher.judged == 3 * 3


def test_teacher_solutions_join_the_student_samples(tmp_path):
    rows = [PromptRow("7+5-3=", "9", 2)]
    label(rows, sampler, CountingTeacher(), tmp_path, 2, solve=teacher_solutions, log=lambda s: None)
    sources = [r["source"] for r in judged_rows(tmp_path)]
    assert sources == ["student", "teacher", "teacher", "teacher"]
    assert teacher_solutions(rows[0]) == ["#9", "7+5=12;12-3=9;#9", "7+5=12;12-3=9;so 7+5-3=9;#9"]
    assert teacher_solutions(PromptRow("What is 2+2?", "4")) == []


def test_pairs_put_the_better_response_first_with_the_teacher_margin():
    rows = [{"prompt": "p", "response": r, "quality": q, "correct": q > 4, "rv": 1.0, "cd": 2.0, "difficulty": 1,
             "quality_probs": None, "rv_probs": None, "cd_probs": None} for r, q in (("a", 9.0), ("b", 0.0), ("c", 9.0))]
    pairs = make_pairs(rows, seed=0)
    assert len(pairs) == 2  # a-b and c-b; a-c tie in quality and makes no pair
    for pair in pairs:
        assert pair["rejected"] == "b" and pair["margin"] == 1.0 and pair["chosen_quality"] == 9.0
        assert pair["rejected_correct"] is False


def test_write_datasets_saves_pointwise_and_pairwise(tmp_path):
    from datasets import load_from_disk

    label(ROWS, sampler, CountingTeacher(), tmp_path, 3, log=lambda s: None)
    sizes = write_datasets(tmp_path, seed=0)
    assert sizes == {"pointwise": 10, "pairwise": 5}
    assert len(load_from_disk(str(tmp_path / "pairwise"))) == 5
    assert set(load_from_disk(str(tmp_path / "pointwise")).column_names) >= {"prompt", "response", "quality", "rv"}


def test_pairwise_agreement_by_hand():
    # group 1: teacher orders (9 > 2 > 0); RM agrees on (9,2) and (9,0), disagrees on (2,0): 2 of 3
    # group 2: teacher 9 vs 0, RM tie: half a pair; the teacher tie (9, 9) is not counted
    groups = [[(0.9, 9.0), (0.1, 2.0), (0.5, 0.0)], [(0.3, 9.0), (0.3, 0.0), (0.2, 9.0)]]
    agreement, pairs = pairwise_agreement(groups)
    # group 2 pairs: (a,b) tie -> 0.5; (a,c) teacher tie -> skipped; (b,c) RM 0.3 > 0.2 but teacher 0 < 9 -> 0
    assert pairs == 5 and abs(agreement - (2 + 0.5 + 0) / 5) < 1e-12
