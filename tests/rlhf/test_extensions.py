"""The extension points: each registry refuses an unknown name in one line naming the key, and a new entry is
usable by name with nothing else changed (the README's "Extending distilrl" examples, run)."""
from __future__ import annotations

import pytest

from reward.scoring.components import REWARD_COMPONENTS
from reward.scoring.verifiers import VERIFIERS
from rlhf.core.config.run_config import ConfigError, load_config
from rlhf.registered import check_registered
from tests.scoring import reward_worker


@pytest.mark.parametrize("override, key, listed", [
    ("rollout.engine=sglang", "rollout.engine", "hf"),
    ("task.verifier=roman", "task.verifier", "final_number, gsm8k, last_number, math, exact, regex"),
    ("label.teacher=oracel", "label.teacher", "oracle, reference, hf, openai"),
    ("reward.components={brevity: 1.0}", "reward.components.brevity", "verifier, rm, seqcls, custom, adaptive, teacher_kl"),
])
def test_an_unknown_name_is_refused_in_one_line_listing_the_registered_ones(override, key, listed):
    cfg = load_config(None, [override])
    with pytest.raises(ConfigError, match=f"config key {key}: unknown .* registered are {listed}") as err:
        check_registered(cfg)
    assert "\n" not in str(err.value)


def test_the_cli_refuses_an_unknown_name_before_anything_is_written(tmp_path, capsys):
    from rlhf.cli import main

    out = tmp_path / "run"
    assert main(["run", "configs/tiny.yaml", f"output_dir={out}", "task.verifier=roman"]) == 2
    assert "task.verifier: unknown verifier 'roman'" in capsys.readouterr().err
    assert not out.exists()


@pytest.fixture
def registered():
    """Entries a test adds, removed again after it."""
    added = []

    def add(registry, name, entry):
        registry.register(name, entry)
        added.append((registry, name))

    yield add
    for registry, name in added:
        del registry._entries[name]


def test_a_new_verifier_and_reward_component_work_by_name(registered):
    class Brevity:
        """1.0 for a response of at most 4 characters."""
        reads_rm = False

        def __init__(self, cfg, custom=None):
            pass

        def score(self, batch):
            return [1.0 if len(r) <= 4 else 0.0 for r in batch.responses]

    registered(VERIFIERS, "roman", lambda answer_regex: lambda response, reference: response.strip() == reference)
    registered(REWARD_COMPONENTS, "brevity", Brevity)
    check_registered(load_config(None, ["task.verifier=roman", "reward.components={verifier: 1.0, brevity: 0.5}"]))
    worker = reward_worker({"verifier": 1.0, "brevity": 0.5}, verifier="roman")
    results = worker.score(["p", "p"], ["XII", "a long answer"], ["XII", "IV"])
    assert [r["reward"] for r in results] == [1.5, 0.0]
    assert results[0]["parts"] == {"verifier": 1.0, "brevity": 1.0}
