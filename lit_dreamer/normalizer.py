"""Return normalization of DreamerV3 (spec section 4): advantage = (R - v) / max(1, S)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ReturnNormalizer(nn.Module):
    """S = EMA of the spread (high - low percentile) of the returns, plain EMA from 0, no debiasing.

    Updating is split in two so that a training step skipped later (e.g. for a NaN loss) leaves the
    state untouched: `peek` computes the value the EMA would take, `commit` stores it.

    Args:
        rate: EMA rate; S <- (1 - rate) * S + rate * spread.
        low, high: percentiles, in [0, 100].
        limit: floor of the scale, so small returns are not blown up.
    """

    def __init__(self, rate: float = 0.01, low: float = 5.0, high: float = 95.0, limit: float = 1.0):
        super().__init__()
        assert 0.0 <= low < high <= 100.0, f"need 0 <= low < high <= 100, got {low}, {high}"
        self.rate, self.low, self.high, self.limit = rate, low, high, limit
        self.register_buffer("spread", torch.zeros((), dtype=torch.float32))

    @torch.no_grad()
    def peek(self, returns: Tensor) -> Tensor:
        """The EMA after including `returns` (any shape), without changing the state. Returns ()."""
        flat = returns.detach().float().flatten()
        # torch.quantile interpolates linearly, like numpy's default; it accepts up to 2**24 values.
        # Filled on the device: torch.tensor(..., device=cuda) would be a blocking copy, a sync per step.
        levels = torch.stack([flat.new_full((), self.low / 100), flat.new_full((), self.high / 100)])
        low, high = torch.quantile(flat, levels)
        return (1 - self.rate) * self.spread + self.rate * (high - low)

    @torch.no_grad()
    def commit(self, value: Tensor) -> None:
        """Store a value obtained from `peek`."""
        self.spread.copy_(value)

    def scale(self, spread: Tensor | None = None) -> Tensor:
        """max(limit, S), with S the stored spread unless given (e.g. the result of `peek`)."""
        spread = self.spread if spread is None else spread
        return torch.clamp(spread, min=self.limit)
