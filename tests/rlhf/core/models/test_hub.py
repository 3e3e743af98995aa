"""The Hugging Face Hub (issue 35): a model given by Hub name is downloaded only when ``hub.offline`` is false, and
``distilrl push`` uploads a run's policy or RM with a model card of its figures. A local fake stands in for the Hub
(huggingface_hub's ``snapshot_download`` and ``HfApi`` monkeypatched): no test touches the network."""
from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest

from rlhf.cli import main
from rlhf.core.config.run_config import RunConfig
from rlhf.core.models.hub import download_models
from tests.paths import REPO

TINY = str(REPO / "configs" / "tiny.yaml")


class FakeHub:
    """``snapshot_download`` and ``HfApi`` over a local folder: each call recorded, uploads copied into it."""

    def __init__(self, root: Path):
        self.root, self.calls = root, []

    def snapshot_download(self, repo_id, local_files_only=False, allow_patterns=None, **kw):
        self.calls.append(("snapshot_download", repo_id, local_files_only, allow_patterns))
        if local_files_only:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        return str(self.root / repo_id)

    def api(self):
        hub = self

        class Api:
            def create_repo(self, repo_id, private=False, exist_ok=False, **kw):
                hub.calls.append(("create_repo", repo_id, private))
                return f"https://hub.example/{repo_id}"

            def upload_folder(self, folder_path, repo_id, **kw):
                hub.calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

            def upload_file(self, path_or_fileobj, path_in_repo, repo_id, **kw):
                (hub.root / repo_id).mkdir(parents=True, exist_ok=True)
                (hub.root / repo_id / path_in_repo).write_bytes(path_or_fileobj)
                hub.calls.append(("upload_file", repo_id, path_in_repo))

        return Api


@pytest.fixture
def hub(tmp_path, monkeypatch) -> FakeHub:
    fake = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    monkeypatch.setattr(huggingface_hub, "HfApi", fake.api())
    return fake


def test_a_hub_model_is_downloaded_only_when_the_config_allows_it(hub, tmp_path, capsys):
    names = {"model.model_name_or_path": "my-org/tiny-student", "reward_model.path": str(tmp_path)}
    download_models(names, offline=True)
    assert hub.calls == []  # offline, the default: not even a look
    said = []
    download_models(names, offline=False, log=said.append)
    assert hub.calls[-1][:2] == ("snapshot_download", "my-org/tiny-student") and "*.safetensors" in hub.calls[-1][3]
    assert not any("*.bin" in pattern or "*.py" in pattern for pattern in hub.calls[-1][3])
    assert said == ["model.model_name_or_path: downloading my-org/tiny-student from the Hugging Face Hub "
                    "(hub.offline is false)"]
    assert RunConfig().hub.offline is True
    # Offline, a Hub name missing from the cache stops the run in one line that says how to allow the download.
    assert main(["run", TINY, "model.model_name_or_path=my-org/tiny-student", f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "set hub.offline=false to let the run download it" in err
    assert not (tmp_path / "run").exists()


def write_run(run: Path) -> Path:
    for name in ("policy", "reward_model"):
        (run / name).mkdir(parents=True)
        (run / name / "config.json").write_text("{}")
        (run / name / "model.safetensors").write_bytes(b"weights")
    (run / "config.yaml").write_text("stages: [warmup, rl, eval]\nalgorithm: {advantage: grpo}\n"
                                     "reward: {components: {verifier: 1.0}}\ntask: {name: arithmetic}\n")
    (run / "summary.json").write_text(json.dumps({
        "steps": 60, "eval_before": {"accuracy": 0.49, "mean_response_tokens": 5.0, "n": 200},
        "eval_after": {"accuracy": 0.74, "mean_response_tokens": 7.5, "n": 200},
        "reward_model": {"pairwise_accuracy": 0.983, "pairwise_count": 120, "spearman": 0.7}}))
    return run


def test_push_uploads_the_policy_with_a_model_card_of_the_runs_figures(hub, tmp_path, capsys):
    run = write_run(tmp_path / "run")
    assert main(["push", str(run), "me/arith-grpo"]) == 0
    assert capsys.readouterr().out.strip().endswith("https://hub.example/me/arith-grpo")
    assert hub.calls[:2] == [("create_repo", "me/arith-grpo", False),
                             ("upload_folder", "me/arith-grpo", ["config.json", "model.safetensors"])]
    card = (hub.root / "me" / "arith-grpo" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\ntags:\n- distilrl\n- grpo\n---\n\n# me/arith-grpo")
    assert "60 RL steps of `grpo` rewarded by verifier x 1" in card
    assert "| accuracy | 0.490 | 0.740 |" in card and "AutoModelForCausalLM.from_pretrained(\"me/arith-grpo\")" in card

    assert main(["push", str(run), "me/arith-rm", "--model", "reward_model", "--private"]) == 0
    assert ("create_repo", "me/arith-rm", True) in hub.calls
    card = (hub.root / "me" / "arith-rm" / "README.md").read_text()
    assert "pairwise accuracy 0.983 (120 pairs" in card and "AutoModelForSequenceClassification" in card


def test_push_of_a_run_without_the_model_is_one_line(hub, tmp_path, capsys):
    run = write_run(tmp_path / "run")
    (run / "policy" / "config.json").unlink()
    assert main(["push", str(run), "me/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "holds no saved model" in err and hub.calls == []


def test_a_hub_dataset_is_downloaded_once_when_allowed_and_named_in_one_line_when_not(tmp_path, monkeypatch):
    import datasets

    from rlhf.core.data.datasets import DatasetError, load_rows
    from rlhf.core.data.hub_datasets import local_datasets

    loaded = []

    def fake_load_dataset(name, *args, **kw):
        loaded.append(name)
        rows = [{"question": f"{a}+{a}=", "answer": str(2 * a)} for a in range(6)]
        return datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                                     "test": datasets.Dataset.from_list(rows[:2])})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    task = {"name": "dataset", "train_file": "my-org/sums", "eval_split": "test", "prompt_field": "question"}
    offline = RunConfig(output_dir=str(tmp_path / "run"), task=task, stages=["rl", "eval"])
    with pytest.raises(DatasetError, match="task.train_file my-org/sums is not a local file or directory: to "
                                           "download it from the Hugging Face Hub, set hub.offline=false"):
        local_datasets(offline)
    online = RunConfig(output_dir=str(tmp_path / "run"), task=task, stages=["rl", "eval"], hub={"offline": False})
    cfg = local_datasets(online, log=lambda line: None)
    assert loaded == ["my-org/sums"] and cfg.task.train_file == str(tmp_path / "hub_datasets" / "my-org--sums")
    train, held_out = load_rows(cfg.task, 0)
    assert len(train) == 6 and [r.prompt for r in held_out] == ["0+0=", "1+1="]
    assert local_datasets(offline).task.train_file == cfg.task.train_file and loaded == ["my-org/sums"]  # reused
