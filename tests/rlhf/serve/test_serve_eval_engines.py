"""Evaluation (``distilrl eval``) and the policy server (``distilrl serve``) sample through the rollout engine that
``rollout.engine`` names, the same registry RL uses. The stand-in engine registered here answers every arithmetic
prompt correctly, which a tiny random policy never does: a perfect score or a right answer over HTTP can only have
come from the engine."""
from __future__ import annotations

import json
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
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


def test_distilrl_serve_prints_a_ready_line_and_one_line_per_request(checkpoint):
    """``distilrl serve`` as a user runs it: a uvicorn-style ready line with the URL on stderr, then one line per
    request (client, request line, status, milliseconds); Ctrl-C stops it cleanly."""
    proc = subprocess.Popen([sys.executable, "-m", "rlhf.cli", "serve", checkpoint, "--port", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    try:
        deadline, url = time.monotonic() + 180, None
        while url is None:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            found = re.match(r"INFO: {5}distilrl serve .* running on (http://127\.0\.0\.1:\d+) \(Press CTRL\+C", line)
            url = found and found.group(1)
        with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as answer:
            assert answer.status == 200
        request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(
            {"model": "other", "messages": [{"role": "user", "content": "1+1="}]}).encode())
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 404
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    time.sleep(0.2)  # the reader thread drains the last lines
    logged = "".join(lines.queue)
    assert re.search(r'INFO: {5}127\.0\.0\.1:\d+ - "GET /v1/models HTTP/1\.1" 200 OK \d+\.\d ms\n', logged), logged
    assert re.search(r'"POST /v1/chat/completions HTTP/1\.1" 404 Not Found \d+\.\d ms\n', logged), logged
