"""Evaluation (``distilrl eval``) and the policy server (``distilrl serve``) sample through the rollout engine that
``rollout.engine`` names, the same registry RL uses. The stand-in engine registered here answers every arithmetic
prompt correctly, which a tiny random policy never does: a perfect score or a right answer over HTTP can only have
come from the engine."""
from __future__ import annotations

import json
import re
import urllib.request

import pytest

from rlhf.core.config.run_config import ModelConfig, RolloutConfig, load_config
from rlhf.core.models.build import build_student, build_tokenizer, save_student
from rlhf.core.data.samples import Sample
from rlhf.cli import main
from rlhf.rl.evaluate import evaluate_checkpoint
from rlhf.serve.policy_server import make_server
from rollout.engines import ENGINES, HFEngine

TINY = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)


class ArithmeticOracleEngine(HFEngine):
    """Loads the checkpoint as the hf engine does, but answers each prompt with the sum of its signed integers in
    the task's answer form (``#16``); records every call (the class's ``calls``)."""

    calls: list[tuple] = []

    def generate(self, prompts: list[str], n: int, max_new_tokens: int, temperature: float,
                 greedy: bool) -> list[Sample]:
        type(self).calls.append((list(prompts), n, max_new_tokens, greedy))
        samples = []
        for index, prompt in enumerate(prompts):
            text = "#" + str(sum(int(term) for term in re.findall(r"[-+]?\d+", prompt)))
            response = self.tokenizer(text, add_special_tokens=False).input_ids + [self.tokenizer.eos_token_id]
            prompt_ids = self.tokenizer(prompt, add_special_tokens=False).input_ids
            samples += [Sample(index, prompt_ids, response, [0.0] * len(response), "stop", text)] * n
        return samples


if "arithmetic_oracle" not in ENGINES:
    ENGINES.register("arithmetic_oracle", ArithmeticOracleEngine)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    tokenizer = build_tokenizer("char")
    path = tmp_path_factory.mktemp("policy")
    save_student(build_student(TINY, tokenizer, seed=0), tokenizer, path)
    return str(path)


def test_eval_samples_through_the_configured_engine(checkpoint):
    ArithmeticOracleEngine.calls.clear()
    cfg = load_config("configs/tiny.yaml", ["rollout.engine=arithmetic_oracle", "task.eval_prompts=8"])
    figures = evaluate_checkpoint(cfg, checkpoint, log=lambda line: None)
    assert figures["accuracy"] == 1.0
    prompts = [p for call in ArithmeticOracleEngine.calls for p in call[0]]
    assert len(prompts) == 8 and all(call[1:] == (1, cfg.eval.max_new_tokens, True)
                                     for call in ArithmeticOracleEngine.calls)
    # The same checkpoint through the default hf engine: the random policy's own (wrong) answers.
    hf = evaluate_checkpoint(load_config("configs/tiny.yaml", ["task.eval_prompts=8"]), checkpoint, lambda line: None)
    assert hf["accuracy"] < 0.5


def test_serve_samples_through_the_configured_engine(checkpoint):
    server = make_server(checkpoint, port=0, rollout=RolloutConfig(engine="arithmetic_oracle"))
    assert isinstance(server.engine, ArithmeticOracleEngine) and server.url.startswith("http://127.0.0.1:")
    assert server.context_length == TINY.max_position_embeddings
    server.start()
    try:
        body = {"messages": [{"role": "user", "content": "12+7-3="}], "n": 2, "max_tokens": 5}
        request = urllib.request.Request(f"{server.url}/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            reply = json.loads(answer.read())
    finally:
        server.close()
    assert [c["message"]["content"] for c in reply["choices"]] == ["#16", "#16"]
    assert ArithmeticOracleEngine.calls[-1] == (["12+7-3="], 2, 5, False)


def test_serve_refuses_an_unregistered_engine_in_one_line(checkpoint, capsys):
    assert main(["serve", checkpoint, "rollout.engine=no_such_engine", "--port", "0"]) == 2
    assert "rollout.engine" in capsys.readouterr().err
