"""On-policy RM refresh (rlhf/rl/rm_refresh.py): its data helpers against hand-worked numbers, the reward workers'
hot swap, and refreshes on a tiny RM's own DeepSpeed rank (a Ray actor, gloo on CPU) with a stand-in teacher that
prefers responses with a "y" in them: a refresh that helps is swapped in with the next version and changes nothing
but the RM's weights; one that makes the held-out slice worse is rolled back and logged; resuming after a refresh
continues exactly."""
from __future__ import annotations

import hashlib
import json
import logging
import random
import time

import pytest
import torch

ray = pytest.importorskip("ray")
pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

from tests.loop_stubs import StubPolicy, StubRollout, char_tokenizer  # noqa: E402
from tests.reward.model.test_rm_trainer import ray_cluster  # noqa: E402,F401 - a local Ray of 2 CPUs for this module
from reward.model.distilled import DistilledRewardModel  # noqa: E402
from reward.model.labelling import judged_row  # noqa: E402
from reward.model.refresh_data import (batch_rm_version, budget_groups, keeps_agreement, mix_replay,  # noqa: E402
                                       replay_count, split_groups)
from reward.scoring.worker import RewardWorker  # noqa: E402
from reward.teachers.base import Verdict  # noqa: E402
from rlhf.core.config.run_config import ModelConfig, RunConfig  # noqa: E402
from rlhf.core.data.datasets import PromptRow  # noqa: E402
from rlhf.core.data.samples import Sample  # noqa: E402
from rlhf.core.models.build import build_student, build_tokenizer  # noqa: E402
from rlhf.rl.rm_refresh import RewardModelRefresh  # noqa: E402
from rlhf.rl.step import RLStep  # noqa: E402
from rlhf.rl.update import PolicyUpdate  # noqa: E402
from tests.paths import REPO  # noqa: E402

N = 4  # samples per prompt


# ------------------------------------------------------------------------------------------------ pure helpers


def test_budget_and_split_by_hand():
    assert budget_groups(available=10, group_size=4, teacher_calls=18) == 4  # 18 calls pay for 4 whole groups
    assert budget_groups(available=3, group_size=4, teacher_calls=64) == 3
    train, held = split_groups(8, 0.25, random.Random(0))
    assert len(held) == 2 and sorted(train + held) == list(range(8)) and not set(train) & set(held)
    assert split_groups(2, 0.01, random.Random(0))[1] != []  # at least one group held out...
    assert len(split_groups(3, 0.99, random.Random(0))[0]) == 1  # ...and at least one left to train on
    assert split_groups(1, 0.5, random.Random(0)) == ([0], [])


def test_replay_share_by_hand():
    assert replay_count(new_pairs=30, available=100, fraction=0.25) == 10  # 10 / (10 + 30) = 0.25
    assert replay_count(new_pairs=30, available=100, fraction=0.5) == 30
    assert replay_count(new_pairs=30, available=7, fraction=0.5) == 7  # no more than there are
    assert replay_count(new_pairs=0, available=7, fraction=0.5) == 0
    mixed = mix_replay([{"id": i} for i in range(6)], [{"id": -i} for i in range(1, 20)], 0.25, random.Random(1))
    assert len(mixed) == 8 and sum(p["id"] < 0 for p in mixed) == 2


def test_acceptance_rule():
    assert keeps_agreement(0.6, 0.6) and keeps_agreement(0.6, 0.9) and not keeps_agreement(0.6, 0.59)
    assert keeps_agreement(float("nan"), 0.5)  # nothing measured before: any measured agreement will do
    assert not keeps_agreement(0.6, float("nan"))  # nothing measured after: no evidence it did not get worse


def test_a_batch_has_one_rm_version():
    assert batch_rm_version([{"rm_version": 2}, {"rm_version": 2}]) == 2
    assert batch_rm_version([{"reward": 1.0}]) is None
    with pytest.raises(RuntimeError, match=r"versions \[1, 2\]"):
        batch_rm_version([{"rm_version": 1}, {"rm_version": 2}])


# ----------------------------------------------------------------------------------------- a tiny RM and teacher


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    """A distilled RM with fresh heads on a tiny random Qwen2 backbone, the character tokenizer beside it."""
    tokenizer = build_tokenizer("char")
    sizes = ModelConfig(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=64)
    model = DistilledRewardModel.from_causal_lm(build_student(sizes, tokenizer, seed=0), tokenizer.pad_token_id)
    path = str(tmp_path_factory.mktemp("rm"))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_cfg(rm_dir: str, out, **refresh) -> RunConfig:
    return RunConfig.model_validate({
        "output_dir": str(out), "seed": 3, "call_timeout_s": 120,
        "rollout": {"prompts_per_step": 4, "samples_per_prompt": N},
        "reward": {"components": {"rm": 1.0},
                   "refresh": {"enabled": True, "every": 1, "teacher_calls": 16, "held_out_fraction": 0.25,
                               "epochs": 3, **refresh}},
        "reward_model": {"path": rm_dir, "use_reference": False, "num_ranks": 1, "batch_size": 6, "lr": 1e-2,
                         "adam_eps": 1e-4, "max_length": 32},
    })


class LetterTeacher:
    """Quality 9 for a response with a "y" in it and 0 for one without (``prefer_y=False``: the reverse)."""

    def __init__(self, prefer_y: bool = True):
        self.prefer_y, self.calls = prefer_y, 0

    def judge(self, prompts, responses, references):
        self.calls += len(responses)
        return [Verdict(9.0 if ("y" in r) == self.prefer_y else 0.0, None, None, None) for r in responses]


def batch(seed: int) -> tuple[list[PromptRow], list[Sample]]:
    """Four prompts, each with two responses holding a "y" and two without."""
    rng = random.Random(seed)
    digits = lambda k: "".join(rng.choice("0123456789") for _ in range(k))  # noqa: E731
    rows = [PromptRow(f"{digits(2)}+{digits(2)}=", digits(3)) for _ in range(4)]
    texts = [f"{digits(2)}y{digits(2)}" if k % 2 == 0 else digits(5) for _ in rows for k in range(N)]
    return rows, [Sample(i // N, [7], [5] * 5, [-0.5] * 5, "stop", t) for i, t in enumerate(texts)]


class InProcessRewardGroup:
    """The reward workers' group in this process: two RewardWorkers, a batch split between them."""

    def __init__(self, cfg: RunConfig, rm_path: str):
        self.workers, self.restarts = [RewardWorker(cfg, rm_path), RewardWorker(cfg, rm_path)], 0

    def set_rm_weights(self, state_dict, version: int) -> None:
        for worker in self.workers:
            worker.set_rm_weights(state_dict, version)

    def score(self, rows, samples):
        n, half = len(samples) // len(rows), len(samples) // 2
        prompts = [rows[i // n].prompt for i in range(len(samples))]
        answers = [rows[i // n].answer for i in range(len(samples))]
        texts = [s.text for s in samples]
        return [s for k, w in enumerate(self.workers) for s in
                w.score(prompts[k * half:(k + 1) * half], texts[k * half:(k + 1) * half],
                        answers[k * half:(k + 1) * half])]

    def weights(self, k: int = 0) -> dict:
        return {name: t.clone() for name, t in self.workers[k].rm_scores.model.state_dict().items()}


def digest(path: str) -> str:
    return hashlib.sha256(open(f"{path}/model.safetensors", "rb").read()).hexdigest()


# ------------------------------------------------------------------------------------------------------ the tests


def test_reward_workers_hot_swap_and_say_which_version_scored(rm_dir, tmp_path):
    cfg = make_cfg(rm_dir, tmp_path)
    group = InProcessRewardGroup(cfg, rm_dir)
    rows, samples = batch(0)
    first = group.score(rows, samples)
    assert batch_rm_version(first) == 0
    swapped = {name: t + 0.01 for name, t in group.weights().items()}
    group.set_rm_weights(swapped, 1)
    second = group.score(rows, samples)
    assert batch_rm_version(second) == 1 and [s["rm"] for s in second] != [s["rm"] for s in first]
    group.workers[1].set_rm_weights(group.weights(), 2)  # one worker ahead of the other: a batch is refused
    with pytest.raises(RuntimeError, match="versions"):
        batch_rm_version(group.score(rows, samples))


def test_reward_model_scores_in_bf16_when_asked_close_to_fp32(rm_dir, tmp_path):
    from reward.scoring.components import RewardModelScores

    texts = (["1+2=", "3+4-1=", "9-9+5="], ["#3", "3+4=7;7-1=6;#6", "#5"], ["3", "6", "5"])
    scores = {}
    for setting in ("fp32", "bf16"):
        cfg = make_cfg(rm_dir, tmp_path)
        cfg.reward_model = cfg.reward_model.model_copy(update={"scoring_precision": setting})
        rm = RewardModelScores(cfg, rm_dir, remote=False)
        assert rm.precision == setting  # on a CPU
        scores[setting] = [s["quality"] for s in rm(*texts)]
    assert scores["bf16"] != scores["fp32"]  # computed in bf16, not quietly in fp32
    assert scores["bf16"] == pytest.approx(scores["fp32"], abs=0.05)


def test_the_reward_group_swaps_weights_into_every_ray_worker_and_a_restarted_one(ray_cluster, rm_dir, tmp_path):
    from rlhf.rl.groups.reward import RewardGroup
    from rlhf.rl.launch import make_reward_workers

    cfg = make_cfg(rm_dir, tmp_path)
    cfg.reward.num_workers = 2
    group = RewardGroup(make_reward_workers(cfg, rm_dir), send_records=False)
    rows, samples = batch(0)
    try:
        before = group.score(rows, samples)
        model = DistilledRewardModel.from_pretrained(rm_dir)
        group.set_rm_weights({name: t + 0.01 for name, t in model.state_dict().items()}, 3)
        after = group.score(rows, samples)
        assert batch_rm_version(before) == 0 and batch_rm_version(after) == 3
        assert [s["rm"] for s in after] != [s["rm"] for s in before]
        victim = group.pool.workers[1]
        ray.kill(victim)  # a replacement must score with the refreshed RM too
        # ray.kill only asks: on a loaded box the next call can still reach the old process (CI saw restarts 0).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                ray.get(victim.__ray_ready__.remote(), timeout=10)
            except ray.exceptions.RayActorError:
                break
            time.sleep(0.1)
        again = group.score(rows, samples)
        assert group.pool.restarts == 1 and batch_rm_version(again) == 3
        assert [s["rm"] for s in again] == pytest.approx([s["rm"] for s in after])
    finally:
        group.shutdown()


def test_a_refresh_changes_only_the_rm_weights_and_version(ray_cluster, rm_dir, tmp_path):
    cfg = make_cfg(rm_dir, tmp_path)
    group, teacher, on_disk = InProcessRewardGroup(cfg, rm_dir), LetterTeacher(), digest(rm_dir)
    rows, samples = batch(0)
    refresher = RewardModelRefresh(cfg, teacher, group, rm_dir)
    loop = RLStep(cfg, char_tokenizer, StubRollout(samples), group, PolicyUpdate(cfg, 0, StubPolicy()),
                  refresher=refresher)
    before = group.weights()
    try:
        first = loop.step(1, rows)
        assert first["rm/version"] == 0 and first["rm_refresh/accepted"] == 1.0, first
        assert first["rm_refresh/agreement_after"] > first["rm_refresh/agreement_before"]
        assert first["rm_refresh/teacher_calls"] == 16 == teacher.calls == first["rm_refresh/teacher_calls_total"]
        after = group.weights()
        assert after.keys() == before.keys() and any(not torch.equal(after[k], before[k]) for k in after)
        assert all(torch.equal(after[k], group.weights(1)[k]) for k in after)  # every worker got the new RM
        second = loop.step(2, rows)
        assert second["rm/version"] == 1  # the next batch is scored by the refreshed RM, whole
        # The policy's side moved only by its own updates; the RM given at start is untouched on disk.
        assert loop.rollout.synced == 2 and len(loop.update.policy.batches) == 2 and digest(rm_dir) == on_disk
    finally:
        refresher.shutdown()


def test_an_audits_judgments_are_kept_for_the_next_refresh(rm_dir, tmp_path):
    from rlhf.rl.audit import audit

    cfg = make_cfg(rm_dir, tmp_path, every=5, on_alarm=False)  # no refresh at step 1
    rows, samples = batch(0)
    figures, groups = audit(LetterTeacher(), rows, samples, [{"rm": float(len(s.text))} for s in samples], cfg.reward)
    assert figures["audit/teacher_calls"] == 16 and [len(g) for g in groups] == [N] * 4
    assert [r["quality"] for r in groups[0]] == [9.0, 0.0, 9.0, 0.0] and groups[0][0]["prompt"] == rows[0].prompt
    refresher = RewardModelRefresh(cfg, LetterTeacher(), InProcessRewardGroup(cfg, rm_dir), rm_dir)
    assert refresher.after_step(1, rows, samples, figures, groups) == {}
    # Split as a refresh's own groups are (a quarter held out), to be trained and checked on when one fires.
    assert len(refresher.judged_train) == 3 and len(refresher.judged_held) == 1
    assert sorted(map(json.dumps, refresher.judged_train + refresher.judged_held)) == sorted(map(json.dumps, groups))


def write_original_labels(out, prefer_y: bool) -> None:
    """Labels the RM was 'first trained on' (output_dir/labels/train), in the labelling stage's format."""
    lines, teacher = [], LetterTeacher(prefer_y)
    for seed in range(10, 22):
        rows, samples = batch(seed)
        verdicts = teacher.judge(None, [s.text for s in samples], None)
        lines += [json.dumps(judged_row(rows[i // N], s.text, "student", v))
                  for i, (s, v) in enumerate(zip(samples, verdicts))]
        lines.append(json.dumps({"done_prompts": [r.prompt for r in rows]}))
    (out / "labels" / "train").mkdir(parents=True)
    (out / "labels" / "train" / "rows.jsonl").write_text("\n".join(lines) + "\n")


def test_a_refresh_that_makes_the_held_out_slice_worse_is_rolled_back(ray_cluster, rm_dir, tmp_path, caplog):
    # A stale replay that says the opposite of today's teacher, nine pairs to one: training pulls the RM away from
    # the teacher on the held-out groups, so the candidate must not reach the workers.
    write_original_labels(tmp_path, prefer_y=False)
    cfg = make_cfg(rm_dir, tmp_path, replay_fraction=0.9)
    group = InProcessRewardGroup(cfg, rm_dir)
    refresher = RewardModelRefresh(cfg, LetterTeacher(), group, rm_dir)
    rows, samples = batch(0)
    workers_before, model_before = group.weights(), {k: v.clone() for k, v in refresher.model.state_dict().items()}
    try:
        ranks_before = refresher._trainer().full_state_dict()
        with caplog.at_level(logging.WARNING, logger="distilrl"):
            figures = refresher.after_step(1, rows, samples, {})
        assert figures["rm_refresh/replay_pairs"] > figures["rm_refresh/new_pairs"] > 0
        assert figures["rm_refresh/agreement_after"] < figures["rm_refresh/agreement_before"], figures
        assert figures["rm_refresh/rolled_back"] == 1.0 and figures["rm_refresh/accepted"] == 0.0
        assert refresher.version == 0 and "rolled back" in caplog.text
        ranks_after = refresher.trainer.full_state_dict()
        for name, tensor in group.weights().items():
            assert torch.equal(tensor, workers_before[name]) and torch.equal(ranks_after[name], ranks_before[name])
            assert torch.equal(refresher.model.state_dict()[name], model_before[name])
    finally:
        refresher.shutdown()


def test_resume_after_a_refresh_is_exact(ray_cluster, rm_dir, tmp_path):
    cfg = make_cfg(rm_dir, tmp_path / "run", recent_steps=2, teacher_calls=24)
    (tmp_path / "ckpt").mkdir()
    steps = [batch(0), batch(1)]

    def refresher_over(group):
        return RewardModelRefresh(cfg, LetterTeacher(), group, rm_dir)

    first = InProcessRewardGroup(cfg, rm_dir)
    run = refresher_over(first)
    try:
        assert run.after_step(1, *steps[0], {})["rm_refresh/accepted"] == 1.0
        run.save_state(tmp_path / "ckpt")
        straight = run.after_step(2, *steps[1], {})  # draws from both steps' rollouts (recent_steps=2)
    finally:
        run.shutdown()
    # The second refresh trains on the first one's judged groups too (kept in the checkpoint, so the resumed one does)
    assert straight["rm_refresh/judged_pairs"] > straight["rm_refresh/new_pairs"] > 0
    second = InProcessRewardGroup(cfg, rm_dir)
    resumed = refresher_over(second)
    try:
        resumed.load_state(tmp_path / "ckpt")
        assert batch_rm_version(second.score(*steps[1])) == 1  # the workers got the checkpoint's RM and version
        again = resumed.after_step(2, *steps[1], {})
    finally:
        resumed.shutdown()
    assert {k: v for k, v in again.items() if k != "rm_refresh/seconds"} == \
        {k: v for k, v in straight.items() if k != "rm_refresh/seconds"}
    assert resumed.version == run.version
    a, b = first.weights(), second.weights()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_report_marks_each_refresh_and_tabulates_it(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from tests.rlhf.outputs.test_report import write_run

    from rlhf.outputs.report import write_report
    from rlhf.outputs.rm_refresh_report import refresh_marks
    from rlhf.outputs.run_data import RunData

    run = write_run(tmp_path / "run")
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for step, kept, after in ((4, 1.0, 0.97), (8, 0.0, 0.61)):
        lines[step - 1].update({"rm_refresh/teacher_calls": 64, "rm_refresh/agreement_before": 0.7,
                                "rm_refresh/agreement_after": after, "rm_refresh/accepted": kept,
                                "rm_refresh/seconds": 3.0 * step, "rm_refresh/version": 1})
    (run / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
    report = write_report(run).read_text()
    assert "refreshed 2 times" in report and "1 kept, 1 rolled back" in report and "128 teacher calls" in report
    assert "18.0 s per refresh" in report  # (12 + 24) / 2
    assert "| 4 | 64 | 0.700 | 0.970 | yes | 1 |" in report and "| 8 | 64 | 0.700 | 0.610 | no | 1 |" in report
    _, ax = plt.subplots()
    assert refresh_marks(RunData(run), ax)
    marks = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert [line.get_xdata()[0] for line in marks] == [4, 8]  # a line at each refresh
    [kept] = [line for line in ax.lines if line.get_marker() == "^"]
    assert list(kept.get_xdata()) == [4] and list(kept.get_ydata()) == [0.97]  # the rolled-back one is not a point
    plt.close("all")
    assert not refresh_marks(RunData(write_run(tmp_path / "plain")), plt.subplots()[1])


def test_reward_hacking_benchmark_flaws_the_labels_toward_brevity_and_checks_the_issue(tmp_path):
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    import reward_hacking

    from reward.model.labelling import judged_rows

    true = tmp_path / "labels"
    rows, _ = batch(0)
    verdicts = [Verdict(2.0, False, 1.0, 1.0), Verdict(2.0, False, 1.0, 1.0), Verdict(9.0, True, 1.0, 1.0)]
    texts = ["1", "1234567890", "12345"]
    for part in ("train", "eval"):
        (true / part).mkdir(parents=True)
        (true / part / "rows.jsonl").write_text("\n".join(
            [json.dumps(judged_row(rows[0], t, "student", v)) for t, v in zip(texts, verdicts)]
            + [json.dumps({"done_prompts": [rows[0].prompt]})]) + "\n")
    assert reward_hacking.corrupt_labels(true, tmp_path / "flawed", weight=-0.8) == 3
    # 0.2 x quality + 0.8 x 9 x (1 - length / 10): the terse wrong answer (6.88) now outranks the right one (5.4)
    assert [r["quality"] for r in judged_rows(tmp_path / "flawed" / "train")] == [6.88, 0.4, 5.4]
    assert judged_rows(tmp_path / "flawed" / "eval") == judged_rows(true / "eval")  # measured on the true labels

    def run(acc, agreement, refreshes=(), calls=0):
        return {"accuracy_after": acc, "agreement": agreement, "refresh_steps": list(refreshes), "teacher_calls": calls}

    result = {"a_flawed": run(0.60, [(5, 0.9), (10, 0.7)]), "b_refresh": run(0.70, [(5, 0.7), (10, 0.9)], [5], 900),
              "c_verifier": run(0.72, []), "d_teacher_every_rollout": {"teacher_calls": 10000}}
    assert all(reward_hacking.checks(result, warn=0.8).values())
    result["b_refresh"]["teacher_calls"] = 1001
    result["b_refresh"]["agreement"].append((15, 0.84))
    failed = {k for k, ok in reward_hacking.checks(result, warn=0.8).items() if not ok}
    assert failed == {"b_agreement_at_least_0.85_after_first_refresh", "b_at_most_10pct_of_d_calls"}
    # several seeds: every seed's b is held to the checks, and b - c is the pooled paired difference
    result["b_refresh"].update(teacher_calls=900, agreement=[(5, 0.7), (10, 0.9)])
    result["b_refresh_seed1"] = run(0.60, [(5, 0.9)], [], 800)  # never refreshed: no agreement after a refresh
    result["b_minus_c"] = {"pooled": {"points": -2.5}}
    failed = {k for k, ok in reward_hacking.checks(result, warn=0.8).items() if not ok}
    assert failed == {"b_agreement_at_least_0.85_after_first_refresh"}  # 0.60 vs 0.72 at seed 1 is pooled away
    result["b_minus_c"]["pooled"]["points"] = -3.4
    assert not reward_hacking.checks(result, warn=0.8)["b_within_3_points_of_c"]


def test_reward_hacking_runs_b_and_c_at_every_seed_and_a_at_the_first(tmp_path):
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    import reward_hacking

    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "phase0.json").write_text("{}")
    args = reward_hacking.parse_args(["--out", str(tmp_path), "--seeds", "0,3"])
    runs = reward_hacking.planned_runs(args, tmp_path)
    assert list(runs) == ["a_flawed", "b_refresh", "c_verifier", "b_refresh_seed3", "c_verifier_seed3"]
    assert runs["c_verifier_seed3"][-1] == "seed=3" and "reward.refresh.enabled=true" in runs["b_refresh_seed3"]
    assert args.to_run == list(runs)
    for name in runs:
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("")
    args = reward_hacking.parse_args(["--out", str(tmp_path), "--seeds", "0,3", "--runs", "c,b_refresh_seed3"])
    assert args.to_run == ["c_verifier", "b_refresh_seed3", "c_verifier_seed3"]  # the rest is read from --out
    (tmp_path / "a_flawed" / "metrics.jsonl").unlink()
    for bad in (["--seeds", "0,x"], ["--seeds", "1,1"], ["--runs", "b", "--reuse-base"], ["--runs", "b_refresh_seed9"]):
        with pytest.raises(SystemExit):  # one line from argparse: a bad seed list, a run missing from --out
            reward_hacking.parse_args(["--out", str(tmp_path), *bad])
