"""Offline training: the pieces of a `fit offline.replay=PATH` run, which learns from a saved replay and steps no env.

The source is only read: `Replay.load` copies it through read-only memmaps into the run's own replay (RAM, or
the run's replay.directory), and the run's checkpoints save that copy, never the source. Its spaces come
from the snapshot itself: the observation keys, shapes and dtypes and the action size from meta.json's spec;
whether actions are one-hot (discrete) or boxes in [-1, 1] (continuous) from meta.json's `action_kind`
(written by `convert-episodes`) or else from the hyperparameters of the model.ckpt saved beside it.

A fresh agent leaves the source's replay-context latents behind (they are the old model's posteriors, of
another size or meaning) and starts with none, as a new online run does: after each training step the
module stores its own posterior of every replayed step in the run's copy, so context is rebuilt as the
replay is read, from the agent that uses it. Computing it all up front would need a pass of the untrained
model over the whole replay, whose latents would be stale after a few hundred steps anyway.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np

from lit_dreamer.config import Config, ConfigError, task_names
from lit_dreamer.replay import ReplaySnapshotError, check_snapshot
from lit_dreamer.relabel import is_hindsight_key
from lit_dreamer.steps import NON_OBS_KEYS, Spec

ACTION_KINDS = ("discrete", "continuous")
ACTION_KIND_KEY = "action_kind"
"""Optional key of a snapshot's meta.json: discrete (one-hot actions) or continuous (boxes in [-1, 1])."""
_LIVE_STORAGE_FILE = re.compile(r"(?:data-\d+-.+|has_context)\.npy$")


@dataclass
class ReplaySource:
    """A checked replay snapshot an offline run reads, and the spaces it implies."""

    path: str
    """The snapshot folder (holding meta.json)."""
    spec: Spec
    """Every key of a stored step, as `envs.space_spec` gives it."""
    discrete: bool
    steps: int
    """Steps it holds (all env streams)."""
    num_envs: int
    """Env streams side by side (each holds steps / num_envs of them)."""
    num_tasks: int

    @property
    def obs_spec(self) -> Spec:
        # A run with reward.hindsight stored its episodes' labels beside the steps: not observations.
        return {key: value for key, value in self.spec.items() if key not in NON_OBS_KEYS and not is_hindsight_key(key)}

    @property
    def action_dim(self) -> int:
        return int(self.spec["action"][0][0])


def read_source(path: str) -> ReplaySource:
    """The snapshot that `offline.replay=path` names, checked, with its spaces; ConfigError naming the fix if not."""
    snapshot = snapshot_folder(path)
    try:
        snapshot, meta = check_snapshot(snapshot)
    except ReplaySnapshotError as err:
        raise ConfigError(f"offline.replay={path}: {err}") from None
    spec = {key: (tuple(shape), np.dtype(dtype)) for key, (shape, dtype) in meta["spec"].items()}
    missing = [key for key in ("action", "reward", "is_first", "is_last", "is_terminal") if key not in spec]
    if missing:
        raise ConfigError(f"offline.replay={path}: the snapshot {snapshot} stores no {', '.join(missing)}; "
                          "it is not a replay of env steps")
    filled = min(int(meta["state"]["rows_added"]), meta["capacity"] // meta["num_envs"])
    return ReplaySource(snapshot, spec, action_kind(snapshot, meta) == "discrete", filled * meta["num_envs"],
                        int(meta["num_envs"]), int(meta.get("num_tasks", 1)))


def snapshot_folder(path: str) -> str:
    """The replay snapshot folder of a snapshot, a step-* folder, a model.ckpt or a run folder."""
    if not os.path.exists(path):
        if glob.glob(f"{glob.escape(path)}.old-*"):
            return path  # check_snapshot takes the complete snapshot that a save cut by a crash left there
        raise ConfigError(f"offline.replay={path} does not exist; give a checkpoint's replay-rank0 folder, a run "
                          "folder, or the output folder of `python -m lit_dreamer convert-episodes`")
    if os.path.isfile(path):  # a model.ckpt: the replay saved beside it
        return _step_folder_replay(os.path.dirname(os.path.abspath(path)), path)
    if os.path.exists(os.path.join(path, "meta.json")):
        return path
    if _is_live_storage(path):
        raise ConfigError(f"offline.replay={path} is the live storage of a run's replay (its replay.directory, "
                          "rewritten while that run trains), not a snapshot; use a checkpoint's replay instead: "
                          f"its run folder or a checkpoints/step-*/replay-rank0 folder")
    if os.path.isdir(os.path.join(path, "checkpoints")):
        from lit_dreamer.resume import find_checkpoint
        ckpt = find_checkpoint(path)
        return _step_folder_replay(os.path.dirname(ckpt), path)
    if any(name.startswith("replay-rank") for name in os.listdir(path)):
        return _step_folder_replay(path, path)
    return path  # check_snapshot names what is missing (its meta.json)


def _step_folder_replay(folder: str, asked: str) -> str:
    """The one replay snapshot of a checkpoint's step-* folder."""
    shards = sorted(name for name in os.listdir(folder) if re.fullmatch(r"replay-rank\d+", name))
    if not shards:
        raise ConfigError(f"offline.replay={asked}: {folder} holds no replay-rank* snapshot; give a checkpoint "
                          "saved by fit, or a replay snapshot folder")
    if len(shards) > 1:
        raise ConfigError(f"offline.replay={asked}: the checkpoint holds {len(shards)} replay shards (one per "
                          f"device: {', '.join(shards)}); name one of them, e.g. "
                          f"offline.replay={os.path.join(folder, shards[0])}")
    return os.path.join(folder, shards[0])


def _is_live_storage(path: str) -> bool:
    """A replay.directory (or one rank's folder in it): memmapped buffers with no meta.json."""
    if not os.path.isdir(path):
        return False
    names = os.listdir(path)
    ranks = [name for name in names if re.fullmatch(r"rank\d+", name)]
    return any(_LIVE_STORAGE_FILE.match(name) for name in names) or any(
        _is_live_storage(os.path.join(path, rank)) for rank in ranks)


def action_kind(snapshot: str, meta: dict) -> str:
    """discrete or continuous: meta.json's action_kind, else the model.ckpt saved beside the snapshot."""
    kind = meta.get(ACTION_KIND_KEY)
    if kind is not None:
        if kind not in ACTION_KINDS:
            raise ConfigError(f"{os.path.join(snapshot, 'meta.json')}: {ACTION_KIND_KEY}={kind!r}; it must be "
                              f"one of {', '.join(ACTION_KINDS)}")
        return kind
    beside = os.path.join(os.path.dirname(os.path.abspath(snapshot)), "model.ckpt")
    if os.path.isfile(beside):
        from lit_dreamer.resume import read_checkpoint
        return "discrete" if read_checkpoint(beside).hparams["discrete"] else "continuous"
    raise ConfigError(f"replay snapshot {snapshot}: cannot tell whether its actions are discrete (one-hot) or "
                      f"continuous: its meta.json has no {ACTION_KIND_KEY} and no model.ckpt is beside it; add "
                      f'"{ACTION_KIND_KEY}": "discrete" (or "continuous") to its meta.json')


# --------------------------------------------------------------------------------------------------
# Checks before anything is written


def check_read_only(cfg: Config, source: ReplaySource, run_dir: str) -> None:
    """Refuse a source this run would write to: one inside its run folder (its checkpoints are pruned there)
    or inside its own replay.directory (rewritten as the run trains)."""
    for key, folder in (("run.dir", run_dir), ("replay.directory", cfg.replay.directory)):
        if folder is not None and _within(source.path, folder):
            raise ConfigError(f"offline.replay={cfg.offline.replay} lies inside this run's {key} {folder}, which the "
                              f"run writes (checkpoints are replaced and pruned there); the source is read-only: "
                              f"choose another {key}")


def _within(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder + os.sep)


def check_env_matches(cfg: Config, source: ReplaySource, env_spec: Spec, discrete: bool) -> None:
    """The env named for evaluation must have the replay's spaces; the error names both."""
    tasks = task_names(cfg)
    replay = {**{k: v for k, v in source.spec.items() if k != "task"}, "action kind": "discrete" if source.discrete
              else "continuous"}
    env = {**{k: v for k, v in env_spec.items() if k != "task"}, "action kind": "discrete" if discrete
           else "continuous"}
    if replay != env:
        differ = sorted(k for k in set(replay) | set(env) if replay.get(k) != env.get(k))
        detail = "; ".join(f"{k}: replay {_shown(replay.get(k))} vs env {_shown(env.get(k))}" for k in differ)
        raise ConfigError(f"offline.replay={cfg.offline.replay} and env {', '.join(tasks)} have different spaces "
                          f"({detail}); name the env the replay was recorded in, or drop env.id to train without "
                          "evaluation")


def _shown(value: Any) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, tuple) and len(value) == 2:
        return f"{value[1]}{list(value[0])}"
    return str(value)


def offline_replay_settings(cfg: Config, source: ReplaySource):
    """The replay section for the run's copy: exactly the source's steps (an offline replay never grows)."""
    return dataclasses.replace(cfg.replay, capacity=max(source.steps, 1))


def build_offline(cfg: Config, run_dir: str) -> tuple[L.LightningModule, L.LightningDataModule, list[L.Callback], Any]:
    """Module, datamodule and callbacks of an offline run (`train.build` for offline.replay)."""
    from lit_dreamer.data import ReplayDataModule
    from lit_dreamer.train import probe_env, resolve_ckpt_path, run_vocabularies

    ckpt_path = resolve_ckpt_path(cfg)
    if ckpt_path is None:
        source = read_source(cfg.offline.replay)
        check_source(cfg, source, run_dir)
    else:  # a resume trains on the run's own copy saved beside the checkpoint: the source may be gone by now
        source = read_source(os.path.join(os.path.dirname(ckpt_path), "replay-rank0"))
    tasks, vocabularies = task_names(cfg), run_vocabularies(cfg)
    info = probe_env(cfg, vocabularies) if tasks else None  # the env named for evaluation, if any
    if info is not None:
        check_env_matches(cfg, source, info.spec, info.discrete)
    datamodule = ReplayDataModule(source.spec, offline_replay_settings(cfg, source), num_envs=source.num_envs,
                                  batch_size=cfg.run.batch_size, batch_length=cfg.run.batch_length,
                                  seed=cfg.run.seed)
    module = offline_module(cfg, source, tasks, info.one_hot if info is not None else None)
    return (module, datamodule, offline_callbacks(cfg, source, run_dir, vocabularies),
            info if info is not None else env_info_of(source))


def check_source(cfg: Config, source: ReplaySource, run_dir: str) -> None:
    """A source this run may read and train from: not written by it, of one task, at least one sequence long."""
    check_read_only(cfg, source, run_dir)
    if source.num_tasks > 1:
        raise ConfigError(f"offline.replay={cfg.offline.replay} holds {source.num_tasks} tasks; offline training "
                          "takes a replay of one task for now")
    if source.steps // source.num_envs < cfg.run.batch_length:
        raise ConfigError(f"offline.replay={cfg.offline.replay} holds {source.steps // source.num_envs} steps per env "
                          f"stream, fewer than one sequence of run.batch_length={cfg.run.batch_length}; lower "
                          "run.batch_length")


def offline_module(cfg: Config, source: ReplaySource, tasks: list[str],
                   one_hot: dict[str, list[int]] | None = None) -> L.LightningModule:
    """A fresh agent for the replay's spaces; `one_hot`: the keys the named env declares one-hot (none without
    an env: a replay does not record them)."""
    from lit_dreamer.module import DreamerModule
    try:
        return DreamerModule(source.obs_spec, source.action_dim, source.discrete, cfg.agent(),
                             compile=cfg.run.compile, num_tasks=1, task_names=tasks or None, one_hot=one_hot)
    except ValueError as err:  # e.g. an observation the encoders cannot take
        raise ConfigError(f"offline.replay={cfg.offline.replay}: {err}") from None


def offline_callbacks(cfg: Config, source: ReplaySource, run_dir: str, vocabularies: Any) -> list[L.Callback]:
    """The source of steps, checkpoints, graceful stop and run record; evaluation and videos in a named env.

    No collapse warning: it watches training returns, and an offline run has none."""
    from lit_dreamer.callbacks import DreamerCheckpoint, EvalCallback, GracefulStop, VideoCallback
    from lit_dreamer.callbacks.offline import OfflineReplay
    from lit_dreamer.callbacks.progress import EnvStepProgressBar
    from lit_dreamer.resume import run_record

    tasks = task_names(cfg)
    callbacks = [OfflineReplay(source.path, total_steps=cfg.offline.steps, seed=cfg.run.seed),  # read unless resuming
                 DreamerCheckpoint(os.path.join(run_dir, "checkpoints"), every_env_steps=cfg.run.checkpoint_every,
                                   keep=cfg.run.keep_checkpoints),
                 GracefulStop(), run_record(cfg, vocabularies)]
    if cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a bar callback with the bar turned off
        callbacks.append(EnvStepProgressBar())
    env_kwargs = {**cfg.env.make_kwargs(), "vocabularies": vocabularies}
    if tasks and cfg.run.eval_every > 0:
        callbacks.append(EvalCallback(tasks, every_env_steps=cfg.run.eval_every, episodes=cfg.run.eval_episodes,
                                      mode=cfg.run.eval_mode, seed=cfg.run.seed + 1_000_000, **env_kwargs))
    if tasks and cfg.run.video_every > 0:
        callbacks.append(VideoCallback(tasks, os.path.join(run_dir, "videos"), every_env_steps=cfg.run.video_every,
                                       **env_kwargs))
    return callbacks


def env_info_of(source: ReplaySource):
    """The EnvInfo `train.build` returns, read from the replay."""
    from lit_dreamer.train import EnvInfo
    return EnvInfo(source.spec, source.obs_spec, source.action_dim, source.discrete)


# --------------------------------------------------------------------------------------------------
# Starting from a checkpoint


def run_length(cfg: Config) -> tuple[int, str, str]:
    """How long the run is: (steps, the key that sets it, its unit)."""
    if cfg.offline.replay is not None:
        return cfg.offline.steps, "offline.steps", "gradient steps"
    return cfg.run.steps, "run.steps", "env steps"


def is_offline_checkpoint(info) -> bool:
    """Whether a checkpoint (resume.CheckpointInfo) was saved by an offline run."""
    return ((info.run_config or {}).get("offline") or {}).get("replay") is not None


def check_offline_start(cfg: Config, info) -> None:
    """An offline run continues only an offline run's checkpoint, and an online run only an online one: their
    step counters count other things (gradient steps, env steps) and their replays were filled differently."""
    if cfg.offline.replay is not None and not is_offline_checkpoint(info):
        raise ConfigError(f"ckpt_path={cfg.ckpt_path}: {info.path} is a checkpoint of an online run, and an offline "
                          "run continues only offline checkpoints; to train its weights offline start a new run "
                          f"from them: init.ckpt={info.path} init.parts=world_model,actor,critic")
    if cfg.offline.replay is None:
        raise ConfigError(f"ckpt_path={cfg.ckpt_path}: {info.path} is a checkpoint of an offline run (it steps no "
                          "env); continue it offline with offline.replay set as it was (`fit --resume RUN_DIR` "
                          f"does that), or start an online run from its weights with init.ckpt={info.path}")
