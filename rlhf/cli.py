"""The ``distilrl`` command line.

  distilrl run CONFIG [dotted.key=value ...]      the stages the config lists (warm-up, label, train_rm, RL, eval)
  distilrl run CONFIG --resume                    continue output_dir's run from its newest complete checkpoint
  distilrl label CONFIG [...]                     only warm-up (if listed) and labelling
  distilrl traces CONFIG [...]                    teacher traces on the prompts: write, grade, select per CD bin
  distilrl sft CONFIG [...]                       distillation SFT of the student on traces (and eval if listed)
  distilrl train-rm CONFIG [--labels RUN] [...]   train and evaluate a distilled RM on a labelling run's labels
  distilrl train-rm CONFIG --data PAIRS [...]     ... on your own preference data (TRL layouts), or on both
  distilrl dpo CONFIG [--data PAIRS] [...]        DPO / IPO / SimPO of the student on the teacher's or your pairs
  distilrl eval CHECKPOINT [--config C] [...]     a policy checkpoint on the held-out prompts, as JSON
  distilrl eval-rm RM_DIR LABELS_DIR|DATA         a distilled RM on held-out labels or preference data, as JSON
  distilrl serve-rm RM_DIR                        the RM over HTTP (OpenRLHF's /get_reward shape, and /score)
  distilrl serve CHECKPOINT                       a policy over an OpenAI-compatible /v1/chat/completions
  distilrl report RUN_DIR                         (re)write a run's report.md and plots
  distilrl config [SECTION]                       the config's keys: types, defaults, descriptions
  distilrl import-model SRC OUT                   a GGUF file or HF directory as a HF safetensors directory
  distilrl push RUN_DIR REPO [--model M]          a run's policy (or reward_model) to the Hub, with a model card

Exit status 0 on success. Errors a user can fix (a bad config, a missing model directory, a dataset with no usable row, a teacher that
cannot judge) end the process with one line on stderr and exit status 2, not a traceback; a run that fails on the
way (a trainer rank died, a call timed out, an unusable reward) with one line and exit status 1.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

from rlhf.commands import COMMANDS


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
            cmd.add_argument("--dry-run", action="store_true", help="print the placement and memory plan and exit "
                             "(starts nothing: no Ray, no GPU)")
    text = "teacher traces on the config's training prompts: write, grade by the verifier, score RV/CD, select"
    cmd = commands.add_parser("traces", help=text, description=text + " per CD bin by the curriculum (traces.*); "
                              "writes a datasets dataset and summary.json to output_dir/traces. A stopped job "
                              "resumes from its cache there.")
    cmd.add_argument("config", help="YAML config file, e.g. configs/gsm8k_sft.yaml")
    cmd.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. traces.prompts=100")
    text = "distillation SFT of the student on a traces dataset (warmup.traces_file, or output_dir/traces)"
    cmd = commands.add_parser("sft", help=text, description=text + "; the traces stage runs first if the config "
                              "lists it, the evaluation after if it lists eval. The student is saved to "
                              "output_dir/warmup in Hugging Face format.")
    cmd.add_argument("config", help="YAML config file, e.g. configs/gsm8k_sft.yaml")
    cmd.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. warmup.steps=50")
    text = "train a distilled RM on labels (and score it against the teacher's held-out labels)"
    cmd = commands.add_parser("train-rm", help=text, description=text + ". Without --labels, the config's warm-up "
                              "(if listed) and labelling run first, in its output_dir.")
    cmd.add_argument("config", help="YAML config file, e.g. configs/quickstart.yaml")
    cmd.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. reward_model.epochs=5")
    cmd.add_argument("--labels", metavar="RUN_DIR", help="a run directory from `distilrl label` (its labels/ and "
                     "warmup/ student are used); the RM goes to the config's output_dir")
    cmd.add_argument("--data", metavar="PATH", help="your own preference data (reward_model.train_file): chosen/"
                     "rejected pairs in TRL's layouts (explicit or implicit prompt, text or messages; optional "
                     "margin, score_chosen/score_rejected) or prompt/completion with score or label; a .jsonl, "
                     ".json, .parquet, .csv file or a save_to_disk directory. With --labels, both are used")
    cmd.add_argument("--eval-data", metavar="PATH", help="held-out preference data (reward_model.eval_file; "
                     "default: reward_model.eval_fraction of --data's prompts)")
    _add_preference_command(commands)
    _add_model_commands(commands)
    return parser


def _add_preference_command(commands) -> None:
    text = "preference optimisation (DPO, IPO, SimPO: dpo.loss) of the student on pairs, the teacher's or your own"
    cmd = commands.add_parser("dpo", help=text, description=text + ". The config's warm-up and labelling run first "
                              "when it lists them (the teacher's pairs, with its margin); the policy goes to "
                              "output_dir/dpo, then the evaluation if the config lists eval.")
    cmd.add_argument("config", help="YAML config file, e.g. configs/quickstart.yaml")
    cmd.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. dpo.beta=0.2")
    cmd.add_argument("--data", metavar="PATH", help="your own preference pairs (dpo.train_file), in the layouts "
                     "train-rm --data reads; without --data, the teacher's pairs from the labelling stage")
    cmd.add_argument("--eval-data", metavar="PATH", help="held-out pairs (dpo.eval_file; default: "
                     "dpo.eval_fraction of --data's prompts)")


def _add_model_commands(commands) -> None:
    """The commands that take a trained model or a run directory: evaluate, serve, report, import."""
    text = "evaluate a policy checkpoint on the held-out prompts (accuracy, response length, per difficulty)"
    cmd = commands.add_parser("eval", help=text, description=text + "; prints JSON.")
    cmd.add_argument("checkpoint", help="a policy directory in Hugging Face format (a run's policy/)")
    cmd.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. task.eval_prompts=500")
    cmd.add_argument("--config", help="the config whose task and eval settings to use (default: the config.yaml "
                     "of the run the checkpoint is in, if any)")
    cmd.add_argument("--show", type=int, default=0, metavar="N", help="also print the first N answers (prompt, "
                     "response, verdict) on stderr, and put them in the JSON under answers")
    cmd = commands.add_parser("eval-rm", help="evaluate a distilled RM against the teacher's held-out labels or "
                              "your own held-out preference data")
    cmd.add_argument("rm_dir", help="a distilled reward model directory (a run's reward_model/)")
    cmd.add_argument("labels_dir", help="a labelling directory with rows.jsonl (a run's labels/eval/), or "
                     "preference data in the layouts train-rm --data reads")
    cmd = commands.add_parser("serve-rm", help="serve a distilled RM over HTTP on 127.0.0.1")
    cmd.add_argument("rm_dir", help="a distilled reward model directory (a run's reward_model/)")
    cmd.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    cmd.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    cmd.add_argument("--token-env", help="environment variable holding a bearer token clients must send")
    cmd.add_argument("--max-queue", type=int, default=64,
                     help="requests that may wait for scoring; beyond that the answer is 503 busy (default 64)")
    cmd.add_argument("--max-tokens", type=int, help="longest prompt + response in tokens; longer samples get 400 "
                     "(default: the model's max_position_embeddings)")
    cmd = commands.add_parser("serve", help="serve a policy checkpoint over an OpenAI-compatible API on 127.0.0.1")
    cmd.add_argument("checkpoint", help="a policy directory in Hugging Face format (a run's policy/)")
    cmd.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. rollout.dtype=bfloat16")
    cmd.add_argument("--config", help="the config whose rollout section (engine, dtype) to serve with (default: the "
                     "config.yaml of the run the checkpoint is in, if any; else the default rollout section)")
    cmd.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    cmd.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    text = "print the config's keys with their types, defaults and descriptions (all, or one section or key)"
    cmd = commands.add_parser("config", help=text, description=text + ", read from the declarations.")
    cmd.add_argument("section", nargs="?", help="a section (rollout, reward.adaptive, ...) or a key (rollout.engine)")
    text = "write a run's report.md and plots (reward, accuracy, KL, per-difficulty, RM-teacher agreement, time)"
    cmd = commands.add_parser("report", help=text, description=text + " from its summary.json and metrics.jsonl.")
    cmd.add_argument("run_dir", help="a run's output_dir")
    text = "upload a run's policy or reward model to the Hugging Face Hub, with a model card of the run's figures"
    cmd = commands.add_parser("push", help=text, description=text + " (token: HF_TOKEN or huggingface-cli login).")
    cmd.add_argument("run_dir", help="a run's output_dir")
    cmd.add_argument("repo", help="the Hub repository, e.g. my-org/qwen-grpo (made if it does not exist)")
    cmd.add_argument("--model", default="policy", choices=["policy", "reward_model"], help="what to push "
                     "(default: the final policy)")
    cmd.add_argument("--private", action="store_true", help="make a new repository private")
    text = "write a Hugging Face directory (safetensors, tokenizer, chat template) from a GGUF file or a directory"
    cmd = commands.add_parser("import-model", help=text, description=text + "; point model.model_name_or_path at "
                              "OUT. GGUF files are de-quantized to float (needs `pip install gguf`).")
    cmd.add_argument("source", help="a .gguf file, or a Hugging Face model directory to re-save")
    cmd.add_argument("out", help="the directory to write (must not exist)")
    cmd.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights' dtype "
                     "(default float32, what CPU training uses)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may also come after an option (`train-rm CONFIG --labels RUN key=value`), which argparse leaves over.
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _quiet_libraries()
    from reward.model.labelling import TeacherError
    from reward.scoring.worker import RewardError
    from rlhf.core.distributed.cluster import ClusterError
    from rlhf.core.config.run_config import ConfigError
    from rlhf.core.data.datasets import DatasetError
    from rlhf.stages.run_dir import RunDirError
    from rlhf.core.guards import NonFiniteError
    from rlhf.core.models.build import ModelLoadError
    from rlhf.core.distributed.worker_pool import WorkerDiedError

    try:
        return COMMANDS[args.command](args)
    except (ConfigError, DatasetError, ModelLoadError, RunDirError, ClusterError, FileNotFoundError,
            NotADirectoryError, TeacherError) as err:
        print(f"distilrl: error: {err}", file=sys.stderr)
        return 2
    except (WorkerDiedError, TimeoutError, RewardError, NonFiniteError) as err:
        # The run failed on the way (its newest checkpoint, if any, is left to resume from): exit 1, one line.
        print(f"distilrl: error: {err}", file=sys.stderr)
        return 1


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
