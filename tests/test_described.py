"""lit_dreamer.envs.described: the env's own spaces as plain data, and its observations converted without the env
exactly as make_env's wrappers convert them."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

from lit_dreamer.envs import make_env
from lit_dreamer.envs.adapters import adapt_action_space, to_env_action
from lit_dreamer.envs.described import ObservationAdapter, describe_spaces, space_from_data, space_to_data
from lit_dreamer.envs.text import TextVocabularies

# (lit_dreamer id, gym.make id of the same env): vectors, a Discrete observation, dm_control's Dict, and BabyAI's
# symbolic view with its mission string (one-hot grid and token ids).
ENVS = [("CartPole-v1", "CartPole-v1"), ("FrozenLake-v1", "FrozenLake-v1"),
        ("dmc/cartpole-balance", "dm_control/cartpole-balance-v0"), ("babyai/GoToLocal", "BabyAI-GoToLocal-v0")]


def own_env(gym_id: str) -> gym.Env:
    if gym_id.startswith("dm_control/"):
        pytest.importorskip("shimmy")
    if gym_id.startswith("BabyAI"):
        pytest.importorskip("minigrid")
    make_env(gym_id)  # registers the family's ids (shimmy, minigrid)
    return gym.make(gym_id)


@pytest.mark.parametrize("env_id, gym_id", ENVS)
def test_adapter_converts_the_envs_own_observations_as_the_wrappers_do(env_id, gym_id):
    vocabularies = TextVocabularies()
    wrapped = make_env(env_id, vocabularies=vocabularies)
    description = describe_spaces(wrapped)
    assert description["raw"]
    obs_spec = {key: (space.shape, str(space.dtype)) for key, space in wrapped.observation_space.spaces.items()}
    adapter = ObservationAdapter(description, obs_spec, vocabularies.state())
    own = own_env(gym_id)
    assert space_from_data(description["observation"]).shape == own.observation_space.shape
    seen, single = [], []
    for seed in (1, 2):
        expected, _ = wrapped.reset(seed=seed)
        raw, _ = own.reset(seed=seed)
        converted, batched = adapter(raw)
        assert not batched
        for key, value in expected.items():
            np.testing.assert_array_equal(converted[key][0], value, err_msg=key)
            assert converted[key].dtype == value.dtype
        seen.append(raw)
        single.append(converted)
    batch = {k: np.stack([s[k] for s in seen]) for k in seen[0]} if isinstance(seen[0], dict) else np.stack(seen)
    if isinstance(seen[0], dict) and "mission" in seen[0]:
        batch["mission"] = [s["mission"] for s in seen]  # a batch of texts is a list of strings
    converted, batched = adapter(batch)
    assert batched
    for key in obs_spec:
        np.testing.assert_array_equal(converted[key], np.concatenate([s[key] for s in single]))


def test_description_is_plain_data_that_rebuilds_the_spaces():
    space = spaces.Dict({"pos": spaces.Box(-1.0, np.array([1.0, 2.0]), (2,), np.float64),
                         "cell": spaces.Discrete(4, start=1), "keys": spaces.MultiDiscrete([2, 3]),
                         "seen": spaces.MultiBinary(3), "image": spaces.Box(0, 255, (8, 8, 3), np.uint8)})
    data = space_to_data(space)
    assert data["spaces"]["image"]["low"] == 0 and data["spaces"]["image"]["high"] == 255  # not 192 numbers
    assert space_from_data(data) == space
    torch.save({"spaces": data}, "/dev/null")  # what a checkpoint can hold with weights_only


def test_pixels_rendered_by_lit_dreamer_take_the_convention_dict_only():
    wrapped = make_env("CartPole-v1", obs="pixels", image_size=16)
    description = describe_spaces(wrapped)
    assert not description["raw"] and description["needs_env"] == "AddRenderObservation"
    adapter = ObservationAdapter(description, {"image": ((16, 16, 3), "uint8")})
    obs, _ = wrapped.reset(seed=0)
    converted, batched = adapter(obs)
    assert not batched and converted["image"].shape == (1, 16, 16, 3)
    with pytest.raises(ValueError, match="lit_dreamer's convention only"):
        adapter(np.zeros(4, np.float32))


class RecordAction(gym.Env):
    """Records the action it is given."""

    observation_space = spaces.Box(-1.0, 1.0, (1,), np.float32)

    def __init__(self, action_space: spaces.Space):
        self.action_space, self.received = action_space, None

    def reset(self, *, seed=None, options=None):
        return np.zeros(1, np.float32), {}

    def step(self, action):
        self.received = action
        return np.zeros(1, np.float32), 0.0, False, False, {}


@pytest.mark.parametrize("space", [spaces.Discrete(3, start=-1), spaces.Box(-2.0, 2.0, (1,), np.float32),
                                   spaces.Box(np.array([-1.0, 0.0]), np.array([3.0, 5.0]), (2,), np.float64),
                                   spaces.Box(-1.0, 1.0, (2,), np.float64)])
def test_to_env_action_is_what_adapt_action_space_passes_to_the_env(space):
    inner = RecordAction(space)
    env = adapt_action_space(inner)
    for action in ([2] if isinstance(space, spaces.Discrete) else [np.array([-1.0, 0.3], np.float32)[:space.shape[0]],
                                                                   np.array([1.0, -0.7], np.float32)[:space.shape[0]]]):
        env.step(action)
        expected = inner.received
        got = to_env_action(np.asarray(action)[None], space)[0]
        np.testing.assert_array_equal(got, expected)
        assert np.asarray(got).dtype == np.asarray(expected).dtype
