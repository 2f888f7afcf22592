"""A phase timer for the training step: off (free) by default, switched on by the benchmark."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

import torch


def synchronize() -> None:
    """Wait for the queued CUDA work, if any: it would otherwise be billed to whichever phase waits for it."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class PhaseTimer:
    """Accumulates wall-clock seconds per named phase while `enabled`; a no-op otherwise.

    Each phase starts and ends with `synchronize()`, so on CUDA a phase holds its own kernels; those
    syncs are extra ones, made only while the timer is enabled (by `bench`).
    """

    def __init__(self, enabled: bool = False):
        self.enabled = enabled
        self.totals: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize()
            self.totals[name] += time.perf_counter() - start
            self.counts[name] += 1

    def reset(self) -> None:
        self.totals.clear()
        self.counts.clear()

    def mean(self) -> dict[str, float]:
        return {k: self.totals[k] / self.counts[k] for k in self.totals}
