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
from dataclasses import dataclass, field
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf
from typing_extensions import override

from lit_dreamer.callbacks import resolve_last
from lit_dreamer.checkpoint_files import is_complete, open_checkpoint
from lit_dreamer.config import Config, ConfigError, EnvConfig, flatten, load_config, task_names, to_flat_dict
from lit_dreamer.envs.text import TextVocabularies

RECORD_KEY = "lit_dreamer"  # the checkpoint's top-level entry written by RunRecord
VOCABULARY_RECORD_KEY = "text_vocabulary"  # in the RunRecord entry: {text key: [words in id order]}
CONFIG_FILE = "config.yaml"  # the config a run started with, in its run folder
# Keys that name where a run lives, not how it trains: not listed as config changes.
PLACE_KEYS = ("ckpt_path", "run.dir", "logger.run_name")


class RunRecord(Callback):
    """Writes the run's config, its task table (env ids; a task's index is its position), its text vocabulary
    (when its envs have text observations) and MLflow run id into every checkpoint."""

    def __init__(self, config: dict[str, Any], tasks: list[str] | None = None,
                 vocabularies: TextVocabularies | None = None):
        super().__init__()
        self.config = config
        self.tasks = tasks if tasks is not None else tasks_of_saved_config(config)
        self.vocabularies = vocabularies

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[RECORD_KEY] = {"config": self.config, "tasks": list(self.tasks),
                                  "mlflow_run_id": logger_run_id(trainer)}
        # As grown so far: every token id in the replay saved beside it is in it.
        vocabulary = self.vocabularies.state() if self.vocabularies is not None else {}
        if vocabulary:
            checkpoint[RECORD_KEY][VOCABULARY_RECORD_KEY] = vocabulary


def logger_run_id(trainer: L.Trainer) -> str | None:
    """The MLflow run id of the trainer's logger (rank 0), None without one."""
    try:
        return getattr(trainer.logger, "run_id", None)
    except Exception:  # noqa: BLE001 - an unreachable store must not fail the save
        return None


def run_record(cfg: Config, vocabularies: TextVocabularies | None = None) -> RunRecord:
    return RunRecord(OmegaConf.to_container(OmegaConf.structured(cfg)), task_names(cfg), vocabularies)


# --------------------------------------------------------------------------------------------------
# Reading a checkpoint


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


def read_checkpoint(path: str, mmap: bool = True) -> CheckpointInfo:
    ckpt = open_checkpoint(path, mmap=mmap)  # names an empty, corrupt, unsafe or foreign file
    record = ckpt.get(RECORD_KEY) or {}
    saver = ckpt.get("callbacks", {}).get("DreamerCheckpoint", {})
    train_steps = ckpt.get("state_dict", {}).get("train_steps")
    return CheckpointInfo(path=path, hparams=ckpt["hyper_parameters"], run_config=record.get("config"),
                          mlflow_run_id=record.get("mlflow_run_id"), env_steps=int(saver.get("last_saved_at", 0)),
                          train_steps=int(train_steps) if train_steps is not None else 0,
                          state_dict=ckpt.get("state_dict", {}), tasks=saved_task_table(record),
                          text_vocabulary=dict(record.get(VOCABULARY_RECORD_KEY) or {}))


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


def inside(path: str, folder: str) -> bool:
    return os.path.realpath(path).startswith(os.path.realpath(folder) + os.sep)


def run_folder_of(ckpt_path: str) -> str | None:
    """R for a checkpoint that really sits at R/checkpoints/step-*/model.ckpt, else None (e.g. a copied file)."""
    step = os.path.dirname(os.path.realpath(ckpt_path))
    checkpoints = os.path.dirname(step)
    if os.path.basename(step).startswith("step-") and os.path.basename(checkpoints) == "checkpoints":
        return os.path.dirname(checkpoints)
    return None


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
