"""Packed preference pairs (reward.model.pair_packing): the layout by hand, and the reward model reading packed rows
exactly as it reads the two sequences apart (scores and gradients), with sdpa and eager attention."""
from __future__ import annotations

import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

from reward.model.distilled import DistilledLlamaRewardModel, DistilledRewardModel, pad_right  # noqa: E402
from reward.model.pair_packing import pack_pairs, packed_widths, shared_prefix_length, worth_packing  # noqa: E402


def test_shared_prefix_leaves_each_side_its_last_token():
    assert shared_prefix_length([1, 2, 3, 4], [1, 2, 5]) == 2
    assert shared_prefix_length([7, 8], [9, 8]) == 0
    assert shared_prefix_length([1, 2, 3], [1, 2, 3]) == 2       # identical: all but the last token
    assert shared_prefix_length([1, 2], [1, 2, 3, 4]) == 1       # one a prefix of the other
    assert shared_prefix_length([5], [5]) == 0


def test_pack_pairs_layout_by_hand():
    # Pair 0 shares [1, 2]; pair 1 shares nothing. Pad id 0.
    packed = pack_pairs([[1, 2, 3, 4], [6]], [[1, 2, 5], [7, 8]], pad_id=0)
    assert packed["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 0, 0]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 2], [0, 0, 1, 0, 0]]
    # Chosen read at their last token, then rejected.
    assert packed["read_index"].tolist() == [[0, 3], [1, 0], [0, 4], [1, 2]]
    mask = packed["attention_mask"]
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.bool
    t, f = True, False
    assert mask[0, 0].tolist() == [[t, f, f, f, f],
                                   [t, t, f, f, f],
                                   [t, t, t, f, f],   # chosen suffix: prefix and itself
                                   [t, t, t, t, f],
                                   [t, t, f, f, t]]   # rejected suffix: prefix and itself, not the chosen suffix
    assert mask[1, 0].tolist() == [[t, f, f, f, f],
                                   [f, t, f, f, f],   # no shared prefix: the rejected side sees only itself
                                   [f, t, t, f, f],
                                   [f, f, f, t, f],   # padding sees only itself (never an empty row: NaN)
                                   [f, f, f, f, t]]
    with pytest.raises(ValueError, match="same, non-zero number"):
        pack_pairs([[1]], [], pad_id=0)


def test_worth_packing_counts_tokens_in_both_layouts():
    long_shared = ([list(range(10)) + [11]], [list(range(10)) + [12]])
    assert packed_widths(*long_shared) == (12, 22) and worth_packing(*long_shared)
    nothing_shared = ([[1, 2, 3]], [[4, 5, 6]])
    assert packed_widths(*nothing_shared) == (6, 6) and not worth_packing(*nothing_shared)


def _tiny_rm(attn: str, backbone: str = "qwen2") -> DistilledRewardModel:
    config_class, model_class = {"qwen2": (transformers.Qwen2Config, DistilledRewardModel),
                                 "llama": (transformers.LlamaConfig, DistilledLlamaRewardModel)}[backbone]
    config = config_class(vocab_size=20, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                          pad_token_id=0, num_labels=1, attn_implementation=attn)
    torch.manual_seed(0)
    model = model_class(config)
    model.init_heads(seed=1)
    with torch.no_grad():  # heads start small; make them matter
        for head in (model.score, model.rv_head, model.cd_head):
            head.weight.mul_(20)
    return model


def _pairs(seed: int, count: int) -> tuple[list[list[int]], list[list[int]]]:
    """Pairs sharing prefixes of 0 to 8 tokens, suffixes of 1 to 6, one identical pair."""
    rng = random.Random(seed)
    tokens = lambda n: [rng.randint(1, 19) for _ in range(n)]  # noqa: E731
    chosen, rejected = [], []
    for _ in range(count):
        prefix = tokens(rng.randint(0, 8))
        chosen.append(prefix + tokens(rng.randint(1, 6)))
        rejected.append(prefix + tokens(rng.randint(1, 6)))
    chosen.append([3, 4, 5])
    rejected.append([3, 4, 5])
    return chosen, rejected


@pytest.mark.parametrize("attn, backbone", [("sdpa", "qwen2"), ("eager", "qwen2"), ("sdpa", "llama")])
def test_packed_rows_score_and_backpropagate_like_separate_rows(attn, backbone):
    model = _tiny_rm(attn, backbone)
    chosen, rejected = _pairs(seed=0, count=7)

    def loss_and_grads(out):
        loss = (out.quality.square().sum() + out.rv.sum() + out.cd_logits.logsumexp(-1).sum())
        model.zero_grad()
        loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    input_ids, mask = pad_right(chosen + rejected, pad_id=0)
    plain = model(input_ids=input_ids, attention_mask=mask)
    plain_grads = loss_and_grads(plain)
    packed = model(**pack_pairs(chosen, rejected, pad_id=0))
    packed_grads = loss_and_grads(packed)

    for name in ("quality", "rv", "cd", "rv_logits", "cd_logits"):
        torch.testing.assert_close(getattr(packed, name), getattr(plain, name), rtol=1e-5, atol=1e-5, msg=name)
    # The identical pair scores the same on both sides.
    assert packed.quality[7].item() == pytest.approx(packed.quality[15].item(), abs=1e-6)
    for name, grad in plain_grads.items():
        assert torch.isfinite(packed_grads[name]).all(), name
        # The gradients run to ~1e3 (heads scaled up): compare at float32 rounding of the largest entry.
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=2e-6 * grad.abs().max().item(),
                                   msg=name)
