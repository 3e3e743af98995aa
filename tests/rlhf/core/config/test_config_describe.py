"""The config explains itself: every key has a description in its declaration, and `distilrl config` prints them."""
import pytest

from rlhf.cli import main
from rlhf.core.config.describe import _keys, describe
from rlhf.core.config.run_config import ConfigError, RunConfig


def test_every_config_key_has_a_description():
    missing = [name for name, (info, _) in _keys(RunConfig, "").items() if not (info.description or "").strip()]
    assert not missing, f"config keys without a description: {missing}"


@pytest.mark.parametrize("section", list(RunConfig.model_fields))
def test_config_command_prints_every_top_level_key(section, capsys):
    assert main(["config", section]) == 0
    out = capsys.readouterr().out
    assert out.startswith(section) and out.count("\n    ") >= 1  # the key and an indented description


def test_config_describes_nested_sections_and_single_keys():
    text = describe("reward.adaptive")
    assert "reward.adaptive.source: Literal['rule', 'teacher', 'rm'] = 'rule'" in text
    assert describe("rollout.samples_per_prompt").startswith("rollout.samples_per_prompt: int = 8\n    Responses")


def test_unknown_key_names_the_closest(capsys):
    with pytest.raises(ConfigError, match="did you mean rollout.engine"):
        describe("rollout.engin")
    assert main(["config", "rollout.engin"]) == 2
    assert "did you mean rollout.engine?" in capsys.readouterr().err


def test_a_renamed_key_value_is_refused_naming_the_new_one():
    from rlhf.core.config.run_config import load_config

    with pytest.raises(ConfigError, match="jsonl is the old name of this task: write task.name: dataset"):
        load_config(None, ["task.name=jsonl"])


@pytest.mark.parametrize("old, new", [("label.base_url=http://x", "label.endpoint.url"),
                                      ("traces.max_retries=1", "traces.endpoint.max_retries"),
                                      ("reward.teacher_url=http://x", "reward.teacher_endpoint.url"),
                                      ("reward.rm_token_env=T", "reward.rm_endpoint.api_key_env")])
def test_old_endpoint_keys_are_refused_naming_the_endpoint_section(old, new):
    from rlhf.core.config.run_config import load_config

    with pytest.raises(ConfigError, match=f"is now {new}"):
        load_config(None, [old])


def test_every_client_takes_one_endpoint_section():
    from rlhf.core.config.run_config import load_config

    cfg = load_config(None, ["label.teacher=openai", "label.endpoint={url: 'http://127.0.0.1:9/v1', model: m}",
                             "reward.rm_endpoint={url: 'http://127.0.0.1:9', api_key_env: TOKEN}"])
    assert (cfg.label.endpoint.url, cfg.label.endpoint.max_retries, cfg.reward.rm_endpoint.api_key_env) == \
        ("http://127.0.0.1:9/v1", 4, "TOKEN")
