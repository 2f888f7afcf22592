"""Where a `fit` starts from: resuming a run, branching from a checkpoint, or nothing left to do.

Three ways to start from a checkpoint:

    fit --resume runs/X                  continue run X; its checkpoint's config, then -c files, then key=value
    fit ckpt_path=last run.dir=runs/X    continue run X with the config built from the command line
    fit ckpt_path=PATH run.dir=runs/Y    branch: a new run in runs/Y from PATH (a model.ckpt or a run folder)

Every checkpoint carries the full run config and its MLflow run id (RunRecord), so a copied
model.ckpt is enough to branch from or to evaluate.
"""

from __future__ import annotations

import os
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf
from typing_extensions import override

# Reading and finding checkpoints needs no Lightning (lit_dreamer.agent loads without it): those helpers live in
# checkpoint_files and are re-exported here for the callers that always imported them from resume.
from lit_dreamer.checkpoint_files import (RECORD_KEY, SPACES_RECORD_KEY, VOCABULARY_RECORD_KEY,  # noqa: F401
                                          CheckpointInfo, complete_checkpoints, find_checkpoint, last_checkpoint,
                                          read_checkpoint, resolve_last, run_folder_of, saved_task_table,
                                          tasks_of_saved_config)
from lit_dreamer.config import Config, ConfigError, flatten, load_config, task_names, to_flat_dict
from lit_dreamer.envs.text import TextVocabularies

CONFIG_FILE = "config.yaml"  # the config a run started with, in its run folder
# Keys that name where a run lives, not how it trains: not listed as config changes.
PLACE_KEYS = ("ckpt_path", "run.dir", "logger.run_name")


class RunRecord(Callback):
    """Writes the run's config, its task table (env ids; a task's index is its position), its text vocabulary
    (when its envs have text observations), the env's own spaces (`spaces`, lit_dreamer.envs.described: what
    lit_dreamer.agent needs to act without the env) and MLflow run id into every checkpoint."""

    def __init__(self, config: dict[str, Any], tasks: list[str] | None = None,
                 vocabularies: TextVocabularies | None = None, spaces: dict | None = None):
        super().__init__()
        self.config = config
        self.tasks = tasks if tasks is not None else tasks_of_saved_config(config)
        self.vocabularies = vocabularies
        self.spaces = spaces

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[RECORD_KEY] = {"config": self.config, "tasks": list(self.tasks),
                                  "mlflow_run_id": logger_run_id(trainer)}
        # As grown so far: every token id in the replay saved beside it is in it.
        vocabulary = self.vocabularies.state() if self.vocabularies is not None else {}
        if vocabulary:
            checkpoint[RECORD_KEY][VOCABULARY_RECORD_KEY] = vocabulary
        if self.spaces is not None:
            checkpoint[RECORD_KEY][SPACES_RECORD_KEY] = self.spaces


def logger_run_id(trainer: L.Trainer) -> str | None:
    """The MLflow run id of the trainer's logger (rank 0), None without one."""
    try:
        return getattr(trainer.logger, "run_id", None)
    except Exception:  # noqa: BLE001 - an unreachable store must not fail the save
        return None


def run_record(cfg: Config, vocabularies: TextVocabularies | None = None, spaces: dict | None = None) -> RunRecord:
    return RunRecord(OmegaConf.to_container(OmegaConf.structured(cfg)), task_names(cfg), vocabularies, spaces)


# --------------------------------------------------------------------------------------------------
# Reading a checkpoint


def check_task_table(info: CheckpointInfo, tasks: list[str]) -> None:
    """Refuse to continue a checkpoint with another task table: task indices in its replay, and the model's
    task rows, would mean other tasks."""
    if info.tasks is not None and info.tasks != list(tasks):
        raise ConfigError(f"checkpoint {info.path} was trained on the tasks {info.tasks}, but this run has "
                          f"{list(tasks)} (the same ids in the same order are needed to continue it); set "
                          f"env.tasks={_listed(info.tasks)} (or env.id for one task), or start a new run")


def _listed(tasks: list[str]) -> str:
    return "[" + ",".join(tasks) + "]"


# --------------------------------------------------------------------------------------------------
# Finding a checkpoint


def inside(path: str, folder: str) -> bool:
    return os.path.realpath(path).startswith(os.path.realpath(folder) + os.sep)


def check_run_dir_free(directory: str, ckpt_path: str | None) -> None:
    """Refuse to start a second run in a run dir whose checkpoints belong to another one."""
    checkpoints = os.path.join(directory, "checkpoints")
    if ckpt_path is not None and inside(ckpt_path, checkpoints):
        return  # continuing this run dir's own run
    if complete_checkpoints(checkpoints) or resolve_last(checkpoints):
        raise ConfigError(f"run.dir {directory} already holds the checkpoints of a run; continue it with "
                          f"`fit --resume {directory}` (or ckpt_path=last run.dir={directory}), "
                          "or choose another run.dir")


# --------------------------------------------------------------------------------------------------
# The config of a resumed run


def saved_config(folder: str, info: CheckpointInfo) -> dict:
    """The config the checkpoint carries, or for an older checkpoint its run folder's config.yaml."""
    if info.run_config is not None:
        return info.run_config
    config_file = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(config_file):
        raise ConfigError(f"--resume {folder}: its checkpoint carries no config and {config_file} is missing; "
                          f"use ckpt_path=last run.dir={folder} with the run's -c files and overrides")
    return OmegaConf.to_container(OmegaConf.load(config_file))


def resume_config(folder: str, files: list[str], overrides: list[str]) -> Config:
    """`fit --resume FOLDER`: the saved config, then the -c files, then the key=value overrides."""
    if not os.path.isdir(folder):
        raise ConfigError(f"--resume {folder}: no such folder; give the run.dir of the run to continue")
    info = read_checkpoint(last_checkpoint(os.path.join(folder, "checkpoints"), asked=f"--resume {folder}"))
    saved = saved_config(folder, info)
    try:
        cfg = load_config(files, overrides, base=saved)
    except ConfigError as err:
        raise ConfigError(f"--resume {folder}: {err}") from None
    if cfg.run.dir != saved.get("run", {}).get("dir") or cfg.ckpt_path != saved.get("ckpt_path"):
        raise ConfigError(f"--resume {folder} sets run.dir and ckpt_path itself; to start a new run from this "
                          f"one use `fit ckpt_path={folder} run.dir=NEW_DIR`")
    cfg.run.dir, cfg.ckpt_path = folder, "last"
    return cfg


def config_changes(saved: dict, cfg: Config) -> list[str]:
    """'key: old -> new' for every setting that differs from the checkpoint's config."""
    old, new = flatten(saved), to_flat_dict(cfg)
    missing = "(unset)"
    keys = sorted(k for k in set(old) | set(new) if k not in PLACE_KEYS)
    return [f"{k}: {old.get(k, missing)!r} -> {new.get(k, missing)!r}" for k in keys
            if old.get(k, missing) != new.get(k, missing)]


def describe_start(ckpt_path: str, info: CheckpointInfo, cfg: Config, continuing: bool) -> str:
    """The console lines that say where the run starts and what differs from the checkpoint's config."""
    what = "continuing" if continuing else "branching into a new run from"
    from lit_dreamer.offline import run_length
    lines = [f"{what} {ckpt_path} ({info.env_steps} {run_length(cfg)[2]})"]
    if info.run_config is not None:
        changes = config_changes(info.run_config, cfg)
        lines.append("config as the checkpoint's" if not changes else "config changes against the checkpoint's:")
        lines.extend(f"  {change}" for change in changes)
    return "\n".join(lines)


def check_replay_beside(ckpt_path: str) -> None:
    """Training from a checkpoint needs the replay saved in its step-* folder, not the model.ckpt alone.

    Only a model.ckpt with none of its step folder's files beside it is refused here; a step folder that
    lacks one of them is damaged, which checkpoint_files.check_checkpoint_folder names.
    """
    folder = os.path.dirname(os.path.abspath(ckpt_path))
    replay = os.path.join(folder, "replay-rank0")
    if not os.path.exists(replay) and not os.path.exists(os.path.join(folder, "collector-rank0.json")):
        raise ConfigError(f"checkpoint {ckpt_path} has no replay beside it ({replay}); to train from it, copy its "
                          "whole step-* folder (model.ckpt, replay-rank*, collector-rank*.json) and pass "
                          "that folder or its model.ckpt")


def nothing_to_do(info: CheckpointInfo, steps: int, key: str = "run.steps", unit: str = "env steps") -> str | None:
    """Why a run from this checkpoint would not train, or None if it would (`key` sets its length of `steps`
    in `unit`: run.steps in env steps, or an offline run's offline.steps in gradient steps)."""
    if info.env_steps < steps:
        return None
    return (f"nothing to do: {info.path} already holds {info.env_steps} {unit} and {key}={steps}; "
            f"set {key} above {info.env_steps} to train further")
