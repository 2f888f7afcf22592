"""An env's own spaces, described in plain data at fit time, and observations converted from them without the env.

`describe_spaces(env)` reads an env made by ``make_env``: the observation and action spaces of the env that
``gym.make(id)`` gives (before lit_dreamer's wrappers), and the conversions lit_dreamer's wrappers apply to an
observation on its way to the flat dict the agent reads. The description is plain lists, dicts, strings and
numbers: a checkpoint keeps it (``ckpt["lit_dreamer"]["spaces"]``), so that lit_dreamer.agent can take the
observations of the user's own env, and give back actions in its action space, with the env not installed.

A conversion that needs the env itself cannot be replayed from an observation: an image lit_dreamer renders
(``obs=pixels`` on gymnasium and dm_control envs, MiniGrid's RGB view) or Atari's preprocessing (frame skip with
max-pooling over frames). Such an agent takes observations in lit_dreamer's convention only (the flat dict
``make_env`` gives), and `ObservationAdapter` says so when given anything else.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from lit_dreamer.envs.adapters import DictObservation, FlatObservations
from lit_dreamer.envs.minigrid import OneHotGrid, one_hot_grid
from lit_dreamer.envs.text import TextTokens, Vocabulary, encode_texts, is_text_space

DESCRIPTION_VERSION = 1


# --------------------------------------------------------------------------------------------------
# Spaces as plain data


def _bound(values: np.ndarray) -> Any:
    """A Box bound as one number when it is the same everywhere (an image's 0 and 255), else a nested list."""
    flat = np.asarray(values).reshape(-1)
    return flat[0].item() if flat.size and np.all(flat == flat[0]) else np.asarray(values).tolist()


def space_to_data(space: spaces.Space) -> dict[str, Any]:
    """A gymnasium space as plain data (space_from_data inverts it); a space of another kind is kept by name only."""
    if isinstance(space, spaces.Dict):
        return {"type": "Dict", "spaces": {key: space_to_data(sub) for key, sub in space.spaces.items()}}
    if isinstance(space, spaces.Box):
        return {"type": "Box", "shape": list(space.shape), "dtype": str(space.dtype), "low": _bound(space.low),
                "high": _bound(space.high)}
    if isinstance(space, spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n), "start": int(space.start)}
    if isinstance(space, spaces.MultiDiscrete):
        return {"type": "MultiDiscrete", "nvec": space.nvec.tolist(), "start": space.start.tolist()}
    if isinstance(space, spaces.MultiBinary):
        return {"type": "MultiBinary", "n": int(space.n) if np.ndim(space.n) == 0 else list(space.shape)}
    if is_text_space(space):  # gymnasium Text, minigrid's MissionSpace: samples are strings
        return {"type": "Text"}
    return {"type": "Other", "repr": repr(space)}


def space_from_data(data: dict[str, Any]) -> spaces.Space:
    """The gymnasium space that space_to_data described (a text space comes back as a gymnasium Text)."""
    kind = data["type"]
    if kind == "Dict":
        return spaces.Dict({key: space_from_data(sub) for key, sub in data["spaces"].items()})
    if kind == "Box":
        dtype = np.dtype(data["dtype"])
        shape = tuple(data["shape"])
        low = np.broadcast_to(np.asarray(data["low"], dtype), shape)
        high = np.broadcast_to(np.asarray(data["high"], dtype), shape)
        return spaces.Box(low, high, shape, dtype)
    if kind == "Discrete":
        return spaces.Discrete(data["n"], start=data["start"])
    if kind == "MultiDiscrete":
        return spaces.MultiDiscrete(data["nvec"], start=data["start"])
    if kind == "MultiBinary":
        return spaces.MultiBinary(data["n"])
    if kind == "Text":
        return spaces.Text(max_length=10_000)
    raise ValueError(f"the saved space {data.get('repr', kind)} cannot be rebuilt")


# --------------------------------------------------------------------------------------------------
# What make_env's wrappers do to an observation


def _conversion(wrapper: gym.Wrapper) -> dict[str, Any] | None:
    """The step a wrapper that changes the observation space applies, or None when it needs the env itself."""
    if isinstance(wrapper, gym.wrappers.ResizeObservation):
        return {"resize": list(wrapper.shape)}
    if isinstance(wrapper, OneHotGrid):
        return {"one_hot_grid": list(wrapper.widths)}
    if isinstance(wrapper, TextTokens):
        return {"text": {"keys": list(wrapper.keys), "length": int(wrapper.length)}}
    return None


def describe_spaces(env: gym.Env) -> dict[str, Any]:
    """The spaces of the env that ``gym.make`` gave (innermost in `env`, a ``make_env`` env) and the conversions
    between its observations and the flat dict: {"version", "observation", "action", "steps", "adapted", "keep",
    "raw", "needs_env"}. "raw" is False when a conversion needs the env (then "needs_env" names the wrapper)."""
    chain = []
    layer = env
    while isinstance(layer, gym.Wrapper):
        chain.append(layer)
        layer = layer.env
    steps, needs_env, flat = [], None, None
    for wrapper in reversed(chain):  # innermost first: the order an observation goes through them
        if isinstance(wrapper, DictObservation):
            flat = wrapper
            break
        if wrapper.observation_space == wrapper.env.observation_space:
            continue
        step = _conversion(wrapper)
        if step is None:
            needs_env = needs_env or type(wrapper).__name__
        steps.append(step)
    if flat is None:
        raise ValueError(f"{env} has no DictObservation wrapper: describe_spaces reads envs made by make_env")
    raw = needs_env is None
    return {"version": DESCRIPTION_VERSION, "observation": space_to_data(layer.observation_space),
            "action": space_to_data(layer.action_space), "steps": steps if raw else [],
            "adapted": space_to_data(flat.env.observation_space), "keep": list(flat.converter.keep),
            "raw": raw, "needs_env": needs_env}


# --------------------------------------------------------------------------------------------------
# Observations of the user's env -> the flat dict the agent reads


class ObservationAdapter:
    """Converts observations of the env a description was made from (single or batched) into batched flat dicts.

    obs_spec: the agent's {key: (shape, dtype)}; vocabularies: {text key: words in id order} (from the
    checkpoint); vocab_size: model.text_vocab. An unknown word of a text observation is out-of-vocabulary.
    """

    def __init__(self, description: dict[str, Any], obs_spec: dict[str, tuple[tuple[int, ...], str]],
                 vocabularies: dict[str, list[str]] | None = None, vocab_size: int = 256):
        self.description, self.obs_spec = description, obs_spec
        self.raw = bool(description.get("raw"))
        self.space = space_from_data(description["observation"]) if self.raw else None
        self.flat = FlatObservations(space_from_data(description["adapted"]), description.get("keep", ()))
        self.vocabularies = {key: Vocabulary(words, vocab_size, grow=False, key=key)
                             for key, words in (vocabularies or {}).items()}

    def __call__(self, obs: Any) -> tuple[dict[str, np.ndarray], bool]:
        """(flat dict of (N, ...) arrays, whether `obs` was a batch). A dict with exactly the agent's keys and
        shapes is taken as already in lit_dreamer's convention; anything else as the env's own observation."""
        if self.is_convention(obs):
            return self.from_convention(obs)
        if not self.raw:
            raise ValueError(f"this agent's observations are made by the env itself ({self.description['needs_env']}"
                             f"), so it takes them in lit_dreamer's convention only: a dict of "
                             f"{spec_text(self.obs_spec)} (one observation) or with a leading batch dim, as "
                             "lit_dreamer.envs.make_env gives them")
        lead = leading_shape(obs, self.space)
        if len(lead) > 1:
            raise ValueError(f"observations with leading dims {lead}: give one observation or a batch (N, ...)")
        items = [index_batch(obs, i) for i in range(lead[0])] if lead else [obs]
        converted = [self.convert(item) for item in items]
        return {key: np.stack([c[key] for c in converted]) for key in self.obs_spec}, bool(lead)

    def convert(self, obs: Any) -> dict[str, np.ndarray]:
        """One observation of the env's own space as the flat dict, through the steps the wrappers apply."""
        for step in self.description["steps"]:
            obs = apply_step(step, obs, self.vocabularies)
        return self.flat(obs)

    def is_convention(self, obs: Any) -> bool:
        """Whether obs is a dict with the agent's keys, each of its shape with at most one leading batch dim."""
        if not isinstance(obs, dict) or set(obs) != set(self.obs_spec):
            return False
        return all(np.shape(obs[key])[-len(shape):] == tuple(shape) if shape else np.ndim(obs[key]) <= 1
                   for key, (shape, _) in self.obs_spec.items())

    def from_convention(self, obs: dict[str, Any]) -> tuple[dict[str, np.ndarray], bool]:
        leads = {key: np.shape(obs[key])[:np.ndim(obs[key]) - len(shape)] for key, (shape, _) in self.obs_spec.items()}
        lead = next(iter(leads.values()))
        if len(lead) > 1 or any(other != lead for other in leads.values()):
            raise ValueError(f"observation entries with leading dims {leads}: every entry needs the same batch dim "
                             "(N,) or none")
        arrays = {key: np.asarray(obs[key], dtype=dtype).reshape(-1, *shape)
                  for key, (shape, dtype) in self.obs_spec.items()}
        return arrays, bool(lead)


def apply_step(step: dict[str, Any], obs: Any, vocabularies: dict[str, Vocabulary]) -> Any:
    """One conversion of describe_spaces' "steps", as its wrapper applies it."""
    if "resize" in step:
        import cv2
        height, width = step["resize"]
        image = np.asarray(obs)
        # ResizeObservation's call: cv2 takes (width, height) and drops a single channel, put back by the reshape.
        return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA).reshape(height, width,
                                                                                        *image.shape[2:])
    if "one_hot_grid" in step:
        return one_hot_grid(obs, tuple(step["one_hot_grid"]))
    if "text" in step:
        return encode_texts(obs, {key: vocabularies[key] for key in step["text"]["keys"]}, step["text"]["length"])
    raise ValueError(f"unknown observation conversion {step}")


def leading_shape(obs: Any, space: spaces.Space) -> tuple[int, ...]:
    """The batch dims of `obs` in front of what one observation of `space` has: () for one observation."""
    if isinstance(space, spaces.Dict):
        if not isinstance(obs, dict) or set(obs) != set(space.spaces):
            keys = sorted(obs) if isinstance(obs, dict) else type(obs).__name__
            raise ValueError(f"expected a dict with the keys {sorted(space.spaces)} (the env's observation), got "
                             f"{keys}")
        leads = {key: leading_shape(obs[key], sub) for key, sub in space.spaces.items()}
        lead = next(iter(leads.values()))
        if any(other != lead for other in leads.values()):
            raise ValueError(f"observation entries with different batch dims: {leads}")
        return lead
    if is_text_space(space) or isinstance(space, spaces.Text):
        return () if isinstance(obs, str) else (len(obs),)
    shape = tuple(space.shape) if space.shape is not None else ()
    have = np.shape(obs)
    if have[len(have) - len(shape):] != shape:
        raise ValueError(f"an observation of shape {have} is neither one of the env's observations {shape} nor a "
                         f"batch (N, {', '.join(map(str, shape))})")
    return have[:len(have) - len(shape)]


def index_batch(obs: Any, index: int) -> Any:
    """Observation number `index` of a batch (dicts entry by entry)."""
    if isinstance(obs, dict):
        return {key: index_batch(value, index) for key, value in obs.items()}
    return obs[index]


def spec_text(obs_spec: dict[str, tuple[tuple[int, ...], str]]) -> str:
    return ", ".join(f"{key}: {tuple(shape)} {dtype}" for key, (shape, dtype) in obs_spec.items())
