"""The collector's bookkeeping: which episode returns reach the logger, and how many env steps a run takes."""

import logging
import os

import mlflow
import numpy as np
import pytest

from lit_dreamer.config import load_config
from lit_dreamer.replay import Replay
from lit_dreamer.train import fit


def config(root, *overrides):
    return load_config(["debug"], [f"run.dir={root}/run", f"logger.tracking_uri=sqlite:///{root}/mlflow.db",
                                   *overrides])


def replay_of(summary) -> dict[str, np.ndarray]:
    replay = Replay.load(os.path.join(os.path.dirname(summary["checkpoint"]), "replay-rank0"))
    return {key: value[:summary["env_steps"], 0] for key, value in replay._data.items()}


def episode_ends(data) -> list[tuple[int, float]]:
    """(row of the last step, return) of every episode that starts and ends inside the replay."""
    ends, start = [], None
    for row in range(len(data["reward"])):
        if data["is_first"][row]:
            start = row
        if data["is_last"][row] and start is not None:
            ends.append((row, float(data["reward"][start:row + 1].sum())))
    return ends


@pytest.mark.parametrize("log_every", [1, 1000])
def test_every_episode_return_is_logged_including_the_prefill_and_the_last(in_tmp, log_every):
    summary = fit(config(in_tmp, "run.steps=120", "run.prefill=60", f"run.log_every={log_every}"))
    assert summary["env_steps"] == 120 and summary["train_steps"] == 60  # one env step per training step
    # Returns are logged at the end of the prefill (60 env steps), after every log_every-th training step
    # (training step k ends at 60 + k env steps) and at the end (120): each episode at the first of these
    # points after its last step was recorded (its row + 1), as the mean of the episodes since the last one.
    points = [60, *(60 + k for k in range(1, 61) if k % log_every == 0), 120]
    expected: dict[int, list[float]] = {}
    for row, ret in episode_ends(replay_of(summary)):
        point = next(p for p in points if p >= row + 1)
        expected.setdefault(point, []).append(ret)
    client = mlflow.MlflowClient(f"sqlite:///{in_tmp}/mlflow.db")
    history = client.get_metric_history(summary["mlflow_run_id"], "train/return")
    logged = sorted((m.step, m.value) for m in history)
    assert [step for step, _ in logged] == sorted(expected)
    assert expected and min(expected) == 60 and max(expected) > 60  # the prefill's episodes and later ones
    for step, value in logged:
        assert value == pytest.approx(np.mean(expected[step]), rel=1e-6)
    assert summary["episodes"] == sum(len(v) for v in expected.values())


@pytest.mark.parametrize("steps, prefill, train_ratio", [
    (25, 60, 16),   # run.steps below the prefill: the prefill is clamped to the run's length
    (41, 20, 16),   # two env steps per training step and an odd remainder: the last one is not overshot
])
def test_a_run_collects_exactly_run_steps(in_tmp, caplog, steps, prefill, train_ratio):
    with caplog.at_level(logging.WARNING):
        summary = fit(config(in_tmp, f"run.steps={steps}", f"run.prefill={prefill}", f"run.train_ratio={train_ratio}"))
    assert summary["env_steps"] == steps
    assert len(Replay.load(os.path.join(os.path.dirname(summary["checkpoint"]), "replay-rank0"))) == steps
    clamped = [r.getMessage() for r in caplog.records if "run.prefill" in r.getMessage()]
    if prefill > steps:
        assert clamped == [f"run.prefill={prefill} is more than run.steps={steps}: prefilling {steps} steps, so the "
                           "whole run acts randomly"]
    else:
        assert clamped == []


def test_fit_finds_the_collector_wherever_it_sits_among_the_callbacks(in_tmp, monkeypatch):
    # A script or subclass may put its own callback first: the summary must still read the collector's counts.
    import lit_dreamer.train as train
    build = train.build

    def collector_last(cfg):
        module, datamodule, callbacks, info = build(cfg)
        return module, datamodule, callbacks[1:] + callbacks[:1], info
    monkeypatch.setattr(train, "build", collector_last)
    summary = fit(config(in_tmp, "run.steps=80", "run.prefill=40"))
    assert summary["env_steps"] == 80 and summary["train_steps"] == 40 and summary["episodes"] >= 1
