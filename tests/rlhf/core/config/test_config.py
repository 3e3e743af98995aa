"""Tests for rlhf.config: defaults, YAML plus dotted overrides, one-line errors naming the key, round trips."""
from __future__ import annotations


import pytest

from rlhf.core.config.run_config import ConfigError, RunConfig, load_config, save_config
from tests.paths import REPO


def write(tmp_path, text: str, name: str = "run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def config_error(*args, **kwargs) -> str:
    """Call load_config expecting a ConfigError; return its message, checked to be a single line."""
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------------------------------------- defaults


def test_no_file_gives_valid_defaults():
    cfg = load_config(None)
    assert isinstance(cfg, RunConfig)
    assert cfg.trainer.zero_stage == 2
    assert cfg.trainer.num_ranks == 2
    assert cfg.rollout.prompts_per_step == 16
    assert cfg.rollout.samples_per_prompt == 8
    assert cfg.rollout_rows == 128
    assert cfg.model.model_name_or_path is None
    assert cfg.algorithm.advantage == "grpo"
    assert cfg.stages == ["warmup", "rl", "eval"]


def test_empty_yaml_file_is_all_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == load_config(None)


# ---------------------------------------------------------------------------------------- file + overrides


def test_yaml_file_plus_overrides(tmp_path):
    path = write(tmp_path, "seed: 7\nrollout:\n  prompts_per_step: 8\n  temperature: 0.7\ntrainer:\n  num_ranks: 4\n")
    cfg = load_config(path, ["trainer.zero_stage=3", "rollout.samples_per_prompt=4", "model.model_name_or_path=/x"])
    # from the overrides
    assert cfg.trainer.zero_stage == 3
    assert cfg.rollout.samples_per_prompt == 4
    assert cfg.model.model_name_or_path == "/x"
    # from the file, kept next to the overrides in the same sections
    assert cfg.seed == 7
    assert cfg.rollout.prompts_per_step == 8
    assert cfg.rollout.temperature == 0.7
    assert cfg.trainer.num_ranks == 4
    # untouched defaults
    assert cfg.trainer.lr == 1e-4
    assert cfg.rollout_rows == 32  # 8 prompts x 4 samples


def test_override_wins_over_the_file(tmp_path):
    path = write(tmp_path, "trainer:\n  zero_stage: 3\n")
    assert load_config(path, ["trainer.zero_stage=2"]).trainer.zero_stage == 2


def test_override_values_are_parsed_as_yaml():
    cfg = load_config(None, ["algorithm.kl_coef=0.05", "stages=[rl, eval]"])
    assert cfg.algorithm.kl_coef == 0.05
    assert cfg.stages == ["rl", "eval"]


def test_malformed_override_is_refused():
    assert "trainer.zero_stage" in config_error(None, ["trainer.zero_stage"])
    config_error(None, ["=3"])


# ------------------------------------------------------------------------------------------- unknown keys


def test_unknown_top_level_key_in_file_names_the_key(tmp_path):
    message = config_error(write(tmp_path, "sede: 1\n"))
    assert "sede" in message
    assert "unknown key" in message


def test_unknown_nested_key_in_file_names_the_dotted_key(tmp_path):
    message = config_error(write(tmp_path, "trainer:\n  zero_stag: 3\n"))
    assert "trainer.zero_stag" in message


def test_unknown_key_via_override_names_the_dotted_key():
    assert "rollout.tempreature" in config_error(None, ["rollout.tempreature=0.5"])
    assert "bogus_section" in config_error(None, ["bogus_section=1"])


def test_override_into_a_value_that_is_not_a_section_is_refused():
    assert "trainer.zero_stage.x" in config_error(None, ["trainer.zero_stage=2", "trainer.zero_stage.x=1"])


# --------------------------------------------------------------------------------------------- bad values


@pytest.mark.parametrize("override, key", [
    ("trainer.zero_stage=5", "trainer.zero_stage"),
    ("rollout.temperature=-1", "rollout.temperature"),
    ("warmup.steps=abc", "warmup.steps"),
    ("rollout.samples_per_prompt=1", "rollout.samples_per_prompt"),  # GRPO needs a group of 2 or more
    ("algorithm.loss_aggregation=sum", "algorithm.loss_aggregation"),
    ("algorithm.advantage=ppo", "algorithm"),
])
def test_bad_value_gives_one_line_error_naming_the_key(override, key):
    message = config_error(None, [override])
    assert key in message
    # the offending value is in the message too
    assert override.split("=", 1)[1] in message


def test_override_value_that_is_not_valid_yaml_is_a_one_line_config_error():
    message = config_error(None, ["rollout.temperature=[1"])
    assert "rollout.temperature" in message
    assert "[1" in message


def test_bad_value_in_file_names_the_key(tmp_path):
    message = config_error(write(tmp_path, "trainer:\n  zero_stage: 5\n"))
    assert "trainer.zero_stage" in message
    assert "5" in message


def test_batch_that_does_not_divide_across_ranks_mentions_the_numbers():
    # 3 prompts x 3 samples = 9 rows, which 2 ranks cannot split
    message = config_error(None, ["rollout.prompts_per_step=3", "rollout.samples_per_prompt=3",
                                  "trainer.num_ranks=2"])
    assert "3 prompts x 3 samples = 9" in message
    assert "trainer.num_ranks=2" in message


def test_prompts_that_do_not_divide_across_rollout_workers_are_refused():
    # 3 prompts x 4 samples = 12 rows would split over 2 workers, but a prompt's samples must stay together
    message = config_error(None, ["rollout.prompts_per_step=3", "rollout.samples_per_prompt=4",
                                  "rollout.num_workers=2", "trainer.num_ranks=1"])
    assert "rollout.prompts_per_step=3" in message
    assert "rollout.num_workers=2" in message


# ----------------------------------------------------------------------------------------------- bad files


def test_missing_file_is_a_config_error(tmp_path):
    assert "does-not-exist.yaml" in config_error(tmp_path / "does-not-exist.yaml")


def test_invalid_yaml_is_a_one_line_config_error(tmp_path):
    path = write(tmp_path, "trainer:\n  zero_stage: [2,\n  lr: 1\n")
    assert "not valid YAML" in config_error(path)


def test_yaml_list_instead_of_mapping_is_a_config_error(tmp_path):
    message = config_error(write(tmp_path, "- trainer\n- rollout\n"))
    assert "mapping" in message
    assert "list" in message


# ----------------------------------------------------------------------------------------- save and print


def test_save_then_load_round_trips(tmp_path):
    cfg = load_config(None, ["trainer.zero_stage=3", "rollout.samples_per_prompt=4", "model.model_name_or_path=/x",
                             "algorithm.loss_aggregation=seq-mean", "stages=[rl]"])
    path = tmp_path / "resolved.yaml"
    save_config(cfg, path)
    again = load_config(path)
    assert again == cfg
    assert again.model_dump() == cfg.model_dump()


def test_saved_config_spells_out_every_default(tmp_path):
    path = tmp_path / "resolved.yaml"
    save_config(load_config(None), path)
    text = path.read_text()
    for key in ("zero_stage: 2", "samples_per_prompt: 8", "loss_aggregation: token-mean", "kl_estimator: k3"):
        assert key in text


def test_describe_batches_mentions_the_rows_figure():
    text = load_config(None, ["rollout.prompts_per_step=8", "rollout.samples_per_prompt=4"]).describe_batches()
    # 8 x 4 = 32 rows; 2 ranks x 16 rows
    assert "32 rollout rows" in text
    assert "8 prompts x 4 samples" in text
    assert "2 trainer rank(s) x 16 rows" in text
    assert "\n" not in text


CONFIGS = REPO / "configs"


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_config_validates(name):
    """The configs users start from load as written (the recipes have their own test in test_cluster.py)."""
    cfg = load_config(CONFIGS / name)
    assert cfg.stages
