"""On resume the run's replay settings apply to the restored replay, not the saved run's (issue 19, spot 2)."""

from __future__ import annotations

import numpy as np
import pytest

from lit_dreamer.config import ConfigError
from lit_dreamer.data import ReplayDataModule
from tests.test_system import fit_in_process, in_tmp

__all__ = ["in_tmp"]  # a fixture, imported for the tests below

STEPS, PREFILL = 40, 20


@pytest.mark.timeout(300)
def test_a_resume_samples_as_its_own_replay_sampling_says(in_tmp, monkeypatch):
    first = fit_in_process(in_tmp, f"run.steps={STEPS}", f"run.prefill={PREFILL}")  # uniform sampling
    restored = []
    load_replay = ReplayDataModule.load_replay
    monkeypatch.setattr(ReplayDataModule, "load_replay",
                        lambda self, path: (load_replay(self, path), restored.append(self)))
    resumed = fit_in_process(in_tmp, f"run.steps={STEPS + 20}", f"run.prefill={PREFILL}", "ckpt_path=last",
                             "replay.sampling=recency", "replay.recency_half_life=3")
    assert resumed["env_steps"] == STEPS + 20 > first["env_steps"] and len(restored) == 1
    replay = restored[0].replay  # the replay the resumed run trained from
    assert len(replay) == STEPS + 20
    # One stream that never wrapped: a start's age is the newest id minus its id. Uniform sampling
    # would give a mean age near 30; an exponential with a half-life of 3 steps gives about 4.3.
    ages = len(replay) - 1 - replay.sample(2000, 1)["index"][:, 0]
    assert ages.mean() < 8 and np.mean(ages < 3) > 0.4


@pytest.mark.timeout(300)
def test_a_resume_with_a_capacity_below_the_stored_steps_is_refused(in_tmp):
    fit_in_process(in_tmp, f"run.steps={STEPS}", f"run.prefill={PREFILL}")
    with pytest.raises(ConfigError) as caught:
        fit_in_process(in_tmp, f"run.steps={STEPS + 20}", f"run.prefill={PREFILL}", "ckpt_path=last",
                       "replay.capacity=30")
    message = str(caught.value)
    assert f"replay.capacity=30 is below the {STEPS} steps stored" in message
    assert f"resume with replay.capacity={STEPS} or more" in message
