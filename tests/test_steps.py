"""The step-key vocabulary of lit_dreamer.steps is the one that the env adapter, the replay and the world model use."""

from __future__ import annotations

import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces

from lit_dreamer import steps
from lit_dreamer.envs import make_env, space_spec
from lit_dreamer.envs.adapters import DictObservation
from lit_dreamer.replay import Replay
from lit_dreamer.world_model import split_obs_keys


class DictObsEnv(gym.Env):
    """An env whose observation dict has one key of our choosing."""

    action_space = spaces.Discrete(2)

    def __init__(self, key: str):
        self.observation_space = spaces.Dict({key: spaces.Box(-1, 1, (3,), np.float32)})


def test_the_spec_of_a_step_is_its_observations_plus_the_non_observation_keys():
    env = make_env("CartPole-v1")
    try:
        spec = space_spec(env)
    finally:
        env.close()
    assert [key for key in spec if not steps.is_model_input(key)] == list(steps.NON_OBS_KEYS)
    assert [key for key in spec if steps.is_model_input(key)] == ["vector"]


@pytest.mark.parametrize("key", [*steps.RESERVED_KEYS, "context/deter"])
def test_an_observation_may_not_use_a_reserved_key(key):
    with pytest.raises(ValueError, match=f"observation key '{key}' clashes with a replay key"):
        DictObservation(DictObsEnv(key))


def test_an_observation_may_use_other_keys_including_log_ones():
    for key in ("state", "log_energy", "contexts"):
        assert list(DictObservation(DictObsEnv(key)).observation_space.spaces) == [key]


@pytest.mark.parametrize("key", [*steps.SAMPLE_KEYS, "context/stoch"])
def test_the_replay_refuses_step_keys_that_a_batch_adds(key):
    spec = {"vector": ((3,), np.float32), key: ((), np.float32)}
    with pytest.raises(ValueError, match=f"spec key '{key}' is reserved for what sample"):
        Replay(spec)
    Replay({"vector": ((3,), np.float32), **{name: ((), np.float32) for name in steps.NON_OBS_KEYS}})


def test_the_world_model_encodes_observations_only():
    spec = {"image": ((8, 8, 3), np.uint8), "vector": ((4,), np.float32), "log_energy": ((), np.float64),
            "context/deter": ((5, 5), np.int64), **{key: ((), np.float32) for key in steps.NON_OBS_KEYS}}
    assert split_obs_keys(spec) == (["image"], ["vector"], [])


def test_the_vocabulary_module_imports_neither_torch_nor_lightning():
    code = "import sys, lit_dreamer.steps; print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
