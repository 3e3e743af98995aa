"""A compact character-level tokenizer for the quickstart task.

One token per character keeps the vocabulary at a few dozen entries, so a tiny Qwen2 student spends its CPU
time on the task rather than on a 151k-way softmax. It is a real ``PreTrainedTokenizerFast``: it saves with the
policy checkpoint and loads back with ``AutoTokenizer``.
"""
from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")
# Enough for arithmetic, think blocks and short English words; characters outside map to <unk>.
DEFAULT_ALPHABET = "0123456789+-*/=#;:.,?!()<> \nabcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def build_char_tokenizer(alphabet: str = DEFAULT_ALPHABET) -> PreTrainedTokenizerFast:
    """A tokenizer with ids 0-2 for <pad>, <eos>, <unk> and one id per character of ``alphabet`` after them."""
    if len(set(alphabet)) != len(alphabet):
        raise ValueError("the tokenizer alphabet repeats a character")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(alphabet)})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # [\s\S], not ".": "." does not match "\n", so "\n\n" would stay one piece and become a single <unk>.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="right"
    )
