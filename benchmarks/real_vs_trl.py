"""distilrl against TRL's GRPOTrainer on a real model, for the same wall-clock budget: held-out accuracy against
training seconds, both sides in one run (issue 31).

    python benchmarks/real_vs_trl.py --model runs/smollm2_distil/warmup [--budget 600] [--eval-every 150]
                                     [--eval-prompts 200] [--out runs/real_vs_trl] [--plot real_vs_trl.png]
                                     [--threads 2] [--only trl|ours]

Both sides start from the same model (by default the SFT student of ``configs/smollm2_distil.yaml``), on the
same task (``configs/data/arithmetic_words``, prompts rendered by the model's chat template, identical strings for
both), with the same verifier reward (``last_number``), prompts per step and samples per prompt (8 x 8), max new
tokens (48), temperature 1, learning rate (1e-4, AdamW, constant), LoRA shape (r 16, alpha 32, the seven
projections), no KL term (TRL's beta 0, our kl_coef 0; neither needs the reference then), token-mean loss (TRL's
"dapo", ours token-mean), one update per batch. Each side at its best setting on this CPU: bf16 where the CPU has
bf16 units (TRL ``bf16=True``; ours ``trainer.precision: auto`` and ``rollout.dtype: bfloat16``), ours with the
``hf_static`` engine, 2 threads each (the process's torch threads for TRL; our thread budget for our actors).
The rows are loaded once, as our run loads them, and TRL gets the same strings; each side draws its own order.
``--threads 1`` where another job keeps the cores busy: there, two threads that wait on each other make
generation tens of times slower (measured: 8 prompts x 48 tokens, 206 s at 2 threads, 4 s at 1).

The clock counts training only: each side stops at the first step that ends past ``--budget`` seconds of
training, and every ``--eval-every`` seconds the held-out problems are answered greedily (48 tokens) with the
clock stopped, by one evaluator for both: our rollout engine at our rollout dtype (ours: the run's rollout worker;
TRL: a copy of its peft model with the adapters merged, saved and loaded by the same engine in this process). Two
generate loops at bf16 differ in a greedy answer here and there (8 prompts: 0.625 against 0.500 from one model),
which would be read as a difference between the trainers. TRL runs first, then ours, one after the other on the
same cores.

Prints a table and one JSON object: each side's (seconds, accuracy) points, its final accuracy, and the seconds
distilrl needed to reach TRL's final accuracy, as a fraction of TRL's budget (the issue's target: <= 0.5).
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # run as a script or imported by a test
from accuracy_stats import se  # noqa: E402

SETTINGS = dict(prompts=8, samples=8, max_new_tokens=48, lr=1e-4, r=16, alpha=32, seed=0, threads=2)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def task_rows(cfg):
    """(train rows, held-out rows) of our run ``cfg`` (``ours_config``), loaded as the run loads them: the
    arithmetic-words task, prompts rendered by the model's chat template. TRL gets these very strings."""
    from rlhf.stages import run_dir

    return run_dir.load_prompts(cfg, tokenizer=run_dir.load_tokenizer(cfg), log=lambda line: None)


def correct(response: str, reference: str) -> bool:
    from reward.scoring.verifiers import last_number_correct

    return bool(last_number_correct(response, reference))


def bf16_capable() -> bool:
    from rlhf.core.models.precision import cpu_flags, resolve_precision

    return resolve_precision("auto", cpu_flags(), cuda=False) == "bf16"


def trl_evaluate(model, tokenizer, cfg, out: Path) -> float:
    """Held-out accuracy of TRL's peft model by our evaluator, the one our side uses (the rollout engine and dtype
    of ``cfg``, greedy, ``eval.max_new_tokens``): a copy with its adapters merged is saved (safetensors) and
    evaluated, so a difference between the sides is not a difference between two generate loops' numerics."""
    import copy
    import shutil

    from rlhf.rl.evaluate import evaluate_checkpoint

    target = out / "trl_eval_policy"
    shutil.rmtree(target, ignore_errors=True)
    merged = copy.deepcopy(model).merge_and_unload()
    merged.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    del merged
    return evaluate_checkpoint(cfg, str(target), log=lambda line: None)["accuracy"]


def trl_config(s: dict, out: Path):
    """TRL's GRPOConfig for ``SETTINGS``: one batch of prompts x samples a step, no KL, token-mean ("dapo")."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=str(out / "trl"), use_cpu=True, bf16=bf16_capable(), fp16=False, gradient_checkpointing=False,
        use_vllm=False, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=s["seed"],
        per_device_train_batch_size=s["prompts"] * s["samples"], gradient_accumulation_steps=1,
        num_generations=s["samples"], max_completion_length=s["max_new_tokens"], temperature=1.0, top_k=0,
        top_p=1.0, beta=0.0, loss_type="dapo", learning_rate=s["lr"], weight_decay=0.0, max_grad_norm=1.0,
        lr_scheduler_type="constant", warmup_steps=0, max_steps=10_000, num_iterations=1,
        dataloader_num_workers=0)


def trl_side(cfg, train, budget: float, every: float, out: Path, log, s: dict) -> list[tuple]:
    """TRL's GRPOTrainer with peft LoRA from ``cfg``'s model; (training seconds, steps, held-out accuracy) points."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import GRPOTrainer

    torch.set_num_threads(s["threads"])
    model_dir = cfg.model.model_name_or_path
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    dataset = datasets.Dataset.from_list([{"prompt": r.prompt, "answer": r.answer} for r in train])

    def reward(prompts, completions, answer, **_):
        return [1.0 if correct(c, a) else 0.0 for c, a in zip(completions, answer)]

    points: list[tuple] = []

    class Clock(TrainerCallback):
        """Training seconds only; held-out evaluations every ``every`` of them, with the clock stopped."""

        def __init__(self):
            self.trained, self.next_eval = 0.0, every

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.trained += time.perf_counter() - self.start
            log(f"TRL step {state.global_step}: {self.trained:.0f} s trained")
            if self.trained >= self.next_eval or self.trained >= budget:
                accuracy = trl_evaluate(model, tokenizer, cfg, out)
                points.append((round(self.trained, 1), state.global_step, accuracy))
                log(f"TRL at {self.trained:.0f} s: held-out accuracy {points[-1][2]:.3f}")
                self.next_eval += every
            if self.trained >= budget:
                control.should_training_stop = True

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = LoraConfig(r=s["r"], lora_alpha=s["alpha"], lora_dropout=0.0, target_modules=TARGETS, bias="none",
                      task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=trl_config(s, out), train_dataset=dataset,
                          processing_class=tokenizer, peft_config=lora, callbacks=[Clock()])
    trainer.remove_callback(PrinterCallback)
    points.insert(0, (0.0, 0, trl_evaluate(trainer.model, tokenizer, cfg, out)))
    log(f"TRL before training: held-out accuracy {points[0][2]:.3f}")
    trainer.train()
    return points


def ours_config(model_dir: Path, eval_prompts: int, out: Path, s: dict):
    """Our run config for ``SETTINGS``: configs/smollm2_distil.yaml's RL from ``model_dir``, verifier reward, no KL."""
    from rlhf.core.config.run_config import load_config

    return load_config(str(ROOT / "configs" / "smollm2_distil.yaml"), [
        f"output_dir={out / 'ours'}", f"model.model_name_or_path={model_dir}", "stages=[rl, eval]",
        f"model.lora={{r: {s['r']}, alpha: {s['alpha']}}}", "reward.components={verifier: 1.0}",
        f"rollout.prompts_per_step={s['prompts']}", f"rollout.samples_per_prompt={s['samples']}",
        f"rollout.max_new_tokens={s['max_new_tokens']}", "rollout.temperature=1.0", f"trainer.lr={s['lr']}",
        "algorithm.kl_coef=0.0", "algorithm.steps=10000", "algorithm.loss_aggregation=token-mean",
        f"task.eval_prompts={eval_prompts}", f"eval.max_new_tokens={s['max_new_tokens']}",
        f"rollout.threads={s['threads']}", f"trainer.threads={s['threads']}", f"seed={s['seed']}",
        *(["rollout.dtype=bfloat16"] if bf16_capable() else [])])


def ours_side(cfg, budget: float, every: float, log) -> list[tuple]:
    import shutil

    import rlhf

    if Path(cfg.output_dir).exists():  # this benchmark's own run directory: a finished run there refuses a new one
        log(f"removing the previous run in {cfg.output_dir}")
        shutil.rmtree(cfg.output_dir)
    points: list[tuple] = []
    with rlhf.Trainer(cfg, log=lambda line: None) as trainer:
        points.append((0.0, 0, trainer.evaluate()["accuracy"]))
        log(f"distilrl before training: held-out accuracy {points[0][2]:.3f}")
        trained, next_eval = 0.0, every
        while trained < budget:
            start = time.perf_counter()
            trainer.step()
            trained += time.perf_counter() - start
            log(f"distilrl step {trainer.steps}: {trained:.0f} s trained")
            if trained >= next_eval or trained >= budget:
                points.append((round(trained, 1), trainer.steps, trainer.evaluate()["accuracy"]))
                log(f"distilrl at {trained:.0f} s: held-out accuracy {points[-1][2]:.3f}")
                next_eval += every
    return points


def seconds_to_reach(points: list[tuple], target: float) -> float | None:
    """Training seconds at the first evaluation with accuracy >= ``target`` (None: never)."""
    return next((sec for sec, _, acc in points if acc >= target), None)


def plot(sides: dict[str, list[tuple]], n: int, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, points in sides.items():
        ax.plot([p[0] for p in points], [100 * p[2] for p in points], marker="o", label=name)
    ax.set(xlabel="training seconds (2-core CPU)", ylabel=f"held-out accuracy, % ({n} problems)",
           title="GRPO with LoRA on SmolLM2-135M-Instruct, same budget")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "runs" / "smollm2_distil" / "warmup")
    parser.add_argument("--budget", type=float, default=600.0, help="training seconds per side")
    parser.add_argument("--eval-every", type=float, default=150.0, help="training seconds between evaluations")
    parser.add_argument("--eval-prompts", type=int, default=200)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "real_vs_trl")
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--only", choices=["trl", "ours"], help="run one side (a quick check)")
    parser.add_argument("--threads", type=int, default=SETTINGS["threads"],
                        help="torch threads of each side (1 on a box another job keeps busy: two threads that "
                             "wait on each other's descheduled core make generation ~50x slower)")
    args = parser.parse_args(argv)
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"error: {args.model} is not a model directory: run configs/smollm2_distil.yaml first "
                         "(its SFT student is runs/smollm2_distil/warmup), or pass --model")
    s = {**SETTINGS, "threads": args.threads}
    log = lambda line: print(line, flush=True)  # noqa: E731
    cfg = ours_config(args.model, args.eval_prompts, args.out, s)
    train, held_out = task_rows(cfg)  # the same rows for both sides
    sides: dict[str, list[tuple]] = {}
    if args.only != "ours":
        sides["TRL GRPOTrainer"] = trl_side(cfg, train, args.budget, args.eval_every, args.out, log, s)
        gc.collect()  # TRL's trainer, model and optimizer (reference cycles) go before our actors start
    if args.only != "trl":
        sides["distilrl"] = ours_side(cfg, args.budget, args.eval_every, log)
    n = len(held_out)
    result: dict = {"settings": {**s, "budget_s": args.budget, "eval_prompts": n, "bf16": bf16_capable()},
                    "points": {name: [{"train_s": sec, "steps": k, "accuracy": a} for sec, k, a in p]
                               for name, p in sides.items()}}
    if len(sides) == 2:
        trl_final = sides["TRL GRPOTrainer"][-1][2]
        reach = seconds_to_reach(sides["distilrl"], trl_final)
        trl_time = sides["TRL GRPOTrainer"][-1][0]
        result["trl_final_accuracy"] = trl_final
        result["trl_final_se"] = round(se(trl_final, n), 4)
        result["distilrl_final_accuracy"] = sides["distilrl"][-1][2]
        result["distilrl_seconds_to_trl_final"] = reach
        result["fraction_of_trl_time"] = None if reach is None else round(reach / trl_time, 3)
        result["target_met"] = reach is not None and reach <= 0.5 * trl_time
    print("| side | train s | steps | held-out accuracy |")
    print("|---|---|---|---|")
    for name, points in sides.items():
        for sec, steps, acc in points:
            print(f"| {name} | {sec:.0f} | {steps} | {acc:.3f} |")
    if args.plot:
        plot(sides, n, args.plot)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
