"""Distil a teacher on your own data (issue 20): teacher traces behind a real local OpenAI-compatible HTTP server
(concurrency bound, resume after a stop, cache hits, failures counted), grading and selection per CD bin, the
traces dataset, and hub names resolved from the local Hugging Face cache."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import datasets
import pytest

from reward.teachers.writers import OpenAIWriter, OracleWriter
from reward.teachers.trace_select import Trace, rule_scores, select
from reward.teachers.traces import build_traces
from rlhf.core.config.run_config import RunConfig
from rlhf.core.data.datasets import PromptRow, arithmetic_rows
from rlhf.core.models.build import ModelLoadError, resolve_model_path


class TeacherServer:
    """A stdlib OpenAI-compatible chat server on 127.0.0.1 that answers each request after ``delay`` seconds with
    a worked solution, fails (HTTP 400) any prompt containing FAIL, and records requests and the most in flight."""

    def __init__(self, delay: float = 0.05):
        self.requests, self.in_flight, self.max_in_flight = 0, 0, 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests += 1
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                time.sleep(delay)
                with server.lock:
                    server.in_flight -= 1
                user = body["messages"][-1]["content"]
                if "FAIL" in user:
                    self._send(400, {"error": {"message": "bad prompt"}})
                else:
                    reply = f"Half of it is {len(user)}.\nThen add one.\n#### {body['messages'][-1]['content'][:1]}"
                    self._send(200, {"choices": [{"message": {"role": "assistant", "content": reply}}]})

            def _send(self, code, payload):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def teacher_server():
    server = TeacherServer()
    yield server
    server.close()


def _conversations(texts):
    return [[{"role": "user", "content": t}] for t in texts]


def test_http_teacher_bounds_concurrency_counts_failures_and_resumes_from_its_cache(teacher_server, tmp_path):
    texts = [f"{d} apples and FAIL" if d == 3 else f"{d} apples" for d in range(8)]
    writer = OpenAIWriter(teacher_server.url, "teacher", concurrency=3, cache_dir=tmp_path, max_retries=0)
    # A job stopped after the first half of its prompts: those replies are in the cache file.
    first = writer.write(_conversations(texts[:4]), n=2)
    assert teacher_server.requests == 8 and 1 < teacher_server.max_in_flight <= 3
    assert first[3] == [None, None] and sum(writer.failures.values()) == 2  # counted, not fatal
    assert first[0][0].endswith("#### 0")
    # A new job (a fresh process: a new writer on the same cache) resumes: only what is missing is asked for.
    again = OpenAIWriter(teacher_server.url, "teacher", concurrency=3, cache_dir=tmp_path, max_retries=0)
    done = []
    full = again.write(_conversations(texts), n=2, progress=done.append)
    assert again.stats["cache_hits"] == 6  # prompts 0-2, two samples each
    assert teacher_server.requests == 8 + 2 + 8  # the failed prompt again, and prompts 4-7
    assert full[:3] == first[:3] and full[3] == [None, None] and all(s is not None for r in full[4:] for s in r)
    assert sum(done) == 16 and teacher_server.max_in_flight <= 3
    # A third run pays nothing for the samples that worked.
    before = teacher_server.requests
    OpenAIWriter(teacher_server.url, "teacher", concurrency=3, cache_dir=tmp_path, max_retries=0).write(
        _conversations(texts[:3]), n=2)
    assert teacher_server.requests == before


def test_traces_stage_from_an_http_teacher_writes_a_graded_dataset(teacher_server, tmp_path):
    rows = [PromptRow(f"{d} pears", str(d)) for d in range(1, 7)] + [PromptRow("9 pears FAIL", "9")]
    cfg = RunConfig(task={"verifier": "gsm8k", "system_prompt": "Be brief."},
                    traces={"teacher": "openai", "endpoint": {"url": teacher_server.url, "model": "t", "concurrency": 2,
                                                              "max_retries": 0},
                            "samples_per_prompt": 2, "curriculum": "none"})
    summary = build_traces(cfg, rows, tmp_path / "traces", log=lambda line: None)
    assert summary["written"] == 12 and summary["teacher_stats"]["failed"] == 2
    assert summary["correct"] == summary["kept"] == 12  # the server answers the prompt's first digit
    data = datasets.load_from_disk(str(tmp_path / "traces" / "dataset"))
    row = data[0]
    assert row["messages"][0] == {"role": "system", "content": "Be brief."}
    assert row["messages"][-1] == {"role": "assistant", "content": row["response"]}
    assert row["correct"] and row["reference"] == "1" and 0 <= row["cd"] <= 9 and row["rv"] > 0
    assert json.loads((tmp_path / "traces" / "summary.json").read_text())["kept"] == 12


def _trace(cd, rv, correct=True, i=0):
    return Trace(f"p{i}", f"r{i}", rv, cd, correct, i)


def test_selection_keeps_correct_traces_and_picks_per_cd_bin_by_the_curriculum():
    traces = [_trace(1.2, 0.5, i=0), _trace(1.7, 4.0, i=1), _trace(1.5, 8.0, i=2), _trace(1.1, 1.0, False, i=3),
              _trace(8.4, 0.5, i=4), _trace(8.9, 4.0, i=5), _trace(8.1, 7.5, i=6), _trace(5.0, 3.0, None, i=7)]
    matched, bins = select(traces, "matched", keep=1 / 3, rv_at_cd0=0.0, rv_at_cd9=8.0)
    # bin 1 (target ~1.3): the short trace; bin 8 (target ~7.6): the long one; bin 5's unverified trace stays.
    assert [t.prompt_index for t in matched] == [0, 6, 7]
    assert bins["1"] == {"traces": 4, "correct": 3, "kept": 1, "mean_rv": 0.5, "target_rv": 1.333}
    assert bins["8"]["kept"] == 1 and bins["8"]["mean_rv"] == 7.5
    high, _ = select(traces, "high", keep=1 / 3, keep_unverified=False)
    assert [t.prompt_index for t in high] == [2, 6]  # target RV 8 everywhere; unverified dropped
    low, _ = select(traces, "low", keep=1.0)
    assert 3 not in [t.prompt_index for t in low] and len(low) == 7  # a wrong trace is never kept
    everything, summary = select(traces, "none", keep=0.1)
    assert len(everything) == 7 and summary["1"]["target_rv"] is None
    with pytest.raises(ValueError, match="unknown curriculum"):
        select(traces, "extreme", keep=0.5)


def test_rule_scores_use_the_difficulty_field_or_the_reasoning_steps():
    traces = [Trace("a", "x=1\ny=2\nz=3\n#### 3", 0, 0, True, 0), Trace("a", "#### 3", 0, 0, True, 0),
              Trace("b", "w=1\n#### 9", 0, 0, False, 1)]
    by_steps = rule_scores(traces, chars_per_rv=1.0)
    assert [t.cd for t in by_steps] == [1.5, 1.5, 1.0]  # prompt a: mean of 3 and 0 steps; b: its only trace
    assert by_steps[0].rv > by_steps[1].rv == 0
    by_field = rule_scores(traces, 1.0, difficulties=[1, 5], difficulty_range=(1, 5))
    assert [t.cd for t in by_field] == [0.0, 0.0, 9.0]


def test_oracle_traces_for_the_arithmetic_task_cover_each_verbosity(tmp_path):
    rows = arithmetic_rows(12, seed=3)
    assert len(OracleWriter().write(_conversations([rows[0].prompt]), 3)[0]) == 3
    cfg = RunConfig(traces={"teacher": "oracle", "samples_per_prompt": 3, "curriculum": "matched", "keep": 0.34,
                            "chars_per_rv": 6.0}, task={"difficulty_field": "level"},
                    reward={"adaptive": {"difficulty_range": (1, 6)}})
    cfg.traces.difficulty_range = (1, 6)
    summary = build_traces(cfg, rows, tmp_path, log=lambda line: None)
    assert summary["written"] == 36 and summary["correct"] == 36
    assert sum(b["kept"] for b in summary["by_cd_bin"].values()) == summary["kept"] < 36


def test_dataset_responses_are_the_traces_and_a_missing_field_is_named(tmp_path):
    rows = [PromptRow("q1", "4", record={"answer": "2+2=4\n#### 4"}), PromptRow("q2", "5", record={"answer": "#### 6"})]
    cfg = RunConfig(task={"verifier": "gsm8k"}, traces={"teacher": "dataset", "curriculum": "none"})
    summary = build_traces(cfg, rows, tmp_path / "a", log=lambda line: None)
    assert (summary["written"], summary["correct"], summary["kept"]) == (2, 1, 1)
    from rlhf.core.data.datasets import DatasetError

    with pytest.raises(DatasetError, match="traces.response_field"):
        build_traces(cfg.model_copy(update={"traces": cfg.traces.model_copy(update={"response_field": "sol"})}),
                     rows, tmp_path / "b", log=lambda line: None)


def test_hub_names_resolve_from_the_local_cache_and_a_missing_one_is_one_line(tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = tmp_path / "models--Org--Tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--Org--Tiny" / "refs").mkdir()
    (tmp_path / "models--Org--Tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_path("Org/Tiny").resolve() == snapshot.resolve()
    assert resolve_model_path(str(tmp_path)) == tmp_path  # a local directory stays as it is
    with pytest.raises(ModelLoadError, match="neither a local directory nor in the Hugging Face cache") as err:
        resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct")
    assert "\n" not in str(err.value)


def test_a_local_hf_teacher_writes_n_samples_and_resumes_from_its_cache(tmp_path):
    from rlhf.core.models.char_tokenizer import build_char_tokenizer
    from rlhf.core.config.run_config import ModelConfig
    from rlhf.core.models.build import build_student, save_student
    from reward.teachers.writers import HFWriter

    tok = build_char_tokenizer()
    tiny = ModelConfig(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32)
    save_student(build_student(tiny, tok, seed=0), tok, tmp_path / "teacher")
    writer = HFWriter(tmp_path / "teacher", tmp_path / "cache", temperature=1.0, max_new_tokens=5)
    out = writer.write(_conversations(["1+2=", "3+4="]), n=3)
    assert [len(r) for r in out] == [3, 3] and all(isinstance(s, str) for r in out for s in r)
    assert writer.stats["requests"] == 6
    again = HFWriter(tmp_path / "teacher", tmp_path / "cache", temperature=1.0, max_new_tokens=5)
    assert again.write(_conversations(["1+2=", "3+4="]), n=3) == out and again.stats["cache_hits"] == 6


def test_distilrl_traces_command_writes_the_selected_dataset(tmp_path, capsys):
    from rlhf.cli import main

    out = tmp_path / "run"
    assert main(["traces", "configs/tiny.yaml", f"output_dir={out}", "traces.prompts=20",
                 "traces.samples_per_prompt=3", "traces.chars_per_rv=6", "traces.keep=0.34"]) == 0
    summary = json.loads((out / "traces" / "summary.json").read_text())
    assert summary["written"] == 60 and summary["correct"] == 60 and 0 < summary["kept"] < 60
    assert len(datasets.load_from_disk(str(out / "traces" / "dataset"))) == summary["kept"]
    assert "per CD bin kept" in capsys.readouterr().out
