"""The dpo stage end to end on 2 DeepSpeed ZeRO-2 ranks with a tiny Qwen2, and a bad pairs file at the CLI.

The pairs are separable but not by chance: each response is four random digits with a "y" (chosen) or an "n"
(rejected) at a random place, so a random model's preference between the two of a pair is a coin toss on the
held-out pairs, and DPO must learn the marker to rank them.
"""
from __future__ import annotations

import json
import random

import pytest

ray = pytest.importorskip("ray")
transformers = pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

from rlhf.cli import main  # noqa: E402
from rlhf.core.config.run_config import RunConfig  # noqa: E402
from rlhf.stages.dpo import dpo_stage  # noqa: E402
from tests.reward.model.test_rm_trainer import lm_dir, ray_cluster, tokenizer  # noqa: E402,F401 - the same tiny student
from tests.paths import REPO  # noqa: E402

TINY = str(REPO / "configs" / "tiny.yaml")


def marked(rng: random.Random, marker: str) -> str:
    digits = [rng.choice("0123456789") for _ in range(4)]
    digits.insert(rng.randrange(5), marker)
    return "#" + "".join(digits)


def marked_pairs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": f"{rng.randrange(50)}+{rng.randrange(50)}=", "chosen": marked(rng, "y"),
             "rejected": marked(rng, "n"), "margin": 0.5} for _ in range(n)]


def write_jsonl(path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_dpo_stage_learns_to_rank_held_out_pairs(ray_cluster, lm_dir, tmp_path):
    """DPO with the pairs' margin as offset, the reference a frozen copy. (SimPO, reference-free, ran the same way
    to pair accuracy 0.33 -> 1.0; left out of the suite for time.)"""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", marked_pairs(48, seed=1))
    cfg = RunConfig.model_validate({
        "output_dir": str(tmp_path / "run"), "call_timeout_s": 120,
        "trainer": {"num_ranks": 2, "zero_stage": 2, "threads": 1, "lr": 1e-2, "lr_warmup_steps": 0},
        "dpo": {"loss": "dpo", "margin_weight": 0.5, "train_file": pairs, "eval_fraction": 0.25, "batch_pairs": 8,
                "micro_batch_pairs": 2, "epochs": 3}})
    records = []
    policy_dir, figures = dpo_stage(cfg, lm_dir, tmp_path / "run", lambda line: None,
                                    lambda metrics, step: records.append(metrics))
    assert figures["train_pairs"] + figures["eval_pairs"] == 48 and figures["steps"] == len(records) > 0
    assert 0.25 <= figures["pair_accuracy_before"] <= 0.75  # the coin toss the marker placement makes
    assert figures["pair_accuracy_after"] >= 0.9
    assert figures["reward_accuracy"] >= 0.9
    assert records[-1]["dpo/loss"] < records[0]["dpo/loss"]
    assert records[-1]["dpo/accuracy"] > records[0]["dpo/accuracy"]
    assert transformers.AutoModelForCausalLM.from_pretrained(policy_dir) is not None


def test_a_bad_pairs_file_stops_dpo_with_one_line_and_writes_nothing(tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "1+1=", "text": "2"}])
    out = tmp_path / "run"
    assert main(["dpo", TINY, "--data", bad, f"output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("distilrl: error:") and "\n" not in err and "chosen/rejected" in err
    assert not out.exists()
