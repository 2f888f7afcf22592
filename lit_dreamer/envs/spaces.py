"""What one replay step holds for an env made by ``make_env``, and how its actions look."""

from __future__ import annotations

from typing import Literal, Union

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from lit_dreamer.steps import Spec

AnyEnv = Union[gym.Env, gym.vector.VectorEnv]

# Key in env.metadata where make_env records how many emulator/physics frames one env step spans.
FRAMES_PER_STEP_KEY = "lit_dreamer_frames_per_step"


def _single_spaces(env: AnyEnv) -> tuple[spaces.Space, spaces.Space]:
    """Observation and action space of one env, for a single env or a vector env alike."""
    if isinstance(env, gym.vector.VectorEnv):
        return env.single_observation_space, env.single_action_space
    return env.observation_space, env.action_space


def action_kind(env: AnyEnv) -> Literal["discrete", "continuous"]:
    """'discrete' for Discrete(n) (the collector sends indices), 'continuous' for Box(-1, 1, (A,))."""
    space = _single_spaces(env)[1]
    if isinstance(space, spaces.Discrete):
        return "discrete"
    if isinstance(space, spaces.Box) and len(space.shape) == 1:
        return "continuous"
    raise ValueError(f"action space {space} is not supported; wrap the env with make_env")


def action_dim(env: AnyEnv) -> int:
    """Width of the stored action: n for Discrete(n) (one-hot), A for Box(-1, 1, (A,))."""
    space = _single_spaces(env)[1]
    return int(space.n) if action_kind(env) == "discrete" else int(space.shape[0])


def env_action(action: np.ndarray, discrete: bool) -> np.ndarray:
    """Policy output (..., A) -> what the env takes: the index of a one-hot, or the box action clipped
    to [-1, 1] (a bounded-normal sample can leave it), with NaN mapped to 0 so it never reaches an env."""
    if discrete:
        return action.argmax(-1)
    return np.clip(np.nan_to_num(action), -1.0, 1.0)


def space_spec(env: AnyEnv) -> Spec:
    """Shape (without batch) and dtype of every entry of one replay step for this env."""
    observation_space = _single_spaces(env)[0]
    if not isinstance(observation_space, spaces.Dict):
        raise ValueError(f"expected a Dict observation space from make_env, got {observation_space}")
    spec: Spec = {
        key: (tuple(space.shape), np.dtype(space.dtype)) for key, space in observation_space.spaces.items()
    }
    spec["action"] = ((action_dim(env),), np.dtype(np.float32))
    spec["reward"] = ((), np.dtype(np.float32))
    for flag in ("is_first", "is_last", "is_terminal"):
        spec[flag] = ((), np.dtype(np.bool_))
    spec["task"] = ((), np.dtype(np.int64))  # the task table index of the env that wrote the step
    return spec


def frames_per_step(env: AnyEnv) -> int:
    """Emulator or physics frames per env step (action repeat, or Atari's frame skip of 4).

    Log frames = env steps x frames_per_step(env). Vector envs inherit the value of their first env.
    """
    return int(env.metadata.get(FRAMES_PER_STEP_KEY, 1))
