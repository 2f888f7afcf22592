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
from dataclasses import dataclass, field
from typing import Any

import torch

from lit_dreamer.config import ConfigError, EnvConfig
from lit_dreamer.replay import ReplaySnapshotError, check_snapshot

RECORD_KEY = "lit_dreamer"  # the checkpoint's top-level entry written by resume.RunRecord
VOCABULARY_RECORD_KEY = "text_vocabulary"  # in the RunRecord entry: {text key: [words in id order]}
SPACES_RECORD_KEY = "spaces"  # in the RunRecord entry: the env's own spaces (lit_dreamer.envs.described)
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


# --------------------------------------------------------------------------------------------------
# Reading a checkpoint (no Lightning needed: lit_dreamer.agent loads checkpoints with these)


@dataclass
class CheckpointInfo:
    path: str
    hparams: dict
    run_config: dict | None
    """The full run config it was saved under; None for checkpoints made before they carried it."""
    mlflow_run_id: str | None
    env_steps: int
    """Env steps over all ranks."""
    train_steps: int
    state_dict: dict
    tasks: list[str] | None = None
    """The task table it was trained on (env ids in index order); None when it carries no config at all."""
    text_vocabulary: dict[str, list[str]] = field(default_factory=dict)
    """{text observation key: words in id order} of its envs (empty: no text observations)."""
    spaces: dict | None = None
    """The env's own observation and action spaces as fit saw them (lit_dreamer.envs.described); None for a
    checkpoint saved before it carried them."""


def read_checkpoint(path: str, mmap: bool = True) -> CheckpointInfo:
    ckpt = open_checkpoint(path, mmap=mmap)  # names an empty, corrupt, unsafe or foreign file
    record = ckpt.get(RECORD_KEY) or {}
    saver = ckpt.get("callbacks", {}).get("DreamerCheckpoint", {})
    train_steps = ckpt.get("state_dict", {}).get("train_steps")
    return CheckpointInfo(path=path, hparams=ckpt["hyper_parameters"], run_config=record.get("config"),
                          mlflow_run_id=record.get("mlflow_run_id"), env_steps=int(saver.get("last_saved_at", 0)),
                          train_steps=int(train_steps) if train_steps is not None else 0,
                          state_dict=ckpt.get("state_dict", {}), tasks=saved_task_table(record),
                          text_vocabulary=dict(record.get(VOCABULARY_RECORD_KEY) or {}),
                          spaces=record.get(SPACES_RECORD_KEY))


def saved_task_table(record: dict) -> list[str] | None:
    """A checkpoint's task table; one that predates the table has the one task of its config's env.id."""
    if "tasks" in record:
        return list(record["tasks"])
    config = record.get("config")
    return tasks_of_saved_config(config) if config is not None else None


def tasks_of_saved_config(config: dict) -> list[str]:
    """task_names of a saved config, read without parsing the rest of it (it may come from another version)."""
    env = config.get("env") or {}
    return list(env.get("tasks") or []) or [env.get("id", EnvConfig.id)]


# --------------------------------------------------------------------------------------------------
# Finding a checkpoint


def resolve_last(dirpath: str) -> str | None:
    """Path of the newest complete model.ckpt under dirpath, or None."""
    link = os.path.join(dirpath, "last")
    path = os.path.join(link, "model.ckpt")
    return os.path.realpath(path) if os.path.exists(path) else None


def complete_checkpoints(checkpoints: str) -> list[str]:
    """The model.ckpt of every step-* folder that has one (written last in a save), oldest first.

    A folder with a model.ckpt holds a run's checkpoint even when a file in it was damaged later.
    """
    if not os.path.isdir(checkpoints):
        return []
    names = sorted(n for n in os.listdir(checkpoints) if n.startswith("step-"))
    paths = [os.path.join(checkpoints, n, "model.ckpt") for n in names]
    return [p for p in paths if os.path.isfile(p)]


def last_checkpoint(checkpoints: str, asked: str) -> str:
    """checkpoints/last; if it is missing or dangling, say which complete step-* there is instead."""
    path = resolve_last(checkpoints)
    if path is not None:
        return path
    link = os.path.join(checkpoints, "last")
    problem = (f"{link} points to {os.readlink(link)}, which holds no complete checkpoint" if os.path.islink(link)
               else f"{checkpoints} has no complete checkpoint")
    # Only a folder whose files are all intact is worth pointing to (checkpoint_files.is_complete).
    complete = [path for path in complete_checkpoints(checkpoints) if is_complete(os.path.dirname(path))]
    if complete:
        hint = f"; the newest complete one is {complete[-1]}: pass it as ckpt_path={complete[-1]}"
    else:
        hint = "; set run.dir to the folder of the run to resume, or start a new run"
    raise ConfigError(f"{asked}: {problem}{hint}")


def find_checkpoint(path: str) -> str:
    """The model.ckpt meant by a model.ckpt path, a step-* folder, or a run folder (its checkpoints/last)."""
    if os.path.isfile(path):
        return path
    if os.path.isfile(os.path.join(path, "model.ckpt")):
        return os.path.join(path, "model.ckpt")
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return last_checkpoint(os.path.join(path, "checkpoints"), asked=f"checkpoint {path!r}")
    if not os.path.exists(path):
        raise ConfigError(f"checkpoint {path!r} does not exist")
    raise ConfigError(f"checkpoint {path!r} is neither a model.ckpt nor a run folder with a checkpoints/ folder")


def run_folder_of(ckpt_path: str) -> str | None:
    """R for a checkpoint that really sits at R/checkpoints/step-*/model.ckpt, else None (e.g. a copied file)."""
    step = os.path.dirname(os.path.realpath(ckpt_path))
    checkpoints = os.path.dirname(step)
    if os.path.basename(step).startswith("step-") and os.path.basename(checkpoints) == "checkpoints":
        return os.path.dirname(checkpoints)
    return None
