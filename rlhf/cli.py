"""The ``distilrl`` command line.

  distilrl run CONFIG [dotted.key=value ...]      the stages the config lists (warm-up, label, train_rm, RL, eval)
  distilrl run CONFIG --resume                    continue output_dir's run from its newest complete checkpoint
  distilrl label CONFIG [...]                     only warm-up (if listed) and labelling
  distilrl eval-rm RM_DIR LABELS_DIR              a distilled RM against the teacher's held-out labels
  distilrl serve-rm RM_DIR                        the RM over HTTP (OpenRLHF's /get_reward shape, and /score)
  distilrl serve CHECKPOINT                       a policy over an OpenAI-compatible /v1/chat/completions

Errors a user can fix (a bad config, a missing model directory, a bad dataset row) end the process with one line
on stderr and exit status 2, not a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distilrl", description="RL fine-tuning of Qwen students with distilled "
                                     "reward models, on Ray and DeepSpeed.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("run", "run the stages a config lists (warm-up, label, train_rm, RL, evaluation)"),
                       ("label", "warm up (if the config lists it) and label student samples with the teacher")):
        cmd = commands.add_parser(name, help=text, description=text)
        cmd.add_argument("config", help="YAML config file, e.g. configs/quickstart.yaml")
        cmd.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. algorithm.steps=10")
        if name == "run":
            cmd.add_argument("--resume", action="store_true", help="continue the run in output_dir from its newest "
                             "complete checkpoint (save_every); a finished run is left as it is")
    cmd = commands.add_parser("eval-rm", help="evaluate a distilled RM against the teacher's held-out labels")
    cmd.add_argument("rm_dir", help="a distilled reward model directory (a run's reward_model/)")
    cmd.add_argument("labels_dir", help="a labelling directory with rows.jsonl (a run's labels/eval/)")
    cmd = commands.add_parser("serve-rm", help="serve a distilled RM over HTTP on 127.0.0.1")
    cmd.add_argument("rm_dir")
    cmd.add_argument("--host", default="127.0.0.1")
    cmd.add_argument("--port", type=int, default=5000)
    cmd.add_argument("--token-env", help="environment variable holding a bearer token clients must send")
    cmd = commands.add_parser("serve", help="serve a policy checkpoint over an OpenAI-compatible API on 127.0.0.1")
    cmd.add_argument("checkpoint")
    cmd.add_argument("--host", default="127.0.0.1")
    cmd.add_argument("--port", type=int, default=8000)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    from rlhf.cluster import ClusterError
    from rlhf.config import ConfigError
    from rlhf.data import DatasetError
    from rlhf.driver import RunDirError
    from rlhf.guards import NonFiniteError
    from rlhf.models import ModelLoadError

    try:
        return COMMANDS[args.command](args)
    except (ConfigError, DatasetError, ModelLoadError, RunDirError, ClusterError, FileNotFoundError) as err:
        print(f"distilrl: error: {err}", file=sys.stderr)
        return 2
    except NonFiniteError as err:  # the run stopped itself; its newest checkpoint is left to resume from
        print(f"distilrl: error: {err}", file=sys.stderr)
        return 1


def _run(args) -> int:
    from rlhf.api import run  # the scripting API's entry point: the command and scripts share one code path
    from rlhf.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.command == "label":
        cfg.stages = [s for s in cfg.stages if s in ("warmup", "label")] or ["label"]
        if "label" not in cfg.stages:
            cfg.stages.append("label")
    run(cfg, log=lambda line: print(line, flush=True), resume=getattr(args, "resume", False))
    return 0


def _eval_rm(args) -> int:
    from reward.distill import evaluate_rm_dir
    from reward.labelling import judged_rows, make_pairs

    for path in (args.rm_dir, os.path.join(args.labels_dir, "rows.jsonl")):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} does not exist")
    rows = judged_rows(args.labels_dir)
    print(json.dumps(evaluate_rm_dir(args.rm_dir, make_pairs(rows, seed=1), rows), indent=2))
    return 0


def _serve_rm(args) -> int:
    from transformers import AutoTokenizer

    from reward.model import DistilledRewardModel, score_texts
    from reward.server import serve_reward

    model = DistilledRewardModel.from_pretrained(args.rm_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.rm_dir)
    token = os.environ.get(args.token_env) if args.token_env else None
    if args.token_env and not token:
        raise FileNotFoundError(f"environment variable {args.token_env} is not set")
    serve_reward(lambda p, r: [s["quality"] for s in score_texts(model, tokenizer, p, r, 64)], args.host, args.port,
                 token)
    return 0


def _serve(args) -> int:
    from rlhf.serve import serve

    serve(args.checkpoint, args.host, args.port)
    return 0


COMMANDS = {"run": _run, "label": _run, "eval-rm": _eval_rm, "serve-rm": _serve_rm, "serve": _serve}


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    import torch
    import transformers

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # said once here, instead of DeepSpeed warning about it
    # The run prints its own progress; per-file loading bars would drown it.
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    import datasets

    datasets.disable_progress_bars()


if __name__ == "__main__":
    sys.exit(main())
