"""Teacher back-ends (reward/teachers): the arithmetic oracle, verdict parsing, the local HF judge read through
its digit distribution, and the OpenAI-compatible HTTP judge against our real policy server (rlhf/serve/policy_server.py) and
small stdlib servers that fail on purpose."""
from __future__ import annotations

import json
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from reward.teachers import HFJudgeTeacher, OpenAITeacher, OracleTeacher, Teacher, Verdict, parse_verdict
from reward.teachers.cache import CACHE_FILE
from rlhf.core.models.char_tokenizer import DEFAULT_ALPHABET, build_char_tokenizer
from rlhf.core.config.run_config import ModelConfig
from rlhf.core.models.build import build_student, build_tokenizer, save_student
from rlhf.serve.policy_server import make_server

# Judging prompts run to about a thousand characters: the tiny models need room for them.
TINY_LONG = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                        max_position_embeddings=4096)
ROWS = (["7+5-3=", "2+2=", "9-4+1="], ["#9", "2+2=4;#4", "nothing"], ["9", "4", "6"])


# --------------------------------------------------------------------------------------------------- oracle


def test_oracle_scores_correct_wrong_unanswered_and_rejects_other_prompts():
    teacher = OracleTeacher()
    assert isinstance(teacher, Teacher)
    verdicts = teacher.judge(["7+5-3=", "7+5-3=", "1+8-2+4=", "What is two plus two?"],
                             ["7+5=12;12-3=9;#9", "#8", "I do not know", "#4"], [None, "9", None, "4"])
    correct, wrong, unanswered, other = verdicts
    assert (correct.quality, correct.correct, correct.error) == (9.0, True, None)
    assert correct.rv > 0 and correct.cd is not None and correct.quality_probs is None
    assert (wrong.quality, wrong.correct, wrong.rv) == (2.0, False, 0.0)
    assert (unanswered.quality, unanswered.correct) == (0.0, False)
    assert other.error and other.quality is None and other.correct is None and other.rv is None


def test_judge_refuses_lists_of_different_lengths():
    with pytest.raises(ValueError, match="one response"):
        OracleTeacher().judge(["1+1="], [], [None])


# --------------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("text, expected", [
    ('{"quality": 7, "correct": true, "rv": 3, "cd": 5}', (7, True, 3, 5)),
    ('Here is my verdict:\n```json\n{"Quality": "8", "RV": 2, "CD": 4}\n```', (8, True, 2, 4)),
    ('{"verdict": {"quality": 3, "rv": 1, "cd": 2, "correct": false}}', (3, False, 1, 2)),
    ("quality: 7", (7, True, None, None)),
    ("Quality = 7/9, RV: 3, cd=5", (7, True, 3, 5)),
    ("**Quality**: 4\n**RV**: 2\n**CD**: 6\nCorrect: yes", (4, True, 2, 6)),
    ("Quality (0-9): 8\nReasoning verbosity (RV): 4\nCognitive difficulty: 2", (8, True, 4, 2)),
    ("Quality: 8/10", (7.2, True, None, None)),
    ("QUALITY: 12, rv: 3.5", (9, True, 3.5, None)),
    ("Scale: quality 0-9. My answer. Quality: 2", (2, False, None, None)),
    ("{'quality': 6, 'rv': 1, 'cd': 0}", (6, True, 1, 0)),
    ('{"score": 1, "correct": "no"}', (1, False, None, None)),
])
def test_parse_verdict_reads_many_reply_styles(text, expected):
    got = parse_verdict(text)
    quality, correct, rv, cd = expected
    assert got["quality"] == pytest.approx(quality) and got["correct"] is correct
    assert (got["rv"] is None) == (rv is None) and (rv is None or got["rv"] == pytest.approx(rv))
    assert (got["cd"] is None) == (cd is None) and (cd is None or got["cd"] == pytest.approx(cd))


@pytest.mark.parametrize("text", ["", "   ", "the answer looks fine to me", "quality: 0-9", '{"foo": 1}',
                                  "7 8 9", "x;a<k>#4 q1u"])
def test_parse_verdict_rejects_garbage_with_one_line(text):
    with pytest.raises(ValueError) as info:
        parse_verdict(text)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------------- HF judge


@pytest.fixture(scope="module")
def char_judge():
    tokenizer = build_tokenizer("char")
    return build_student(TINY_LONG, tokenizer, seed=3), tokenizer


def test_hf_judge_gives_soft_labels_for_every_row(char_judge):
    teacher = HFJudgeTeacher(char_judge, batch_size=4)
    verdicts = teacher.judge(*ROWS)
    assert len(verdicts) == 3
    for v in verdicts:
        assert v.error is None
        for score, probs in ((v.quality, v.quality_probs), (v.rv, v.rv_probs), (v.cd, v.cd_probs)):
            assert len(probs) == 10 and all(p >= 0 for p in probs) and math.isclose(sum(probs), 1.0, abs_tol=1e-9)
            assert 0.0 <= score <= 9.0 and score == pytest.approx(sum(i * p for i, p in enumerate(probs)))
        assert v.correct == (v.quality >= 5)
    # Deterministic, and independent of how rows are batched (left padding must not change a row's verdict).
    again = HFJudgeTeacher(char_judge, batch_size=1).judge(*ROWS)
    for a, b in zip(verdicts, again):
        assert a.quality_probs == pytest.approx(b.quality_probs, abs=1e-5)
        assert a.cd == pytest.approx(b.cd, abs=1e-5)


def test_hf_judge_uses_the_chat_template_when_there_is_one(char_judge):
    model, _ = char_judge
    tokenizer = build_tokenizer("char")
    tokenizer.chat_template = "{% for m in messages %}U:{{ m['content'] }}\n{% endfor %}A:"
    teacher = HFJudgeTeacher((model, tokenizer))
    ids = teacher._encode("1+1=", "#2", None, "quality")
    assert tokenizer.decode(ids).startswith("U:") and tokenizer.decode(ids).endswith("\nA:Quality score (0-9): ")
    [verdict] = teacher.judge(["1+1="], ["#2"], [None])
    assert verdict.error is None and math.isclose(sum(verdict.quality_probs), 1.0, abs_tol=1e-9)


def test_hf_judge_loads_a_directory_and_fails_long_rows_softly(char_judge, tmp_path):
    save_student(*char_judge, tmp_path / "judge")
    teacher = HFJudgeTeacher(tmp_path / "judge", max_length=1000)
    short, long = teacher.judge(["1+1=", "1+1="], ["#2", "x" * 2000], [None, None])
    assert short.error is None and short.quality_probs is not None
    assert long.error and "limit" in long.error and long.quality is None
    with pytest.raises(ValueError, match="does not exist"):
        HFJudgeTeacher(tmp_path / "missing")


# --------------------------------------------------------------------------------------------------- HTTP judge
# Against the real policy server: one tiny random model (its replies are garbage) and one whose weights are set
# so that greedy decoding emits a fixed JSON verdict, piece by piece.

JSON_PIECES = ['{"quality": 7, ', '"rv": 3, ', '"cd": 5, "correct": true}']


def forced_verdict_model():
    """A real Qwen2 whose greedy output is always JSON_PIECES then end-of-sequence.

    Attention and MLP write nothing (zero output projections), so the last hidden state is the normalised one-hot
    embedding of the current token and the LM head acts as a lookup table "current token -> next token": any token
    -> piece 1 -> piece 2 -> piece 3 -> <eos>. The pieces are added tokens of a character tokenizer; prompts are
    split into single characters and never contain them, so the chain always starts from piece 1.
    """
    tokenizer = build_char_tokenizer(DEFAULT_ALPHABET + '{}"')
    tokenizer.add_tokens(JSON_PIECES)
    vocab = len(tokenizer)
    hidden = -(-vocab // 4) * 4  # even head size for rotary embeddings (2 heads)
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=8, max_position_embeddings=4096,
                         tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    first, second, third = tokenizer.convert_tokens_to_ids(JSON_PIECES)
    with torch.no_grad():
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(vocab, hidden))
        model.model.norm.weight.fill_(1.0)
        head = torch.zeros(vocab, hidden)
        head[first, :] = 1.0  # the default successor of every token...
        for current, following in ((first, second), (second, third), (third, tokenizer.eos_token_id)):
            head[following, current] = 2.0  # ...beaten along the chain
        model.lm_head.weight.copy_(head)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def garbage_server():
    tokenizer = build_tokenizer("char")
    server = make_server((build_student(TINY_LONG, tokenizer, seed=0), tokenizer), port=0, model_name="tiny")
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def verdict_server():
    server = make_server(forced_verdict_model(), port=0, model_name="forced-judge")
    server.start()
    yield server
    server.close()


def test_unparseable_replies_become_error_rows(garbage_server):
    teacher = OpenAITeacher(f"{garbage_server.url}/v1", "tiny", max_tokens=12, max_retries=0)
    verdicts = teacher.judge(*ROWS)
    assert len(verdicts) == 3
    assert all(v.error and "unparseable" in v.error and v.quality is None for v in verdicts)
    assert teacher.stats["failed_rows"] == 3


def test_a_parseable_reply_through_the_real_server(verdict_server):
    teacher = OpenAITeacher(verdict_server.url, "forced-judge", max_retries=0)  # bare host: /v1 is added
    verdicts = teacher.judge(*ROWS)
    for v in verdicts:
        assert (v.quality, v.correct, v.rv, v.cd, v.error) == (7.0, True, 3.0, 5.0, None)


def test_cache_makes_a_second_run_free_and_survives_a_torn_line(verdict_server, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test-secret-1234")
    cache = tmp_path / "cache"

    def teacher():
        return OpenAITeacher(f"{verdict_server.url}/v1", "forced-judge", api_key_env="TEST_JUDGE_KEY",
                             cache_dir=cache, max_retries=0)

    before = verdict_server.request_count
    first = teacher().judge(*ROWS)
    assert verdict_server.request_count - before == 3
    assert teacher().judge(*ROWS) == first
    assert verdict_server.request_count - before == 3  # the second run made no request at all

    cache_file = cache / CACHE_FILE
    assert "sk-test-secret" not in cache_file.read_text()
    with open(cache_file, "a") as f:
        f.write('{"key": "0123abc", "reply": "{\\"qual')  # a crash in the middle of an append
    resumed = teacher()
    assert resumed.cache.skipped_lines == 1 and len(resumed.cache) == 3
    assert resumed.judge(*ROWS) == first and verdict_server.request_count - before == 3
    resumed.judge(["1+1="], ["#2"], [None])  # a new row: one request, appended after the torn line
    assert verdict_server.request_count - before == 4
    assert len(teacher().cache) == 4


# ---- stdlib stub servers for failure modes


class StubJudge(ThreadingHTTPServer):
    """Answers chat completions with a fixed verdict after failing with ``fail_with`` statuses, one per request;
    records requests, Authorization headers and the most requests ever in flight at once."""

    daemon_threads = True

    def __init__(self, fail_with: list[int], delay_s: float = 0.0):
        super().__init__(("127.0.0.1", 0), _StubHandler)
        self.fail_with, self.delay_s = list(fail_with), delay_s
        self.lock = threading.Lock()
        self.requests, self.in_flight, self.max_in_flight = 0, 0, 0
        self.auth: list[str | None] = []
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _StubHandler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        server: StubJudge = self.server
        self.rfile.read(int(self.headers["Content-Length"]))
        with server.lock:
            server.requests += 1
            server.in_flight += 1
            server.max_in_flight = max(server.max_in_flight, server.in_flight)
            server.auth.append(self.headers.get("Authorization"))
            status = server.fail_with.pop(0) if server.fail_with else 200
        time.sleep(server.delay_s)
        content = '{"quality": 8, "rv": 2, "cd": 4}'
        body = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}
                          if status == 200 else {"error": {"message": f"stub failure {status}"}}).encode()
        with server.lock:
            server.in_flight -= 1
        self.send_response(status)
        if status == 429:
            self.send_header("Retry-After", "0")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def stub():
    servers: list[StubJudge] = []

    def start(fail_with: list[int] = (), delay_s: float = 0.0) -> StubJudge:
        servers.append(StubJudge(list(fail_with), delay_s))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def test_retries_with_backoff_on_5xx_and_429(stub):
    server = stub([500, 503, 429])
    teacher = OpenAITeacher(server.url, "judge", max_retries=3, backoff_s=0.05)
    started = time.perf_counter()
    [verdict] = teacher.judge(["1+1="], ["#2"], [None])
    assert verdict.error is None and verdict.quality == 8.0
    assert server.requests == 4 and teacher.stats["retries"] == 3
    assert time.perf_counter() - started >= 0.05 + 0.1 + 0.2  # exponential back-off between attempts


def test_gives_up_after_the_retries_and_never_retries_other_4xx(stub):
    server = stub([500] * 10)
    [verdict] = OpenAITeacher(server.url, "judge", max_retries=2, backoff_s=0.01).judge(["1+1="], ["#2"], [None])
    assert server.requests == 3 and "HTTP 500" in verdict.error and "3 attempts" in verdict.error
    server = stub([400])
    [verdict] = OpenAITeacher(server.url, "judge", max_retries=5, backoff_s=0.01).judge(["1+1="], ["#2"], [None])
    assert server.requests == 1 and "HTTP 400" in verdict.error and "stub failure" in verdict.error


def test_a_closed_port_fails_the_row_after_retries():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    teacher = OpenAITeacher(f"http://127.0.0.1:{port}/v1", "judge", max_retries=2, backoff_s=0.01, timeout_s=5)
    [verdict] = teacher.judge(["1+1="], ["#2"], [None])
    assert verdict.error and "cannot reach" in verdict.error and "3 attempts" in verdict.error
    assert teacher.stats["http_requests"] == 3


def test_concurrency_limit_and_api_key_header(stub, monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test-secret-1234")
    server = stub(delay_s=0.1)
    teacher = OpenAITeacher(server.url, "judge", api_key_env="TEST_JUDGE_KEY", concurrency=2)
    assert "sk-test" not in repr(teacher)
    verdicts = teacher.judge([f"{i}+1=" for i in range(1, 7)], ["#0"] * 6, [None] * 6)
    assert all(v.quality == 8.0 for v in verdicts)
    assert server.requests == 6 and server.max_in_flight == 2
    assert server.auth == ["Bearer sk-test-secret-1234"] * 6


def test_configuration_errors_are_one_line_value_errors(monkeypatch):
    monkeypatch.delenv("TEST_JUDGE_KEY_MISSING", raising=False)
    with pytest.raises(ValueError, match="TEST_JUDGE_KEY_MISSING"):
        OpenAITeacher("http://127.0.0.1:1/v1", "judge", api_key_env="TEST_JUDGE_KEY_MISSING")
    for bad in ("127.0.0.1:8000", "ftp://host/v1", "", "http:///v1"):
        with pytest.raises(ValueError, match="base_url"):
            OpenAITeacher(bad, "judge")
    with pytest.raises(ValueError):
        OpenAITeacher("http://127.0.0.1:1/v1", "judge", concurrency=0)


def test_verdict_defaults():
    v = Verdict(quality=None, correct=None, rv=None, cd=None, error="x")
    assert v.quality_probs is None and v.rv_probs is None and v.cd_probs is None
