"""The ``distilrl`` command line. ``distilrl run CONFIG [dotted.key=value ...]`` runs the stages the config lists.

Errors a user can fix (a bad config, a missing model directory, a bad dataset row) end the process with one line
on stderr and exit status 2, not a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distilrl", description="RL fine-tuning of Qwen students with distilled "
                                     "reward models, on Ray and DeepSpeed.")
    commands = parser.add_subparsers(dest="command", required=True)
    run_cmd = commands.add_parser("run", help="run the stages a config lists (warm-up, RL, evaluation)")
    run_cmd.add_argument("config", help="YAML config file, e.g. configs/quickstart.yaml")
    run_cmd.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. algorithm.steps=10")
    args = parser.parse_args(argv)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    import torch
    import transformers

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # said once here, instead of DeepSpeed warning about it
    # The run prints its own progress; per-file loading bars would drown it.
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    from rlhf.config import ConfigError, load_config
    from rlhf.data import DatasetError
    from rlhf.driver import RunDirError, run
    from rlhf.models import ModelLoadError

    try:
        cfg = load_config(args.config, args.overrides)
        run(cfg, log=lambda line: print(line, flush=True))
    except (ConfigError, DatasetError, ModelLoadError, RunDirError) as err:
        print(f"distilrl: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
