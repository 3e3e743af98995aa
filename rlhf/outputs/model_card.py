"""``distilrl push RUN REPO``: a run's policy or distilled reward model uploaded to the Hugging Face Hub, with a model
card written from the run's own files (what ran, its held-out figures, how to load it).

The upload goes through ``huggingface_hub.HfApi`` (its token: ``HF_TOKEN`` or ``huggingface-cli login``); nothing
else in distilrl writes to the network.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from rlhf.outputs.run_data import RunData, fmt

FOLDERS = {"policy": "policy", "reward_model": "reward_model"}  # what can be pushed -> its directory in the run
LOADERS = {"policy": "AutoModelForCausalLM", "reward_model": "AutoModelForSequenceClassification"}


def model_card(run: RunData, what: str, repo: str) -> str:
    """The README.md of the pushed model: front matter, what ran, the figures, how to load it."""
    base = run.conf("model.model_name_or_path")
    tags = ["distilrl", "reward-model" if what == "reward_model" else str(run.conf("algorithm.advantage", "rl"))]
    front = ["---", "library_name: transformers", "tags:", *[f"- {tag}" for tag in tags]]
    if base and str(base).count("/") == 1 and not str(base).startswith((".", "/")):
        front.append(f"base_model: {base}")
    lines = [*front, "---", "", f"# {repo}", ""]
    stages = ", ".join(run.conf("stages") or []) or "?"
    what_text = "distilled reward model" if what == "reward_model" else "policy"
    lines += [f"The {what_text} of a distilrl run (stages {stages}; task `{run.conf('task.name', '?')}`; started from "
              f"`{base or 'a student built from model.* sizes'}`).", ""]
    lines += _rm_figures(run) if what == "reward_model" else _policy_figures(run)
    lines += ["## Use", "", "```python", f"from transformers import AutoTokenizer, {LOADERS[what]}", "",
              f'model = {LOADERS[what]}.from_pretrained("{repo}")',
              f'tokenizer = AutoTokenizer.from_pretrained("{repo}")', "```", ""]
    return "\n".join(lines)


def _policy_figures(run: RunData) -> list[str]:
    before, after = run.eval("before"), run.eval("after")
    rewards = ", ".join(f"{k} x {v:g}" for k, v in (run.conf("reward.components") or {}).items())
    lines = ["## Results", "", f"{run.summary.get('steps', '?')} RL steps of `{run.conf('algorithm.advantage', '?')}`"
             f" rewarded by {rewards or '?'}. Held-out evaluation (greedy answers checked by the task's verifier):", "",
             "| figure | before RL | after RL |", "|---|---|---|"]
    for key, name in (("accuracy", "accuracy"), ("mean_response_tokens", "response tokens"), ("n", "prompts")):
        if key in before or key in after:
            lines.append(f"| {name} | {fmt(before.get(key))} | {fmt(after.get(key))} |")
    return lines + [""]


def _rm_figures(run: RunData) -> list[str]:
    rm = run.summary.get("reward_model") or {}
    rm = rm.get("own_data") or rm
    return ["## Results", "", "On held-out pairs: pairwise accuracy "
            f"{fmt(rm.get('pairwise_accuracy'))} ({rm.get('pairwise_count', '?')} pairs; 0.5 is chance), Spearman "
            f"with the reference scores {fmt(rm.get('spearman'))}. The score is the quality head's output "
            f"(higher is better).", ""]


def push_run(run_dir: str | Path, repo: str, what: str = "policy", private: bool = False,
             log: Callable[[str], None] = print) -> str:
    """Upload ``run_dir``'s policy (or reward model) and its model card to Hub repository ``repo`` (made if it is
    not there); returns the repository's URL."""
    from huggingface_hub import HfApi

    if what not in FOLDERS:
        raise ValueError(f"push: {what!r} is not one of {', '.join(FOLDERS)}")
    run = RunData(run_dir)
    folder = run.dir / FOLDERS[what]
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no saved model: push a run that wrote its {what}")
    api = HfApi()
    url = api.create_repo(repo, private=private, exist_ok=True)
    log(f"uploading {folder} to {repo}")
    api.upload_folder(folder_path=str(folder), repo_id=repo, commit_message=f"distilrl: {what} of {run.dir.name}")
    api.upload_file(path_or_fileobj=model_card(run, what, repo).encode(), path_in_repo="README.md", repo_id=repo,
                    commit_message="distilrl: model card")
    return str(url)
