"""Open a checkpoint folder safely and name what is damaged in it (used by fit, eval and the callbacks).

A checkpoint folder `step-N/` holds `model.ckpt`, one `replay-rank<R>/` snapshot and one
`collector-rank<R>.json` per rank (see callbacks/checkpoint.py). A damaged file is never skipped or
replaced by an older checkpoint behind the user's back: the error names the file, says the folder
is damaged and points to the newest older complete `step-*`, and the user chooses.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from typing import Any

import torch

from lit_dreamer.config import ConfigError
from lit_dreamer.replay import ReplaySnapshotError, check_snapshot

_STEP_FOLDER = re.compile(r"step-\d+$")
_RANK_FILE = re.compile(r"(?:replay-rank(\d+)|collector-rank(\d+)\.json)$")


def open_checkpoint(path: str, *, mmap: bool = False) -> dict[str, Any]:
    """torch.load a Lightning checkpoint with weights_only=True; ConfigError if it is damaged or unsafe."""
    problem = _archive_problem(path)
    if problem:
        raise damaged(path, problem)
    try:
        # weights_only: tensors and plain containers only; a pickled object that would run code is refused.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        # A pickled object that names a function or class (a GLOBAL) is unsafe; other failures are damage.
        unsafe = [line for line in str(err).splitlines() if re.search(r"unsupported global", line, re.IGNORECASE)]
        if not unsafe:
            raise damaged(path, f"is empty or corrupt ({_first_line(err)})") from None
        raise ConfigError(f"checkpoint {path} cannot be loaded safely (weights_only=True): {unsafe[0].strip()}; "
                          "use a checkpoint written by lit_dreamer") from None
    except Exception as err:  # noqa: BLE001 - a damaged archive fails in many ways inside torch
        raise damaged(path, f"is empty or corrupt ({_first_line(err)})") from None
    if not isinstance(checkpoint, dict) or "hyper_parameters" not in checkpoint:
        raise ConfigError(f"{path} is no lit_dreamer checkpoint (it has no hyper_parameters); use a model.ckpt "
                          "from a run's checkpoints/step-* folder")
    return checkpoint


def _archive_problem(path: str) -> str | None:
    """Why `path` is no readable torch.save archive (zip), or None. Reads the zip directory, not the data."""
    if not os.path.isfile(path):
        return "is missing"
    if os.path.getsize(path) == 0:
        return "is empty or corrupt (0 bytes)"
    try:
        with zipfile.ZipFile(path) as archive:
            size = os.path.getsize(path)
            if any(info.header_offset + info.compress_size > size for info in archive.infolist()):
                return "is empty or corrupt (truncated)"
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        return f"is empty or corrupt (not a complete torch.save archive: {err})"
    return None


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def check_checkpoint_folder(ckpt_path: str, ranks: list[int] | None = None) -> None:
    """Check the replay snapshots and collector files beside `ckpt_path` for `ranks` (None: every rank present).

    A checkpoint without them cannot resume exactly (the replay would be empty, the episode
    counters and RNG would silently start again), so each must be there and intact.
    """
    folder = os.path.dirname(os.path.abspath(ckpt_path))
    if ranks is None:
        found = [int(a or b) for a, b in (m.groups() for m in map(_RANK_FILE.match, os.listdir(folder)) if m)]
        ranks = list(range(max(found, default=0) + 1))
    for rank in ranks:
        problem = _rank_problem(folder, rank)
        if problem:
            raise damaged(*problem)


def _rank_problem(folder: str, rank: int) -> tuple[str, str] | None:
    """(file, problem) for the first missing or damaged file of one rank, or None."""
    try:
        check_snapshot(os.path.join(folder, f"replay-rank{rank}"))
    except ReplaySnapshotError as err:
        return err.file, err.problem
    state_file = os.path.join(folder, f"collector-rank{rank}.json")
    try:
        with open(state_file) as f:
            state = json.load(f)
    except FileNotFoundError:
        return state_file, f"is missing: rank {rank}'s episode counters and RNG would silently start from zero"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return state_file, f"cannot be read ({type(err).__name__}: {err})"
    if not isinstance(state, dict) or "rng" not in state:
        return state_file, "is incomplete (it has no RNG state)"
    return None


def is_complete(folder: str) -> bool:
    """Does a `step-*` folder hold an intact model.ckpt archive and intact files for every rank present?"""
    path = os.path.join(folder, "model.ckpt")
    if _archive_problem(path):
        return False
    try:
        check_checkpoint_folder(path)
    except ConfigError:
        return False
    return True


def older_complete(folder: str) -> str | None:
    """The newest complete `step-*` folder beside `folder` that is older than it, or None."""
    parent, name = os.path.split(os.path.abspath(folder))
    if not os.path.isdir(parent):
        return None
    names = sorted((n for n in os.listdir(parent) if _STEP_FOLDER.match(n) and n < name), reverse=True)
    return next((os.path.join(parent, n) for n in names if is_complete(os.path.join(parent, n))), None)


def damaged(file: str, problem: str) -> ConfigError:
    """The error for a damaged checkpoint: the file, the folder, and which older checkpoint is complete."""
    folder = os.path.dirname(os.path.realpath(file))  # through the `last` link to its step-* folder
    while folder != os.path.dirname(folder) and not _STEP_FOLDER.match(os.path.basename(folder)):
        folder = os.path.dirname(folder)  # from replay-rank0/meta.json up to its step-* folder
    if not _STEP_FOLDER.match(os.path.basename(folder)):
        return ConfigError(f"checkpoint {file} is damaged: it {problem}; use another copy of it")
    older = older_complete(folder)
    hint = (f"the newest older complete checkpoint is {older}: use it with ckpt_path="
            f"{os.path.join(older, 'model.ckpt')} (the env steps after it are collected again) or with "
            "eval --ckpt, or restore the damaged file" if older else
            f"no older complete checkpoint is in {os.path.dirname(folder)}: restore the damaged file or start anew")
    return ConfigError(f"checkpoint {folder} is damaged: {file} {problem}; {hint}")
