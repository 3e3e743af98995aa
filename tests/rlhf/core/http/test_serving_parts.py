"""The servers' pure parts against hand-computed answers: the queue's order and batching, the bounded token count,
top-k/top-p truncation, stop strings and per-token pieces, and the OpenAI request reader's refusals."""
from __future__ import annotations

import math

import pytest
import torch

from rlhf.core.http.json_handler import HttpError
from rlhf.core.http.limits import max_chars_per_token, tokens_within
from rlhf.core.http.queue import _Job, next_batch
from rlhf.core.data.samples import Sample
from rlhf.core.models.build import build_tokenizer
from rlhf.serve.openai_reply import finish
from rlhf.serve.openai_request import parse_request
from rollout.engine import truncate


def job(cost: int, arrived: float, key="k", items: int = 1) -> _Job:
    return _Job(payload=(cost, arrived), cost=cost, items=items, batch_key=key, arrived=arrived)


def test_the_smallest_size_class_goes_first_in_arrival_order_within_it():
    heavy1, heavy2, light1, light2 = job(4000, 0.0), job(3000, 1.0), job(20, 2.0), job(25, 3.0)
    batch = next_batch([heavy1, heavy2, light1, light2], now=4.0, age_limit_s=10.0, max_items=8, max_cost=1000)
    assert batch == [light1, light2]  # 20 and 25 tokens: one class (5 bits); the heavies wait


def test_a_request_that_waited_the_age_limit_goes_first_whatever_its_size():
    heavy, light = job(4000, 0.0), job(20, 2.0)
    assert next_batch([heavy, light], now=5.0, age_limit_s=5.0, max_items=8, max_cost=1000) == [heavy]
    assert next_batch([heavy, light], now=4.9, age_limit_s=5.0, max_items=8, max_cost=1000) == [light]
    assert next_batch([heavy, light], now=5.0, age_limit_s=5.0, max_items=8, max_cost=5000) == [heavy, light]


def test_batches_share_key_and_stop_at_max_items_or_cost():
    a, b, c, d = job(20, 0.0, items=3), job(20, 1.0, key="other"), job(21, 2.0, items=3), job(22, 3.0, items=3)
    assert next_batch([a, b, c, d], now=4.0, age_limit_s=10.0, max_items=6, max_cost=1000) == [a, c]
    assert next_batch([a, b, c, d], now=4.0, age_limit_s=10.0, max_items=9, max_cost=1000) == [a, c, d]
    assert next_batch([a, b, c, d], now=4.0, age_limit_s=10.0, max_items=9, max_cost=41) == [a, c]  # 20 + 21
    heavies = [job(3000, 0.0), job(3000, 1.0)]  # alike, but together over the cost budget: one at a time
    assert next_batch(heavies, now=2.0, age_limit_s=10.0, max_items=9, max_cost=1000) == heavies[:1]
    unbatchable = job(20, 0.0, key=None)
    assert next_batch([unbatchable, c], now=1.0, age_limit_s=10.0, max_items=6, max_cost=1000) == [unbatchable]


def test_tokens_within_counts_a_short_text_exactly():
    assert tokens_within(len, "x" * 99, limit=100, chars_per_token=8) == 99
    assert tokens_within(len, "x" * 101, limit=100, chars_per_token=8) == 101  # counted whole: 101 <= 4 * 100


def test_tokens_within_refuses_long_texts_after_a_bounded_prefix():
    seen = []

    def count(text: str) -> int:
        seen.append(len(text))
        return len(text.split())  # one token per word

    text = "word " * 200_000  # 1 MB, 200k tokens
    assert tokens_within(count, text, limit=100, chars_per_token=1_000_000) is None
    assert seen == [399, 799]  # prefixes of 400 and 800 characters (cut back to a space): 80, then 160 words
    assert tokens_within(count, "w " * 20 + "x" * 5000, limit=100, chars_per_token=10) is None  # 5040 > 1000
    assert len(seen) == 2  # refused from its length, untokenized


def test_max_chars_per_token_is_the_longest_vocabulary_entry():
    tokenizer = build_tokenizer("char")
    assert max_chars_per_token(tokenizer) == max(len(t) for t in tokenizer.get_vocab())


def test_truncate_keeps_top_k_and_the_top_p_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    top2 = torch.softmax(truncate(logits, 2, 1.0), -1)[0]
    assert top2.tolist() == pytest.approx([0.625, 0.375, 0.0, 0.0])
    # top_p 0.6: 0.5 alone is under 0.6, 0.5 + 0.3 reaches it: the first two stay.
    nucleus = torch.softmax(truncate(logits, 0, 0.6), -1)[0]
    assert nucleus.tolist() == pytest.approx([0.625, 0.375, 0.0, 0.0])
    # top_p 0.9: 0.5 + 0.3 = 0.8 is under, + 0.15 reaches it: three stay, renormalised over 0.95.
    nucleus = torch.softmax(truncate(logits, 0, 0.9), -1)[0]
    assert nucleus.tolist() == pytest.approx([0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0])
    assert torch.equal(truncate(logits, 0, 1.0), logits)  # off: unchanged
    assert truncate(logits, 1, 1.0)[0].isinf().tolist() == [False, True, True, True]


def test_finish_cuts_at_the_first_stop_string_and_keeps_the_token_that_completed_it():
    tokenizer = build_tokenizer("char")
    ids = tokenizer("ab;cd;e", add_special_tokens=False).input_ids
    sample = Sample(0, [1], ids, [-0.1 * (i + 1) for i in range(len(ids))], "length", "ab;cd;e")
    choice = finish(tokenizer, sample, ["d;", ";c"])
    assert (choice.text, choice.finish_reason) == ("ab", "stop")  # ";c" starts at 2, before "d;" at 4
    assert len(choice.token_ids) == 4 and choice.logprobs == pytest.approx([-0.1, -0.2, -0.3, -0.4])
    assert "".join(choice.pieces) == "ab" and choice.pieces[:2] == ["a", "b"]
    unstopped = finish(tokenizer, sample, ["zz"])
    assert (unstopped.text, unstopped.finish_reason, unstopped.pieces) == ("ab;cd;e", "length", list("ab;cd;e"))


@pytest.mark.parametrize("kind,body,param", [
    ("chat", {"messages": [{"role": "user", "content": "x"}], "frequency_penalty": 0.5}, "frequency_penalty"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "logit_bias": {"5": 1}}, "logit_bias"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "whatever": 1}, "whatever"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
    ("text", {"prompt": "x", "echo": True}, "echo"),
    ("text", {"prompt": "x", "best_of": 3}, "best_of"),
    ("text", {"prompt": [1, 2, 3]}, "prompt"),
    ("text", {"prompt": "x", "logprobs": 6}, "logprobs"),
])
def test_unsupported_parameters_are_refused_by_name(kind, body, param):
    with pytest.raises(HttpError) as refused:
        parse_request(kind, body)
    assert refused.value.status == 400 and refused.value.param == param and param in refused.value.message


def test_neutral_values_are_accepted_and_the_rest_read():
    request = parse_request("chat", {"messages": [{"role": "user", "content": "x"}], "frequency_penalty": 0,
                                     "presence_penalty": 0.0, "logit_bias": {}, "response_format": {"type": "text"},
                                     "user": "me", "top_k": -1, "top_p": 0.9, "stop": "##", "logprobs": True,
                                     "top_logprobs": 3, "stream": True, "stream_options": {"include_usage": True}})
    assert (request.top_k, request.top_p, request.stop, request.top_logprobs) == (0, 0.9, ["##"], 3)
    assert request.stream and request.include_usage and request.logprobs
    text = parse_request("text", {"prompt": ["a", "b"], "logprobs": 2, "n": 2, "best_of": 2})
    assert (text.prompts, text.logprobs, text.top_logprobs, text.n) == (["a", "b"], True, 2, 2)
    assert not math.isnan(text.temperature)
