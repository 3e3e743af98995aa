"""The README's "Talking to the servers" examples, run as written against real local servers: the openai client
against the policy server (chat with log-probs, then a stream) and curl against the reward server (/score and
/get_reward with prompts). Only the port in the URLs is changed, to the servers' free ports."""
from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess

import pytest

from rlhf.core.config.run_config import ModelConfig
from rlhf.core.models.build import build_student, build_tokenizer
from rlhf.serve.policy_server import make_server
from rlhf.serve.reward_server import make_reward_server
from tests.paths import REPO

pytest.importorskip("openai")
README = REPO / "README.md"
TINY = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)


def section_blocks(language: str) -> list[str]:
    text = README.read_text()
    section = text[text.index("### Talking to the servers"):]
    section = section[:section.index("\n#", 1)]
    return re.findall(rf"```{language}\n(.*?)```", section, re.S)


def test_the_openai_client_example_runs_against_serve():
    [example] = section_blocks("python")
    tokenizer = build_tokenizer("char")
    with make_server((build_student(TINY, tokenizer, 0), tokenizer), port=0, model_name="policy") as server:
        server.start()
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(example.replace("http://127.0.0.1:8000", server.url), "README.md", "exec"), {})
    printed = out.getvalue()
    assert "ChatCompletionTokenLogprob" in printed or "TopLogprob" in printed  # the first token's alternatives
    assert printed.strip()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_curl_examples_run_against_serve_rm():
    [example] = section_blocks("bash")
    commands = [c for c in example.replace("\\\n", " ").splitlines() if c.strip().startswith("curl")]
    assert len(commands) == 2
    seen = []

    def score(prompts, responses):
        seen.append((list(prompts), list(responses)))
        return [float(len(r)) for r in responses]

    with make_reward_server(score) as server:
        server.start()
        answers = [subprocess.run(["bash", "-c", c.replace("http://127.0.0.1:5000", server.url)], capture_output=True,
                                  text=True, timeout=30, check=True).stdout for c in commands]
    assert [json.loads(a) for a in answers] == [{"rewards": [8.0]}, {"rewards": [8.0]}]
    assert seen == [(["2+3="], ["2+3=5;#5"]), (["2+3="], ["2+3=5;#5"])]  # /get_reward cut the prompt off the query
