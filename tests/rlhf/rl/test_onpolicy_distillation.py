"""On-policy distillation: the teacher worker's log-probs, the per-token teacher_kl reward, the vocabulary check
and the config's refusals."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from reward.teachers.logprobs import TeacherLogprobWorker, check_same_vocabulary
from rlhf.core.algorithms.advantages import grpo_advantages
from rlhf.core.algorithms.tokens import token_logprobs
from rlhf.core.models.char_tokenizer import build_char_tokenizer
from rlhf.core.config.run_config import ConfigError, ModelConfig, load_config
from rlhf.core.models.build import ModelLoadError, build_student, build_tokenizer, save_student
from tests.loop_stubs import stub_loop


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    tokenizer = build_tokenizer("char")
    model = build_student(ModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                                      intermediate_size=64), tokenizer, seed=3)
    path = tmp_path_factory.mktemp("teacher")
    save_student(model, tokenizer, str(path))
    return str(path)


def test_teacher_logprobs_equal_a_plain_forward_row_by_row(teacher_dir):
    """Rows of 9, 4 and 6 tokens, packed in micro-batches of 2: each row's log-probs are those of its own forward."""
    tokenizer = build_tokenizer("char")
    texts = ["7+5-3=#9;", "2+2=", "9-1=#8"]
    ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    width = max(map(len, ids))
    batch = {"input_ids": torch.tensor([r + [0] * (width - len(r)) for r in ids]),
             "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids])}
    worker = TeacherLogprobWorker(teacher_dir, threads=1, micro_batch_size=2, temperature=0.7)
    got = worker.logprobs(batch)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, use_safetensors=True).eval()
    for i, row in enumerate(ids):
        with torch.no_grad():
            logits = model(torch.tensor([row])).logits / 0.7
        want = token_logprobs(logits, torch.tensor([row]))[0]
        torch.testing.assert_close(got[i, :len(row)], want, atol=1e-5, rtol=1e-5)
        assert (got[i, len(row):] == 0).all() and got[i, 0] == 0


class StubTeacher:
    """log p_teacher = -1.5 on the first prompt's rows and -0.5 on the second's (the sampler's are -0.5 on every
    token): a reverse KL of 1.0 per token on the first prompt's samples, 0 on the second's."""

    def logprobs(self, batch):
        out = torch.full(batch.input_ids.shape, -0.5)
        out[:2] = -1.5
        return out


def _distillation_step(overrides: list[str], rewards: list[float]):
    cfg = load_config(None, ["rollout.prompts_per_step=2", "rollout.samples_per_prompt=2", "trainer.num_ranks=2",
                             "rollout.max_new_tokens=4", "reward.teacher_model_path=t", *overrides])
    loop = stub_loop(cfg, rewards, [2, 1, 3, 2])
    loop.update.teacher = StubTeacher()
    rows = [SimpleNamespace(prompt="p0", answer="1", difficulty=1), SimpleNamespace(prompt="p1", answer="1",
                                                                                     difficulty=2)]
    metrics = loop.step(1, rows)
    (batch,) = loop.update.policy.batches
    return batch.advantages, metrics


def test_teacher_kl_advantage_is_each_tokens_centred_log_ratio_to_the_teacher():
    advantages, metrics = _distillation_step(["algorithm.advantage=on_policy_distillation",
                                              "reward.components={teacher_kl: 0.5}"], [0.0] * 4)
    # Log-ratios -1 on the 3 response tokens of rows 0-1, 0 on the 5 of rows 2-3: mean -3/8. Each token gets
    # 0.5 * (its log-ratio + 3/8), its own and no later token's (discount 0); 0 on the prompt and padding.
    a, b = 0.5 * (-1 + 3 / 8), 0.5 * (3 / 8)
    assert advantages[:, 1:].tolist() == [[a, a, 0.0], [a, 0.0, 0.0], [b, b, b], [b, b, 0.0]]
    assert (advantages[:, 0] == 0).all()
    assert metrics["distill/reverse_kl"] == pytest.approx(3 / 8)
    assert metrics["difficulty/1/reverse_kl"] == pytest.approx(1.0)
    assert metrics["difficulty/2/reverse_kl"] == pytest.approx(0.0)


def test_the_distillation_term_is_taken_from_the_trainers_log_probs_not_the_samplers():
    """The trainer's log-probs -0.7 where the sampler said -0.5: log-ratios 0.8 on rows 0-1 (3 tokens) and -0.2 on
    rows 2-3 (5 tokens), mean 0.175 (from the sampler's: 0.375)."""
    cfg = load_config(None, ["rollout.prompts_per_step=2", "rollout.samples_per_prompt=2", "trainer.num_ranks=2",
                             "rollout.max_new_tokens=4", "reward.teacher_model_path=t",
                             "algorithm.advantage=on_policy_distillation", "reward.components={teacher_kl: 0.5}"])
    loop = stub_loop(cfg, [0.0] * 4, [2, 1, 3, 2])
    loop.update.teacher = StubTeacher()
    loop.update.policy.policy_logprobs = lambda batch: torch.full(batch.input_ids.shape, -0.7)
    rows = [SimpleNamespace(prompt="p0", answer="1", difficulty=1), SimpleNamespace(prompt="p1", answer="1",
                                                                                     difficulty=2)]
    metrics = loop.step(1, rows)
    assert metrics["distill/reverse_kl"] == pytest.approx(0.175)
    assert metrics["difficulty/1/reverse_kl"] == pytest.approx(0.8)
    (batch,) = loop.update.policy.batches
    a = -0.5 * (0.8 - 0.175)  # the advantage falls with the log-ratio above its mean
    assert batch.advantages[0, 1:].tolist() == pytest.approx([a, a, 0.0])


def test_teacher_kl_adds_to_the_estimators_own_advantages():
    """GRPO over the verifier's rewards plus the distillation term: the sum of the two, token by token."""
    advantages, _ = _distillation_step(["algorithm.advantage=grpo", "reward.components={verifier: 1.0, teacher_kl: 0.5}"],
                                       [1.0, 0.0, 0.0, 0.0])
    grpo = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 2)
    a, b = 0.5 * (-1 + 3 / 8), 0.5 * (3 / 8)
    want = [[grpo[0] + a, grpo[0] + a, 0.0], [grpo[1] + a, 0.0, 0.0], [b, b, b], [b, b, 0.0]]
    torch.testing.assert_close(advantages[:, 1:], torch.tensor(want))


def test_a_teacher_with_another_vocabulary_is_refused_in_one_line(teacher_dir):
    other = build_char_tokenizer("0123456789+-=#;")
    with pytest.raises(ModelLoadError, match="the teacher's vocabulary .* is not the student's") as err:
        check_same_vocabulary(other, teacher_dir)
    assert "\n" not in str(err.value)
    check_same_vocabulary(build_tokenizer("char"), teacher_dir)  # the same tokenizer passes


@pytest.mark.parametrize("overrides, message", [
    (["reward.components={teacher_kl: 1.0}"], "set reward.teacher_model_path"),
    (["reward.components={teacher_kl: 1.0, verifier: 1.0}", "reward.teacher_model_path=t",
      "algorithm.advantage=on_policy_distillation"], "learns from reward.components.teacher_kl alone"),
    (["reward.components={teacher_kl: 1.0}", "reward.teacher_model_path=t", "algorithm.advantage=grpo",
      "algorithm.dynamic_sampling=true"], "teacher_kl gives every token a reward"),
])
def test_teacher_kl_settings_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


class _CompletionsServer:
    """A real OpenAI-compatible completions endpoint on 127.0.0.1 that echoes prompt log-probs from the teacher
    (as vLLM does with echo and logprobs); a prompt starting with token 99 gets a 500. Counts requests."""

    def __init__(self, teacher_dir: str):
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        model = AutoModelForCausalLM.from_pretrained(teacher_dir, use_safetensors=True).eval()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                server.requests.append(self.path)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                ids = body["prompt"]
                if self.path != "/v1/completions" or ids[0] == 99:
                    self.send_response(500)
                    self.end_headers()
                    return
                with torch.no_grad():
                    logp = token_logprobs(model(torch.tensor([ids])).logits, torch.tensor([ids]))[0]
                reply = {"choices": [{"logprobs": {"token_logprobs": [None] + logp[1:].tolist() + [-0.1]}}]}
                raw = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self.requests: list[str] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def test_remote_teacher_log_probs_match_the_local_teacher_with_cache_and_failures_counted(teacher_dir, tmp_path):
    from reward.teachers.logprobs import RemoteTeacherLogprobs

    server = _CompletionsServer(teacher_dir)
    try:
        ids = [[4, 5, 6, 7, 8], [9, 10, 11, 0, 0], [99, 5, 6, 0, 0]]
        batch = {"input_ids": torch.tensor(ids),
                 "attention_mask": torch.tensor([[1] * 5, [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]])}
        remote = RemoteTeacherLogprobs(server.url, "teacher", cache_dir=tmp_path / "cache", max_retries=0)
        got = remote.logprobs(batch)
        local = TeacherLogprobWorker(teacher_dir, threads=1, micro_batch_size=4, temperature=1.0).logprobs(
            {k: v[:2] for k, v in batch.items()})
        torch.testing.assert_close(got[:2], local, atol=1e-5, rtol=1e-5)
        assert got[2].isnan().all() and remote.stats["failed_rows"] == 1  # the 500: counted, not fatal
        assert set(server.requests) == {"/v1/completions"} and len(server.requests) == 3
        again = remote.logprobs({k: v[:2] for k, v in batch.items()})  # both rows from the on-disk cache
        torch.testing.assert_close(again, got[:2])
        assert len(server.requests) == 3 and remote.stats["cache_hits"] == 2
    finally:
        server.httpd.shutdown()
