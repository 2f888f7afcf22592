"""Learning-curve statistics for `compare`: pure functions on arrays.

Runs' metric histories go onto a common env-step grid; a group of runs gets its mean curve with a 95%
percentile-bootstrap band over runs, and the interquartile mean (IQM) at its last grid step, computed as
rliable does (Agarwal et al., *Deep RL at the Edge of the Statistical Precipice*, 2021).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np


def history_arrays(points: Sequence[tuple[float, float, float]]) -> tuple[np.ndarray, np.ndarray]:
    """(step, timestamp, value) triples -> increasing steps and their values.

    A step logged twice (a resumed run repeats the steps since its checkpoint) keeps the newer value.
    """
    latest = {step: value for step, _, value in sorted(points, key=lambda p: (p[0], p[1]))}
    steps = np.array(sorted(latest), dtype=float)
    return steps, np.array([latest[s] for s in sorted(latest)], dtype=float)


def interpolate_to_grid(steps: np.ndarray, values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """A run's curve at the grid's env steps: linear between logged steps, NaN outside the run's range."""
    steps, values, grid = (np.asarray(a, dtype=float) for a in (steps, values, grid))
    assert steps.shape == values.shape and np.all(np.diff(steps) > 0), "steps must increase, one value each"
    out = np.full(grid.shape, np.nan)
    if steps.size:
        inside = (grid >= steps[0]) & (grid <= steps[-1])
        out[inside] = np.interp(grid[inside], steps, values)
    return out


def step_grid(run_steps: Sequence[np.ndarray], max_points: int = 200) -> np.ndarray:
    """Evenly spaced env steps from the group's first to its last logged step.

    As many points as the most often logged run has (at most max_points), so evaluations at a fixed
    interval land on the grid exactly and are not smoothed by the interpolation.
    """
    first, last = min(s[0] for s in run_steps), max(s[-1] for s in run_steps)
    count = min(max_points, max(len(s) for s in run_steps))
    return np.linspace(first, last, max(count, 2) if last > first else 1)


IQM_DEFINITION = "IQM: rliable's 25% trimmed mean (scipy.stats.trim_mean(x, 0.25)): floor(n/4) runs dropped at each end"


def iqm(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """Interquartile mean as rliable computes it: a 25% trimmed mean along axis.

    The floor(n/4) smallest and floor(n/4) largest values are dropped and the rest averaged with equal
    weight (rliable's `aggregate_iqm` is `scipy.stats.trim_mean(scores, 0.25)`). For n < 4 nothing is
    dropped: the IQM of 3 runs is their mean. NaN for no values.
    """
    ordered = np.moveaxis(np.sort(np.asarray(values, dtype=float), axis=axis), axis, -1)
    n = ordered.shape[-1]
    if n == 0:
        return np.full(ordered.shape[:-1], np.nan)
    cut = n // 4
    return ordered[..., cut:n - cut].mean(axis=-1)


def bootstrap_ci(values: Sequence[float], statistic: Callable = np.mean, confidence: float = 0.95,
                 resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of statistic(values), resampling the values (runs) with replacement.

    statistic takes an array and axis=-1 (np.mean, iqm). The seed is fixed, so a figure is reproducible.
    """
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    estimates = statistic(values[rng.integers(0, values.size, size=(resamples, values.size))], axis=-1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(estimates, [tail, 100 - tail])
    return float(low), float(high)


@dataclass
class GroupCurve:
    """A group's runs on a common env-step grid, their mean with a bootstrap CI, and the IQM at the end."""

    name: str
    grid: np.ndarray
    curves: np.ndarray
    """(runs, grid points); NaN where a run has no value."""
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    final_values: np.ndarray
    """The values at the last grid step of the runs that reach it."""
    final_iqm: float
    final_iqm_ci: tuple[float, float]


def group_curve(name: str, runs: Sequence[tuple[np.ndarray, np.ndarray]], max_points: int = 200) -> GroupCurve:
    """Aggregate a group's (steps, values) curves; every run needs at least one point."""
    grid = step_grid([steps for steps, _ in runs], max_points)
    curves = np.stack([interpolate_to_grid(steps, values, grid) for steps, values in runs])
    mean, low, high = (np.full(grid.shape, np.nan) for _ in range(3))
    for j, column in enumerate(curves.T):
        present = column[~np.isnan(column)]
        if present.size:  # a grid point in a gap between runs' ranges has none
            mean[j] = present.mean()
            low[j], high[j] = bootstrap_ci(present)
    final = curves[:, -1][~np.isnan(curves[:, -1])]
    return GroupCurve(name, grid, curves, mean, low, high, final, float(iqm(final)), bootstrap_ci(final, iqm))
