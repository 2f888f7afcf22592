"""MiniGrid and BabyAI (pip ``minigrid``) in lit_dreamer's convention: ids ``babyai/<Level>`` and ``minigrid/<Env>``.

minigrid's observation is ``{"image": 7x7x3 uint8, "direction": Discrete(4), "mission": str}`` where the
"image" holds (object, colour, state) indices per cell of the agent's egocentric view, not pixels. With
``obs="proprio"`` it becomes ``grid``: every cell one-hot over minigrid's own index tables, flattened to
a float32 vector (7 x 7 x (11 + 6 + 3) = 980). An MLP reads that vector for a fraction of a CNN's cost on
a 64x64 image, and every cell's content is one exact entry instead of something to be recovered from
pixels. With ``obs="pixels"`` the egocentric view is rendered as RGB and resized to ``image`` (SxSx3).
``direction`` stays Discrete (DictObservation one-hots it) and ``mission`` stays the text minigrid gives.

The minigrid package is imported only when such an env is made: importing it registers its envs.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import math
import re
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

# The key under which envs declare their words, and the tokenizer that splits texts into them (the comma of
# ", then" is no word): the text module's own, so declared words and token ids always agree.
from lit_dreamer.envs.adapters import declare_one_hot
from lit_dreamer.envs.text import VOCABULARY_METADATA_KEY, tokenize


SHORT_PREFIXES = {"babyai/": "BabyAI", "minigrid/": "MiniGrid"}
NATIVE_PREFIXES = ("BabyAI-", "MiniGrid-")


def load_minigrid() -> None:
    """Import minigrid, which registers its BabyAI-* and MiniGrid-* ids, or raise an ImportError naming the fix."""
    try:
        import minigrid
    except ImportError as error:
        raise ImportError("BabyAI and MiniGrid envs need minigrid: pip install minigrid") from error
    gym.register_envs(minigrid)


def is_minigrid_id(env_id: str) -> bool:
    return env_id.startswith((*SHORT_PREFIXES, *NATIVE_PREFIXES))


def minigrid_gym_id(env_id: str) -> str:
    """``babyai/GoToLocal`` -> ``BabyAI-GoToLocal-v0`` (the highest registered version when there is no v0);
    native ids and short ids with a version are kept. Call load_minigrid() first."""
    short = next((prefix for prefix in SHORT_PREFIXES if env_id.startswith(prefix)), None)
    if short is None:
        return env_id
    base = f"{SHORT_PREFIXES[short]}-{env_id[len(short):]}"
    if re.search(r"-v\d+$", base):
        return base
    versions = [int(m.group(1)) for gym_id in gym.registry if (m := re.fullmatch(rf"{re.escape(base)}-v(\d+)", gym_id))]
    # v0 when registered (the level as published), else the newest; none: v0, for the unknown-id error.
    return f"{base}-v{0 if 0 in versions or not versions else max(versions)}"


def short_ids(registry_ids: list[str]) -> list[str]:
    """The ``babyai/<Level>`` and ``minigrid/<Env>`` forms of registered ids, for suggestions."""
    short = []
    for gym_id in registry_ids:
        if match := re.fullmatch(r"(BabyAI|MiniGrid)-(.+)-v\d+", gym_id):
            short.append(f"{match.group(1).lower()}/{match.group(2)}")
    return short


# --------------------------------------------------------------------------------------------------
# Observations


def cell_tables() -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """minigrid's object, colour and state index tables (the meaning of the symbolic view's 3 channels)."""
    from minigrid.core.constants import COLOR_TO_IDX, OBJECT_TO_IDX, STATE_TO_IDX
    return OBJECT_TO_IDX, COLOR_TO_IDX, STATE_TO_IDX


def one_hot_cells(view: np.ndarray, widths: tuple[int, ...]) -> np.ndarray:
    """An HxWxC integer view as a float32 vector: per cell, one one-hot of width widths[c] per channel c,
    joined, cells in row-major order (length H * W * sum(widths))."""
    cells = view.reshape(-1, len(widths)).astype(np.int64)
    offsets = np.cumsum(widths) - np.asarray(widths)
    vector = np.zeros((cells.shape[0], sum(widths)), np.float32)
    vector[np.arange(cells.shape[0])[:, None], cells + offsets] = 1.0
    return vector.reshape(-1)


class OneHotGrid(gym.ObservationWrapper):
    """Replaces minigrid's symbolic ``image`` (object, colour, state per cell) by ``grid``, its cells one-hot."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.widths = tuple(len(table) for table in cell_tables())
        height, width, _ = env.observation_space["image"].shape
        others = {key: space for key, space in env.observation_space.spaces.items() if key != "image"}
        grid = spaces.Box(0.0, 1.0, (height * width * sum(self.widths),), np.float32)
        self.observation_space = spaces.Dict({"grid": grid, **others})
        declare_one_hot(self, {"grid": list(self.widths) * (height * width)})

    def observation(self, observation: dict[str, Any]) -> dict[str, Any]:
        return one_hot_grid(observation, self.widths)


def one_hot_grid(observation: dict[str, Any], widths: tuple[int, ...]) -> dict[str, Any]:
    """minigrid's observation with its symbolic ``image`` replaced by ``grid`` (OneHotGrid's conversion, shared
    with lit_dreamer.agent); `widths` are the sizes of minigrid's object, colour and state tables."""
    others = {key: value for key, value in observation.items() if key != "image"}
    return {"grid": one_hot_cells(observation["image"], widths), **others}


class EgocentricPixels(gym.ObservationWrapper):
    """Replaces the symbolic ``image`` by the agent's egocentric view rendered as RGB, SxSx3 uint8."""

    def __init__(self, env: gym.Env, image_size: int):
        super().__init__(env)
        view = env.observation_space["image"].shape[0]
        # Tiles at least as large as S / view: the frame is then shrunk to S, never stretched.
        self.tile_size, self.image_size = math.ceil(image_size / view), image_size
        image = spaces.Box(0, 255, (image_size, image_size, 3), np.uint8)
        self.observation_space = spaces.Dict({**env.observation_space.spaces, "image": image})

    def observation(self, observation: dict[str, Any]) -> dict[str, Any]:
        import cv2
        frame = self.unwrapped.get_frame(tile_size=self.tile_size, agent_pov=True)
        image = cv2.resize(frame, (self.image_size, self.image_size), interpolation=cv2.INTER_AREA)
        return {**observation, "image": np.ascontiguousarray(image, dtype=np.uint8)}


class ReportSuccess(gym.Wrapper):
    """``info["success"]``: minigrid pays 1 - 0.9 * steps / max_steps > 0 when the mission is achieved and
    0 otherwise, so success is a termination with a positive reward. Reported on every step (False until
    then), so that an episode cut by a time limit wrapped around this one still ends with its report."""

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        observation, reward, terminated, truncated, info = self.env.step(action)
        return observation, reward, terminated, truncated, {**info, "success": bool(terminated and reward > 0)}


class SilentResets(gym.Wrapper):
    """Swallows what BabyAI levels print at reset: every rejected layout ("Sampling rejected: ...") goes to
    stdout, dozens per hundred resets, which would bury the training log."""

    def reset(self, **kwargs: Any) -> tuple[Any, dict]:
        with contextlib.redirect_stdout(io.StringIO()):
            return self.env.reset(**kwargs)


# --------------------------------------------------------------------------------------------------
# Mission vocabulary

# The fixed words of the BabyAI grammar: the literals of the surface() methods in
# minigrid/envs/babyai/core/verifier.py (ObjDesc: articles, "object" and the location phrases; GoTo,
# PickUp, Open, PutNext; the Before / After / And joins), and "go", BabyAIMissionSpace's placeholder.
BABYAI_FIXED_WORDS = ("a", "the", "object", "in", "front", "of", "you", "behind", "on", "your", "go", "to", "pick",
                      "up", "open", "put", "next", "then", "after", "and")


def minigrid_vocabulary() -> list[str]:
    """Every word a BabyAI mission can contain, sorted: minigrid's colour names, object types and location
    names, and the grammar's fixed words."""
    from minigrid.core.constants import COLOR_NAMES
    from minigrid.envs.babyai.core.verifier import LOC_NAMES, OBJ_TYPES
    return sorted({*COLOR_NAMES, *OBJ_TYPES, *LOC_NAMES, *BABYAI_FIXED_WORDS})


def mission_space_words(space: spaces.Space) -> list[str]:
    """The words of every mission a MiniGrid MissionSpace can generate (all placeholder combinations)."""
    placeholders = getattr(space, "ordered_placeholders", None) or []
    missions = (space.mission_func(*choice) for choice in itertools.product(*placeholders))
    return sorted({word for mission in missions for word in tokenize(mission)})


def env_vocabulary(env: gym.Env) -> list[str]:
    """The BabyAI vocabulary joined with the words of the env's own mission space (plain MiniGrid envs)."""
    return sorted({*minigrid_vocabulary(), *mission_space_words(env.observation_space["mission"])})


# --------------------------------------------------------------------------------------------------
# Builder


def make_minigrid(gym_id: str, *, obs: str, image_size: int, render: bool) -> gym.Env:
    """A registered BabyAI-* or MiniGrid-* env with the observation of `obs`, success in the final info,
    and its mission vocabulary in ``env.metadata[VOCABULARY_METADATA_KEY]``."""
    load_minigrid()
    env = gym.make(gym_id, **({"render_mode": "rgb_array"} if render else {}))
    words = env_vocabulary(env)
    env = ReportSuccess(SilentResets(env))
    env = EgocentricPixels(env, image_size) if obs == "pixels" else OneHotGrid(env)
    env.metadata = {**env.metadata, VOCABULARY_METADATA_KEY: {"mission": words}}
    return env
