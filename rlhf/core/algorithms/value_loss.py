"""The critic's loss (PPO with ``advantage: gae``)."""
from __future__ import annotations

import torch


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       clip: float | None = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """The critic's per-token loss, PPO's clipped form: 0.5 * max((V - R)^2, (V_clip - R)^2) with
    V_clip = old_V + clamp(V - old_V, -clip, clip), so one update cannot move a value far from the one the
    advantages were computed with. ``clip`` None (or <= 0) is the plain 0.5 * (V - R)^2. Returns (loss per token,
    1.0 where the clipped term was the larger one, i.e. the clip was active)."""
    unclipped = (values - returns).square()
    if not clip or clip <= 0:
        return 0.5 * unclipped, torch.zeros_like(unclipped)
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    clipped = (clipped_values - returns).square()
    return 0.5 * torch.maximum(unclipped, clipped), (clipped > unclipped).float()
