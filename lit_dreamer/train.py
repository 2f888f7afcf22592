"""Build and run a training run from a Config: the code behind `python -m lit_dreamer fit`."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass

import lightning as L
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from lit_dreamer.callbacks import (DreamerCheckpoint, EnvCollector, EvalCallback, GracefulStop, VideoCallback,
                                   resolve_last)
from lit_dreamer.callbacks.progress import EnvStepProgressBar
from lit_dreamer.agent_config import ModelConfig
from lit_dreamer.checkpoint_files import check_checkpoint_folder
from lit_dreamer.config import Config, ConfigError, to_flat_dict, to_yaml, validate
from lit_dreamer.data import ReplayDataModule
from lit_dreamer.envs import action_dim, action_kind, make_env, space_spec
from lit_dreamer.module import DreamerModule
from lit_dreamer.resume import (CheckpointInfo, check_replay_beside, check_run_dir_free, describe_start,
                                find_checkpoint, inside, last_checkpoint, nothing_to_do, read_checkpoint, run_record)
from lit_dreamer.tracking import (KIND_TAG, RUN_ID_FILE, ResilientMLFlowLogger, TrackingError, check_tracking_uri,
                                  claim_run_dir, continued_run_id, mark_orphaned_run)
from lit_dreamer.world_model import NON_OBS_KEYS


@dataclass
class EnvInfo:
    spec: dict
    obs_spec: dict
    action_dim: int
    discrete: bool


def env_info(env) -> EnvInfo:
    """The replay spec, observation spec, action size and action kind of an env."""
    spec = space_spec(env)
    obs_spec = {k: v for k, v in spec.items() if k not in NON_OBS_KEYS}
    return EnvInfo(spec, obs_spec, action_dim(env), action_kind(env) == "discrete")


def probe_env(cfg: Config) -> EnvInfo:
    """Make one env to read its spaces (fails fast on an unknown id or an unusable space)."""
    try:
        env = make_env(cfg.env.id, **env_kwargs(cfg))
    except (ValueError, ImportError) as err:  # ImportError: an env family whose package is not installed
        raise ConfigError(f"env.id={cfg.env.id!r}: {err}") from None
    try:
        return env_info(env)
    finally:
        env.close()


def run_dir(cfg: Config) -> str:
    return cfg.run.dir or os.path.join("runs", cfg.logger.run_name)


def check_writable_dir(directory: str, key: str = "run.dir") -> None:
    """Fail before anything is created when `directory` cannot be made or written to.

    A real write (a temporary file, removed at once) in the nearest folder that exists: permission bits
    alone would miss a read-only file system, and root passes them all."""
    existing = os.path.abspath(directory)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"{key}={directory} cannot be created: {existing} is a file, not a folder; "
                          f"choose another {key}")
    try:
        descriptor, probe = tempfile.mkstemp(prefix=".lit_dreamer-write-check-", dir=existing)
    except OSError as err:
        raise ConfigError(f"{key}={directory} is not writable: cannot write in {existing} ({err.strerror}); "
                          f"choose a writable folder with {key}=DIR or fix its permissions") from None
    os.close(descriptor)
    os.remove(probe)


RUN_NAME_ENV = "LIT_DREAMER_RUN_NAME"


TORCHRUN_ID_ENV = "TORCHELASTIC_RUN_ID"  # set by torchrun for every worker: the rendezvous id, shared by all ranks


def default_run_name(cfg: Config) -> str:
    """`<env>-seed<S>-<time>-<random>`; under torchrun `<env>-seed<S>-torchrun-<rendezvous id>`.

    torchrun starts every rank itself, so no rank can hand its name to the others as Lightning's
    own launcher allows (RUN_NAME_ENV): the name must come from what all ranks share.
    """
    env = cfg.env.id.replace("/", "-")
    rdzv_id = os.environ.get(TORCHRUN_ID_ENV)
    if rdzv_id not in (None, "", "none"):
        return f"{env}-seed{cfg.run.seed}-torchrun-{rdzv_id[:8]}"
    if rdzv_id is not None and not cfg.run.dir:
        # torchrun's multi-node default: no shared id. Every rank would pick its own run folder.
        raise ConfigError("launched by torchrun without a rendezvous id, so the ranks cannot agree on a "
                          "default run folder; set logger.run_name=NAME or run.dir=DIR (the same on every "
                          "node), or pass torchrun --rdzv-id=ID")
    return f"{env}-seed{cfg.run.seed}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}"


def resolve_ckpt_path(cfg: Config) -> str | None:
    """The model.ckpt to start from: run.dir's checkpoints/last for 'last', else a model.ckpt or a run folder."""
    if cfg.ckpt_path is None:
        return None
    if cfg.ckpt_path == "last":
        return last_checkpoint(os.path.join(run_dir(cfg), "checkpoints"), asked="ckpt_path=last")
    return find_checkpoint(cfg.ckpt_path)


def check_start(cfg: Config, ckpt_path: str | None) -> tuple[bool, dict | None]:
    """Whether the run continues run.dir's own checkpoint (not a branch), and the summary if there is nothing to do.

    Says on the console where the run starts and which settings differ from the checkpoint's config.
    """
    check_run_dir_free(run_dir(cfg), ckpt_path)
    if ckpt_path is None:
        return False, None
    continuing = inside(ckpt_path, os.path.join(run_dir(cfg), "checkpoints"))
    info = read_checkpoint(ckpt_path)
    if rank_zero_only.rank == 0:
        print(describe_start(ckpt_path, info, cfg, continuing), flush=True)
    if nothing_to_do(info, cfg.run.steps):
        return continuing, finished_summary(cfg, info)
    check_replay_beside(ckpt_path)
    check_checkpoint_folder(ckpt_path)  # the replay and counters beside it, before anything is written
    return continuing, None


def finished_summary(cfg: Config, info: CheckpointInfo) -> dict:
    """The summary of a start from a checkpoint that already holds run.steps: nothing ran, nothing changed."""
    return {"nothing_to_do": nothing_to_do(info, cfg.run.steps), "env_steps": info.env_steps,
            "train_steps": info.train_steps, "checkpoint": info.path, "run_dir": run_dir(cfg),
            "mlflow_run_id": info.mlflow_run_id, "tracking_uri": cfg.logger.tracking_uri,
            "rank": rank_zero_only.rank, "stopped_by": None}


def check_checkpoint_matches(path: str, module: DreamerModule) -> None:
    """Refuse a checkpoint made for other spaces or another architecture, naming the difference."""
    hparams = read_checkpoint(path).hparams
    for key in ("obs_spec", "action_dim", "discrete"):
        if hparams.get(key) != module.hparams[key]:
            raise ConfigError(f"checkpoint {path} was made for {key}={hparams.get(key)!r}, but this run has "
                              f"{key}={module.hparams[key]!r}; use the env settings it was trained with")
    # A key the checkpoint lacks was added to ModelConfig after it was written: it has the value it was made
    # with (LEGACY_MODEL_DEFAULTS), which may differ from today's default.
    try:
        saved = asdict(ModelConfig.from_saved(hparams.get("config", {}).get("model", {})))
    except ValueError as err:
        raise ConfigError(f"checkpoint {path}: {err}; it was written by another version of lit_dreamer") from None
    wanted = module.hparams["config"]["model"]
    diff = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v}
    if diff:
        detail = ", ".join(f"model.{k}: checkpoint {a!r} vs requested {b!r}" for k, (a, b) in diff.items())
        overrides = " ".join(f"model.{k}={_override_value(a)}" for k, (a, _) in diff.items())
        raise ConfigError(f"checkpoint {path} has another model config ({detail}); to load it, set {overrides}")


def _override_value(value) -> str:
    """A value as a `key=value` command-line override spells it (YAML: lowercase booleans, no spaces)."""
    if value is None or isinstance(value, bool):
        return "null" if value is None else str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    return str(value)


def git_commit(directory: str = os.path.dirname(os.path.abspath(__file__))) -> str:
    """HEAD of the git checkout holding the code, '+dirty' if tracked files differ from it; 'unknown' outside git.

    Untracked files do not count: run outputs (mlflow.db, runs/) would otherwise mark every run dirty.
    """
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=directory, capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()
    try:
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):  # no git, not a checkout, or a checkout git refuses
        return "unknown"
    return head + ("+dirty" if dirty else "")


def make_logger(cfg: Config, directory: str, resuming: bool) -> tuple[Logger | None, bool]:
    """The run's logger (logger.backend), and whether it continues the run recorded in the run dir (rank 0 only).

    MLflow: a resume in the run dir of the checkpoint continues its MLflow run, unless that run is not in
    this tracking store (another URI, a relative sqlite path from another folder, a damaged mlflow_run_id):
    then, as for a checkpoint started in a new run dir (a branch), a new MLflow run is opened.
    TensorBoard and CSV write into the run dir (tensorboard/, csv/) and append on a resume.
    """
    backend = cfg.logger.backend
    if backend == "none":
        return None, resuming
    if backend == "csv":
        return CSVLogger(directory, name="", version="csv"), resuming
    if backend == "tensorboard":
        return TensorBoardLogger(directory, name="", version="tensorboard", default_hp_metric=False), resuming
    run_id = continued_run_id(directory, cfg.logger.tracking_uri) if resuming else None
    logger = ResilientMLFlowLogger(experiment_name=cfg.logger.experiment, run_name=cfg.logger.run_name,
                                   tracking_uri=cfg.logger.tracking_uri, run_id=run_id, tags={KIND_TAG: "train"})
    return logger, run_id is not None


def record_run(cfg: Config, directory: str, logger: Logger | None, continued: bool, ckpt_path: str | None) -> None:
    """Write the run dir's config.yaml (and mlflow_run_id) and the new run's params, tags and config artifact.

    A continued run has them all from its start. A new MLflow run holds a lease on the run dir until it
    ends, so that the next `fit` there can tell a killed run from a live one (tracking.mark_orphaned_run).
    """
    if continued:
        if isinstance(logger, ResilientMLFlowLogger):
            claim_run_dir(directory, logger.run_id, cfg.logger.tracking_uri)
            logger.lease_dir = directory
        return
    config_file = os.path.join(directory, "config.yaml")
    with open(config_file, "w") as f:
        f.write(to_yaml(cfg))
    params = {k: v for k, v in to_flat_dict(cfg).items() if k != "ckpt_path"}
    if not isinstance(logger, ResilientMLFlowLogger):
        if logger is not None:
            logger.log_hyperparams(params)
        return
    with open(os.path.join(directory, RUN_ID_FILE), "w") as f:
        f.write(logger.run_id)
    claim_run_dir(directory, logger.run_id, cfg.logger.tracking_uri)
    logger.lease_dir = directory
    logger.log_hyperparams(params)
    logger.set_tag("git_commit", git_commit())
    if ckpt_path is not None:
        logger.set_tag("resumed_from", os.path.abspath(ckpt_path))
    logger.log_artifact(config_file)


def logs_location(cfg: Config, logger: Logger | None) -> str:
    """Where this run's metrics went, in words (for the summary the CLI prints)."""
    if isinstance(logger, ResilientMLFlowLogger):
        return f"MLflow run {logger.run_id} at {cfg.logger.tracking_uri}"
    if isinstance(logger, CSVLogger):
        return f"metrics in {os.path.join(logger.log_dir, 'metrics.csv')}"
    if isinstance(logger, TensorBoardLogger):
        return f"TensorBoard logs in {logger.log_dir}"
    return "no metrics logged (logger.backend=none)" if rank_zero_only.rank == 0 else "metrics on rank 0"


def build(cfg: Config) -> tuple[DreamerModule, ReplayDataModule, list[L.Callback], EnvInfo]:
    """Module, datamodule and callbacks for a Config: the pieces a script would assemble by hand."""
    info = probe_env(cfg)
    try:
        module = DreamerModule(info.obs_spec, info.action_dim, info.discrete, cfg.agent(), compile=cfg.run.compile)
    except ValueError as err:  # e.g. an observation the encoders cannot take
        raise ConfigError(f"env.id={cfg.env.id!r}: {err}") from None
    datamodule = ReplayDataModule(info.spec, cfg.replay, num_envs=cfg.env.num_envs, batch_size=cfg.run.batch_size,
                                  batch_length=cfg.run.batch_length, seed=cfg.run.seed)
    collector = EnvCollector(cfg.env.id, num_envs=cfg.env.num_envs, seed=cfg.run.seed,
                             train_ratio=cfg.run.train_ratio, prefill=cfg.run.prefill, total_steps=cfg.run.steps,
                             asynchronous=cfg.env.asynchronous, nonfinite=cfg.env.nonfinite, **env_kwargs(cfg))
    checkpoint = DreamerCheckpoint(os.path.join(run_dir(cfg), "checkpoints"), every_env_steps=cfg.run.checkpoint_every,
                                   keep=cfg.run.keep_checkpoints)
    callbacks = [collector, checkpoint, GracefulStop(), run_record(cfg)]
    if cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a bar callback with the bar turned off
        callbacks.append(EnvStepProgressBar())
    if cfg.run.eval_every > 0:
        callbacks.append(EvalCallback(cfg.env.id, every_env_steps=cfg.run.eval_every, episodes=cfg.run.eval_episodes,
                                      mode=cfg.run.eval_mode, seed=cfg.run.seed + 1_000_000, **env_kwargs(cfg)))
    if cfg.run.video_every > 0:
        callbacks.append(VideoCallback(cfg.env.id, os.path.join(run_dir(cfg), "videos"),
                                       every_env_steps=cfg.run.video_every, **env_kwargs(cfg)))
    return module, datamodule, callbacks, info


def env_kwargs(cfg: Config) -> dict:
    return dict(obs=cfg.env.obs, action_repeat=cfg.env.action_repeat, image_size=cfg.env.image_size,
                time_limit=cfg.env.time_limit)


def fit(cfg: Config) -> dict:
    """Train as configured; returns a summary dict (also printed by the CLI)."""
    validate(cfg)  # load_config validates; a Config built in a script is checked here before anything runs
    if cfg.logger.run_name is not None or TORCHRUN_ID_ENV in os.environ:
        cfg.logger.run_name = cfg.logger.run_name or default_run_name(cfg)  # torchrun: the same on every rank
        return _fit_named(cfg)
    # Under DDP Lightning re-runs this command for the other ranks, seconds later: they must take rank 0's
    # name, or each rank would write its checkpoint part into its own runs/<name> folder.
    if rank_zero_only.rank != 0:
        cfg.logger.run_name = os.environ.get(RUN_NAME_ENV) or default_run_name(cfg)
        return _fit_named(cfg)
    cfg.logger.run_name = default_run_name(cfg)
    os.environ[RUN_NAME_ENV] = cfg.logger.run_name  # inherited by the rank processes Lightning starts
    try:
        return _fit_named(cfg)
    finally:
        # Gone with this run: a later run in this process, or the ranks it starts, names its own.
        os.environ.pop(RUN_NAME_ENV, None)


def _fit_named(cfg: Config) -> dict:
    """`fit` once the run has its name."""
    if rank_zero_only.rank == 0:
        mark_orphaned_run(run_dir(cfg))  # a run killed in this folder before: end its MLflow run
    ckpt_path = resolve_ckpt_path(cfg)
    continuing, finished = check_start(cfg, ckpt_path)
    if finished is not None:
        return finished
    check_writable_dir(run_dir(cfg))
    if cfg.logger.backend == "mlflow":
        try:
            check_tracking_uri(cfg.logger.tracking_uri)
        except TrackingError as err:
            raise ConfigError(str(err)) from None
    L.seed_everything(cfg.run.seed, workers=True, verbose=False)
    module, datamodule, callbacks, info = build(cfg)
    if ckpt_path is not None:
        check_checkpoint_matches(ckpt_path, module)
    directory = run_dir(cfg)
    os.makedirs(directory, exist_ok=True)
    # Under DDP only rank 0 has an MLflow run (and writes the run dir's files). The other ranks get no
    # logger at all: opening the store would race rank 0's creation of a new database under torchrun,
    # which starts all ranks at once.
    logger, continued = None, False
    if rank_zero_only.rank == 0:
        logger, continued = make_logger(cfg, directory, resuming=continuing)
        record_run(cfg, directory, logger, continued, ckpt_path)
    trainer = L.Trainer(**cfg.trainer, logger=logger if logger is not None else False, callbacks=callbacks,
                        max_epochs=-1, max_steps=-1, enable_checkpointing=False, log_every_n_steps=cfg.run.log_every,
                        num_sanity_val_steps=0, default_root_dir=directory)
    start = time.time()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    collector = callbacks[0]
    summary = {
        "env_steps": collector.env_steps * trainer.world_size,
        "train_steps": int(module.train_steps),
        "episodes": collector.episodes,  # of this rank
        "world_size": trainer.world_size,
        "best_return": collector.best_return,
        "eval": next((cb.history[-1][1] for cb in callbacks if isinstance(cb, EvalCallback) and cb.history), None),
        "last_return": collector.last_return,
        "seconds": time.time() - start,
        "mlflow_run_id": logger.run_id if isinstance(logger, ResilientMLFlowLogger) else None,
        "logs": logs_location(cfg, logger),
        "tracking_uri": cfg.logger.tracking_uri,
        "checkpoint": resolve_last(os.path.join(directory, "checkpoints")),
        "run_dir": directory,
        "rank": trainer.global_rank,
        # SIGINT or SIGTERM when a signal ended the run before run.steps (it resumes with ckpt_path=last)
        "stopped_by": next((cb.stopped_by for cb in callbacks if isinstance(cb, GracefulStop)), None),
    }
    return summary

