"""Padding-free training batches: a micro-batch's rows packed end to end into fewer rows.

Rollout rows differ in length (a two-token answer beside a fifty-token working), and a right-padded batch computes
every row at the longest one's width. Packed, several rows share one: each keeps its own position ids (0, 1, ...),
and the attention of each token stays inside its row. Transformers builds that block-diagonal causal mask itself
when it is given position ids that restart and no attention mask (``masking_utils.find_packed_sequence_indices``;
flash-attention reads the same position ids as varlen boundaries), so the model's outputs at every real token are
those of the padded batch.

Packed rows are as wide as the longest original row, so attention per packed row costs no more than per padded
row; the saving is in the rows: every linear layer, the logits and the loss run over fewer tokens. Per-token
tensors (masks, advantages, log-probs) are gathered into the same layout, so a per-token loss summed over the packed
batch is the padded batch's loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf.core.data.batch import TrainBatch

# Pack when it removes at least this share of the padded batch's tokens. The reward model's pair packing
# (reward/model/pair_packing.py) shares the bar, measured there; for a smaller saving the gather and scatter back are not
# worth it.
MIN_TOKEN_SAVING = 0.15


@dataclass
class RowPacking:
    """Where each token of a (B, L) right-padded batch goes in the packed (bins, W) layout."""

    source: torch.Tensor        # (bins, W) long: flat index (row * L + column) of the token in each slot; B * L
                                # in padding slots, which read a zero appended after the flattened batch
    position_ids: torch.Tensor  # (bins, W) long: each row's own positions; 0 in every padding slot, so each
                                # padding token is a sequence of one that attends only to itself
    shape: tuple[int, int]      # (B, L) of the padded batch

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """A (B, L) tensor of the padded batch in the packed layout (zero in padding slots)."""
        if tuple(x.shape) != self.shape:
            raise ValueError(f"pack: tensor of shape {tuple(x.shape)}, the packing is for {self.shape}")
        flat = torch.cat([x.reshape(-1), x.new_zeros(1)])
        return flat[self.source.to(x.device)]

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """A (bins, W) tensor in the packed layout back in the padded (B, L) layout (zero in padding)."""
        rows, width = self.shape
        flat = packed.new_zeros(rows * width + 1)
        flat[self.source.to(packed.device).reshape(-1)] = packed.reshape(-1)
        return flat[:-1].reshape(rows, width)


def plan_packing(lengths: list[int], width: int) -> RowPacking:
    """First-fit decreasing: the longest rows first, each into the first packed row with room for it, packed
    rows ``max(lengths)`` wide. ``lengths``: each row's tokens (its attention mask's sum); ``width``: the padded
    batch's L. A row of length 0 is dropped (it has nothing to compute)."""
    if not lengths or max(lengths) > width:
        raise ValueError(f"plan_packing: row lengths {lengths[:8]}... do not fit a batch {width} wide")
    capacity = max(lengths)
    bins: list[list[int]] = []
    room: list[int] = []
    for row in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[row] == 0:
            continue
        for b, free in enumerate(room):
            if free >= lengths[row]:
                break
        else:
            b = len(bins)
            bins.append([])
            room.append(capacity)
        bins[b].append(row)
        room[b] -= lengths[row]
    padding = len(lengths) * width
    source = torch.full((len(bins), capacity), padding, dtype=torch.long)
    position_ids = torch.zeros((len(bins), capacity), dtype=torch.long)
    for b, rows in enumerate(bins):
        at = 0
        for row in rows:
            n = lengths[row]
            source[b, at:at + n] = torch.arange(row * width, row * width + n)
            position_ids[b, at:at + n] = torch.arange(n)
            at += n
    return RowPacking(source, position_ids, (len(lengths), width))


def worth_packing(lengths: list[int], packing: RowPacking) -> bool:
    """Whether the packed rows hold at least MIN_TOKEN_SAVING fewer tokens than the rows padded to the longest."""
    packed = packing.source.numel()
    if not packed:
        return False  # nothing but empty rows
    padded = len(lengths) * max(lengths)
    return packed <= (1.0 - MIN_TOKEN_SAVING) * padded


# Attention implementations tested with packed rows. Flash-attention reads packed position ids too, but no GPU here
# has run it: it trains on padded rows until one has.
PACKABLE_ATTENTION = ("sdpa", "eager")


def micro_batches(batch: dict[str, torch.Tensor] | TrainBatch, size: int, device, can_pack: bool):
    """(first row, micro-batch on ``device``, RowPacking or None) over ``batch``'s right-padded (B, L) tensors;
    each micro-batch is of ``batch``'s kind, a dict or a TrainBatch.

    Each micro-batch is cut to its longest row, then packed when ``can_pack`` and packing saves enough: a packed
    micro-batch holds every tensor in the packed layout (the attention mask too, 1 on each real token) and
    ``position_ids``, from which the model derives its attention mask. ``model_inputs`` turns either kind into the
    model's arguments, and a per-token result computed on a packed micro-batch goes back to the padded layout with
    ``packing.unpack``.
    """
    tensors = _tensors(batch)
    for first in range(0, tensors["input_ids"].shape[0], size):
        mb = {k: v[first:first + size] for k, v in tensors.items()}
        lengths = mb["attention_mask"].sum(dim=1).tolist()
        # Rows are right-padded, so columns past the longest row in this micro-batch are pure padding.
        width = max(max(lengths), 1)
        mb = {k: v[:, :width] for k, v in mb.items()}
        plan = plan_packing(lengths, width) if can_pack else None
        if plan is not None and worth_packing(lengths, plan):
            mb = {k: plan.pack(v) for k, v in mb.items()}
            mb["position_ids"] = plan.position_ids
        else:
            plan = None
        mb = {k: v.to(device) for k, v in mb.items()}
        yield first, mb if isinstance(batch, dict) else TrainBatch(**mb), plan


def per_token(batch: dict[str, torch.Tensor], size: int, device, can_pack: bool, compute) -> torch.Tensor:
    """``compute(micro-batch)``, a per-token (rows, L) result, over ``batch``'s rows (input_ids, attention_mask) in
    micro-batches of ``size`` rows, packed where that pays: back in the batch's padded layout, (B, L) on the CPU, 0
    at padding. The forward every per-token figure shares (log-probs, values, a teacher's log-probs)."""
    out = torch.zeros(batch["input_ids"].shape)
    # A response mask travels along, for a compute that reads only the response (rlhf/core/models/response_head.py).
    keys = [k for k in ("input_ids", "attention_mask", "response_mask") if k in batch]
    for first, mb, plan in micro_batches({k: batch[k] for k in keys}, size, device, can_pack):
        values = compute(mb).float()
        values = plan.unpack(values) if plan is not None else values * mb["attention_mask"]
        out[first:first + values.shape[0], :values.shape[1]] = values.cpu()
    return out


def model_inputs(mb: dict[str, torch.Tensor] | TrainBatch) -> dict[str, torch.Tensor]:
    """The model's keyword arguments for a micro-batch from ``micro_batches``, packed or not."""
    mb = _tensors(mb)
    if "position_ids" in mb:
        # Transformers looks for packed rows only where there is no KV cache (a training forward).
        return {"input_ids": mb["input_ids"], "position_ids": mb["position_ids"], "use_cache": False}
    return {"input_ids": mb["input_ids"], "attention_mask": mb["attention_mask"]}


def zero_sequence_starts(x: torch.Tensor, mb: dict[str, torch.Tensor] | TrainBatch) -> torch.Tensor:
    """``x`` (rows, L), a per-token result aligned as ``tokens.token_logprobs`` (position t from the model's
    output at t - 1), with each packed sequence's first token set to 0. There the output at t - 1 is the previous
    sequence's last token, unrelated to this one; 0 is what position 0 of a padded row holds. Unpacked micro-batches
    pass through."""
    position_ids = _tensors(mb).get("position_ids")
    if position_ids is None:
        return x
    return x.masked_fill(position_ids == 0, 0.0)


def _tensors(batch: dict[str, torch.Tensor] | TrainBatch) -> dict[str, torch.Tensor]:
    """A batch's tensors by name: the RL update's TrainBatch and every other stage's dict alike."""
    return batch if isinstance(batch, dict) else dict(batch.tensors())
