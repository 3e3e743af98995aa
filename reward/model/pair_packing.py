"""Preference pairs packed so that the tokens chosen and rejected share are computed once.

A pair's two sequences start alike: always the prompt, often the start of the response too (two rollouts that
branch late, or a worked answer and the same working with a wrong result). The reward model is causal, so a
token's hidden state depends only on the tokens before it: the shared prefix has the same hidden states in both
sequences. One packed row holds ``prefix + chosen suffix + rejected suffix``; a 4D attention mask lets each suffix
see the prefix and itself but not the other suffix, and position ids restart the rejected suffix where the prefix
ends. Read at the last token of each suffix, the heads give what two separate forwards would, for
``prefix + C + R`` tokens per pair instead of ``2 x (prefix + max(C, R))``.

The mask is dense (B, 1, L, L), so attention itself is not cheaper, and kernels that take no custom mask
(flash-attention) cannot run it: ``worth_packing`` says whether a batch gains enough to pay for that.
"""
from __future__ import annotations

import torch

# Pack when it removes at least this share of the tokens the plain (2B rows, padded) forward would compute: the bar
# of the policy's row packing, first measured on pairs (benchmarks/README.md).
from rlhf.core.data.packing import MIN_TOKEN_SAVING


def shared_prefix_length(a: list[int], b: list[int]) -> int:
    """Tokens the two sequences share from the start, leaving each at least one token of its own (the token its
    score is read at), so identical sequences share all but the last."""
    limit = min(len(a), len(b)) - 1
    shared = 0
    while shared < limit and a[shared] == b[shared]:
        shared += 1
    return shared


def packed_widths(chosen: list[list[int]], rejected: list[list[int]]) -> tuple[int, int]:
    """(tokens in the packed batch, tokens in the plain batch): rows padded to the longest in each layout."""
    packed = max(len(c) + len(r) - shared_prefix_length(c, r) for c, r in zip(chosen, rejected))
    plain = max(len(s) for s in chosen + rejected)
    return len(chosen) * packed, 2 * len(chosen) * plain


def worth_packing(chosen: list[list[int]], rejected: list[list[int]]) -> bool:
    packed, plain = packed_widths(chosen, rejected)
    return packed <= (1.0 - MIN_TOKEN_SAVING) * plain


def pack_pairs(chosen: list[list[int]], rejected: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Packed rows for the pairs (token id lists without padding).

    Returns input_ids (B, L) long; attention_mask (B, 1, L, L) bool, True where a query may attend to a key;
    position_ids (B, L) long; read_index (2B, 2) long, (row, position) of the last token of each chosen suffix
    then of each rejected suffix. Padding tokens attend only to themselves: a query row with nothing to attend to
    would give NaN, and NaN reaches the gradients even where the loss ignores it.
    """
    if len(chosen) != len(rejected) or not chosen:
        raise ValueError(f"pack_pairs needs the same, non-zero number of chosen and rejected rows "
                         f"(got {len(chosen)} and {len(rejected)})")
    rows = len(chosen)
    prefixes = [shared_prefix_length(c, r) for c, r in zip(chosen, rejected)]
    width = max(len(c) + len(r) - p for c, r, p in zip(chosen, rejected, prefixes))
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((rows, width), dtype=torch.long)
    # segment: 0 prefix, 1 chosen suffix, 2 rejected suffix, -1 padding.
    segment = torch.full((rows, width), -1, dtype=torch.long)
    read_index = torch.zeros((2 * rows, 2), dtype=torch.long)
    for i, (c, r, p) in enumerate(zip(chosen, rejected, prefixes)):
        tokens = c + r[p:]
        input_ids[i, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        position_ids[i, :len(c)] = torch.arange(len(c))
        position_ids[i, len(c):len(tokens)] = torch.arange(p, len(r))
        segment[i, :p], segment[i, p:len(c)], segment[i, len(c):len(tokens)] = 0, 1, 2
        read_index[i] = torch.tensor([i, len(c) - 1])
        read_index[rows + i] = torch.tensor([i, len(tokens) - 1])
    query, key = segment.unsqueeze(2), segment.unsqueeze(1)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    # A key is visible to a query in the same segment or in the prefix; padding sees only itself.
    visible = ((query == key) | (key == 0)) & (query >= 0) & (key >= 0) & causal
    visible |= torch.eye(width, dtype=torch.bool) & (query < 0)
    return {"input_ids": input_ids, "attention_mask": visible.unsqueeze(1), "position_ids": position_ids,
            "read_index": read_index}
