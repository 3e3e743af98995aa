"""Your own preference data for `distilrl train-rm`: TRL's four pair layouts and scored responses read into the
trainer's pairs (margins, scores, soft labels kept), a held-out split by prompt, and the RM trained on each layout
through the CLI, its held-out pairwise accuracy reported."""
from __future__ import annotations

import json

import pytest
from transformers import AutoModelForSequenceClassification

from reward.model.preference_data import load_preference_data, message_renderer
from rlhf.core.models.char_tokenizer import build_char_tokenizer
from rlhf.core.data.datasets import DatasetError
from rlhf.cli import main
from tests.e2e.test_end_to_end import TINY

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def layout_records(layout: str, n: int = 24) -> list[dict]:
    """Arithmetic preference pairs (the right sum chosen) in one of TRL's layouts."""
    records = []
    for a in range(n):
        prompt, good, bad = f"{a}+{a}=", f"#{2 * a}", f"#{2 * a + 1}"
        records.append({
            "explicit_text": {"prompt": prompt, "chosen": good, "rejected": bad},
            "implicit_text": {"chosen": f"{prompt} {good}", "rejected": f"{prompt} {bad}"},
            "explicit_chat": {"prompt": _user(prompt), "chosen": _assistant(good), "rejected": _assistant(bad)},
            "implicit_chat": {"chosen": _user(prompt) + _assistant(good), "rejected": _user(prompt) + _assistant(bad)},
        }[layout])
    return records


def write_jsonl(path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def render():
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return message_renderer(tokenizer)


# ------------------------------------------------------------------------------------------ reading the layouts


@pytest.mark.parametrize("layout, prompt", [
    ("explicit_text", "3+3="), ("implicit_text", "3+3= "),
    ("explicit_chat", "<user>3+3=<eos><assistant>"), ("implicit_chat", "<user>3+3=<eos><assistant>"),
])
def test_the_four_trl_layouts_give_the_same_pairs(tmp_path, render, layout, prompt):
    data = load_preference_data(write_jsonl(tmp_path / "p.jsonl", layout_records(layout)), render)
    assert len(data.pairs) == 24 and data.pointwise == []
    assert data.pairs[3] == {"prompt": prompt, "chosen": "#6", "rejected": "#7"}
    assert ("implicit" if layout.startswith("implicit") else "explicit") in data.layout


def test_margin_and_score_columns_become_the_trainers_targets(tmp_path, render):
    records = [{"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": 10, "score_rejected": 4},
               {"prompt": "r", "chosen": "c", "rejected": "d", "score_chosen": 7, "score_rejected": 1,
                "margin": 2.5, "chosen_cd": 3, "chosen_rv_probs": [0.1] * 10}]
    first, second = load_preference_data(write_jsonl(tmp_path / "s.jsonl", records), render).pairs
    # scores 1..10 mapped onto the teacher's 0-9 quality scale; the margin from them unless a margin column says
    assert (first["chosen_quality"], first["rejected_quality"]) == (9.0, 3.0)
    assert first["margin"] == pytest.approx(6.0 / 9.0)
    assert (second["chosen_quality"], second["rejected_quality"], second["margin"]) == (6.0, 0.0, 2.5)
    assert second["chosen_cd"] == 3 and second["chosen_rv_probs"] == [0.1] * 10


def test_scored_responses_pair_up_within_a_prompt(tmp_path, render):
    records = [{"prompt": "q", "completion": "a", "score": 0.9}, {"prompt": "q", "completion": "b", "score": 0.1},
               {"prompt": "q", "completion": "c", "score": 0.1}, {"prompt": "r", "completion": "d", "score": 0.5}]
    data = load_preference_data(write_jsonl(tmp_path / "pw.jsonl", records), render)
    assert len(data.pointwise) == 4 and [r["quality"] for r in data.pointwise] == [9.0, 0.0, 0.0, 4.5]
    assert sorted((p["chosen"], p["rejected"]) for p in data.pairs) == [("a", "b"), ("a", "c")]
    assert all(p["margin"] == pytest.approx(1.0) and p["chosen_quality"] == 9.0 for p in data.pairs)


def test_unpaired_good_and_bad_labels_pair_up(tmp_path, render):
    records = [{"prompt": _user("q"), "completion": _assistant("a"), "label": True},
               {"prompt": _user("q"), "completion": _assistant("b"), "label": False}]
    data = load_preference_data(write_jsonl(tmp_path / "u.jsonl", records), render)
    assert data.pairs[0]["prompt"] == "<user>q<eos><assistant>"
    assert (data.pairs[0]["chosen"], data.pairs[0]["rejected"], data.pairs[0]["chosen_correct"]) == ("a", "b", True)


def test_held_out_split_keeps_prompts_apart(tmp_path, render):
    data = load_preference_data(write_jsonl(tmp_path / "p.jsonl", layout_records("explicit_text")), render)
    train, held = data.held_out(0.25, seed=0)
    assert len(held.pairs) == 6 and len(train.pairs) == 18
    assert not {p["prompt"] for p in train.pairs} & {p["prompt"] for p in held.pairs}


def test_unusable_preference_files_are_named(tmp_path, render):
    with pytest.raises(DatasetError, match="has columns \\['prompt', 'text'\\]: give chosen/rejected"):
        load_preference_data(write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "text": "a"}]), render)
    with pytest.raises(DatasetError, match="no pair to train on"):
        load_preference_data(write_jsonl(tmp_path / "one.jsonl", [{"prompt": "q", "completion": "a", "score": 1}]),
                             render)
    with pytest.raises(DatasetError, match="does not exist"):
        load_preference_data(tmp_path / "none.jsonl", render)


# -------------------------------------------------------------------------------------- training through the CLI

@pytest.fixture(scope="module")
def ray_cluster():
    """One Ray for the module's runs (a run leaves a Ray it did not start running): seconds saved per run."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


RM_ARGS = ["reward_model.num_ranks=1", "reward_model.epochs=2", "reward_model.batch_size=8",
           "reward_model.eval_fraction=0.25"]


def train_rm_on(tmp_path, data_file: str, *extra: str) -> tuple[dict, list[str]]:
    """(the summary's reward_model figures, the heads the saved RM records as trained)."""
    out = tmp_path / "rm_run"
    assert main(["train-rm", TINY, "--data", data_file, f"output_dir={out}", *RM_ARGS, *extra]) == 0
    model = AutoModelForSequenceClassification.from_pretrained(out / "reward_model")
    assert model.config.num_labels == 1
    return json.loads((out / "summary.json").read_text())["reward_model"], model.config.trained_heads


# Two runs cover the four layouts: each trains on one and is scored on another read the same way (a run costs
# some 25 s of Ray and DeepSpeed start-up on a CPU box; that the layouts give the same pairs is tested above).
@pytest.mark.parametrize("train_layout, eval_layout", [("explicit_text", "implicit_chat"),
                                                       ("implicit_text", "explicit_chat")])
def test_train_rm_on_trl_layouts_reports_held_out_accuracy(ray_cluster, tmp_path, capsys, train_layout,
                                                           eval_layout):
    held_out = write_jsonl(tmp_path / "eval.jsonl", layout_records(eval_layout, 8))
    figures, heads = train_rm_on(tmp_path, write_jsonl(tmp_path / "pairs.jsonl", layout_records(train_layout)),
                                 "--eval-data", held_out)
    assert figures["pairwise_count"] == 8 and 0.0 <= figures["pairwise_accuracy"] <= 1.0
    assert figures["spearman"] is None  # pairs without scores: nothing to correlate
    assert figures["source"] == "your preference data"
    assert heads == ["quality"]  # no RV/CD targets: those heads are untrained, and not reported
    capsys.readouterr()  # eval-rm scores the same held-out file the same way
    assert main(["eval-rm", str(tmp_path / "rm_run" / "reward_model"), held_out]) == 0
    assert json.loads(capsys.readouterr().out)["pairwise_accuracy"] == figures["pairwise_accuracy"]



def write_teacher_labels(run_dir) -> str:
    """A labelling run's directory as `distilrl label` leaves it: judged rows in labels/{train,eval}/rows.jsonl."""
    for name, prompts in (("train", range(8)), ("eval", range(8, 12))):
        rows = [{"prompt": f"{a}+{a}=", "reference": str(2 * a), "response": f"#{2 * a + d}", "source": "student",
                 "difficulty": 1, "quality": 9 - 4 * abs(d), "correct": d == 0, "rv": 1, "cd": 1,
                 "quality_probs": None, "rv_probs": None, "cd_probs": None} for a in prompts for d in (0, 1, 2)]
        done = {"done_prompts": sorted({r["prompt"] for r in rows})}
        (run_dir / "labels" / name).mkdir(parents=True)
        write_jsonl(run_dir / "labels" / name / "rows.jsonl", rows + [done])
    return str(run_dir)


def test_train_rm_mixes_scored_responses_with_teacher_labels(ray_cluster, tmp_path, capsys):
    records = [{"prompt": f"{a}+{a}=", "completion": f"#{2 * a + d}", "score": 1.0 - abs(d)}
               for a in range(20, 36) for d in (-1, 0, 2)]
    labels = write_teacher_labels(tmp_path / "labelling_run")
    figures, heads = train_rm_on(tmp_path, write_jsonl(tmp_path / "scores.jsonl", records), "--labels", labels)
    assert heads == ["quality", "rv", "cd"]  # the teacher's labels carry RV and CD
    trained_on = [line for line in capsys.readouterr().out.splitlines() if "training the distilled RM" in line]
    assert "from 24 teacher-judged responses and 36 of your own (scored responses)" in trained_on[0]
    # against the teacher's held-out labels, as before; your own held-out responses beside it
    assert figures["pointwise_count"] == 12 and 0.0 <= figures["pairwise_accuracy"] <= 1.0
    own = figures["own_data"]
    assert own["pointwise_count"] == 12 and own["pairwise_count"] == 12  # 4 of 16 prompts held out, 3 pairs each
    assert -1.0 <= own["spearman"] <= 1.0


def test_train_rm_data_errors_are_one_line(tmp_path, capsys):
    assert main(["train-rm", TINY, "--data", str(tmp_path / "none.jsonl"), f"output_dir={tmp_path / 'o'}"]) == 2
    assert "preference data" in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q"}])
    assert main(["train-rm", TINY, "--data", bad, f"output_dir={tmp_path / 'o'}"]) == 2
    assert "give chosen/rejected" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # no config.yaml, no warmup/: bad input writes nothing


def test_text_the_rm_tokenizer_garbles_or_cuts_is_counted_and_said(tmp_path):
    from reward.model.preference_data import fit_warnings, tokenizer_fit
    from rlhf.core.config.run_config import RunConfig
    from rlhf.stages.reward_model import own_preference_data

    tokenizer = build_char_tokenizer()
    pairs = [{"prompt": "2+2=", "chosen": "4", "rejected": "5"},
             {"prompt": "Is it café?", "chosen": "yes, “really”", "rejected": "no"},  # é and quotes: <unk>
             {"prompt": "q " * 70, "chosen": "a", "rejected": "b"}]  # 140 + 1 + 1 tokens: over 128
    fit = tokenizer_fit(pairs, tokenizer, 128)
    assert fit == {"pairs": 3, "garbled": 1, "truncated": 1}
    garbled, cut = fit_warnings(fit, "pairs.jsonl", 128)
    assert garbled.startswith("warning: 1 of 3 pairs of pairs.jsonl do not survive the RM's tokenizer")
    assert cut.startswith("warning: 1 of 3 pairs of pairs.jsonl are longer than reward_model.max_length=128 tokens")
    assert fit_warnings(tokenizer_fit(pairs[:1], tokenizer, 128), "x", 128) == []
    # train-rm's loading says it, once per problem
    tokenizer.save_pretrained(tmp_path / "student")
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs * 2)
    said = []
    own_preference_data(RunConfig(reward_model={"train_file": data}), str(tmp_path / "student"), said.append)
    assert [line.split(" pairs of ")[0] for line in said if line.startswith("warning")] == [
        "warning: 2 of 6", "warning: 2 of 6"]


def test_a_preference_file_is_checked_before_anything_is_written(tmp_path):
    from reward.model.preference_data import check_preference_file

    check_preference_file(write_jsonl(tmp_path / "ok.jsonl", layout_records("explicit_text", 2)), "k")
    with pytest.raises(DatasetError, match="has columns \\['prompt', 'text'\\]"):
        check_preference_file(write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "text": "a"}]), "k")
    with pytest.raises(DatasetError, match="reward_model.eval_file .*none.jsonl does not exist"):
        check_preference_file(tmp_path / "none.jsonl", "reward_model.eval_file")
