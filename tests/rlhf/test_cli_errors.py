"""Bad input stops with one line naming the problem and a non-zero exit, and damages nothing already written.

Two tables: bad configs, datasets and model directories through ``distilrl run`` (in-process), each checked for
exit status 2, its one-line message, and that the run directory is byte-for-byte as it was (a previous unfinished
run in output_dir, a finished one beside it); and bad teacher replies, reward-server requests and custom reward
functions at the component that meets them, each checked for its one-line message and status.
"""
import http.client
import json
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from reward.model.labelling import TeacherError, label
from reward.teachers import OpenAITeacher
from reward.scoring.worker import RewardError
from rlhf.cli import main
from rlhf.core.data.datasets import PromptRow, load_jsonl_rows
from tests.scoring import reward_worker
from tests.paths import REPO

TINY = str(REPO / "configs" / "tiny.yaml")
GOOD_ROW = {"prompt": "1+1=", "answer": "2"}


def one_line(text: str) -> bool:
    return bool(text) and "\n" not in text.strip()


# ------------------------------------------------------------------------------------------ model directories


@pytest.fixture(scope="module")
def good_models(tmp_path_factory) -> dict[str, Path]:
    """A tiny student and a reward model built on it, saved as a run would save them."""
    from reward.model.distilled import DistilledRewardModel
    from rlhf.core.config.run_config import ModelConfig
    from rlhf.core.models.build import build_student, build_tokenizer, save_student

    root = tmp_path_factory.mktemp("models")
    tokenizer = build_tokenizer("char")
    student = build_student(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                        intermediate_size=64), tokenizer, seed=0)
    save_student(student, tokenizer, root / "student")
    rm = DistilledRewardModel.from_causal_lm(student, pad_token_id=tokenizer.pad_token_id)
    rm.save_pretrained(root / "rm")
    tokenizer.save_pretrained(root / "rm")
    return {"student": root / "student", "rm": root / "rm"}


def copy_of(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


def damaged_student(tmp, models, how):
    model = copy_of(models["student"], tmp / "model")
    weights = next(model.glob("*.safetensors"))
    if how == "no_config":
        (model / "config.json").unlink()
    elif how == "config_not_json":
        (model / "config.json").write_text("{ not json")
    elif how == "no_weights":
        weights.unlink()
    elif how == "random_bytes":
        weights.write_bytes(bytes(range(256)) * 40)
    elif how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "unknown_model_type":
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, "model_type": "nosuchmodel",
                                                       "architectures": ["NoSuchForCausalLM"]}))
    elif how == "config_list":
        (model / "config.json").write_text("[1, 2]")
    elif how == "no_tokenizer":
        for name in model.iterdir():
            if "token" in name.name or name.name == "vocab.json":
                name.unlink()
    return [f"model.model_name_or_path={model}"]


# ----------------------------------------------------------------------------------------------- datasets


# A dataset task cannot warm up without a traces dataset (no silent fallback to the arithmetic teacher); the
# data cases below check the data, so they run RL and evaluation only.
RL_ONLY = ["stages=[rl,eval]"]


def jsonl_task(tmp: Path, content: bytes | list, eval_rows: list | None = None) -> list[str]:
    """Overrides for a jsonl task whose training file holds ``content`` (records, or raw bytes)."""
    train, held_out = tmp / "train.jsonl", tmp / "eval.jsonl"
    train.write_bytes(content if isinstance(content, bytes) else
                      "".join(json.dumps(r) + "\n" for r in content).encode())
    held_out.write_text("".join(json.dumps(r) + "\n" for r in (eval_rows or [GOOD_ROW] * 4)))
    return ["task.name=dataset", f"task.train_file={train}", f"task.eval_file={held_out}", *RL_ONLY]


def csv_task(tmp: Path, content: bytes) -> list[str]:
    train = tmp / "train.csv"
    train.write_bytes(content)
    return ["task.name=dataset", f"task.train_file={train}", f"task.eval_file={train}", *RL_ONLY]


def binary_file(tmp: Path, content: bytes) -> Path:
    path = tmp / "bad.yaml"
    path.write_bytes(content)
    return path


def yaml_file(tmp: Path, text: str) -> Path:
    path = tmp / "bad.yaml"
    path.write_text(text)
    return path


# (id, make(tmp, models) -> (config path or None for tiny, overrides), expected parts of the message)
CLI_CASES = [
    # configs
    ("malformed_yaml", lambda t, m: (yaml_file(t, "trainer: {zero_stage: 3\nrollout: ["), []),
     ["bad.yaml is not valid YAML"]),
    ("yaml_not_a_mapping", lambda t, m: (yaml_file(t, "- a\n- b\n"), []), ["must hold a mapping", "list"]),
    ("config_file_missing", lambda t, m: (t / "nowhere.yaml", []), ["nowhere.yaml does not exist"]),
    ("config_path_is_a_directory", lambda t, m: (t, []), ["is a directory", "give the YAML file in it"]),
    ("binary_config", lambda t, m: (binary_file(t, bytes(range(256)) * 4), []), ["is not UTF-8 text"]),
    ("utf16_config", lambda t, m: (binary_file(t, "trainer: {lr: 0.01}\n".encode("utf-16")), []),
     ["is not UTF-8 text", "UTF-16"]),
    ("infinite_lr", lambda t, m: (None, ["trainer.lr=inf"]), ["trainer.lr", "finite number"]),
    ("nan_kl", lambda t, m: (None, ["algorithm.kl_coef=.nan"]), ["algorithm.kl_coef", "finite number"]),
    ("infinite_reward_weight", lambda t, m: (None, ["reward.components={verifier: .inf}"]),
     ["reward.components.verifier", "finite number"]),
    ("output_dir_is_a_file", lambda t, m: (None, [f"output_dir={binary_file(t, b'x')}"]),
     ["bad.yaml is a file, not a directory"]),
    ("output_dir_under_a_file", lambda t, m: (None, [f"output_dir={binary_file(t, b'x') / 'run'}"]),
     ["cannot be made", "bad.yaml is a file"]),
    ("unknown_key", lambda t, m: (None, ["trainer.zero_stagee=3"]),
     ["trainer.zero_stagee", "unknown key", "did you mean trainer.zero_stage?"]),
    ("unknown_section", lambda t, m: (None, ["nosuchsection.key=1"]), ["nosuchsection", "unknown key"]),
    ("bad_enum_value", lambda t, m: (None, ["trainer.zero_stage=5"]), ["trainer.zero_stage"]),
    ("wrong_type", lambda t, m: (None, ["rollout.prompts_per_step=abc"]), ["rollout.prompts_per_step", "'abc'"]),
    ("negative_lr", lambda t, m: (None, ["trainer.lr=-1"]), ["trainer.lr", "greater than 0"]),
    ("override_without_equals", lambda t, m: (None, ["algorithm.steps"]), ["not of the form dotted.key=value"]),
    ("batch_does_not_divide", lambda t, m: (None, ["rollout.prompts_per_step=3", "rollout.samples_per_prompt=3"]),
     ["9", "trainer.num_ranks=2"]),
    ("all_reward_weights_zero", lambda t, m: (None, ["reward.components={verifier: 0}"]),
     ["reward.components", "non-zero"]),
    ("unknown_reward_component", lambda t, m: (None, ["reward.components={judge: 1.0}"]), ["reward.components"]),
    ("rm_without_a_reward_model", lambda t, m: (None, ["reward.components={rm: 1.0}"]),
     ["uses rm but there is none"]),
    ("jsonl_task_without_files", lambda t, m: (None, ["task.name=dataset"]), ["task.train_file"]),
    ("openai_teacher_without_url", lambda t, m: (None, ["label.teacher=openai"]), ["label.endpoint"]),
    ("responses_leave_no_room_for_prompts", lambda t, m: (None, ["rollout.max_new_tokens=200"]),
     ["leave no room for a prompt", "128 positions"]),
    # datasets: every row bad (a row or two among good ones is skipped instead: test_bad_rows_are_skipped...)
    ("no_prompt_field", lambda t, m: (None, jsonl_task(t, [{"question": "1+1=", "answer": "2"}] * 3)),
     ["train.jsonl has no usable rows (3 skipped)", "line 1 has no field 'prompt'", "task.prompt_field"]),
    ("no_answer_field", lambda t, m: (None, jsonl_task(t, [{"prompt": "1+1="}] * 2)),
     ["has no field 'answer'", "task.answer_field"]),
    ("empty_prompt", lambda t, m: (None, jsonl_task(t, [{"prompt": "", "answer": "2"}])),
     ["field 'prompt' must be non-empty text"]),
    ("blank_prompt", lambda t, m: (None, jsonl_task(t, [{"prompt": "  \t", "answer": "2"}])),
     ["field 'prompt' must be non-empty text"]),
    ("numeric_prompt", lambda t, m: (None, jsonl_task(t, [{"prompt": 12, "answer": "2"}])),
     ["field 'prompt' must be non-empty text"]),
    ("list_answer", lambda t, m: (None, jsonl_task(t, [{"prompt": "1+1=", "answer": [2]}])),
     ["field 'answer' must be text or a number"]),
    ("bool_answer", lambda t, m: (None, jsonl_task(t, [{"prompt": "1+1=", "answer": True}])),
     ["field 'answer' must be text or a number"]),
    ("string_difficulty", lambda t, m: (None, jsonl_task(t, [{**GOOD_ROW, "level": "hard"}]) +
                                        ["task.difficulty_field=level"]), ["field 'level' must be an integer"]),
    ("latin1_text", lambda t, m: (None, jsonl_task(t, b'{"prompt": "caf\xe9=", "answer": "1"}\n')),
     ["line 1 is not UTF-8 text", "re-encode"]),
    ("utf16_file", lambda t, m: (None, jsonl_task(t, json.dumps(GOOD_ROW).encode("utf-16"))),
     ["is not UTF-8 text"]),
    ("not_json", lambda t, m: (None, jsonl_task(t, b'{"prompt": "1+1=", answer: 2}\n')), ["not valid JSON"]),
    ("json_array_row", lambda t, m: (None, jsonl_task(t, [["1+1=", "2"]])), ["is a JSON list"]),
    ("empty_file", lambda t, m: (None, jsonl_task(t, b"\n\n")), ["holds no rows"]),
    ("garbage_csv", lambda t, m: (None, csv_task(t, b'prompt,answer\n"1+1=,2\n3,"4\n\x00garbage",,,,\n')),
     ["cannot read", "as csv (ParserError", "Expected 2 fields in line 3"]),
    ("binary_csv", lambda t, m: (None, csv_task(t, bytes(range(128, 256)) * 8)),
     ["as csv (UnicodeDecodeError"]),
    ("missing_file", lambda t, m: (None, ["task.name=dataset", f"task.train_file={t / 'no.jsonl'}",
                                          f"task.eval_file={t / 'no.jsonl'}", *RL_ONLY]), ["no.jsonl does not exist"]),
    ("over_long_prompts", lambda t, m: (None, jsonl_task(t, [{"prompt": "1+" * 80 + "1=", "answer": "81"}] * 4)),
     ["training prompts has no usable rows (4 skipped)", "162 tokens, over the 112 that fit"]),
    ("over_long_held_out_prompts", lambda t, m: (None, jsonl_task(t, [GOOD_ROW] * 4,
                                                                  [{"prompt": "9" * 200, "answer": "1"}])),
     ["held-out prompts has no usable rows"]),
    ("too_few_prompts_left", lambda t, m: (None, jsonl_task(t, [GOOD_ROW, {"prompt": ""}] * 2)),
     ["only 2 training prompts for rollout.prompts_per_step=4"]),
    # model directories
    ("model_dir_missing", lambda t, m: (None, [f"model.model_name_or_path={t / 'nope'}"]),
     ["model directory", "nope does not exist", "model.model_name_or_path"]),
    ("model_dir_without_config", lambda t, m: (None, damaged_student(t, m, "no_config")), ["has no config.json"]),
    ("model_config_not_json", lambda t, m: (None, damaged_student(t, m, "config_not_json")),
     ["config.json is not valid JSON"]),
    ("model_without_safetensors", lambda t, m: (None, damaged_student(t, m, "no_weights")),
     ["has no model.safetensors"]),
    ("corrupt_safetensors", lambda t, m: (None, damaged_student(t, m, "random_bytes")),
     ["is not a readable safetensors file"]),
    ("truncated_safetensors", lambda t, m: (None, damaged_student(t, m, "truncated")),
     ["safetensors"]),
    ("unknown_model_type", lambda t, m: (None, damaged_student(t, m, "unknown_model_type")),
     ["cannot load the model in", "nosuchmodel"]),
    ("model_config_a_list", lambda t, m: (None, damaged_student(t, m, "config_list")),
     ["config.json holds a JSON list, not the object save_pretrained writes"]),
    ("model_without_tokenizer", lambda t, m: (None, damaged_student(t, m, "no_tokenizer")),
     ["has no tokenizer (tokenizer.json"]),
    ("reward_model_given_as_policy", lambda t, m: (None, [f"model.model_name_or_path={m['rm']}"]),
     ["holds a Qwen2ForSequenceClassification, not a *ForCausalLM model", "model.model_name_or_path"]),
    ("policy_given_as_reward_model", lambda t, m: (None, [f"reward_model.path={m['student']}",
                                                          "reward.components={rm: 1.0}"]),
     ["holds a Qwen2ForCausalLM, not a *ForSequenceClassification model", "reward_model.path"]),
    ("reward_model_dir_missing", lambda t, m: (None, [f"reward_model.path={t / 'no_rm'}",
                                                      "reward.components={rm: 1.0}"]),
     ["no_rm does not exist", "reward_model.path"]),
]


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (with its bytes) and directory under ``root``."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.fixture
def runs(tmp_path) -> Path:
    """runs/finished: a finished run; runs/current: an unfinished one that the failing command is pointed at."""
    root = tmp_path / "runs"
    for name, files in (("finished", {"summary.json": "{}", "metrics.jsonl": '{"step": 1}\n', "config.yaml": "a: 1\n",
                                      "policy/model.safetensors": "weights"}),
                        ("current", {"metrics.jsonl": '{"step": 1}\n{"step": 2}\n', "config.yaml": "b: 2\n",
                                     "labels/train/rows.jsonl": '{"prompt": "1+1="}\n', "warmup/config.json": "{}"})):
        for rel, text in files.items():
            (root / name / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / name / rel).write_text(text)
    return root


@pytest.mark.parametrize("make, expected", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_bad_input_to_distilrl_run(make, expected, tmp_path, runs, good_models, capsys):
    config, overrides = make(tmp_path, good_models)
    before = snapshot(runs)
    code = main(["run", str(config or TINY), f"output_dir={runs / 'current'}", *overrides])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, captured
    assert one_line(err) and err.startswith("distilrl: error: "), err
    for part in expected:
        assert part in err, (part, err)
    assert snapshot(runs) == before  # nothing written, nothing removed, no *.tmp left behind


def test_bad_rows_are_skipped_counted_and_shown(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(GOOD_ROW), '{"prompt": ', json.dumps({"prompt": "", "answer": "1"}), json.dumps(GOOD_ROW),
             json.dumps({"q": 1}), json.dumps([1]), "caf\xe9"]
    path.write_bytes("\n".join(lines[:-1]).encode() + b"\n" + lines[-1].encode("latin-1") + b"\n")
    logged = []
    assert load_jsonl_rows(path, "prompt", "answer", log=logged.append) == [PromptRow("1+1=", "2")] * 2
    assert len(logged) == 1 and one_line(logged[0])
    assert logged[0].startswith(f"warning: skipped 5 of 7 rows of {path}: line 2 is not valid JSON")
    assert "line 3: field 'prompt' must be non-empty text or a list of chat messages; line 5 has no field 'prompt'" \
        in logged[0]
    assert logged[0].endswith("; and 2 more")


def test_console_script_exit_status_and_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "rlhf.cli", "run", TINY, "nosuchsection.key=1"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["distilrl: error: config key nosuchsection: unknown key (check the "
                                                  "spelling against rlhf/core/config/run_config.py)"]


def test_an_output_dir_that_cannot_be_written_is_refused_first(tmp_path, capsys, monkeypatch):
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.geteuid() == 0:  # root writes anywhere: stand in for the permission the kernel would refuse
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    try:
        assert main(["run", TINY, f"output_dir={locked / 'run'}"]) == 2
        err = capsys.readouterr().err.strip()
        assert one_line(err) and f"output_dir {locked / 'run'} (nor its parent {locked}) is not writable" in err
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


@pytest.fixture
def busy_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock.getsockname()[1]


# (id, make(tmp, models, busy port) -> argv, expected parts of the one-line message)
SERVE_CASES = [
    ("serve_rm_missing_dir", lambda t, m, p: ["serve-rm", str(t / "nope")], ["nope does not exist", "RM_DIR"]),
    ("serve_rm_on_a_policy", lambda t, m, p: ["serve-rm", str(m["student"])],
     ["holds a Qwen2ForCausalLM, not a *ForSequenceClassification model"]),
    ("serve_rm_port_in_use", lambda t, m, p: ["serve-rm", str(m["rm"]), "--port", str(p)],
     ["cannot listen on 127.0.0.1:{p}", "choose another --port"]),
    ("serve_rm_bad_port", lambda t, m, p: ["serve-rm", str(m["rm"]), "--port", "70000"], ["is not a port number"]),
    ("serve_rm_bad_max_tokens", lambda t, m, p: ["serve-rm", str(m["rm"]), "--max-tokens", "0"],
     ["--max-tokens 0 must be positive"]),
    ("serve_port_in_use", lambda t, m, p: ["serve", str(m["student"]), "--port", str(p)],
     ["cannot listen on 127.0.0.1:{p}"]),
    ("serve_missing_dir", lambda t, m, p: ["serve", str(t / "nope")], ["nope does not exist"]),
    ("serve_on_a_reward_model", lambda t, m, p: ["serve", str(m["rm"])], ["not a *ForCausalLM model"]),
]


@pytest.mark.parametrize("make, expected", [c[1:] for c in SERVE_CASES], ids=[c[0] for c in SERVE_CASES])
def test_bad_input_to_the_servers(make, expected, tmp_path, good_models, busy_port, capsys):
    assert main(make(tmp_path, good_models, busy_port)) == 2
    err = capsys.readouterr().err.strip()
    assert one_line(err) and err.startswith("distilrl: error: "), err
    for part in expected:
        assert part.replace("{p}", str(busy_port)) in err, (part, err)


# --------------------------------------------------------------------------------- teachers, server, reward fns


class FakeJudge(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint that answers every request as ``server.reply`` says."""

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        status, body = self.server.reply
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def chat(content) -> bytes:
    return json.dumps({"choices": [{"message": {"content": content}}]}).encode()


TEACHER_CASES = [
    ("unparseable_verdict", (200, chat("I think it is fine.")), "unparseable judge reply"),
    ("verdict_without_quality", (200, chat('{"rv": 3}')), "judge reply has no quality score"),
    ("empty_verdict", (200, chat("")), "unparseable judge reply: empty judge reply"),
    ("non_text_content", (200, chat(None)), "the judge server replied with no text content"),
    ("no_choices", (200, b'{"choices": []}'), "malformed reply from the judge server"),
    ("reply_not_json", (200, b"<html>gateway</html>"), "malformed reply from the judge server"),
    ("http_500", (500, b'{"error": {"message": "overloaded"}}'), "HTTP 500 from the judge server: overloaded"),
    ("http_401", (401, b'{"error": "bad key"}'), "HTTP 401 from the judge server: bad key"),
    ("http_404_html", (404, b"<h1>no</h1>"), "HTTP 404 from the judge server"),
]


@pytest.fixture(scope="module")
def judge_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("reply, expected", [c[1:] for c in TEACHER_CASES], ids=[c[0] for c in TEACHER_CASES])
def test_bad_teacher_replies(reply, expected, judge_server, tmp_path, capsys, monkeypatch):
    judge_server.reply = reply
    teacher = OpenAITeacher(f"http://127.0.0.1:{judge_server.server_address[1]}/v1", "judge", max_retries=1,
                            backoff_s=0.0)
    # Per row: an error verdict with a one-line reason, never an exception out of judge().
    verdicts = teacher.judge(["1+1="] * 2, ["#2", "#3"], ["2", "2"])
    assert all(v.quality is None and one_line(v.error) and expected in v.error for v in verdicts)
    # A teacher that fails every row stops labelling before anything is written; the CLI says so in one line.
    out = tmp_path / "labels"
    with pytest.raises(TeacherError) as info:
        label([PromptRow("1+1=", "2")] * 3, lambda prompts, n: [["#2"] * n for _ in prompts], teacher, out, 2)
    assert one_line(str(info.value)) and "judged none of the first 6 responses (6 x " in str(info.value)
    assert not (out / "rows.jsonl").exists()
    monkeypatch.setitem(__import__("rlhf.cli").cli.COMMANDS, "run", lambda args: (_ for _ in ()).throw(info.value))
    assert main(["run", TINY]) == 2
    assert capsys.readouterr().err.strip() == f"distilrl: error: {info.value}"


SERVER_CASES = [
    ("malformed_json", b'{"prompts": ["a"], "responses": ', {}, 400, "malformed JSON"),
    ("not_utf8", b'{"prompts": ["\xff"]}', {}, 400, "malformed JSON"),
    ("body_not_an_object", b'["a", "b"]', {}, 400, "body must be a JSON object, got list"),
    ("prompts_not_a_list", b'{"prompts": "a", "responses": ["b"]}', {}, 400, "'prompts' must be a list of strings"),
    ("response_not_a_string", b'{"prompts": ["a"], "responses": [3]}', {}, 400, "responses[0] must be a string"),
    ("missing_key", b'{"prompts": ["a"]}', {}, 400, "missing 'responses'"),
    ("length_mismatch", b'{"prompts": ["a", "b"], "responses": ["c"]}', {}, 400, "has 2 items but"),
    ("huge_body", b'{"prompts": ["' + b"x" * 300_000 + b'"]}', {}, 413, "over the limit of 100000"),
    ("too_many_samples", json.dumps({"prompts": ["a"] * 65, "responses": ["b"] * 65}).encode(), {}, 413,
     "batch of 65 samples is over the limit of 64"),
    ("lying_content_length", b'{"prompts": []}', {"Content-Length": "50"}, 400, "body ended after"),
    ("bad_content_length", b"{}", {"Content-Length": "-3"}, 400, "bad Content-Length"),
]


@pytest.fixture(scope="module")
def reward_server():
    from rlhf.serve.reward_server import make_reward_server

    with make_reward_server(lambda p, r: [1.0] * len(p), max_request_bytes=100_000, max_batch=64) as server:
        server.start()
        yield server


@pytest.mark.parametrize("body, headers, status, expected", [c[1:] for c in SERVER_CASES],
                         ids=[c[0] for c in SERVER_CASES])
def test_bad_reward_server_requests(body, headers, status, expected, reward_server):
    def request(data: bytes, extra: dict) -> tuple[int, dict]:
        conn = http.client.HTTPConnection(*reward_server.server_address[:2], timeout=10)
        try:
            conn.putrequest("POST", "/score")
            for name, value in {"Content-Type": "application/json", "Content-Length": str(len(data)),
                                **extra}.items():
                conn.putheader(name, value)
            conn.endheaders()
            try:
                conn.send(data)
                if int(extra.get("Content-Length", len(data))) > len(data):
                    conn.sock.shutdown(socket.SHUT_WR)  # a client that stopped sending: the body ends short
            except OSError:
                pass  # the server may answer (and close) before a refused body is all sent
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    got, answer = request(body, headers)
    assert got == status and set(answer) == {"error"} and one_line(answer["error"]) and expected in answer["error"]
    # The server carries on for the next, well-formed request.
    assert request(b'{"prompts": ["a"], "responses": ["b"]}', {}) == (200, {"rewards": [1.0]})


def _raises(prompts, responses, rows):
    raise ValueError("no reference\nsecond line")


REWARD_FN_CASES = [
    ("raises", _raises, "reward_fn raised ValueError"),
    ("wrong_count", lambda p, r, rows: [1.0], "reward_fn returned 1 rewards for 2 responses"),
    ("not_a_number", lambda p, r, rows: [1.0, "high"], "reward_fn returned 'high', not a number"),
    ("not_iterable", lambda p, r, rows: None, "reward_fn raised TypeError"),
]


def test_a_nan_from_a_custom_reward_function_is_named_for_the_guard():
    """A NaN is not an error of the function's: the batch is skipped by the driver's guard (rlhf/core/guards.py),
    which names the component, so the worker returns it marked instead of raising."""
    worker = reward_worker({"custom": 1.0}, custom=lambda p, r, rows: [float("nan"), 0.0])
    scores = worker.score(["1+1=", "2+2="], ["#2", "#4"], ["2", "4"], [{"q": 1}, {"q": 2}])
    assert scores[0]["nonfinite"] == "custom=nan" and "nonfinite" not in scores[1]


@pytest.mark.parametrize("fn, expected", [c[1:] for c in REWARD_FN_CASES], ids=[c[0] for c in REWARD_FN_CASES])
def test_custom_reward_functions_that_fail(fn, expected, capsys, monkeypatch):
    import ray

    from rlhf.core.distributed.worker_pool import application_error

    worker = reward_worker({"custom": 1.0}, custom=fn)
    with pytest.raises(RewardError) as info:
        worker.score(["1+1=", "2+2="], ["#2", "#4"], ["2", "4"], [{"q": 1}, {"q": 2}])
    assert expected in str(info.value) and one_line(str(info.value))
    # Raised in a reward worker actor, it reaches the driver as itself (one line), not as Ray's wrapper...
    wrapped = ray.exceptions.RayTaskError("RewardWorker.score", "Traceback ...\nRewardError: ...", info.value)
    assert application_error(wrapped) is info.value
    # ... and ends `distilrl run` with exit status 1 and that line.
    monkeypatch.setitem(__import__("rlhf.cli").cli.COMMANDS, "run", lambda args: (_ for _ in ()).throw(info.value))
    assert main(["run", TINY]) == 1
    assert capsys.readouterr().err.strip() == f"distilrl: error: {info.value}"


def test_bad_input_for_a_new_run_directory_creates_nothing(tmp_path, capsys):
    """A missing traces file, or preference data in no known layout, stops before output_dir is made."""
    out = tmp_path / "new_run"
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"question": "q", "answer": "a"}\n')
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n')
    for argv, expected in (
            (["run", TINY, "stages=[sft,eval]", f"warmup.traces_file={tmp_path / 'none.jsonl'}"],
             "warmup.traces_file " + str(tmp_path / "none.jsonl") + " does not exist"),
            (["train-rm", TINY, "--data", str(pairs)], "has columns ['answer', 'question']"),
            (["train-rm", TINY, "--data", str(good), f"reward_model.eval_file={tmp_path / 'none.jsonl'}"],
             f"reward_model.eval_file {tmp_path / 'none.jsonl'} does not exist")):
        assert main([*argv, f"output_dir={out}"]) == 2
        err = capsys.readouterr().err.strip()
        assert one_line(err) and expected in err, err
        assert not out.exists()


def test_rows_skipped_as_bad_are_counted_for_summary_json(tmp_path):
    from rlhf.core.config.run_config import TaskConfig
    from rlhf.core.data.datasets import load_rows

    train, held_out = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("\n".join([json.dumps(GOOD_ROW), "{bad", json.dumps({"q": 1}), json.dumps(GOOD_ROW)]) + "\n")
    held_out.write_text(json.dumps(GOOD_ROW) + "\n[1]\n")
    stats: dict = {}
    load_rows(TaskConfig(name="dataset", train_file=str(train), eval_file=str(held_out)), 0, log=None, stats=stats)
    assert (stats["train_skipped_bad"], stats["eval_skipped_bad"]) == (2, 1)
    assert (stats["train_prompts"], stats["eval_prompts"]) == (2, 1)
