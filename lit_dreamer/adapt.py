"""Adaptation: start a new run from another run's weights (`init.ckpt`), e.g. a new task on a pretrained world model.

Unlike `ckpt_path` (which continues or branches a run with its optimizer state, counters and replay), `init.ckpt`
starts a new run (new MLflow run, fresh optimizers, step 0, empty replay) whose chosen parts (`init.parts`) start
from the checkpoint's weights:

- a parameter loads when the checkpoint has one of the same name and shape;
- task rows (embedding rows, per-task output layers) load by task name: a task of the new table that the
  checkpoint was trained on gets its row, a new task a fresh one; a one-task model's head is its task's row;
- the first layer of a head whose input differs only by the task vector (one task vs several, `embedding`)
  loads the columns of the latent features; the task columns start fresh;
- everything else of those parts starts fresh and is listed on the console.

`init.freeze` then freezes the world model's encoder, RSSM and decoder (WorldModel.freeze_shared).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from torch import Tensor

from lit_dreamer.conditioning import CONDITIONED_HEADS, Conditioning, task_indexed
from lit_dreamer.config import Config, ConfigError
from lit_dreamer.resume import CheckpointInfo, find_checkpoint, read_checkpoint

PART_PREFIXES = {
    "world_model": ("world_model.",),
    "actor": ("actor_critic.actor.",),
    # The slow critic starts as the critic does: the critic's loaded weights.
    "critic": ("actor_critic.critic.", "actor_critic.slow_critic."),
}


@dataclass
class InitReport:
    """What an `init.ckpt` start loaded: state-dict names by how they were filled."""

    path: str
    loaded: list[str] = field(default_factory=list)
    rows: dict[str, list[str]] = field(default_factory=dict)
    """Task-indexed names -> the tasks whose rows came from the checkpoint (the others start fresh)."""
    columns: list[str] = field(default_factory=list)
    """First layers whose latent-feature columns loaded (the task columns start fresh)."""
    fresh: list[str] = field(default_factory=list)

    def describe(self, parts: list[str], frozen: bool) -> str:
        lines = [f"initializing {', '.join(parts)} from {self.path}: {len(self.loaded)} tensors loaded"
                 + (" (encoder, RSSM and decoder frozen)" if frozen else "")]
        for name, tasks in self.rows.items():
            lines.append(f"  {name}: rows of {', '.join(tasks)} loaded, other tasks fresh" if tasks else
                         f"  {name}: fresh (the checkpoint has none of this run's tasks)")
        lines += [f"  {name}: latent-feature columns loaded, task columns fresh" for name in self.columns]
        lines += [f"  {name}: fresh (not in the checkpoint, or another shape)" for name in self.fresh]
        return "\n".join(lines)


def check_init_start(cfg: Config, continuing: bool) -> str | None:
    """The init.ckpt model.ckpt, checked before anything is written; None without init.ckpt or when continuing
    a run that began from it (its own checkpoint holds the weights now)."""
    if cfg.init.ckpt is None or continuing:
        return None
    if cfg.ckpt_path is not None:
        raise ConfigError(f"init.ckpt={cfg.init.ckpt} and ckpt_path={cfg.ckpt_path} are both set: init.ckpt starts a "
                          "new run from a checkpoint's weights, ckpt_path continues or branches a run with its "
                          "optimizer state and replay; drop one of them")
    try:
        return find_checkpoint(cfg.init.ckpt)
    except ConfigError as err:
        raise ConfigError(f"init.ckpt: {err}") from None


def initialize(module, path: str, parts: list[str], tasks: list[str]) -> InitReport:
    """Load `parts` of the checkpoint at `path` into `module` (a DreamerModule built for `tasks`)."""
    from lit_dreamer.train import check_checkpoint_matches  # train imports this module
    try:
        check_checkpoint_matches(path, module)
    except ConfigError as err:
        raise ConfigError(f"init.ckpt: {err}") from None
    info = read_checkpoint(path, mmap=False)
    return load_parts(module, TaskedState(info.state_dict, saved_conditioning(info), saved_tasks(info)), parts,
                      tasks, InitReport(path))


def load_parts(module, source: "TaskedState", parts: list[str], tasks: list[str], report: InitReport) -> InitReport:
    """Fill `parts` of `module` (built for `tasks`) from a source state dict where they fit (see the module doc)."""
    target = TaskedState(module.state_dict(), module.cond, list(tasks))
    prefixes = tuple(p for part in parts for p in PART_PREFIXES[part])
    new_state = {}
    for name, tensor in target.state.items():
        if name.startswith(prefixes):
            new_state[name] = fill(name, tensor, source, target, report)
    module.load_state_dict(new_state, strict=False)
    return report


@dataclass
class TaskedState:
    """A DreamerModule's state dict (the checkpoint's or the new run's), how its heads read the task, its task table."""

    state: dict[str, Tensor]
    cond: Conditioning
    tasks: list[str]

    def rows(self, name: str, tensor: Tensor) -> tuple[Tensor, list[str]] | None:
        """The tensor as one row per task with the task names, if `name` is per task (a one-task model's head
        output layer is its task's row); None for a shared tensor."""
        if task_indexed(name, self.cond):
            return tensor, self.tasks
        if not self.cond.active and is_head_output(name):
            return tensor[None], self.tasks[:1]
        return None


def fill(name: str, tensor: Tensor, source: TaskedState, target: TaskedState, report: InitReport) -> Tensor:
    """The value of target entry `name`: from the source where it fits, else `tensor` (fresh)."""
    value = source.state.get(name)
    if value is None:
        report.fresh.append(name)
        return tensor
    if task_indexed(name, target.cond) or task_indexed(name, source.cond):
        target_rows, source_rows = target.rows(name, tensor), source.rows(name, value)
        if target_rows is not None and source_rows is not None:
            return fill_rows(name, tensor, target_rows, source_rows, report)
    else:  # shared by the tasks on both sides
        if value.shape == tensor.shape:
            report.loaded.append(name)
            return value.to(tensor.dtype)
        if is_head_input(name) and value.dim() == 2 and value.shape[0] == tensor.shape[0]:
            # The first layer reads [features, task vector] on one side and the features alone on the other.
            out = tensor.clone()
            shared = min(value.shape[1], tensor.shape[1])
            out[:, :shared] = value[:, :shared]
            report.columns.append(name)
            return out
    report.fresh.append(name)
    return tensor


def fill_rows(name: str, tensor: Tensor, target_rows: tuple[Tensor, list[str]],
              source_rows: tuple[Tensor, list[str]], report: InitReport) -> Tensor:
    """A per-task tensor: the rows of tasks the source knows come from the source, by task name."""
    (rows, tasks), (source_values, source_tasks) = target_rows, source_rows
    if rows.shape[1:] != source_values.shape[1:]:
        report.fresh.append(name)
        return tensor
    rows = rows.clone()
    matched = [task for task in tasks if task in source_tasks]
    for task in matched:
        rows[tasks.index(task)] = source_values[source_tasks.index(task)]
    report.rows[name] = matched
    return rows.reshape(tensor.shape)


def is_head_output(name: str) -> bool:
    return any(name in (f"{head}.out.weight", f"{head}.out.bias") for head in CONDITIONED_HEADS)


def is_head_input(name: str) -> bool:
    """The Linear of the first hidden layer of a conditioned head (the one that reads the task vector)."""
    return any(name == f"{head}.trunk.0.0.weight" for head in CONDITIONED_HEADS)


def saved_conditioning(info: CheckpointInfo) -> Conditioning:
    multitask = (info.hparams.get("config") or {}).get("multitask") or {}
    return Conditioning(int(info.hparams.get("num_tasks", 1)), multitask.get("conditioning", "embedding"),
                        int(multitask.get("embed_dim", 16)))


def saved_tasks(info: CheckpointInfo) -> list[str]:
    return list(info.tasks) if info.tasks is not None else ["(unknown task)"]


def start_from_init(cfg: Config, module, path: str | None, tasks: list[str], announce: bool) -> InitReport | None:
    """Load init.ckpt's parts (a new run) and freeze as init.freeze says; returns what was loaded.

    `path` None: no init.ckpt, or a run that continues from its own checkpoint, whose weights Lightning loads;
    init.freeze still applies there, so a resumed adapted run stays frozen.
    """
    report = None
    if path is not None:
        report = initialize(module, path, cfg.init.part_list(), tasks)
        if announce:
            print(report.describe(cfg.init.part_list(), cfg.init.freeze), flush=True)
    if cfg.init.ckpt is not None and cfg.init.freeze:
        module.world_model.freeze_shared()
    return report


def init_tag(cfg: Config) -> str | None:
    """The MLflow tag value of an init.ckpt run: the checkpoint it started from (absolute)."""
    if cfg.init.ckpt is None:
        return None
    try:
        return os.path.abspath(find_checkpoint(cfg.init.ckpt))
    except ConfigError:
        return os.path.abspath(cfg.init.ckpt)
