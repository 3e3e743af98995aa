"""Seeded fuzzing of what users and clients send: generated bad configs through ``distilrl run`` and bad requests
to both HTTP servers. Every one must be refused the designed way (one line and exit 2; a 4xx JSON answer), never
with a traceback or a 500. Fast: configs are refused before anything starts, the servers run a tiny model."""
from __future__ import annotations

import http.client
import json
import random
import socket
from pathlib import Path

import pytest
import yaml

from rlhf.serve.reward_server import make_reward_server
from rlhf.core.config.run_config import ConfigError, ModelConfig, load_config
from rlhf.core.models.build import build_student, build_tokenizer
from rlhf.cli import main
from rlhf.serve.policy_server import make_server
from tests.paths import REPO

TINY = REPO / "configs" / "tiny.yaml"

# Values that no config key takes (or that many refuse): wrong types, non-finite and out-of-range numbers.
BAD_VALUES = ["abc", "", [1, 2], {"a": 1}, {"a": {"b": {"c": [None]}}}, float("inf"), float("-inf"), float("nan"),
              -1, -1e-9, 0, 2**80, -(2**80), True, None, "\x00\x01", "9" * 5000, 1e308]


def flat_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        if isinstance(value, dict) and value and prefix + key != "reward.components":
            keys += flat_keys(value, f"{prefix}{key}.")
        else:
            keys.append(prefix + key)
    return keys


def set_dotted(tree: dict, key: str, value) -> None:
    *path, last = key.split(".")
    for part in path:
        tree = tree.setdefault(part, {}) if isinstance(tree.get(part, {}), dict) else {}
    tree[last] = value


def bad_configs(rng: random.Random, n: int) -> list[bytes]:
    """``n`` config files: mostly tiny.yaml with one to three keys set to bad values, some with unknown keys, and
    some whose text is damaged (bytes flipped, cut short, not text)."""
    base = yaml.safe_load(TINY.read_text())
    keys = flat_keys(load_config(TINY).model_dump())
    text = TINY.read_bytes()
    out = []
    for i in range(n):
        kind = i % 10
        if kind < 7:
            data = json.loads(json.dumps(base))
            for _ in range(rng.randint(1, 3)):
                set_dotted(data, rng.choice(keys), rng.choice(BAD_VALUES))
            out.append(yaml.safe_dump(data, allow_unicode=True).encode())
        elif kind == 7:
            data = json.loads(json.dumps(base))
            set_dotted(data, rng.choice(keys) + "_typo", 1)
            out.append(yaml.safe_dump(data).encode())
        elif kind == 8:
            damaged = bytearray(text)
            for _ in range(rng.randint(1, 20)):
                damaged[rng.randrange(len(damaged))] = rng.randrange(256)
            out.append(bytes(damaged[: rng.randrange(1, len(damaged))]))
        else:
            out.append(bytes(rng.randrange(256) for _ in range(rng.randint(1, 400))))
    return out


def test_generated_bad_configs_are_refused_in_one_line(tmp_path, capsys):
    rng = random.Random(25)
    refused = accepted = 0
    path = tmp_path / "fuzz.yaml"
    for content in bad_configs(rng, 260):
        path.write_bytes(content)
        try:  # as the CLI call below reads it: a mutation of output_dir is mended by its override
            load_config(path, [f"output_dir={tmp_path / 'out'}"])
        except ConfigError:
            pass
        else:
            accepted += 1  # a mutation that happened to be valid (or a flip in a comment): nothing to check
            continue
        refused += 1
        # The CLI meets the same refusal first: one line, exit 2, nothing written.
        assert main(["run", str(path), f"output_dir={tmp_path / 'out'}"]) == 2, content[:200]
        err = capsys.readouterr().err.strip()
        assert err.startswith("distilrl: error: ") and "\n" not in err and "Traceback" not in err, err
    assert refused >= 200, (refused, accepted)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def servers():
    reward = make_reward_server(lambda p, r: [float(len(x)) for x in r], count_tokens=lambda p, r: len(p) + len(r),
                                max_tokens=200, max_batch=16)
    tokenizer = build_tokenizer("char")
    tiny = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    policy = make_server((build_student(tiny, tokenizer, 0), tokenizer), port=0)
    for server in (reward, policy):
        server.start()
    yield {"reward": reward, "policy": policy}
    for server in (reward, policy):
        server.close()


def junk(rng: random.Random, depth: int = 0):
    """A random JSON value: any type, odd numbers, nesting now and then very deep."""
    choice = rng.randrange(10)
    if choice == 0 and depth < 3:
        return [junk(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if choice == 1 and depth < 3:
        return {rng.choice(["prompts", "responses", "query", "messages", "seed", "n", "x"]): junk(rng, depth + 1)
                for _ in range(rng.randint(0, 3))}
    return rng.choice([None, True, -1, 0, 2**80, -(2**80), 1.5, 1e308, "", "p", "x" * 500, [], {},
                       [{"role": "user", "content": 5}], {"role": "user"}, ["a"] * 20])


def bad_bodies(rng: random.Random, kind: str) -> bytes:
    good = ({"prompts": ["p"], "responses": ["r"]} if kind == "reward" else
            {"messages": [{"role": "user", "content": "1+1="}], "max_tokens": 4})
    shape = rng.randrange(6)
    if shape == 0:  # one field replaced by junk
        body = dict(good)
        body[rng.choice(list(good) + ["seed", "n", "temperature", "max_tokens"])] = junk(rng)
        return json.dumps(body).encode()
    if shape == 1:  # junk as the whole body
        return json.dumps(junk(rng)).encode()
    if shape == 2:  # deep nesting
        depth = rng.choice([100, 5000, 200_000])
        return b"[" * depth + b"]" * depth
    if shape == 3:  # cut short
        raw = json.dumps(good).encode()
        return raw[: rng.randrange(len(raw))]
    if shape == 4:  # not text
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 300)))
    return json.dumps({**good, rng.choice(["seed", "n", "max_tokens", "temperature"]):  # out of range numbers
                       rng.choice([2**80, -(2**80), 2**64, -1, 1e308 * 10, float("nan"), 10**4000])}).encode()


def send(server, method: str, path: str, body: bytes, headers: dict) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders(body)
        answer = conn.getresponse()
        return answer.status, json.loads(answer.read() or b"{}")
    finally:
        conn.close()


def test_generated_bad_requests_get_4xx_never_500(servers, caplog):
    rng = random.Random(25)
    statuses = []
    for i in range(240):
        kind = "reward" if i % 2 else "policy"
        server = servers[kind]
        path = "/score" if kind == "reward" else "/v1/chat/completions"
        body = bad_bodies(rng, kind)
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
        method = "POST"
        twist = rng.randrange(12)
        if twist == 0:
            headers["Content-Length"] = rng.choice(["-1", "abc", "1e9", str(2**70)])
        elif twist == 1:
            path = rng.choice(["/", "/nope", "/score/../x", "/v1/models?" + "a" * 3000])
        elif twist == 2:
            method = rng.choice(["PUT", "DELETE", "GET"])
        try:
            status, answer = send(server, method, path, body, headers)
        except (ConnectionError, http.client.HTTPException, socket.timeout):
            status, answer = None, {}  # a refused Content-Length may close the connection before the answer
        assert status is None or status < 500, (kind, body[:200], headers, answer)
        if status is not None and status >= 400:
            assert "error" in answer
        statuses.append(status)
    assert sum(s is not None and 400 <= s < 500 for s in statuses) >= 100
    assert not [r for r in caplog.records if r.exc_info]  # no traceback logged by either server
    # Both servers still answer a good request.
    good = b'{"prompts": ["p"], "responses": ["ab"]}'
    answer = send(servers["reward"], "POST", "/score", good, {"Content-Length": str(len(good))})
    assert answer == (200, {"rewards": [2.0]})
    good = b'{"messages": [{"role": "user", "content": "1+1="}], "max_tokens": 2}'
    answer = send(servers["policy"], "POST", "/v1/chat/completions", good, {"Content-Length": str(len(good))})
    assert answer[0] == 200


def long_text(rng: random.Random, size: int) -> str:
    """A long text of one of the shapes that tokenize worst: words, one unbroken run, digits, or mixed scripts."""
    shape = rng.randrange(4)
    if shape == 0:
        return " ".join(rng.choice(["the", "carry", "7+5=12;", "\u4e2d\u6587", "x" * 30]) for _ in range(size // 5))[:size]
    if shape == 1:
        return "a" * size
    if shape == 2:
        return "".join(rng.choice("0123456789") for _ in range(size))
    return "".join(rng.choice(["\u00e9", "\u0416", "\U0001F600", " ", "\n", "b"]) for _ in range(size))


def test_generated_long_context_texts_are_refused_after_bounded_tokenizing(servers):
    """Texts up to the body limit against a 200-token limit: each refused with 400 naming the limit, having had at
    most a few limits' worth of characters tokenized (not the whole text), and the servers still answer."""
    counted: list[int] = []

    def count_tokens(prompt: str, response: str) -> int:
        counted.append(len(prompt) + len(response))
        return len(prompt) + len(response)

    rng = random.Random(37)
    with make_reward_server(lambda p, r: [0.0] * len(r), count_tokens=count_tokens, max_tokens=200,
                            chars_per_token=64) as reward:
        reward.start()
        for _ in range(12):
            text = long_text(rng, rng.choice([1_700, 10_000, 300_000, 900_000]))
            body = json.dumps({"prompts": ["p"], "responses": [text]}).encode()
            if len(body) > reward.max_request_bytes:
                continue
            status, answer = send(reward, "POST", "/score", body, {"Content-Length": str(len(body))})
            assert status == 400 and "200" in answer["error"], answer
        policy_body = json.dumps({"messages": [{"role": "user", "content": long_text(rng, 600_000)}]}).encode()
        status, answer = send(servers["policy"], "POST", "/v1/chat/completions", policy_body,
                              {"Content-Length": str(len(policy_body))})
        assert status == 400, answer
    assert counted and max(counted) <= 2 * 200 * 4 + 256  # prefixes of about twice a limit's worth, never the text
    good = b'{"prompts": ["p"], "responses": ["ab"]}'
    assert send(servers["reward"], "POST", "/score", good, {"Content-Length": str(len(good))})[0] == 200


# ------------------------------------------------------------------------------------------- model directories


class _Payload:
    """A pickle that touches the marker file when it is unpickled (what a hostile pytorch_model.bin does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _link_out(directory: Path, rng: random.Random, outside: Path) -> None:
    name = rng.choice(["model.safetensors", "config.json", "tokenizer.json"])
    target = outside / f"{rng.randrange(10**6)}-{name}"
    if (directory / name).exists():
        (directory / name).replace(target)
    else:
        target.write_text("{}")
    (directory / name).symlink_to(target)


def _bad_index(directory: Path, rng: random.Random, outside: Path) -> None:
    (directory / "model.safetensors").unlink(missing_ok=True)
    shard = rng.choice(["../model.safetensors", str(outside / "x.safetensors"), "pytorch_model.bin",
                        "missing.safetensors"])
    index = rng.choice([{"weight_map": {"model.norm.weight": shard}}, {"weight_map": [shard]}, [1, 2], "x"])
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def _mutations(marker: Path):
    """Each makes a model directory one that only a safetensors-only loader can refuse (or any loader, when
    damaged); several may apply to one directory."""
    from safetensors.torch import save_file
    import torch

    def pickle_file(d, rng, outside):
        name = rng.choice(["pytorch_model.bin", "model.pt", "weights.pth", "adapter_model.bin", "x.ckpt", "w.pkl"])
        torch.save({"w": _Payload(marker)}, d / name)

    def decoy_only(d, rng, outside):
        if (d / "model.safetensors").exists():
            (d / "model.safetensors").rename(d / rng.choice(["decoy.safetensors", "model-00001-of-00002.safetensors"]))

    def damaged(d, rng, outside):
        data = (d / "model.safetensors").read_bytes() if (d / "model.safetensors").is_file() else b"\x00" * 64
        cut = data[:rng.randrange(1, 64)] if rng.random() < 0.5 else bytes(rng.randrange(256) for _ in range(64))
        (d / "model.safetensors").unlink(missing_ok=True)
        (d / "model.safetensors").write_bytes(cut)

    def wrong_tensors(d, rng, outside):
        (d / "model.safetensors").unlink(missing_ok=True)
        save_file({"decoy": torch.zeros(rng.randint(1, 4))}, d / "model.safetensors")

    return [pickle_file, decoy_only, damaged, wrong_tensors, _link_out, _bad_index]


def test_generated_model_directories_are_refused_in_one_line_and_never_unpickled(tmp_path, capsys):
    import shutil

    from reward.model.distilled import DistilledRewardModel
    from rlhf.core.models.build import ModelLoadError, save_student

    tokenizer = build_tokenizer("char")
    tiny = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    good = {"lm": tmp_path / "lm", "rm": tmp_path / "rm"}
    save_student(build_student(tiny, tokenizer, 0), tokenizer, good["lm"])
    save_student(DistilledRewardModel.from_causal_lm(good["lm"], tokenizer.pad_token_id), tokenizer, good["rm"])
    marker, outside = tmp_path / "ran", tmp_path / "outside"
    outside.mkdir()
    capsys.readouterr()
    mutations, rng = _mutations(marker), random.Random(37)
    for i in range(24):
        kind = "lm" if i % 2 else "rm"
        directory = tmp_path / f"case{i}"
        shutil.copytree(good[kind], directory)
        for mutate in rng.sample(mutations, rng.randint(1, 3)):
            mutate(directory, rng, outside)
        if kind == "lm":  # through the CLI: one line, exit 2, nothing written
            assert main(["import-model", str(directory), str(tmp_path / f"out{i}")]) == 2, i
            err = capsys.readouterr().err.strip()  # after any of Hugging Face's progress bars: one line
            assert err.splitlines()[-1].startswith("distilrl: error: ") and "Traceback" not in err, err
            assert not (tmp_path / f"out{i}").exists()
        else:
            with pytest.raises(ModelLoadError) as refused:
                DistilledRewardModel.from_pretrained(directory)
            assert "\n" not in str(refused.value), i
    assert not marker.exists()
