"""Comparing tensors with hand-computed numbers, as every algorithm test does."""
import torch

T = torch.tensor


def close(actual: torch.Tensor, expected: list, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, T(expected, dtype=actual.dtype), atol=atol, rtol=0)
