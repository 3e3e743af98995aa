"""The same GRPO run twice from the same warm-up student: rewarded by the distilled RM, and by the oracle verifier.

    python benchmarks/rm_vs_oracle.py [--config configs/quickstart.yaml] [--out runs/rm_vs_oracle] [key=value ...]

Run 1 is the full distilled-RM pipeline (warm-up -> label -> train RM -> GRPO on RM scores -> eval). Run 2 starts
from run 1's warm-up checkpoint and repeats GRPO with the same seeds and steps, rewarded by the rule verifier (the
oracle's correctness check). Prints a table, then one JSON object: gain_rm, gain_oracle (held-out accuracy after RL
minus before), their ratio, and the RM's pairwise accuracy against the teacher.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from rlhf.cli import _quiet_libraries
from rlhf.core.config.run_config import load_config
from rlhf.api import run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--out", default="runs/rm_vs_oracle")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    _quiet_libraries()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)

    rm_cfg = load_config(args.config, [*args.overrides, f"output_dir={out / 'rm'}",
                                       "stages=[warmup,label,train_rm,rl,eval]", "reward.components={rm: 1.0}"])
    rm = run(rm_cfg, log=lambda line: print(f"[rm] {line}", flush=True)).summary
    oracle_cfg = load_config(args.config, [*args.overrides, f"output_dir={out / 'oracle'}", "stages=[rl,eval]",
                                           f"model.model_name_or_path={out / 'rm' / 'warmup'}",
                                           "reward.components={verifier: 1.0}", "reward.audit_every=0"])
    oracle = run(oracle_cfg, log=lambda line: print(f"[oracle] {line}", flush=True)).summary

    def gain(summary: dict) -> float:
        return round(summary["eval_after"]["accuracy"] - summary["eval_before"]["accuracy"], 4)

    result = {
        "accuracy_before": rm["eval_before"]["accuracy"],
        "accuracy_after_rm": rm["eval_after"]["accuracy"],
        "accuracy_after_oracle": oracle["eval_after"]["accuracy"],
        "gain_rm": gain(rm),
        "gain_oracle": gain(oracle),
        "rm_pairwise_accuracy": rm["reward_model"]["pairwise_accuracy"],
        "rm_spearman": rm["reward_model"]["spearman"],
        "steps": rm["steps"],
        "wall_s": round(rm["wall_s"] + oracle["wall_s"], 1),
    }
    result["gain_ratio"] = round(result["gain_rm"] / result["gain_oracle"], 3) if result["gain_oracle"] else None
    print(f"{'reward':<10}{'before':>8}{'after':>8}{'gain':>8}")
    print(f"{'rm':<10}{result['accuracy_before']:>8.3f}{result['accuracy_after_rm']:>8.3f}{result['gain_rm']:>8.3f}")
    print(f"{'oracle':<10}{oracle['eval_before']['accuracy']:>8.3f}{result['accuracy_after_oracle']:>8.3f}"
          f"{result['gain_oracle']:>8.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
