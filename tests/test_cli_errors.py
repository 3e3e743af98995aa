"""Bad input stops with one line naming the problem, exit status 2, and no half-written checkpoint."""
import json
import subprocess
import sys
from pathlib import Path

from rlhf.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")


def run_cli(args, capsys):
    code = main(["run", *args])
    err = capsys.readouterr().err.strip()
    return code, err


def assert_nothing_half_written(out: Path):
    assert not list(out.parent.glob("**/*.tmp")) if out.parent.exists() else True
    assert not (out / "policy").exists() and not (out / "summary.json").exists()


def test_malformed_yaml_names_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: {zero_stage: 3\nrollout: [")
    code, err = run_cli([str(bad), f"output_dir={tmp_path / 'out'}"], capsys)
    assert code == 2 and "\n" not in err and "bad.yaml is not valid YAML" in err
    assert not (tmp_path / "out").exists()


def test_unknown_key_and_bad_value_name_the_key(tmp_path, capsys):
    code, err = run_cli([TINY, f"output_dir={tmp_path / 'out'}", "trainer.zero_stagee=3"], capsys)
    assert code == 2 and "trainer.zero_stagee" in err and "unknown key" in err and "\n" not in err
    code, err = run_cli([TINY, f"output_dir={tmp_path / 'out'}", "trainer.zero_stage=5"], capsys)
    assert code == 2 and "trainer.zero_stage" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_batch_that_does_not_divide_is_refused(tmp_path, capsys):
    code, err = run_cli([TINY, f"output_dir={tmp_path / 'out'}", "rollout.prompts_per_step=3",
                         "rollout.samples_per_prompt=3"], capsys)
    assert code == 2 and "9" in err and "trainer.num_ranks=2" in err


def test_missing_model_directory(tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli([TINY, f"output_dir={out}", f"model.model_name_or_path={tmp_path / 'nope'}"], capsys)
    assert code == 2 and "\n" not in err and "does not exist" in err and "nope" in err
    assert_nothing_half_written(out)


def test_model_directory_without_safetensors(tmp_path, capsys):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    code, err = run_cli([TINY, f"output_dir={tmp_path / 'out'}", f"model.model_name_or_path={model_dir}"], capsys)
    assert code == 2 and "safetensors" in err


def test_dataset_row_without_the_needed_field(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n" + json.dumps({"question": "2+2="}) + "\n")
    out = tmp_path / "out"
    code, err = run_cli([TINY, f"output_dir={out}", "task.name=jsonl", f"task.train_file={data}",
                         f"task.eval_file={data}"], capsys)
    assert code == 2 and "\n" not in err
    assert "line 2" in err and "'prompt'" in err and "question" in err
    assert_nothing_half_written(out)


def test_console_script_exit_status_and_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "rlhf.cli", "run", TINY, "nosuchsection.key=1"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["distilrl: error: config key nosuchsection: unknown key (check the "
                                                  "spelling against rlhf/config.py)"]
