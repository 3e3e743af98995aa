"""Two run directories, compared figure by figure: are their metrics.jsonl and summary.json the same, timings
aside? Used to show a restructuring changed no behaviour (the same config and seed before and after a commit).

    python benchmarks/compare_runs.py RUN_A RUN_B [--tolerance 0]

Seconds, rates, memory and paths differ between any two runs and are left out; every other number must agree
within ``--tolerance`` (0: bit for bit, as a deterministic run on one machine gives). Prints each difference, then
one JSON line: steps compared, figures compared, differences.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

# Timings, throughput (the measured GEMM rate among them), memory and where files went: not behaviour.
IGNORED = re.compile(r"(_s$|_s/|_per_s|tokens_s|gflops|mfu|rss|memory|_mib$|_mb$|_dir$|path|wall|stage_s|student_dir)")


def flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}/"))
        return out
    if isinstance(tree, list) and all(isinstance(v, (int, float)) for v in tree):
        return {f"{prefix}{i}": v for i, v in enumerate(tree)}
    return {prefix.rstrip("/"): tree}


def differences(a: dict, b: dict, tolerance: float, where: str) -> tuple[int, list[str]]:
    fa, fb = flatten(a), flatten(b)
    keys = sorted(k for k in set(fa) | set(fb) if not IGNORED.search(k))
    diffs = []
    for key in keys:
        x, y = fa.get(key), fb.get(key)
        same = (isinstance(x, (int, float)) and isinstance(y, (int, float))
                and (abs(x - y) <= tolerance or (math.isnan(x) and math.isnan(y)))) or x == y
        if not same:
            diffs.append(f"{where} {key}: {x!r} != {y!r}")
    return len(keys), diffs


def compare(run_a: Path, run_b: Path, tolerance: float) -> dict:
    lines_a = (run_a / "metrics.jsonl").read_text().splitlines()
    lines_b = (run_b / "metrics.jsonl").read_text().splitlines()
    compared, diffs = 0, []
    if len(lines_a) != len(lines_b):
        diffs.append(f"metrics.jsonl: {len(lines_a)} lines != {len(lines_b)}")
    for i, (la, lb) in enumerate(zip(lines_a, lines_b)):
        n, d = differences(json.loads(la), json.loads(lb), tolerance, f"metrics.jsonl line {i + 1}")
        compared, diffs = compared + n, diffs + d
    n, d = differences(json.loads((run_a / "summary.json").read_text()),
                       json.loads((run_b / "summary.json").read_text()), tolerance, "summary.json")
    return {"steps": min(len(lines_a), len(lines_b)), "figures": compared + n, "differences": diffs + d}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--tolerance", type=float, default=0.0)
    args = parser.parse_args()
    result = compare(args.run_a, args.run_b, args.tolerance)
    for line in result["differences"]:
        print(line)
    print(json.dumps({"steps": result["steps"], "figures": result["figures"],
                      "differences": len(result["differences"]), "same": not result["differences"]}))
    return 0 if not result["differences"] else 1


if __name__ == "__main__":
    sys.exit(main())
