"""Build and run a training run from a Config: the code behind `python -m lit_dreamer fit`."""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass, field

import lightning as L
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from lit_dreamer.callbacks import (CheckpointArtifacts, CollapseWatch, DreamerCheckpoint, EnvCollector, EvalCallback, GracefulStop, VideoCallback,
                                   resolve_last)
from lit_dreamer.callbacks.env_collector import find_collector
from lit_dreamer.callbacks.progress import EnvStepProgressBar
from lit_dreamer.callbacks.reward_stats import RewardStats
from lit_dreamer.adapt import check_init_start, saved_conditioning, start_from_init
from lit_dreamer.agent_config import ModelConfig
from lit_dreamer.checkpoint_files import check_checkpoint_folder
from lit_dreamer.config import Config, ConfigError, task_names, validate
from lit_dreamer.data import ReplayDataModule
from lit_dreamer.envs import action_dim, action_kind, check_same_spaces, make_env, space_spec
from lit_dreamer.envs.adapters import ONE_HOT_METADATA_KEY
from lit_dreamer.envs.described import describe_spaces
from lit_dreamer.envs.text import TextVocabularies, check_text_growth
from lit_dreamer.module import DreamerModule
from lit_dreamer.offline import build_offline, check_offline_start, is_offline_checkpoint, run_length
from lit_dreamer.rewards import shared_judge
from lit_dreamer.resume import (CheckpointInfo, check_replay_beside, check_run_dir_free, check_task_table,
                                describe_start, find_checkpoint, inside, last_checkpoint, nothing_to_do, read_checkpoint, run_record)
# git_commit moved to tracking with the rest of the run record; scripts and tests import it from here too
from lit_dreamer.tracking import (ResilientMLFlowLogger, TrackingError, check_tracking_uri, git_commit,  # noqa: F401
                                  logs_location, make_logger, mark_orphaned_run, record_run)
from lit_dreamer.relabel import hindsight_spec
from lit_dreamer.rewards.wrappers import instruction_key
from lit_dreamer.steps import NON_OBS_KEYS


@dataclass
class EnvInfo:
    spec: dict
    obs_spec: dict
    action_dim: int
    discrete: bool
    spaces: dict | None = None
    """The env's own spaces and lit_dreamer's conversions (envs.described), saved in checkpoints for Agent.load."""
    one_hot: dict = field(default_factory=dict)
    """The observation keys the env declares one-hot: {key: group widths} (model.one_hot_decoder)."""


def env_info(env) -> EnvInfo:
    """The replay spec, observation spec, action size and action kind of an env."""
    spec = space_spec(env)
    obs_spec = {k: v for k, v in spec.items() if k not in NON_OBS_KEYS}
    declared = env.metadata.get(ONE_HOT_METADATA_KEY, {})
    one_hot = {k: [int(w) for w in widths] for k, widths in declared.items() if k in obs_spec}
    return EnvInfo(spec, obs_spec, action_dim(env), action_kind(env) == "discrete", one_hot=one_hot)


def probe_env(cfg: Config, vocabularies: TextVocabularies | None = None) -> EnvInfo:
    """Make one env of each task to read its spaces (fails fast on an unknown id, an unusable space, or
    tasks whose spaces differ). With the run's `vocabularies` it also learns which text keys grow one."""
    envs = []
    try:
        for task in task_names(cfg):
            try:
                envs.append((task, make_env(task, **cfg.env.make_kwargs(), vocabularies=vocabularies,
                                            reward=cfg.reward)))
            except (ValueError, ImportError) as err:  # ImportError: an env family whose package is not installed
                raise ConfigError(f"{task_key(cfg, task)}: {err}") from None
        try:
            check_same_spaces(envs)
        except ValueError as err:
            raise ConfigError(f"env.tasks: {err}") from None
        info = env_info(envs[0][1])
        info.spaces = describe_spaces(envs[0][1])
        return info
    finally:
        for _, env in envs:
            env.close()


def task_key(cfg: Config, task: str) -> str:
    """How the config names a task: `env.id='X'` for a one-task run, `env.tasks[i]='X'` otherwise."""
    return f"env.tasks[{cfg.env.tasks.index(task)}]={task!r}" if cfg.env.tasks else f"env.id={task!r}"


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
    tasks = task_names(cfg)
    env = tasks[0].replace("/", "-") + (f"-and-{len(tasks) - 1}-more" if len(tasks) > 1 else "") if tasks else ""
    if cfg.offline.replay is not None:
        env = "-".join(filter(None, ("offline", env)))
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
    tasks = task_names(cfg)
    # A branch of a one-task checkpoint into a new run may change its env (the spaces are checked when the
    # module is built, naming the difference); continuing a run, or any run of several tasks, keeps its table.
    if continuing or len(tasks) > 1 or (info.tasks is not None and len(info.tasks) > 1):
        check_task_table(info, tasks)
    if rank_zero_only.rank == 0:
        print(describe_start(ckpt_path, info, cfg, continuing), flush=True)
    if cfg.offline.replay is not None or is_offline_checkpoint(info):
        check_offline_start(cfg, info)
    if nothing_to_do(info, *run_length(cfg)):
        return continuing, finished_summary(cfg, info)
    check_replay_beside(ckpt_path)
    check_checkpoint_folder(ckpt_path)  # the replay and counters beside it, before anything is written
    return continuing, None


def finished_summary(cfg: Config, info: CheckpointInfo) -> dict:
    """The summary of a start from a checkpoint that already holds run.steps: nothing ran, nothing changed."""
    return {"nothing_to_do": nothing_to_do(info, *run_length(cfg)), "env_steps": info.env_steps,
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


def check_conditioning_matches(path: str, module: DreamerModule) -> None:
    """Continuing or branching needs the checkpoint's task conditioning (its heads' shapes); init.ckpt does not."""
    saved = saved_conditioning(read_checkpoint(path))
    if module.cond.active and saved != module.cond:
        raise ConfigError(f"checkpoint {path} conditions its heads with multitask.conditioning={saved.mode} "
                          f"(embed_dim {saved.embed_dim}), but this run asks for {module.cond.mode} (embed_dim "
                          f"{module.cond.embed_dim}); set multitask.conditioning={saved.mode} "
                          f"multitask.embed_dim={saved.embed_dim}, or start a new run from its weights with init.ckpt")


def _override_value(value) -> str:
    """A value as a `key=value` command-line override spells it (YAML: lowercase booleans, no spaces)."""
    if value is None or isinstance(value, bool):
        return "null" if value is None else str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    return str(value)


def run_vocabularies(cfg: Config) -> TextVocabularies:
    """The text vocabularies every env of the run shares: those of the checkpoint it continues or branches from
    (else of init.ckpt), so that token ids keep their meaning; empty for a new run."""
    path = resolve_ckpt_path(cfg)
    if path is None and cfg.init.ckpt is not None:
        path = find_checkpoint(cfg.init.ckpt)
    saved = read_checkpoint(path).text_vocabulary if path is not None else {}
    return TextVocabularies(cfg.model.text_vocab, saved)


def build(cfg: Config) -> tuple[DreamerModule, ReplayDataModule, list[L.Callback], EnvInfo]:
    """Module, datamodule and callbacks for a Config: the pieces a script would assemble by hand."""
    if cfg.offline.replay is not None:
        return build_offline(cfg, run_dir(cfg))
    vocabularies = run_vocabularies(cfg)
    info, tasks = probe_env(cfg, vocabularies), task_names(cfg)
    check_text_growth(vocabularies, cfg.env.asynchronous, world_size=1)  # several devices: the collector checks
    env_kwargs = {**cfg.env.make_kwargs(), "vocabularies": vocabularies}
    try:
        module = DreamerModule(info.obs_spec, info.action_dim, info.discrete, cfg.agent(), compile=cfg.run.compile,
                               num_tasks=len(tasks), task_names=tasks, text_words=vocabularies.words(),
                               one_hot=info.one_hot)
    except ValueError as err:  # e.g. an observation the encoders cannot take
        raise ConfigError(f"{task_key(cfg, tasks[0])}: {err}") from None
    # Every replay row holds the envs of all tasks side by side (num_envs per task).
    datamodule = ReplayDataModule(replay_spec(cfg, info), cfg.replay, num_envs=cfg.env.num_envs * len(tasks),
                                  batch_size=cfg.run.batch_size, batch_length=cfg.run.batch_length, seed=cfg.run.seed,
                                  num_tasks=len(tasks), hindsight_fraction=cfg.reward.hindsight_fraction)
    collector = EnvCollector(tasks, num_envs=cfg.env.num_envs, seed=cfg.run.seed,
                             train_ratio=cfg.run.train_ratio, prefill=cfg.run.prefill, total_steps=cfg.run.steps,
                             asynchronous=cfg.env.asynchronous, nonfinite=cfg.env.nonfinite, reward=cfg.reward,
                             **env_kwargs)  # evaluation and videos keep the env's own reward
    checkpoint = DreamerCheckpoint(os.path.join(run_dir(cfg), "checkpoints"), every_env_steps=cfg.run.checkpoint_every,
                                   keep=cfg.run.keep_checkpoints)
    callbacks = [collector, checkpoint, GracefulStop(), run_record(cfg, vocabularies, info.spaces)]
    callbacks += checkpoint_artifacts(cfg, checkpoint)
    if cfg.reward.source == "llm":
        callbacks.append(RewardStats(shared_judge(cfg.reward.llm), every=cfg.run.log_every))
    if cfg.run.collapse_entropy > 0:
        callbacks.append(CollapseWatch(cfg.run.collapse_entropy, cfg.run.collapse_window, every=cfg.run.log_every))
    if cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a bar callback with the bar turned off
        callbacks.append(EnvStepProgressBar())
    if cfg.run.eval_every > 0:
        callbacks.append(EvalCallback(tasks, every_env_steps=cfg.run.eval_every, episodes=cfg.run.eval_episodes,
                                      mode=cfg.run.eval_mode, seed=cfg.run.seed + 1_000_000, **env_kwargs))
    if cfg.run.video_every > 0:
        callbacks.append(VideoCallback(tasks, os.path.join(run_dir(cfg), "videos"),
                                       every_env_steps=cfg.run.video_every, **env_kwargs))
    return module, datamodule, callbacks, info


def replay_spec(cfg: Config, info: EnvInfo) -> dict:
    """What a replay step holds: the env's step keys, and with reward.hindsight the keys of an episode's second
    label (lit_dreamer.relabel) for the instruction observation the labeller reads."""
    if cfg.reward.hindsight is None:
        return info.spec
    # make_env's HindsightLabel already refused an env without an instruction; its token key keeps the raw name.
    return {**info.spec, **hindsight_spec(info.spec, [instruction_key(info.obs_spec)])}


def checkpoint_artifacts(cfg: Config, checkpoint: DreamerCheckpoint) -> list[L.Callback]:
    """The callback that logs checkpoints to MLflow (logger.log_checkpoints), after `checkpoint` in the list.

    Without MLflow the default `last` is skipped (config.check_model_logging refuses `all`): with a warning for
    TensorBoard and CSV, silently for backend=none, which asked for no logging at all."""
    if cfg.logger.log_checkpoints == "none" or cfg.logger.backend == "none":
        return []
    if cfg.logger.backend != "mlflow":
        rank_zero_warn(f"logger.log_checkpoints=last logs checkpoints to MLflow, and logger.backend="
                       f"{cfg.logger.backend}: skipped (the checkpoints stay in run.dir/checkpoints); set logger.log_checkpoints=none to "
                       "silence this")
        return []
    return [CheckpointArtifacts(checkpoint, cfg.logger.log_checkpoints)]


def register_at_end(cfg: Config, logger: Logger | None, summary: dict) -> dict | None:
    """logger.register_as: register the final checkpoint's policy (rank 0, a run that reached run.steps).

    A store failure here leaves the run intact and says how to register it later, rather than fail a finished fit."""
    if not cfg.logger.register_as or not isinstance(logger, ResilientMLFlowLogger) or summary["stopped_by"] \
            or summary["checkpoint"] is None:
        return None
    from lit_dreamer.registry import register_policy
    try:
        return register_policy(summary["checkpoint"], cfg.logger.register_as, cfg.logger.tracking_uri,
                               cfg.logger.experiment, run_id=logger.run_id)
    except Exception as err:  # noqa: BLE001 - the run is done and saved; registering can be repeated
        rank_zero_warn(f"registering the policy as {cfg.logger.register_as} failed ({type(err).__name__}: {err}); "
                       f"register it with `python -m lit_dreamer register --ckpt {run_dir(cfg)} "
                       f"name={cfg.logger.register_as}`")
        return None


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
    """`fit` once the run has its name: the checks, the pieces, the logger, the Trainer run, its summary."""
    start = preflight(cfg)
    if start.finished is not None:
        return start.finished
    L.seed_everything(cfg.run.seed, workers=True, verbose=False)
    module, datamodule, callbacks, _ = build(cfg)
    if start.ckpt_path is not None:
        check_checkpoint_matches(start.ckpt_path, module)
        check_conditioning_matches(start.ckpt_path, module)
    start_from_init(cfg, module, start.init_path, task_names(cfg), announce=rank_zero_only.rank == 0)
    logger = set_up_logging(cfg, start)
    trainer = make_trainer(cfg, callbacks, logger)
    began = time.time()
    trainer.fit(module, datamodule=datamodule, ckpt_path=start.ckpt_path, weights_only=True)
    summary = fit_summary(cfg, trainer, module, logger, time.time() - began)
    summary["registered"] = register_at_end(cfg, logger, summary)
    return summary


@dataclass
class Start:
    """Where a fit starts: the checkpoint (None: from scratch), whether it continues run.dir's own run
    (not a branch), and the summary to return at once when the checkpoint already holds run.steps."""

    ckpt_path: str | None
    continuing: bool
    finished: dict | None
    init_path: str | None = None
    """The init.ckpt model.ckpt whose weights a new run starts from (None: none, or continuing)."""


def preflight(cfg: Config) -> Start:
    """Everything checked before anything is built or written: a killed run's leftovers, the checkpoint,
    the run dir and the tracking store."""
    if rank_zero_only.rank == 0:
        mark_orphaned_run(run_dir(cfg))  # a run killed in this folder before: end its MLflow run
    ckpt_path = resolve_ckpt_path(cfg)
    continuing, finished = check_start(cfg, ckpt_path)
    init_path = check_init_start(cfg, continuing)
    if finished is None:
        check_writable_dir(run_dir(cfg))
        check_tracking(cfg)
    return Start(ckpt_path, continuing, finished, init_path)


def check_tracking(cfg: Config) -> None:
    """With logger.backend=mlflow, fail before training when the tracking store cannot be reached or written."""
    if cfg.logger.backend != "mlflow":
        return
    try:
        check_tracking_uri(cfg.logger.tracking_uri)
    except TrackingError as err:
        raise ConfigError(str(err)) from None


def set_up_logging(cfg: Config, start: Start) -> Logger | None:
    """Make the run dir; on rank 0 open the logger and write the run's record (config.yaml, params, tags).

    Under DDP only rank 0 has an MLflow run (and writes the run dir's files). The other ranks get no
    logger at all: opening the store would race rank 0's creation of a new database under torchrun,
    which starts all ranks at once.
    """
    directory = run_dir(cfg)
    os.makedirs(directory, exist_ok=True)
    if rank_zero_only.rank != 0:
        return None
    logger, continued = make_logger(cfg, directory, resuming=start.continuing)
    record_run(cfg, directory, logger, continued, start.ckpt_path)
    return logger


def make_trainer(cfg: Config, callbacks: list[L.Callback], logger: Logger | None) -> L.Trainer:
    """The Trainer of a fit: cfg.trainer plus what fit owns (endless epochs, its own checkpoints, no sanity check)."""
    return L.Trainer(**cfg.trainer, logger=logger if logger is not None else False, callbacks=callbacks,
                     max_epochs=-1, max_steps=-1, enable_checkpointing=False, log_every_n_steps=cfg.run.log_every,
                     num_sanity_val_steps=0, default_root_dir=run_dir(cfg))


def fit_summary(cfg: Config, trainer: L.Trainer, module: DreamerModule, logger: Logger | None,
                seconds: float) -> dict:
    """What a finished (or stopped) fit did and where its outputs are: the dict `fit` returns."""
    collector, directory = find_collector(trainer), run_dir(cfg)
    evals = [cb.history[-1][1] for cb in trainer.callbacks if isinstance(cb, EvalCallback) and cb.history]
    stops = [cb.stopped_by for cb in trainer.callbacks if isinstance(cb, GracefulStop)]
    return {
        "env_steps": collector.env_steps * trainer.world_size,
        "train_steps": int(module.train_steps),
        "episodes": collector.episodes,  # of this rank
        "world_size": trainer.world_size,
        "best_return": collector.best_return,
        "eval": next(iter(evals), None),
        "last_return": collector.last_return,
        "seconds": seconds,
        "mlflow_run_id": logger.run_id if isinstance(logger, ResilientMLFlowLogger) else None,
        "logs": logs_location(cfg, logger),
        "tracking_uri": cfg.logger.tracking_uri,
        "checkpoint": resolve_last(os.path.join(directory, "checkpoints")),
        "run_dir": directory,
        "rank": trainer.global_rank,
        # SIGINT or SIGTERM when a signal ended the run before run.steps (it resumes with ckpt_path=last)
        "stopped_by": next(iter(stops), None),
        "offline_replay": cfg.offline.replay,  # an offline run counts gradient steps and steps no env
    }
