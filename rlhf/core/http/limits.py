"""Bounding the work one request may cost before the model sees it: a text is checked against a token limit by
tokenizing growing prefixes (a few times the limit's worth of characters, doubled while under the limit), so an
over-long text costs about twice the limit's tokenizing, not its whole length (tokenizing 1 MB costs a second of
CPU and hundreds of MB); a text longer than the limit times the tokenizer's longest token is refused untokenized.
"""
from __future__ import annotations

from collections.abc import Callable

FIRST_PREFIX_CHARS_PER_TOKEN = 4  # the first prefix tried: about a limit's worth of ordinary text
FALLBACK_CHARS_PER_TOKEN = 256  # when the tokenizer has no vocabulary to look at


def max_chars_per_token(tokenizer) -> int:
    """An upper bound on the characters one token decodes to: its longest vocabulary entry (byte-level BPE
    entries spell each byte as one character, so an entry is never shorter than the text it decodes to)."""
    try:
        vocab = tokenizer.get_vocab()
    except (AttributeError, NotImplementedError):
        return FALLBACK_CHARS_PER_TOKEN
    return max((len(token) for token in vocab), default=FALLBACK_CHARS_PER_TOKEN) or 1


def _cut(text: str, size: int) -> str:
    """``text[:size]``, moved back to the last whitespace in its final 256 characters if there is one: the
    pre-tokenizers split words there, so the prefix's tokens are a prefix of the whole text's tokens and never
    more of them (a cut inside a word could tokenize into more pieces than the whole word)."""
    space = max(text.rfind(" ", size - 256, size), text.rfind("\n", size - 256, size))
    return text[:space] if space > 0 else text[:size]


def tokens_within(count: Callable[[str], int], text: str, limit: int, chars_per_token: int) -> int | None:
    """``count(text)``, or None once the text is known to be over ``limit`` from its length or a prefix's count;
    tokenizes at most about twice the characters of a ``limit``-token text before it knows."""
    if len(text) > limit * chars_per_token:
        return None
    size = limit * FIRST_PREFIX_CHARS_PER_TOKEN
    while size < len(text):
        if count(_cut(text, size)) > limit:
            return None
        size *= 2
    return count(text)
