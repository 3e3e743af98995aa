"""What each ``distilrl`` command does, once rlhf/cli.py has parsed its arguments: one function per command, each
importing what it needs when it runs (``distilrl --help`` must not pay for Ray, DeepSpeed and torch)."""
from __future__ import annotations

import json
import os
import sys


def _run(args) -> int:
    from rlhf.core.config.run_config import load_config

    cfg = load_config(args.config, args.overrides)
    if getattr(args, "dry_run", False):
        from rlhf.core.distributed.plan import describe_plan

        print("\n".join(describe_plan(cfg)))
        return 0
    if args.command == "label":
        cfg.stages = [s for s in cfg.stages if s in ("warmup", "label")] or ["label"]
        if "label" not in cfg.stages:
            cfg.stages.append("label")
    _run_stages(cfg, resume=getattr(args, "resume", False))
    return 0


def _traces(args) -> int:
    from rlhf.core.config.run_config import load_config
    from rlhf.stages.run_dir import refuse_finished_run
    from rlhf.stages.sft import traces_stage

    cfg = load_config(args.config, args.overrides)
    refuse_finished_run(cfg)
    traces_stage(cfg, cfg.output_dir, _log)
    return 0


def _sft(args) -> int:
    from rlhf.core.config.run_config import config_from_dict, load_config

    data = load_config(args.config, args.overrides).model_dump()
    stages = [s for s in data["stages"] if s in ("traces", "eval")]
    data["stages"] = stages[:1] + ["sft"] + stages[1:] if "traces" in stages else ["sft", *stages]
    _run_stages(config_from_dict(data))  # validated again: sft needs its traces
    return 0


def _log(line: str) -> None:
    """Progress lines on stdout; through tqdm so that a progress bar on the terminal is redrawn below them."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


def _train_rm(args) -> int:
    from rlhf.api import Trainer
    from rlhf.core.config.run_config import ConfigError, load_config

    cfg = load_config(args.config, args.overrides)
    for key, path in (("train_file", args.data), ("eval_file", args.eval_data)):
        if path is not None:
            if not os.path.exists(path):
                raise FileNotFoundError(f"preference data {path} does not exist")
            setattr(cfg.reward_model, key, path)
    if args.eval_data and not cfg.reward_model.train_file:
        raise ConfigError("--eval-data needs --data (or reward_model.train_file): the preference data to train on")
    if args.labels is None and cfg.reward_model.train_file:
        cfg.stages = ["train_rm"]  # your own data alone: no labelling (its RM starts from model.*)
        _run_stages(cfg)
        return 0
    if args.labels is None:
        cfg.stages = [s for s in cfg.stages if s in ("warmup", "label")] + ["train_rm"]
        _run_stages(cfg)
        return 0
    labels = os.path.join(args.labels, "labels")
    if not os.path.isdir(labels):
        raise FileNotFoundError(f"{labels} does not exist: give --labels the output_dir of a `distilrl label` run")
    if os.path.abspath(args.labels) == os.path.abspath(cfg.output_dir):
        raise ConfigError(f"output_dir {cfg.output_dir} is the labelling run itself: set output_dir=... to a new "
                          f"directory for the reward model")
    student = os.path.join(args.labels, "warmup")
    if os.path.isdir(student) and not cfg.model.model_name_or_path:
        cfg.model.model_name_or_path = student  # the RM starts from the student whose samples were labelled
    cfg.stages = ["train_rm"]
    with Trainer(cfg, log=_log) as trainer:
        trainer.train_reward_model(labels)
    return 0


def _dpo(args) -> int:
    from reward.model.preference_data import load_preference_data
    from rlhf.core.config.run_config import load_config

    cfg = load_config(args.config, args.overrides)
    for key, path in (("train_file", args.data), ("eval_file", args.eval_data)):
        if path is not None:
            setattr(cfg.dpo, key, path)
    for path in (cfg.dpo.train_file, cfg.dpo.eval_file):
        if path:  # a bad file stops here, before anything is written
            if not os.path.exists(path):
                raise FileNotFoundError(f"preference data {path} does not exist")
            load_preference_data(path, lambda messages: "\n\n".join(str(m["content"]) for m in messages))
    first = ("traces", "warmup", "sft") + (() if cfg.dpo.train_file else ("label",))
    cfg.stages = [s for s in cfg.stages if s in first] + ["dpo"] + (["eval"] if "eval" in cfg.stages else [])
    _run_stages(cfg)
    return 0


def _run_stages(cfg, resume: bool = False) -> None:
    from rlhf.api import run

    run(cfg, log=_log, resume=resume)


def _checkpoint_config(args):
    """The config a command on a checkpoint uses: --config, else the config.yaml of the run the checkpoint is in
    (if any), with the overrides; its registered names checked."""
    from pathlib import Path

    from rlhf.core.config.run_config import load_config
    from rlhf.registered import check_registered

    config = args.config
    if config is None and (Path(args.checkpoint).resolve().parent / "config.yaml").is_file():
        config = str(Path(args.checkpoint).resolve().parent / "config.yaml")
    cfg = load_config(config, args.overrides)
    check_registered(cfg)
    return cfg


def _eval(args) -> int:
    from rlhf.core.config.run_config import ConfigError
    from rlhf.rl.evaluate import answers_text, evaluate_checkpoint

    if args.show < 0:
        raise ConfigError(f"--show {args.show} must be 0 or more")
    cfg = _checkpoint_config(args)
    figures = evaluate_checkpoint(cfg, args.checkpoint, log=lambda line: print(line, file=sys.stderr, flush=True),
                                  show=args.show)
    if figures.get("answers"):
        print(answers_text(figures["answers"]), file=sys.stderr, flush=True)
    print(json.dumps(figures, indent=2))
    return 0


def _config(args) -> int:
    from rlhf.core.config.describe import describe

    print(describe(args.section))
    return 0


def _report(args) -> int:
    from rlhf.outputs.report import write_report

    print(write_report(args.run_dir))
    return 0


def _eval_rm(args) -> int:
    from rlhf.stages.reward_model import evaluate_rm_dir
    from reward.model.labelling import judged_rows, make_pairs

    for path in (args.rm_dir, args.labels_dir):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} does not exist")
    if os.path.exists(os.path.join(args.labels_dir, "rows.jsonl")):
        rows = judged_rows(args.labels_dir)
        pairs, pointwise = make_pairs(rows, seed=1), rows
    else:  # your own preference data, conversational prompts rendered with the RM's chat template
        from transformers import AutoTokenizer

        from reward.model.preference_data import load_preference_data, message_renderer

        render = message_renderer(AutoTokenizer.from_pretrained(args.rm_dir))
        data = load_preference_data(args.labels_dir, render, seed=1)
        pairs, pointwise = data.pairs, data.pointwise
    print(json.dumps(evaluate_rm_dir(args.rm_dir, pairs, pointwise), indent=2))
    return 0


def _serve_rm(args) -> int:
    from transformers import AutoTokenizer

    from reward.model.distilled import DistilledRewardModel, encode_pair, score_texts
    from rlhf.core.http.limits import max_chars_per_token
    from rlhf.serve.reward_server import serve_reward
    from rlhf.core.models.build import check_model_dir

    _check_serve_args(args)
    check_model_dir(args.rm_dir, "RM_DIR (a run's reward_model/)", "ForSequenceClassification")
    token = os.environ.get(args.token_env) if args.token_env else None
    if args.token_env and not token:
        raise FileNotFoundError(f"environment variable {args.token_env} is not set")
    model = DistilledRewardModel.from_pretrained(args.rm_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.rm_dir)
    # Longer samples than the model's positions cannot be scored as trained; refusing them also bounds a request.
    limit = args.max_tokens or getattr(model.config, "max_position_embeddings", None) or 4096
    serve_reward(lambda p, r: [s["quality"] for s in score_texts(model, tokenizer, p, r, 64)], args.host, args.port,
                 token, max_queue=args.max_queue, count_tokens=lambda p, r: len(encode_pair(tokenizer, p, r)),
                 max_tokens=limit, chars_per_token=max_chars_per_token(tokenizer))
    return 0


def _check_serve_args(args) -> None:
    from rlhf.core.config.run_config import ConfigError

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port} is not a port number (0-65535)")
    if getattr(args, "max_tokens", None) is not None and args.max_tokens <= 0:
        raise ConfigError(f"--max-tokens {args.max_tokens} must be positive")


def _serve(args) -> int:
    from rlhf.serve.policy_server import serve

    _check_serve_args(args)
    serve(args.checkpoint, args.host, args.port, rollout=_checkpoint_config(args).rollout)
    return 0


def _push(args) -> int:
    from huggingface_hub.errors import HfHubHTTPError

    from rlhf.outputs.model_card import push_run

    try:
        print(push_run(args.run_dir, args.repo, args.model, args.private, log=_log))
    except (HfHubHTTPError, ConnectionError) as err:  # the Hub refused or could not be reached: one line, exit 1
        print(f"distilrl: error: push to {args.repo} failed: {' '.join(str(err).split())[:300]}", file=sys.stderr)
        return 1
    return 0


def _import_model(args) -> int:
    from rlhf.core.models.model_import import import_model

    print(import_model(args.source, args.out, args.dtype))
    return 0


COMMANDS = {"config": _config, "run": _run, "label": _run, "traces": _traces, "sft": _sft, "train-rm": _train_rm, "eval": _eval,
            "eval-rm": _eval_rm, "serve-rm": _serve_rm, "serve": _serve, "report": _report,
            "import-model": _import_model, "dpo": _dpo, "push": _push}
