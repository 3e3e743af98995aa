"""Every ``distilrl`` command answers --help with exit status 0; the console script itself too."""
import subprocess
import sys

import pytest

from rlhf.cli import COMMANDS, build_parser, main

SUBCOMMANDS = ["run", "label", "traces", "sft", "train-rm", "dpo", "eval", "eval-rm", "serve-rm", "serve",
               "report", "config", "import-model", "push"]


def test_the_documented_subcommands_exist():
    assert sorted(COMMANDS) == sorted(SUBCOMMANDS)
    usage = build_parser().format_help()
    for name in SUBCOMMANDS:
        assert name in usage


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_subcommand_help(name, capsys):
    with pytest.raises(SystemExit) as done:
        main([name, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: distilrl {name}")
    # Every positional argument and option says what it is.
    parser = build_parser()._subparsers._group_actions[0].choices[name]
    for action in parser._actions:
        if action.dest != "help":
            assert action.help, f"{name} {action.dest} has no help text"


def test_console_script_help_and_bad_usage():
    done = subprocess.run([sys.executable, "-m", "rlhf.cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and all(name in done.stdout for name in SUBCOMMANDS)
    done = subprocess.run([sys.executable, "-m", "rlhf.cli", "nosuchcommand"], capture_output=True, text=True)
    assert done.returncode == 2 and "invalid choice" in done.stderr


def test_train_rm_and_eval_refuse_missing_inputs(tmp_path, capsys):
    assert main(["train-rm", "configs/tiny.yaml", "--labels", str(tmp_path / "none"),
                 f"output_dir={tmp_path / 'rm'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "none/labels does not exist" in err and not (tmp_path / "rm").exists()
    assert main(["eval", str(tmp_path / "no_policy"), "--config", "configs/tiny.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no_policy does not exist" in err
