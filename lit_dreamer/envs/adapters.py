"""Wrappers that put any gymnasium env into lit_dreamer's observation and action convention.

Observations become a flat ``spaces.Dict`` whose entries the encoders can take: ``uint8`` images of
shape HxWx{1,3} and ``float32`` vectors of rank 1 (categorical entries become one-hot vectors). Actions
become ``Discrete(n)`` with indices starting at 0, or ``Box(-1, 1, (A,), float32)``.
"""

from __future__ import annotations

from typing import Any, Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.wrappers import RescaleAction, TransformAction
from gymnasium.wrappers.utils import rescale_box

from lit_dreamer.steps import is_reserved

ACCEPTED_OBSERVATIONS = (
    "accepted observations: rank-1 (or scalar) numeric vectors, which become float32; uint8 images of "
    "shape HxWx1 or HxWx3; Discrete and rank-1 MultiDiscrete entries, which become one-hot float32 "
    "vectors; rank-1 MultiBinary entries, which become 0/1 float32 vectors; alone or in a (nested) Dict"
)
CATEGORICAL = (spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)

ONE_HOT_METADATA_KEY = "lit_dreamer_one_hot"
"""env.metadata entry where an env declares which float32 vector keys are one-hot groups: {key: [width, ...]},
the groups side by side in that order (model.one_hot_decoder=categorical decodes each with a softmax)."""


def one_hot_widths(space: spaces.Space) -> list[int] | None:
    """The one-hot group widths that a Discrete (one group) or MultiDiscrete (one per entry) entry becomes; None
    for a MultiBinary entry, whose 0/1 values are not one-hot."""
    if isinstance(space, spaces.Discrete):
        return [int(space.n)]
    if isinstance(space, spaces.MultiDiscrete):
        return [int(n) for n in space.nvec]
    return None


def declare_one_hot(env: gym.Env, widths: dict[str, list[int]]) -> None:
    """Adds `widths` ({key: group widths}) to the one-hot keys the env declares in its metadata."""
    if widths:
        declared = {**env.metadata.get(ONE_HOT_METADATA_KEY, {}), **widths}
        env.metadata = {**env.metadata, ONE_HOT_METADATA_KEY: declared}


def _is_image(space: spaces.Box) -> bool:
    return space.dtype == np.uint8 and len(space.shape) == 3 and space.shape[-1] in (1, 3)


def _convert_categorical(key: str, space: spaces.Space) -> spaces.Box:
    """The float32 vector space of a Discrete (one-hot), MultiDiscrete (one one-hot per entry, joined)
    or MultiBinary (0/1) entry, or a ValueError naming the key."""
    if isinstance(space, spaces.Discrete):
        return spaces.Box(0.0, 1.0, (int(space.n),), np.float32)
    if len(space.shape) != 1:
        raise ValueError(
            f"observation {key!r} is a {type(space).__name__} space of shape {space.shape}; only rank-1 "
            f"{type(space).__name__} spaces are taken, flatten it in a wrapper; {ACCEPTED_OBSERVATIONS}"
        )
    width = int(space.nvec.sum()) if isinstance(space, spaces.MultiDiscrete) else int(space.shape[0])
    return spaces.Box(0.0, 1.0, (width,), np.float32)


def one_hot_observation(space: spaces.Space, value: Any) -> np.ndarray:
    """A Discrete value v as a one-hot of width n at index v - start; a MultiDiscrete value as its
    entries' one-hots concatenated (width sum(nvec)); a MultiBinary value as a 0/1 float32 vector."""
    if isinstance(space, spaces.MultiBinary):
        return np.asarray(value, dtype=np.float32).reshape(space.shape)
    sizes = np.atleast_1d(np.asarray(space.n if isinstance(space, spaces.Discrete) else space.nvec, np.int64))
    index = np.atleast_1d(np.asarray(value, np.int64) - np.asarray(space.start, np.int64))
    if index.shape != sizes.shape or np.any(index < 0) or np.any(index >= sizes):
        raise ValueError(f"observation value {value!r} is not in its space {space}")
    vector = np.zeros(int(sizes.sum()), np.float32)
    vector[np.cumsum(sizes) - sizes + index] = 1.0  # each entry's offset plus its index
    return vector


def _convert_box(key: str, space: spaces.Space) -> spaces.Box:
    """The space that one observation entry has in our convention, or a ValueError naming the key."""
    if isinstance(space, CATEGORICAL):
        return _convert_categorical(key, space)
    if not isinstance(space, spaces.Box):
        raise ValueError(
            f"observation {key!r} is a {type(space).__name__} space ({space}); {ACCEPTED_OBSERVATIONS}"
        )
    if _is_image(space):
        return space
    numeric = np.issubdtype(space.dtype, np.number) or space.dtype == np.bool_
    if numeric and len(space.shape) <= 1:
        shape = space.shape or (1,)
        low = np.broadcast_to(space.low, space.shape).reshape(shape).astype(np.float32)
        high = np.broadcast_to(space.high, space.shape).reshape(shape).astype(np.float32)
        return spaces.Box(low, high, shape, np.float32)
    raise ValueError(
        f"observation {key!r} has shape {space.shape} and dtype {space.dtype}, which no encoder takes; "
        f"{ACCEPTED_OBSERVATIONS}"
    )


def _flatten_spaces(space: spaces.Space, prefix: str = "") -> dict[str, spaces.Space]:
    """Nested Dict spaces flattened to one level with '/'-joined keys."""
    if not isinstance(space, spaces.Dict):
        return {prefix: space}
    flat: dict[str, spaces.Space] = {}
    for name, subspace in space.spaces.items():
        flat.update(_flatten_spaces(subspace, f"{prefix}{name}" if not prefix else f"{prefix}/{name}"))
    return flat


def _flatten_values(value: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for name, item in value.items():
        flat.update(_flatten_values(item, f"{prefix}{name}" if not prefix else f"{prefix}/{name}"))
    return flat


class FlatObservations:
    """The conversion DictObservation applies, without an env: a source observation space becomes `space`, a flat
    ``spaces.Dict``, and calling it converts one observation of the source space (lit_dreamer.agent uses it on
    observations that a user's own env returned).

    A top-level Box becomes ``image`` (rank 3) or ``vector``; Dict observations keep their keys (nested dicts
    joined with "/"); scalars become shape (1,), numeric vectors float32, uint8 HxWx{1,3} boxes stay images;
    Discrete and MultiDiscrete entries become one-hot float32 vectors, MultiBinary ones 0/1 float32 vectors.
    Anything else raises a ValueError at construction that names the key, its shape and dtype. Keys in `keep`
    (text token ids) are left as they are. Observations are C-contiguous arrays.
    """

    def __init__(self, source: spaces.Space, keep: Sequence[str] = ()):
        if isinstance(source, spaces.Dict):
            flat = _flatten_spaces(source)
        elif isinstance(source, spaces.Box):
            flat = {"image" if len(source.shape) == 3 else "vector": source}
        else:
            flat = {"observation": source}
        for key in flat:
            if is_reserved(key):
                raise ValueError(f"observation key {key!r} clashes with a replay key; rename it")
        # `keep`: top-level keys whose boxes pass unchanged, the int64 token ids of text observations.
        converted = {key: space if key in keep else _convert_box(key, space) for key, space in flat.items()}
        self.categorical = {key: space for key, space in flat.items() if isinstance(space, CATEGORICAL)}
        self.one_hot = {key: widths for key, space in self.categorical.items()
                        if (widths := one_hot_widths(space)) is not None}
        self.top_level_key = None if isinstance(source, spaces.Dict) else next(iter(converted))
        self.keep = tuple(keep)
        self.space = spaces.Dict(converted)

    def __call__(self, observation: Any) -> dict[str, np.ndarray]:
        if self.top_level_key is not None:
            observation = {self.top_level_key: observation}
        else:
            observation = _flatten_values(observation)
        # Contiguous copies: dm_control renders upside down and returns a flipped view (negative strides),
        # which torch.as_tensor refuses; every consumer (collector, eval, videos) then gets a plain array.
        return {key: self.entry(key, observation[key], space) for key, space in self.space.spaces.items()}

    def entry(self, key: str, value: Any, space: spaces.Box) -> np.ndarray:
        if key in self.categorical:
            return one_hot_observation(self.categorical[key], value)
        return np.ascontiguousarray(np.asarray(value, dtype=space.dtype).reshape(space.shape))


class DictObservation(gym.ObservationWrapper):
    """Observations as a flat dict (FlatObservations: the conversion itself, shared with lit_dreamer.agent).

    Keys in `keep` (text token ids) are left as they are. Observations and `render()` frames are
    C-contiguous arrays.
    """

    def __init__(self, env: gym.Env, keep: Sequence[str] = ()):
        super().__init__(env)
        self.converter = FlatObservations(env.observation_space, keep)
        self.observation_space = self.converter.space
        declare_one_hot(self, self.converter.one_hot)

    def observation(self, observation: Any) -> dict[str, np.ndarray]:
        return self.converter(observation)

    def render(self) -> Any:
        """The env's frame as a contiguous array (dm_control's is a flipped view with negative strides)."""
        frame = self.env.render()
        return np.ascontiguousarray(frame) if isinstance(frame, np.ndarray) else frame


def adapt_action_space(env: gym.Env) -> gym.Env:
    """Discrete actions indexed from 0, or continuous actions in Box(-1, 1, (A,), float32).

    Continuous boxes are rescaled with gymnasium's RescaleAction; the inner env receives its own dtype.
    """
    space = env.action_space
    if isinstance(space, spaces.Discrete):
        if space.start == 0:
            return env
        start = int(space.start)
        return TransformAction(env, lambda action: action + start, spaces.Discrete(int(space.n)))
    if not isinstance(space, spaces.Box) or not np.issubdtype(space.dtype, np.floating):
        raise ValueError(
            f"action space {space} is not supported; lit_dreamer takes Discrete(n) or a rank-1 float Box"
        )
    if len(space.shape) != 1:
        raise ValueError(f"action space {space} has shape {space.shape}; continuous actions must be rank 1")
    if not (np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high))):
        raise ValueError(
            f"action space {space} has infinite bounds, which cannot be rescaled to [-1, 1]; "
            "wrap the env with gymnasium's ClipAction or give the Box finite bounds"
        )
    if not (np.all(space.low == -1) and np.all(space.high == 1)):
        # Bounds in the box's own dtype: float64 bounds on a float32 box make gymnasium warn.
        unit = np.ones(space.shape, dtype=space.dtype)
        env = RescaleAction(env, -unit, unit)
    if space.dtype == np.float32:
        return env
    inner_dtype = space.dtype
    unit_box = spaces.Box(-1.0, 1.0, space.shape, np.float32)
    return TransformAction(env, lambda action: np.asarray(action, dtype=inner_dtype), unit_box)


def to_env_action(action: np.ndarray, space: spaces.Space) -> np.ndarray:
    """Actions in lit_dreamer's convention (indices from 0, or a [-1, 1] box; any leading batch dims) as the env's
    own action space `space` takes them: what adapt_action_space's wrappers do to an action on its way in (the
    Discrete's start added; the box cast to its dtype, then mapped onto [low, high] by gymnasium's rescale_box)."""
    if isinstance(space, spaces.Discrete):
        return np.asarray(action, np.int64) + int(space.start)
    action = np.asarray(action, dtype=space.dtype)
    if np.all(space.low == -1) and np.all(space.high == 1):
        return action
    unit = np.ones(space.shape, dtype=space.dtype)
    _, _, to_env = rescale_box(space, -unit, unit)  # the function RescaleAction applies
    return to_env(action)
