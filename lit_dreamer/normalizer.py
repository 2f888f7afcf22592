"""Return normalization of DreamerV3 (spec section 4): advantage = (R - v) / max(1, S), one S per task."""

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
        num_tasks: with several tasks each task has its own S (`spread` (K,)), the EMA of the spread of its
            own returns: tasks whose returns differ in scale are not normalized by each other's. One task
            keeps the one-task state (`spread` ()), so its checkpoints load either way.
    """

    def __init__(self, rate: float = 0.01, low: float = 5.0, high: float = 95.0, limit: float = 1.0,
                 num_tasks: int = 1):
        super().__init__()
        assert 0.0 <= low < high <= 100.0, f"need 0 <= low < high <= 100, got {low}, {high}"
        self.rate, self.low, self.high, self.limit = rate, low, high, limit
        self.num_tasks = num_tasks
        shape = () if num_tasks == 1 else (num_tasks,)
        self.register_buffer("spread", torch.zeros(shape, dtype=torch.float32))

    @torch.no_grad()
    def peek(self, returns: Tensor, task: Tensor | None = None) -> Tensor:
        """The EMA after including `returns` (any shape), without changing the state. Returns () or (K,).

        With several tasks, `task` (the shape of `returns`, int64) says whose each return is; a task with
        no returns here keeps its spread.
        """
        if self.num_tasks > 1:
            return self.peek_per_task(returns, task)
        flat = returns.detach().float().flatten()
        # torch.quantile interpolates linearly, like numpy's default; it accepts up to 2**24 values.
        # Filled on the device: torch.tensor(..., device=cuda) would be a blocking copy, a sync per step.
        levels = torch.stack([flat.new_full((), self.low / 100), flat.new_full((), self.high / 100)])
        low, high = torch.quantile(flat, levels)
        return (1 - self.rate) * self.spread + self.rate * (high - low)

    def peek_per_task(self, returns: Tensor, task: Tensor) -> Tensor:
        """`peek` with one EMA per task: percentiles over each task's own returns."""
        assert task is not None and task.shape == returns.shape, "several tasks: give the task of every return"
        flat, task = returns.detach().float().flatten(), task.flatten()
        # (K, N) with the other tasks' returns as NaN, so that nanquantile takes each row's own: no boolean
        # indexing, which would cost a host-device sync per task.
        mine = task[None] == torch.arange(self.num_tasks, device=task.device)[:, None]
        rows = torch.where(mine, flat[None], flat.new_full((), float("nan")))
        levels = torch.stack([flat.new_full((), self.low / 100), flat.new_full((), self.high / 100)])
        low, high = torch.nanquantile(rows, levels, dim=1)  # (K,) each; NaN for a task with no returns
        updated = (1 - self.rate) * self.spread + self.rate * (high - low)
        return torch.where(mine.any(1), updated, self.spread)

    @torch.no_grad()
    def commit(self, value: Tensor) -> None:
        """Store a value obtained from `peek`."""
        self.spread.copy_(value)

    def scale(self, spread: Tensor | None = None) -> Tensor:
        """max(limit, S), with S the stored spread unless given (e.g. the result of `peek`)."""
        spread = self.spread if spread is None else spread
        return torch.clamp(spread, min=self.limit)
