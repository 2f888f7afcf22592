"""Replay storage for sequences of environment steps.

Step t of an env stream stores the observation o_t, the action a_{t-1} that *led to* o_t (zero at
``is_first``), the reward r_t received together with o_t, and the flags of o_t::

    obs:          o0     o1     o2     o3(last)   o0'(first)   o1'
    action:       0      a0     a1     a2         0            a0'
    reward:       0      r1     r2     r3         0            r1'
    is_first:     1      0      0      0          1            0
    is_last:      0      0      0      1          0            0

``is_terminal`` marks a true end of the MDP (no bootstrap); ``is_last`` also covers truncation.

Layout: every key is a time-major ring buffer of shape (rows, num_envs, *shape) with
rows = capacity // num_envs; one column per env stream, and all streams advance together under one
write head. A sequence is T consecutive rows of one column, drawn from the rows that currently hold
data, so it never reads unwritten slots and never straddles the write head (old and new data never
mix). It may cross episode boundaries; ``is_first`` marks the resets.

Rows carry an absolute number (0, 1, 2, ... in order of ``add``); the row with absolute number a sits
at physical row a % rows. The ``index`` that ``sample`` returns is ``absolute * num_envs + stream``,
so ``update_context`` can tell whether a slot was overwritten since it was sampled.

Replay context (newest DreamerV3 recipe): ``update_context`` stores the model's posterior latent per
replayed step; ``sample`` returns the latent of the step just before each sequence, so the model can
start from it instead of zeros.

Settings (capacity, storage folder, sampler) come whole in one ``ReplayConfig``; where each sequence
starts is the job of the sampler it names (``lit_dreamer.sampling.SAMPLERS``). The step keys and
spec types are defined in ``lit_dreamer.steps``. Not thread-safe: guard it with a lock if the
collector and the learner run in different threads.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.lib.format import open_memmap

from lit_dreamer.relabel import REWARD_KEY, relabel_batch
from lit_dreamer.sampling import ReplayConfig, make_sampler
from lit_dreamer.steps import CONTEXT_PREFIX, SpecLike, clashes_with_a_batch_key

_COPY_CHUNK_BYTES = 64 << 20
_FORMAT_VERSION = 1
_NPY_HEADER_BOUND = 4096  # np.save pads its header to a multiple of 64 bytes; far less than this
_META_BOUND = 64 << 10


def _file_name(kind: str, position: int, name: str) -> str:
    return f"{kind}-{position:02d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.npy"


class Replay:
    """Time-major ring buffers of env steps, sampled as (B, T) sequences of one env stream each.

    Args:
        spec: shape (without batch) and dtype of each key of a step, e.g. ``envs.space_spec(env)``.
        settings: ``capacity`` (steps over all streams; each stream keeps ``capacity // num_envs``),
            ``directory`` (if set, the buffers are ``.npy`` memmaps there, created fresh: existing
            buffer files are overwritten, so capacity is bounded by disk, not RAM) and the sampler
            (``sampling`` and its settings). Default: ``ReplayConfig()``.
        num_envs: env streams written together by each ``add`` (over all tasks).
        seed: seed of the replay's own generator, which drives all sampling.
        num_tasks: tasks whose streams lie side by side: task k writes columns
            [k * num_envs // num_tasks, (k + 1) * num_envs // num_tasks); ``settings.task_balance``
            gives each task an equal share of every batch (see ``lit_dreamer.sampling.Sampler``).
    """

    def __init__(self, spec: SpecLike, settings: ReplayConfig | None = None, num_envs: int = 1, *, seed: int = 0,
                 num_tasks: int = 1):
        settings = ReplayConfig() if settings is None else settings
        capacity, directory = settings.capacity, settings.directory
        if num_envs < 1 or capacity < num_envs:
            raise ValueError(f"need num_envs >= 1 and capacity >= num_envs, got {capacity=} {num_envs=}")
        self.sampler = make_sampler(settings, num_envs, num_tasks)
        self.settings = settings
        self.spec = {key: (tuple(int(size) for size in shape), np.dtype(dtype)) for key, (shape, dtype) in spec.items()}
        for key in self.spec:
            if clashes_with_a_batch_key(key):
                raise ValueError(f"spec key {key!r} is reserved for what sample() returns; rename it")
        self.num_envs, self.num_tasks = num_envs, num_tasks
        self.directory = directory
        self._rows = capacity // num_envs
        self._rng = np.random.default_rng(seed)
        self._rows_added = 0
        self._draws = 0  # batches drawn: turns the rotation of the task shares
        if directory is not None:
            os.makedirs(directory, exist_ok=True)
        self._data = {
            key: self._allocate(_file_name("data", position, key), (self._rows, num_envs, *shape), dtype)
            for position, (key, (shape, dtype)) in enumerate(self.spec.items())
        }
        self._has_context = self._allocate("has_context.npy", (self._rows, num_envs), np.bool_)
        self._context: dict[str, np.ndarray] = {}
        self.hindsight_fraction = 0.0
        """Share of the sequences holding a relabelled episode that ``sample`` swaps to its second label
        (``lit_dreamer.relabel``; only where the spec has the ``hindsight_*`` keys)."""

    # ----------------------------------------------------------------------------- storage
    def _allocate(self, file_name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        if self.directory is None:
            return np.zeros(shape, dtype)
        return open_memmap(os.path.join(self.directory, file_name), mode="w+", dtype=dtype, shape=shape)

    def _context_array(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """The buffer of one latent, allocated on first use from the shape and dtype it is given."""
        if name not in self._context:
            file_name = _file_name("context", len(self._context), name)
            self._context[name] = self._allocate(file_name, (self._rows, self.num_envs, *shape), dtype)
        array = self._context[name]
        if array.shape[2:] != tuple(shape):
            raise ValueError(f"context {name!r} has per-step shape {tuple(shape)}, stored ones {array.shape[2:]}")
        return array

    @property
    def capacity(self) -> int:
        return self._rows * self.num_envs

    @property
    def nbytes(self) -> int:
        """Bytes of all buffers (on disk in memmap mode)."""
        arrays = [*self._data.values(), *self._context.values(), self._has_context]
        return sum(array.nbytes for array in arrays)

    @property
    def _filled(self) -> int:
        """Rows per stream that hold data."""
        return min(self._rows_added, self._rows)

    def __len__(self) -> int:
        return self._filled * self.num_envs

    def add_step_key(self, key: str, shape: tuple[int, ...], dtype: Any) -> None:
        """A new step key, zero in every stored step: brings a snapshot from before the key existed up to
        date (``task`` in a one-task replay is 0 everywhere)."""
        if key in self.spec or clashes_with_a_batch_key(key):
            raise ValueError(f"cannot add the step key {key!r}: it exists or is reserved")
        self.spec[key] = (tuple(shape), np.dtype(dtype))
        position = len(self.spec) - 1
        self._data[key] = self._allocate(_file_name("data", position, key), (self._rows, self.num_envs, *shape), dtype)

    # ----------------------------------------------------------------------------- writing
    def add(self, step: Mapping[str, np.ndarray], context: Mapping[str, np.ndarray] | None = None) -> None:
        """Write one vector step: each value shaped (num_envs, *shape); optional latents (num_envs, ...)."""
        if step.keys() != self.spec.keys():
            raise ValueError(
                f"step keys differ from the spec: missing {sorted(self.spec.keys() - step.keys())}, "
                f"unexpected {sorted(step.keys() - self.spec.keys())}"
            )
        values = {key: np.asarray(value) for key, value in step.items()}
        for key, (shape, _) in self.spec.items():
            if values[key].shape != (self.num_envs, *shape):
                raise ValueError(
                    f"step[{key!r}] has shape {values[key].shape}, expected (num_envs={self.num_envs}, *{shape})"
                )
        row = self._rows_added % self._rows
        for key, value in values.items():
            self._data[key][row] = value
        self._has_context[row] = False
        if context is not None:
            self._check_context_names(context)
            for name, value in context.items():
                value = np.asarray(value)
                self._context_array(name, value.shape[1:], value.dtype)[row] = value
            self._has_context[row] = True
        self._rows_added += 1

    def write_recent(self, stream: int, length: int, values: Mapping[str, Any]) -> None:
        """Overwrite keys of the last ``length`` steps of one env stream (the newest ``add`` included; clipped to
        the rows still stored): e.g. an episode's hindsight label, known once its last step is in. Each value is
        one step's (broadcast to every step) or ``length`` steps', oldest first."""
        count = min(length, self._filled)
        rows = np.arange(self._rows_added - count, self._rows_added) % self._rows
        for key, value in values.items():
            value = np.asarray(value)
            if value.shape[:1] == (length,) and value.ndim == len(self.spec[key][0]) + 1:
                value = value[length - count:]
            self._data[key][rows, stream] = value

    def _check_context_names(self, latents: Mapping[str, Any]) -> None:
        # One has_context flag covers all latents of a slot, so every write must bring all of them.
        if self._context and latents.keys() != self._context.keys():
            raise ValueError(f"context names {sorted(latents)} differ from the stored ones {sorted(self._context)}")

    def update_context(self, index: np.ndarray, latents: Mapping[str, np.ndarray]) -> None:
        """Store latents (B, T, ...) for the slots ``index`` (B, T) that ``sample`` returned.

        Slots overwritten by ``add`` since they were sampled are skipped, and so are ids of -1 (a sequence
        ``sample`` swapped to its hindsight label, whose latents read another instruction than the stored steps).
        """
        index = np.asarray(index, dtype=np.int64)
        if index.size and (index.min() < -1 or index.max() >= self._rows_added * self.num_envs):
            raise ValueError("index holds ids that this replay never returned from sample()")
        self._check_context_names(latents)
        absolute, streams = np.divmod(index, self.num_envs)
        live = (index >= 0) & (absolute >= self._rows_added - self._filled)
        rows, streams = absolute[live] % self._rows, streams[live]
        for name, value in latents.items():
            value = np.asarray(value)
            if value.shape[: index.ndim] != index.shape:
                raise ValueError(f"latent {name!r} has shape {value.shape}; its leading axes must be {index.shape}")
            self._context_array(name, value.shape[index.ndim :], value.dtype)[rows, streams] = value[live]
        self._has_context[rows, streams] = True

    # ----------------------------------------------------------------------------- sampling
    def sample(self, batch_size: int, length: int) -> dict[str, np.ndarray]:
        """B sequences of T consecutive steps, each from one env stream: every key as (B, T, ...).

        Also returns ``index`` (B, T) int64 for ``update_context``, ``context_valid`` (B,) and, once
        latents are stored, ``context/<name>`` (B, ...): the latent of the step before each sequence
        (zeros where ``context_valid`` is False).
        """
        draw = self.draw(batch_size, length)
        batch = {**{key: array[draw.rows, draw.columns] for key, array in self._data.items()}, **draw.extras}
        return relabel_batch(batch, self._rng, self.hindsight_fraction)

    def draw(self, batch_size: int, length: int) -> Draw:
        """Where the sequences of one ``sample`` lie, and its small keys; ``sample`` gathers the step keys.

        A copy of ``storage`` elsewhere (e.g. on an accelerator) gathers the same batch with
        ``copy[draw.rows, draw.columns]``; the generator advances exactly as in ``sample``.
        """
        if length > self._rows:
            raise ValueError(f"length={length} exceeds the {self._rows} steps each env stream can hold")
        if self._filled < length:
            raise ValueError(
                f"the replay holds {self._filled} steps per env stream but sample(length={length}) needs at "
                f"least {length}; collect more steps before sampling"
            )
        starts, streams = self.sampler.draw(self._rng, batch_size, self._filled - length + 1, self._draws,
                                            rewarded=self._rewarded, length=length)
        self._draws += 1
        first = self._rows_added - self._filled + starts
        absolute = first[:, None] + np.arange(length)
        rows, columns = absolute % self._rows, streams[:, None]
        extras = {"index": absolute * self.num_envs + columns}
        extras.update(self._gather_context(first - 1, streams, has_previous=starts > 0))
        return Draw(rows, columns, extras)

    def _rewarded(self) -> tuple[np.ndarray, np.ndarray]:
        """The stored steps with a nonzero reward, or a nonzero reward under a hindsight label: (offsets from the
        oldest stored row, streams)."""
        rows = (self._rows_added - self._filled + np.arange(self._filled)) % self._rows
        rewarded = self._data["reward"][rows] != 0
        if REWARD_KEY in self._data:
            rewarded |= self._data[REWARD_KEY][rows] != 0
        offsets, streams = np.nonzero(rewarded)
        return offsets, streams

    @property
    def storage(self) -> Mapping[str, np.ndarray]:
        """The step buffers, (rows, num_envs, *shape) per key: read them, write only through ``add`` (and
        ``write_recent``, which a copy elsewhere does not follow: ``replay.device=auto`` refuses hindsight)."""
        return self._data

    @property
    def rows_added(self) -> int:
        """Rows written by ``add`` since the replay began (its absolute row counter)."""
        return self._rows_added

    def rows_since(self, rows_added: int) -> np.ndarray:
        """Physical rows written since ``rows_added`` was the counter, oldest first, at most one ring of them."""
        start = max(rows_added, self._rows_added - self._filled)
        return np.arange(start, self._rows_added) % self._rows

    def _gather_context(self, previous: np.ndarray, streams: np.ndarray, has_previous: np.ndarray) -> dict:
        if not self._context:
            return {"context_valid": np.zeros(len(streams), np.bool_)}
        # The oldest row's predecessor is unwritten or already overwritten: has_previous excludes it.
        rows = previous % self._rows
        valid = has_previous & self._has_context[rows, streams]
        gathered = {"context_valid": valid}
        for name, array in self._context.items():
            values = array[rows, streams]
            values[~valid] = 0
            gathered[CONTEXT_PREFIX + name] = values
        return gathered

    # ----------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Counters and RNG state (plain JSON-able types); the buffers themselves go through save()."""
        return {"rows_added": self._rows_added, "rng": self._rng.bit_generator.state, "draws": self._draws}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._rows_added = int(state["rows_added"])
        self._rng.bit_generator.state = dict(state["rng"])
        self._draws = int(state.get("draws", 0))  # snapshots from before multi-task replay lack it

    def save(self, path: str) -> None:
        """Write a complete snapshot into directory ``path``, replacing any previous one atomically.

        The snapshot is built in ``path.tmp-<pid>`` and swapped in by renames, so a crash leaves
        either the old or the new snapshot in place (or, between the two renames, the old one in
        ``path.old-<pid>``, where ``load`` finds it).
        """
        path = os.path.abspath(path)
        if self.directory is not None and os.path.realpath(self.directory) == os.path.realpath(path):
            raise ValueError(f"cannot save into the replay's own storage directory {path!r}")
        temporary = f"{path}.tmp-{os.getpid()}"
        shutil.rmtree(temporary, ignore_errors=True)
        os.makedirs(temporary)
        try:
            files = self._write_arrays(temporary)
            # meta.json is written last: a directory that has it is a complete snapshot.
            _write_file(os.path.join(temporary, "meta.json"), json.dumps(self._metadata(files)).encode())
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        previous = f"{path}.old-{os.getpid()}"
        if os.path.exists(path):
            os.rename(path, previous)
        os.rename(temporary, path)
        _sync_directory(os.path.dirname(path))
        shutil.rmtree(previous, ignore_errors=True)

    def _write_arrays(self, directory: str) -> dict[str, Any]:
        # Until the ring wraps, data sits in rows [0, filled); after it, all rows hold data.
        filled = self._filled
        files: dict[str, Any] = {"data": {}, "context": {}, "has_context": "has_context.npy"}
        for position, (key, array) in enumerate(self._data.items()):
            files["data"][key] = _file_name("data", position, key)
            _save_array(os.path.join(directory, files["data"][key]), array[:filled])
        for position, (name, array) in enumerate(self._context.items()):
            files["context"][name] = _file_name("context", position, name)
            _save_array(os.path.join(directory, files["context"][name]), array[:filled])
        _save_array(os.path.join(directory, files["has_context"]), self._has_context[:filled])
        return files

    def _metadata(self, files: dict[str, Any]) -> dict[str, Any]:
        return {
            "format": _FORMAT_VERSION,
            "spec": {key: [list(shape), dtype.str] for key, (shape, dtype) in self.spec.items()},
            "capacity": self.capacity,
            "num_envs": self.num_envs,
            "num_tasks": self.num_tasks,
            "state": self.state_dict(),
            "files": files,
        }

    @property
    def snapshot_nbytes(self) -> int:
        """Bytes that ``save`` writes now: the rows that hold data, plus a bound for headers and meta.json."""
        filled = self._filled
        arrays = [*self._data.values(), *self._context.values(), self._has_context]
        return sum(array[:filled].nbytes + _NPY_HEADER_BOUND for array in arrays) + _META_BOUND

    @classmethod
    def load(cls, path: str, settings: ReplayConfig | None = None, *, context: bool = True,
             seed: int | None = None) -> Replay:
        """Restore a snapshot written by ``save`` under ``settings``: the current run's, not the saved run's.

        ``settings`` gives the capacity, the storage (RAM, or memmaps in ``settings.directory``) and
        the sampler the restored replay uses; None: the snapshot's capacity in RAM with uniform
        sampling (to look at a snapshot). A capacity below the stored steps raises
        ReplayCapacityError: it would silently drop the oldest data. Arrays are read through
        read-only memmaps and copied in chunks, so RAM never holds the snapshot and the storage at
        once. A missing, truncated or otherwise damaged file raises ReplaySnapshotError naming it,
        before anything is allocated.

        ``context=False`` leaves the stored replay-context latents behind (they belong to the model that
        wrote them; another model stores its own as it trains). ``seed`` restarts sampling from a generator
        of that seed instead of the saved one (a new run reading another run's data).
        """
        snapshot, meta = check_snapshot(path)
        settings = ReplayConfig(capacity=meta["capacity"]) if settings is None else settings
        directory = settings.directory
        if directory is not None and os.path.realpath(directory) == os.path.realpath(snapshot):
            raise ValueError("load the replay into a directory other than the snapshot it reads")
        num_envs, rows_added = meta["num_envs"], int(meta["state"]["rows_added"])
        stored_rows = meta["capacity"] // num_envs
        filled = min(rows_added, stored_rows)
        if settings.capacity // num_envs < filled:
            raise ReplayCapacityError(snapshot, settings.capacity, filled * num_envs)
        spec = {key: (tuple(shape), np.dtype(dtype)) for key, (shape, dtype) in meta["spec"].items()}
        replay = cls(spec, settings, num_envs, num_tasks=int(meta.get("num_tasks", 1)))
        state = dict(meta["state"])
        if seed is not None:
            state.update(rng=np.random.default_rng(seed).bit_generator.state, draws=0)
        if replay._rows == stored_rows:  # the same ring: every row goes back where it was
            replay._restore_arrays(snapshot, meta["files"], oldest=0, context=context)
            replay.load_state_dict(state)
            return replay
        # Another ring size: the stored rows, oldest first, become rows 0..filled-1 of the new ring,
        # numbered afresh (ids that sample() returned before the save do not outlive it anyway).
        replay._restore_arrays(snapshot, meta["files"], oldest=(rows_added - filled) % stored_rows, context=context)
        replay.load_state_dict({**state, "rows_added": filled})
        return replay

    def _restore_arrays(self, snapshot: str, files: Mapping[str, Any], oldest: int, context: bool = True) -> None:
        """Copy each array of a checked snapshot, whose oldest row is ``oldest``, into this replay's first rows
        (without its latents and their flags when ``context`` is False: no slot then has context)."""
        for key, file_name in files["data"].items():
            _copy_in_order(np.load(os.path.join(snapshot, file_name), mmap_mode="r"), self._data[key], oldest)
        if not context:
            return
        for name, file_name in files["context"].items():
            source = np.load(os.path.join(snapshot, file_name), mmap_mode="r")
            _copy_in_order(source, self._context_array(name, source.shape[2:], source.dtype), oldest)
        _copy_in_order(np.load(os.path.join(snapshot, files["has_context"]), mmap_mode="r"), self._has_context, oldest)


@dataclass
class Draw:
    """The sequences of one batch: step keys are ``storage[key][rows, columns]``, (B, T, ...)."""

    rows: np.ndarray
    """(B, T) physical rows."""
    columns: np.ndarray
    """(B, 1) env stream of each sequence."""
    extras: dict[str, np.ndarray]
    """``index``, ``context_valid`` and ``context/<name>``, as ``sample`` returns them."""


class ReplayCapacityError(ValueError):
    """Settings whose capacity cannot hold the steps a snapshot stores."""

    def __init__(self, snapshot: str, capacity: int, stored: int):
        super().__init__(f"replay capacity {capacity} is below the {stored} steps stored in the snapshot {snapshot}")
        self.snapshot, self.capacity, self.stored = snapshot, capacity, stored


class ReplaySnapshotError(ValueError):
    """A replay snapshot that cannot be loaded: ``file`` is the missing or damaged file, ``problem`` says how."""

    def __init__(self, file: str, problem: str):
        super().__init__(f"replay snapshot file {file} {problem}")
        self.file, self.problem = file, problem


class MissingReplaySnapshot(ReplaySnapshotError, FileNotFoundError):
    """No snapshot at all where one was expected (also a FileNotFoundError)."""


def check_snapshot(path: str) -> tuple[str, dict[str, Any]]:
    """The snapshot folder of ``path`` and its meta.json, once every file it lists is checked.

    Reads only headers and sizes, not the data: cheap enough to run before each resume.
    """
    snapshot = _find_snapshot(os.path.abspath(path))
    meta = _read_meta(os.path.join(snapshot, "meta.json"))
    rows = meta["capacity"] // meta["num_envs"]
    filled = min(int(meta["state"]["rows_added"]), rows)
    for key, file_name in meta["files"]["data"].items():
        shape, dtype = meta["spec"][key]
        _check_array(os.path.join(snapshot, file_name), (filled, meta["num_envs"], *shape), np.dtype(dtype))
    for file_name in meta["files"]["context"].values():
        _check_array(os.path.join(snapshot, file_name), (filled, meta["num_envs"]), None)
    _check_array(os.path.join(snapshot, meta["files"]["has_context"]), (filled, meta["num_envs"]), np.dtype(np.bool_))
    return snapshot, meta


def _read_meta(file: str) -> dict[str, Any]:
    try:
        with open(file) as handle:
            meta = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReplaySnapshotError(file, f"cannot be read ({type(err).__name__}: {err})") from None
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT_VERSION:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ReplaySnapshotError(file, f"has format {found!r}, expected {_FORMAT_VERSION}")
    try:
        # Every key that load() reads, with the type it needs: a damaged file fails here, not halfway.
        if int(meta["capacity"]) < int(meta["num_envs"]) or int(meta["num_envs"]) < 1:
            raise ValueError(f"capacity {meta['capacity']} and num_envs {meta['num_envs']} do not fit")
        if int(meta["num_envs"]) % int(meta.get("num_tasks", 1)):
            raise ValueError(f"num_envs {meta['num_envs']} does not split over num_tasks {meta['num_tasks']}")
        int(meta["state"]["rows_added"])
        dict(meta["state"]["rng"])
        dtypes = [np.dtype(dtype) for _, dtype in meta["spec"].values()]
        if set(meta["files"]["data"]) != set(meta["spec"]) or not isinstance(meta["files"]["context"], dict):
            raise ValueError("the files listed differ from the spec")
        # Snapshots written before the settings moved out of them also hold sampling and
        # recency_half_life: they are ignored, since the run's own settings apply on load.
        if not isinstance(meta["files"]["has_context"], str):
            raise ValueError("files.has_context is not what save() writes")
    except (KeyError, TypeError, ValueError) as err:
        raise ReplaySnapshotError(file, f"is incomplete or malformed ({type(err).__name__}: {err})") from None
    if any(dtype.hasobject for dtype in dtypes):
        raise ReplaySnapshotError(file, "lists an object dtype, which a replay never stores")
    return meta


def _check_array(file: str, shape: tuple[int, ...], dtype: np.dtype | None) -> None:
    """Refuse a missing .npy, one holding Python objects, one shorter than its header says, or one of
    another dtype or shape (dtype None: a latent, any dtype and any trailing axes after ``shape``)."""
    try:
        with open(file, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read_header:
                raise ValueError(f".npy version {version} is not one np.save writes for a replay")
            header = read_header[version](handle)
            data_start = handle.tell()
    except FileNotFoundError:
        raise ReplaySnapshotError(file, "is missing") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise ReplaySnapshotError(file, f"has no valid .npy header ({err})") from None
    found_shape, fortran, found_dtype = header
    if found_dtype.hasobject:
        raise ReplaySnapshotError(file, "holds Python objects (object dtype), which a replay never stores")
    if dtype is not None and found_dtype != dtype:
        raise ReplaySnapshotError(file, f"has dtype {found_dtype}, expected {dtype}")
    if fortran or tuple(found_shape[: len(shape)]) != shape or (dtype is not None and len(found_shape) != len(shape)):
        raise ReplaySnapshotError(file, f"has shape {tuple(found_shape)}, expected {shape}"
                                        + ("" if dtype is not None else " followed by the latent's shape"))
    expected = data_start + math.prod(found_shape) * found_dtype.itemsize
    size = os.path.getsize(file)
    if size < expected:
        raise ReplaySnapshotError(file, f"is truncated ({size} of {expected} bytes)")

def _write_file(path: str, payload: bytes) -> None:
    with open(path, "wb") as file:
        file.write(payload)
        file.flush()
        os.fsync(file.fileno())


def _save_array(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as file:
        np.save(file, array)
        file.flush()
        os.fsync(file.fileno())


def _sync_directory(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _copy_in_chunks(source: np.ndarray, target: np.ndarray) -> None:
    """Copy source into the first rows of target, a bounded number of bytes at a time."""
    row_bytes = max(1, source[0].nbytes) if len(source) else 1
    step = max(1, _COPY_CHUNK_BYTES // row_bytes)
    for start in range(0, len(source), step):
        stop = min(start + step, len(source))
        target[start:stop] = source[start:stop]


def _copy_in_order(source: np.ndarray, target: np.ndarray, oldest: int) -> None:
    """Copy a stored ring whose oldest row is ``oldest`` into the first rows of target, oldest first
    (``oldest=0``: row for row)."""
    _copy_in_chunks(source[oldest:], target)
    _copy_in_chunks(source[:oldest], target[len(source) - oldest :])


def _find_snapshot(path: str) -> str:
    """``path`` if it holds a complete snapshot, else one left in ``path.old-<pid>`` by a crash."""
    if os.path.exists(os.path.join(path, "meta.json")):
        return path
    leftovers = [old for old in glob.glob(f"{glob.escape(path)}.old-*") if os.path.exists(os.path.join(old, "meta.json"))]
    if leftovers:
        return max(leftovers, key=os.path.getmtime)
    if os.path.isdir(path):
        raise MissingReplaySnapshot(os.path.join(path, "meta.json"), "is missing (a snapshot is complete once it has one)")
    raise MissingReplaySnapshot(path, "is missing: no replay snapshot there")
