"""`python -m lit_dreamer convert-episodes SRC_DIR out=PATH`: episodes logged as .npz files -> a replay snapshot.

The episode format (one `.npz` file per episode, read in file-name order; T observations, T >= 2):

    <any other name>   (T, ...) an observation key: (T,) or (T, D) numbers (stored as float32 vectors), or
                       (T, H, W, C) uint8 images. Every file has the same keys, shapes and dtypes.
    action             (T-1,) integer indices of a discrete action space, or (T-1, A) floats of a box
                       space: action[t] is the action taken at observation t.
    reward             (T-1,) floats: reward[t] is the reward received for action[t] (with observation t+1).
    terminated         optional scalar bool, default false: the episode ended in a terminal state (no value
                       after its last observation); false means it was cut (time limit, end of the log).

Box actions are stored in [-1, 1], as the agent acts: give the env's bounds with action_low and action_high
to rescale them (default: already in [-1, 1]). The replay step flags (is_first, is_last, is_terminal) are
derived from the episode boundaries; a step stores the action that *led* to its observation (see
`lit_dreamer.replay`). The output is a replay snapshot folder that `fit offline.replay=PATH` reads; its
meta.json records whether the actions are discrete.
"""

from __future__ import annotations

import glob
import json
import os
import zipfile
from dataclasses import dataclass
from typing import Optional

import numpy as np

from lit_dreamer.config import ConfigError
from lit_dreamer.offline import ACTION_KIND_KEY
from lit_dreamer.options import at_least, checked
from lit_dreamer.replay import Replay
from lit_dreamer.sampling import ReplayConfig
from lit_dreamer.steps import is_reserved

STEP_ARRAYS = ("action", "reward", "terminated")
"""The arrays of an episode file that are not observations."""


@dataclass
class ConvertOptions:
    """Options of `python -m lit_dreamer convert-episodes SRC_DIR ...`."""

    out: Optional[str] = None
    """The replay snapshot folder to write (required; it must not exist yet)."""
    num_actions: Optional[int] = checked(None, at_least(1))
    """Size of a discrete action space (None: the largest action index in the episodes + 1)."""
    action_low: float = -1.0
    """Lower bound of every dimension of a box action space, mapped to -1."""
    action_high: float = 1.0
    """Upper bound of every dimension of a box action space, mapped to 1."""


@dataclass
class Episode:
    """One episode file, checked: its observations, actions (as stored: one-hot or in [-1, 1]) and rewards."""

    file: str
    obs: dict[str, np.ndarray]
    action: np.ndarray
    reward: np.ndarray
    terminated: bool

    @property
    def length(self) -> int:
        return len(self.reward) + 1


def convert_episodes(source: str, options: ConvertOptions) -> dict:
    """Write the episodes in `source` as one replay snapshot at options.out; returns a summary."""
    if options.out is None:
        raise ConfigError("convert-episodes needs out=PATH, the replay folder to write")
    if os.path.exists(options.out):
        raise ConfigError(f"out={options.out} exists; give a new folder (a replay snapshot is never overwritten)")
    if options.action_high <= options.action_low:
        raise ConfigError(f"action_high={options.action_high} must be above action_low={options.action_low}")
    files = episode_files(source)
    raw = [read_episode(file) for file in files]
    check_same_layout(raw)
    discrete = np.issubdtype(raw[0]["action"].dtype, np.integer)
    num_actions = options.num_actions or (1 + max(int(r["action"].max(initial=0)) for r in raw) if discrete else 0)
    episodes = [to_episode(r, discrete, num_actions, options) for r in raw]
    replay = fill_replay(episodes)
    write_snapshot(replay, options.out, "discrete" if discrete else "continuous")
    return {"episodes": len(episodes), "steps": len(replay), "out": options.out,
            "action": f"discrete, {num_actions} actions" if discrete else f"continuous, {episodes[0].action.shape[1]} dims",
            "observations": {k: f"{v.dtype}{list(v.shape[1:])}" for k, v in episodes[0].obs.items()}}


def episode_files(source: str) -> list[str]:
    if not os.path.isdir(source):
        raise ConfigError(f"convert-episodes: {source} is not a folder; give the folder of the .npz episode files")
    files = sorted(glob.glob(os.path.join(glob.escape(source), "*.npz")))
    if not files:
        raise ConfigError(f"convert-episodes: {source} holds no .npz files (one per episode)")
    return files


def read_episode(file: str) -> dict[str, np.ndarray]:
    """The arrays of one episode file, with the lengths and kinds checked; ConfigError naming file and array."""
    try:
        with np.load(file, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise ConfigError(f"{file}: cannot be read as a .npz of arrays ({err})") from None
    arrays["__file__"] = np.array(file)
    for name in ("action", "reward"):
        if name not in arrays:
            raise ConfigError(f"{file}: no `{name}` array; an episode file holds its observations, `action` (T-1) "
                              "and `reward` (T-1)")
    obs = {k: v for k, v in arrays.items() if k not in STEP_ARRAYS and k != "__file__"}
    if not obs:
        raise ConfigError(f"{file}: no observation array (any array besides action, reward, terminated)")
    for name in obs:
        if is_reserved(name):
            raise ConfigError(f"{file}: array `{name}` is a name the replay keeps for itself (step flags are derived "
                              "from the episode: is_first, is_last, is_terminal); rename or remove it")
    lengths = {len(v) if v.ndim else 0 for v in obs.values()}
    if len(lengths) > 1 or min(lengths) < 2:
        shown = ", ".join(f"{k} {v.shape}" for k, v in obs.items())
        raise ConfigError(f"{file}: the observation arrays need one length T >= 2 along their first axis: {shown}")
    steps = lengths.pop()
    for name in ("action", "reward"):
        if arrays[name].ndim == 0 or len(arrays[name]) != steps - 1:
            raise ConfigError(f"{file}: `{name}` has shape {arrays[name].shape}, but T={steps} observations need "
                              f"T-1={steps - 1} of them (the last observation has no action and no reward after it)")
    if arrays["reward"].ndim != 1 or not np.issubdtype(arrays["reward"].dtype, np.number):
        raise ConfigError(f"{file}: `reward` must be numbers of shape (T-1,), got {arrays['reward'].dtype} "
                          f"{arrays['reward'].shape}")
    return arrays


def check_same_layout(raw: list[dict[str, np.ndarray]]) -> None:
    """Every episode has the first one's arrays, trailing shapes and kinds of dtype."""
    def layout(arrays: dict[str, np.ndarray]) -> dict[str, tuple]:
        return {k: (v.shape[1:], v.dtype.kind) for k, v in arrays.items() if k not in ("__file__", "terminated")}

    first = layout(raw[0])
    for arrays in raw[1:]:
        other = layout(arrays)
        for name in sorted(set(first) | set(other)):
            if first.get(name) != other.get(name):
                raise ConfigError(f"{arrays['__file__']}: array `{name}` is {_described(other.get(name))}, but in "
                                  f"{raw[0]['__file__']} it is {_described(first.get(name))}; every episode needs the "
                                  "same arrays with the same shapes and kinds of dtype")


def _described(entry: tuple | None) -> str:
    if entry is None:
        return "missing"
    kinds = {"b": "bool", "i": "int", "u": "unsigned int", "f": "float"}
    return f"{kinds.get(entry[1], entry[1])} of per-step shape {entry[0]}"


def to_episode(arrays: dict[str, np.ndarray], discrete: bool, num_actions: int, options: ConvertOptions) -> Episode:
    """One checked episode with observations, actions and rewards as the replay stores them."""
    file = str(arrays["__file__"])
    obs = {name: observation(file, name, value) for name, value in arrays.items()
           if name not in STEP_ARRAYS and name != "__file__"}
    reward = arrays["reward"].astype(np.float32)
    if not np.isfinite(reward).all():
        raise ConfigError(f"{file}: `reward` holds NaN or infinite values")
    action = (one_hot(file, arrays["action"], num_actions) if discrete
              else box_action(file, arrays["action"], options.action_low, options.action_high))
    return Episode(file, obs, action, reward, terminated_flag(file, arrays.get("terminated")))


def observation(file: str, name: str, value: np.ndarray) -> np.ndarray:
    """(T, D) float32 for numbers, (T, H, W, C) uint8 kept for images."""
    if value.dtype == np.uint8 and value.ndim == 4:
        return value
    if value.dtype.kind not in "biuf" or value.ndim > 2:
        raise ConfigError(f"{file}: observation `{name}` is {value.dtype} of shape {value.shape}; an observation is "
                          "(T,) or (T, D) numbers, or (T, H, W, C) uint8 images")
    vector = value.reshape(len(value), -1).astype(np.float32)
    if not np.isfinite(vector).all():
        raise ConfigError(f"{file}: observation `{name}` holds NaN or infinite values")
    return vector


def one_hot(file: str, action: np.ndarray, num_actions: int) -> np.ndarray:
    if action.ndim != 1:
        raise ConfigError(f"{file}: discrete `action` must be indices of shape (T-1,), got {action.shape}")
    if action.size and (action.min() < 0 or action.max() >= num_actions):
        raise ConfigError(f"{file}: `action` holds indices {int(action.min())}..{int(action.max())}, outside "
                          f"0..{num_actions - 1} (num_actions={num_actions})")
    return np.eye(num_actions, dtype=np.float32)[action]


def box_action(file: str, action: np.ndarray, low: float, high: float) -> np.ndarray:
    if action.ndim != 2 or action.dtype.kind != "f":
        raise ConfigError(f"{file}: `action` must be integer indices (T-1,) of a discrete space or floats (T-1, A) "
                          f"of a box space, got {action.dtype} {action.shape}")
    scaled = (2.0 * (action.astype(np.float64) - low) / (high - low) - 1.0).astype(np.float32)
    if not np.isfinite(scaled).all() or np.abs(scaled).max(initial=0.0) > 1.0 + 1e-5:
        raise ConfigError(f"{file}: `action` holds values outside [action_low, action_high] = [{low}, {high}] "
                          f"(from {float(np.nanmin(action)):.4g} to {float(np.nanmax(action)):.4g}); give the env's "
                          "bounds with action_low=X action_high=Y")
    return np.clip(scaled, -1.0, 1.0)


def terminated_flag(file: str, value: np.ndarray | None) -> bool:
    if value is None:
        return False
    if value.shape != () or value.dtype.kind not in "biu" or value not in (0, 1):
        raise ConfigError(f"{file}: `terminated` must be one bool (true: a terminal state ended the episode), "
                          f"got {value.dtype} {value.shape}")
    return bool(value)


def fill_replay(episodes: list[Episode]) -> Replay:
    """One env stream holding the episodes one after another, as the collector would have written them."""
    first = episodes[0]
    spec = {name: (value.shape[1:], value.dtype) for name, value in first.obs.items()}
    spec.update({"action": ((first.action.shape[1],), np.float32), "reward": ((), np.float32),
                 "is_first": ((), np.bool_), "is_last": ((), np.bool_), "is_terminal": ((), np.bool_)})
    replay = Replay(spec, ReplayConfig(capacity=sum(e.length for e in episodes)), num_envs=1)
    for episode in episodes:
        for t in range(episode.length):
            last = t == episode.length - 1
            step = {name: value[t][None] for name, value in episode.obs.items()}
            step["action"] = (episode.action[t - 1] if t else np.zeros_like(episode.action[0]))[None]
            step["reward"] = np.array([episode.reward[t - 1] if t else 0.0], np.float32)
            step["is_first"], step["is_last"] = np.array([t == 0]), np.array([last])
            step["is_terminal"] = np.array([last and episode.terminated])
            replay.add(step)
    return replay


def write_snapshot(replay: Replay, out: str, kind: str) -> None:
    """Replay.save, then meta.json with the action kind (swapped in whole: a snapshot with it is complete)."""
    replay.save(out)
    meta_file = os.path.join(out, "meta.json")
    with open(meta_file) as f:
        meta = json.load(f)
    meta[ACTION_KIND_KEY] = kind
    with open(meta_file + ".tmp", "w") as f:
        json.dump(meta, f)
    os.replace(meta_file + ".tmp", meta_file)
