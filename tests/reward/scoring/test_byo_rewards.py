"""Bring your own rewards: the GSM8K, MATH (math-verify), exact and regex verifiers on tricky answers; custom
reward functions named by path (sync and async, errors naming the sample); a sequence-classification reward model
trained by TRL's RewardTrainer used as the seqcls component."""
from __future__ import annotations

import textwrap

import pytest
import torch

from reward.scoring.custom import load_reward_fn
from reward.scoring.verifiers import gsm8k_correct, last_boxed, make_verifier, math_correct
from reward.scoring.worker import RewardError
from rlhf.core.config.run_config import ConfigError, config_from_dict
from tests.scoring import reward_worker

# ------------------------------------------------------------------------------------------------- verifiers


@pytest.mark.parametrize("response, reference, verdict", [
    ("She makes 9 * 2 = 18 dollars.\n#### 18", "18", True),
    ("#### 1,000", "1000", True),               # thousands separators on either side
    ("#### 1000", "1,000", True),
    ("#### $18.00", "18", True),                 # dollars and trailing zeros
    ("#### 18.", "18", True),                    # a sentence's full stop
    ("#### 0.5", "1/2", True),                   # numbers compare as numbers
    ("#### 17", "18", False),
    ("first #### 18, then #### 17", "18", False),  # the last answer counts
    ("the answer is 18", "18", None),            # no "#": not answered in GSM8K form
])
def test_gsm8k_verifier(response, reference, verdict):
    assert gsm8k_correct(response, reference) is verdict


@pytest.mark.parametrize("response, reference, verdict", [
    (r"so \boxed{1/2}", "0.5", True),
    (r"\boxed{0.5}", r"\frac{1}{2}", True),
    (r"\boxed{\frac{1}{2}}", "1/2", True),
    (r"\boxed{\dfrac12}", "0.5", True),
    (r"\boxed{1,000}", "1000", True),
    (r"\boxed{1000}", "1,000", True),
    (r"\boxed{x^2+1}", "1+x^2", True),
    (r"\boxed{\frac{1}{2}}", r"The answer is $\boxed{0.5}$.", True),  # a boxed reference solution
    (r"\boxed{2}", "1/2", False),
    (r"draft \boxed{3}, no: \boxed{4}", "4", True),  # the last box is the answer
    (r"draft \boxed{3}, no: \boxed{4}", "3", False),
    ("the answer is 1/2", "1/2", None),            # unboxed: not answered in MATH form
    (r"\boxed{\frac{1}{2", "0.5", None),           # a box left open
])
def test_math_verifier_uses_math_verify_equivalence(response, reference, verdict):
    assert math_correct(response, reference) is verdict


@pytest.mark.parametrize("response, reference, verdict", [
    # MATH-500's escaped dollars: the identical boxed string and the bare number both match
    (r"\boxed{\$36}", r"\$36", True),
    (r"\boxed{36}", r"\$36", True),
    (r"\boxed{\$18.90}", r"\$18.90", True),
    (r"\boxed{18.9}", r"\$18.90", True),
    (r"\boxed{\$32,\!348}", r"\$32,\!348", True),
    (r"\boxed{32348}", r"\$32,\!348", True),
    (r"\boxed{\$37}", r"\$36", False),
    (r"\boxed{25\%}", r"25\%", True),                        # percentages
    (r"\boxed{25}", r"25\%", True),
    (r"\boxed{26\%}", r"25\%", False),
    (r"\boxed{5\text{ cm}}", r"5\text{ cm}", True),          # units
    (r"\boxed{5}", r"5\text{ cm}", True),
    (r"\boxed{6\text{ cm}}", r"5\text{ cm}", False),
    (r"\boxed{\text{Monday}}", r"\text{Monday}", True),      # text answers
    (r"\boxed{\text{Tuesday}}", r"\text{Monday}", False),
    (r"\boxed{\text{(C)}}", r"\text{(C)}", True),
])
def test_math_verifier_on_currency_percentages_units_and_text(response, reference, verdict):
    assert math_correct(response, reference) is verdict


def test_last_boxed_balances_braces():
    assert last_boxed(r"a \boxed{\frac{1}{2}} b \fbox{3}") == r"\boxed{3}"
    assert last_boxed(r"\boxed{\frac{a}{b}} end") == r"\boxed{\frac{a}{b}}"
    assert last_boxed("none") is None


def test_exact_and_regex_verifiers_and_their_config():
    exact = make_verifier("exact")
    assert exact("  Paris\n", "Paris") is True and exact("paris", "Paris") is False
    regex = make_verifier("regex", r"Answer:\s*(\w+)")
    assert regex("Answer: B ... Answer: C", "C") is True
    assert regex("Answer: B", "C") is False
    assert regex("I am not sure", "C") is None
    assert make_verifier("regex", r"[A-D]$")("pick C", "C") is True  # no group: the whole match
    with pytest.raises(ConfigError, match="config key task: verifier regex needs task.answer_regex"):
        config_from_dict({"task": {"verifier": "regex"}})
    with pytest.raises(ConfigError, match=r"config key task.answer_regex: not a valid regular expression"):
        config_from_dict({"task": {"verifier": "regex", "answer_regex": "(unclosed"}})


def test_reward_worker_uses_the_configured_verifier():
    worker = reward_worker({"verifier": 1.0}, correct=1.0, unparseable=-0.5, verifier="math")
    scores = worker.score(["p"] * 3, [r"\boxed{0.5}", r"\boxed{2}", "1/2"], ["1/2"] * 3)
    assert [s["reward"] for s in scores] == [1.0, 0.0, -0.5]
    assert [s["answered"] for s in scores] == [1.0, 1.0, 0.0]
    assert worker.verify([r"\frac{1}{2} so \boxed{\frac12}"], ["0.5"]) == [{"correct": 1.0, "answered": 1.0}]


# ------------------------------------------------------------------------------------- custom reward functions


def _reward_file(tmp_path, body: str):
    path = tmp_path / "my_rewards.py"
    path.write_text(textwrap.dedent(body))
    return path


def test_custom_reward_from_a_file_sync_and_async_weighted_beside_the_verifier(tmp_path):
    path = _reward_file(tmp_path, """
        import asyncio

        def brevity(prompts, responses, rows):
            return [1.0 if len(r) <= 8 else 0.0 for r in responses]

        async def uses_rows(prompts, responses, rows):
            async def one(response, row):
                await asyncio.sleep(0)
                return float(row["level"]) if row["answer"] in response else 0.0
            return await asyncio.gather(*(one(r, row) for r, row in zip(responses, rows)))
    """)
    rows = [{"answer": "4", "level": 2}, {"answer": "4", "level": 2}]
    for name, expected in (("brevity", [1.0 + 0.5, 0.0]), ("uses_rows", [1.0 + 1.0, 1.0])):
        fn = load_reward_fn(f"{path}:{name}")
        worker = reward_worker({"verifier": 1.0, "custom": 0.5}, custom=fn)
        scores = worker.score(["2+2="] * 2, ["#4", "it is 4, I think, #5"], ["4", "4"], rows)
        assert [s["reward"] for s in scores] == expected, name


def test_custom_reward_by_module_path_and_load_errors(tmp_path, monkeypatch):
    _reward_file(tmp_path, "def score(prompts, responses, rows):\n    return [0.25] * len(responses)\n")
    monkeypatch.chdir(tmp_path)  # module paths resolve from the working directory, as with `python -m`
    assert load_reward_fn("my_rewards:score")(["p"], ["r"], [{}]) == [0.25]
    with pytest.raises(ConfigError, match=r"reward.custom_fn: cannot import no_such_module \(ModuleNotFoundError"):
        load_reward_fn("no_such_module:score")
    with pytest.raises(ConfigError, match=r"reward.custom_fn: my_rewards has no function 'missing'"):
        load_reward_fn("my_rewards:missing")
    with pytest.raises(ConfigError, match=r"reward function file .*nowhere.py does not exist"):
        load_reward_fn("nowhere.py:score")
    (tmp_path / "broken.py").write_text("1/0\n")
    with pytest.raises(ConfigError, match=r"broken.py failed to load \(ZeroDivisionError"):
        load_reward_fn("broken.py:score")
    with pytest.raises(ConfigError, match="config key reward.custom_fn: must read module.path:function"):
        config_from_dict({"reward": {"custom_fn": "my_rewards.score"}})


def test_custom_reward_errors_name_the_failing_sample(tmp_path):
    path = _reward_file(tmp_path, """
        async def picky(prompts, responses, rows):
            return [1.0 / len(r) for r in responses]  # an empty response divides by zero
    """)
    worker = reward_worker({"custom": 1.0}, custom=load_reward_fn(f"{path}:picky"))
    with pytest.raises(RewardError, match=r"reward_fn raised ZeroDivisionError.* on prompt 'q2', response '', "
                                          r"row \{'id': 2\}"):
        worker.score(["q1", "q2"], ["ok", ""], ["1", "1"], [{"id": 1}, {"id": 2}])


def test_custom_fn_travels_to_a_process_that_cannot_import_it(tmp_path):
    """Ray ships the function with cloudpickle to workers whose sys.path lacks the file: it must go by value."""
    from ray import cloudpickle

    path = _reward_file(tmp_path, "def score(prompts, responses, rows):\n    return [len(r) for r in responses]\n")
    fn = load_reward_fn(f"{path}:score")
    import subprocess
    import sys

    blob = cloudpickle.dumps(fn)
    code = "import sys, pickle; fn = pickle.loads(sys.stdin.buffer.read()); print(fn(['p'], ['abc'], [{}]))"
    out = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True, cwd="/", check=True)
    assert out.stdout.decode().strip() == "[3]"


# --------------------------------------------------------------------- a TRL-trained reward model as seqcls


# A ChatML-like template in the character tokenizer's alphabet, for TRL's conversational datasets. (No newline
# after <eos>: the saved character tokenizer reloads as a Qwen2Tokenizer, which drops whitespace after it.)
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def trl_reward_model(tmp_path_factory):
    """A tiny Qwen2 reward model trained for a couple of steps by TRL's RewardTrainer on CPU, saved as TRL does;
    a copy of it whose tokenizer has a chat template (``chat``) for TRL's conversational layout."""
    import shutil

    import datasets
    from transformers import Qwen2Config, Qwen2ForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from rlhf.core.models.char_tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    torch.manual_seed(0)
    model = Qwen2ForSequenceClassification(Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, num_labels=1, pad_token_id=tokenizer.pad_token_id))
    pairs = datasets.Dataset.from_list([{"chosen": f"{a}+{a}=#{2 * a}", "rejected": f"{a}+{a}=#{2 * a + 1}"}
                                        for a in range(16)])
    out = tmp_path_factory.mktemp("trl_rm")
    args = RewardConfig(output_dir=str(out / "trainer"), max_steps=2, per_device_train_batch_size=8, use_cpu=True,
                        report_to="none", bf16=False, save_strategy="no",
                        logging_strategy="no", learning_rate=1e-3)
    trainer = RewardTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(out / "rm"))
    shutil.copytree(out / "rm", out / "chat")
    chat_tokenizer = build_char_tokenizer()
    chat_tokenizer.chat_template = CHAT_TEMPLATE
    chat_tokenizer.save_pretrained(str(out / "chat"))
    trainer.model.eval()
    return out / "rm", out / "chat", trainer, chat_tokenizer


def trl_scores(trainer, pairs: list[dict], tokenizer=None) -> tuple[list[float], list[float]]:
    """TRL's own forward on preference pairs: its dataset preparation (end-of-sequence token, chat template),
    its collator and the trained model, as in RewardTrainer.compute_loss: (chosen scores, rejected scores)."""
    import datasets

    tokenizer = tokenizer or trainer.processing_class
    prepared = trainer._prepare_dataset(datasets.Dataset.from_list(pairs), tokenizer, trainer.args, "parity")
    batch = trainer.data_collator([{k: row[k] for k in ("chosen_ids", "rejected_ids")} for row in prepared])
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    chosen, rejected = torch.chunk(logits, 2)
    return chosen.tolist(), rejected.tolist()


PROMPTS, GOOD, BAD = ["3+3=", "5+5=", "12+12="], ["#6", "#10", "#24"], ["#7", "#11", "#2"]


def test_seqcls_scores_plain_text_pairs_as_trl_trained_them(trl_reward_model):
    from reward.model.seqcls import SeqClsReward

    path, _, trainer, _ = trl_reward_model
    assert any(path.glob("*.safetensors"))
    reward = SeqClsReward(path, batch_size=2)  # two batches, rows of different lengths padded
    assert reward.text_format == "plain"
    chosen, rejected = trl_scores(trainer, [{"prompt": p, "chosen": g, "rejected": b}
                                            for p, g, b in zip(PROMPTS, GOOD, BAD)])
    assert reward.score(PROMPTS, GOOD) == pytest.approx(chosen, abs=1e-5)
    assert reward.score(PROMPTS, BAD) == pytest.approx(rejected, abs=1e-5)
    assert reward.token_ids("1+1=", "#2")[-1] == trainer.processing_class.eos_token_id  # TRL appends it
    assert len({round(c, 6) for c in chosen}) == 3  # a real score per text, not a constant


def test_seqcls_scores_conversational_pairs_through_the_chat_template(trl_reward_model):
    from reward.model.seqcls import SeqClsReward

    _, chat_path, trainer, chat_tokenizer = trl_reward_model
    reward = SeqClsReward(chat_path)
    assert reward.text_format == "chat"
    pairs = [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": g}],
              "rejected": [{"role": "assistant", "content": b}]} for p, g, b in zip(PROMPTS, GOOD, BAD)]
    chosen, rejected = trl_scores(trainer, pairs, chat_tokenizer)
    assert reward.score(PROMPTS, GOOD) == pytest.approx(chosen, abs=1e-5)
    assert reward.score(PROMPTS, BAD) == pytest.approx(rejected, abs=1e-5)
    # prompts the run rendered already (a chat student's) are not wrapped a second time
    rendered = [chat_tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                   add_generation_prompt=True) for p in PROMPTS]
    assert reward.score(rendered, GOOD) == pytest.approx(chosen, abs=1e-5)
    plain = SeqClsReward(chat_path, text_format="plain").score(PROMPTS, GOOD)
    assert plain != pytest.approx(chosen, abs=1e-3)  # the format matters: the parity above is not by chance


def test_trl_reward_model_scores_as_the_seqcls_component(trl_reward_model):
    path, _, trainer, _ = trl_reward_model
    expected, _ = trl_scores(trainer, [{"prompt": p, "chosen": r, "rejected": r} for p, r in zip(PROMPTS, GOOD)])
    worker = reward_worker({"verifier": 1.0, "seqcls": 0.5}, seqcls_path=str(path))
    scores = worker.score(PROMPTS, GOOD, ["6", "11", "24"])
    verifier = [1.0, 0.0, 1.0]
    assert [s["reward"] for s in scores] == pytest.approx([v + 0.5 * e for v, e in zip(verifier, expected)],
                                                          abs=1e-5)


def test_seqcls_config_and_directory_errors(tmp_path):
    with pytest.raises(ConfigError, match="reward.components uses seqcls: set reward.seqcls_path"):
        config_from_dict({"reward": {"components": {"seqcls": 1.0}}})
    from reward.model.seqcls import check_seqcls_dir
    from rlhf.core.models.build import ModelLoadError

    with pytest.raises(ModelLoadError, match="reward.seqcls_path .* does not exist"):
        check_seqcls_dir(tmp_path / "none")
    with pytest.raises(ModelLoadError, match="has no config.json"):
        check_seqcls_dir(tmp_path)
