"""The run configuration: typed dataclasses with defaults, YAML overlays, dotted overrides, validation.

`load_config(files, overrides)` starts from these defaults, merges each YAML overlay in order,
then the `key=value` overrides. Unknown keys and wrong types fail before anything runs, with
the closest valid key suggested.
"""

from __future__ import annotations

import ast
import difflib
import functools
import inspect
import os
import re
import textwrap
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Callable, Optional, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lit_dreamer.agent_config import (AgentConfig, BehaviorConfig, LossScales, ModelConfig, MultitaskConfig,
                                     OptimConfig, WorldModelConfig, migrate_moved_keys)
from lit_dreamer.rewards.settings import RewardConfig, check_reward
from lit_dreamer.sampling import REPLAY_DEVICES, SAMPLERS, ReplayConfig

def config_dir() -> str:
    """The YAML overlays: lit_dreamer/configs in an installed package, configs/ at the top of a checkout."""
    package = os.path.dirname(os.path.abspath(__file__))
    installed = os.path.join(package, "configs")
    return installed if os.path.isdir(installed) else os.path.join(os.path.dirname(package), "configs")


CONFIG_DIR = config_dir()


class ConfigError(ValueError):
    """A configuration problem, with a message that names the key and the fix."""


@dataclass
class EnvConfig:
    """The environment."""

    id: Optional[str] = "CartPole-v1"
    """Gymnasium id (CartPole-v1, Pendulum-v1, ...), dmc/<domain>-<task> (dm_control), atari/<game>; null: no env,
    only in an offline run (offline.replay), which then sets it to null unless env.id or env.tasks is given."""
    tasks: list[str] = field(default_factory=list)
    """Env ids trained together by one agent, each with env.num_envs envs per device (empty: the one task env.id)."""
    obs: str = "proprio"
    """Observation mode: proprio (the env's vectors) or pixels (64x64 RGB renders)."""
    num_envs: int = 1
    """Environments stepped in parallel per device and task."""
    action_repeat: int = 1
    """Env frames per agent step (not for Atari, which uses the protocol's frame skip of 4)."""
    image_size: int = 64
    """Side of image observations, a power of two."""
    time_limit: Optional[int] = None
    """Extra episode time limit in agent steps (None: the env's own)."""
    asynchronous: bool = False
    """Step the envs in subprocesses (gymnasium AsyncVectorEnv)."""
    nonfinite: str = "cut"
    """NaN/inf reward or observation: cut (end the episode as truncated, warn once, go on) or error (stop the run)."""
    text_length: int = 24
    """Words kept of each text observation (longer texts are cut, with a warning), as token ids padded to this."""
    held_out: list[str] = field(default_factory=list)
    """Instruction phrases (e.g. 'red ball') no episode of the run gets: an episode whose instruction (`mission` or
    `instruction`) holds one as consecutive words is redrawn at reset; `eval instructions=held_out` tests on them."""

    def make_kwargs(self) -> dict:
        """The keyword arguments of `lit_dreamer.envs.make_env` these settings give (not the id, seed or count)."""
        return dict(obs=self.obs, action_repeat=self.action_repeat, image_size=self.image_size,
                    time_limit=self.time_limit, text_length=self.text_length, held_out=tuple(self.held_out))


@dataclass
class RunConfig:
    """Length, seed, train ratio and batch shape of a run."""

    steps: int = 2000
    """Total env steps over all devices and tasks (agent steps, before action repeat)."""
    seed: int = 0
    """Seed of networks, envs and replay sampling."""
    train_ratio: float = 512.0
    """Replayed steps per env step (of all tasks); gradient steps per env step = train_ratio / (batch_size *
    batch_length)."""
    prefill: int = 1000
    """Env steps collected with a random policy before training."""
    batch_size: int = 16
    """Sequences per batch (B)."""
    batch_length: int = 64
    """Steps per sequence (T)."""
    log_every: int = 10
    """Log metrics every this many training steps."""
    checkpoint_every: int = 10000
    """Save a checkpoint (with replay) every this many env steps (0: never), and always at the end."""
    keep_checkpoints: int = 2
    """Newest checkpoint folders kept in run.dir/checkpoints (older ones are deleted; 0: keep all)."""
    eval_every: int = 5000
    """Evaluate in separate envs every this many env steps and at the end (0: never)."""
    eval_episodes: int = 10
    """Episodes per evaluation and task, run in parallel envs."""
    eval_mode: str = "mode"
    """Evaluation policy: mode (the most likely action) or sample."""
    video_every: int = 20000
    """Write an episode video and the world model's open-loop prediction every this many env steps (0: never)."""
    dir: Optional[str] = None
    """Folder for checkpoints and the run's files (None: runs/<run name>)."""
    collapse_entropy: float = 0.2
    """Warn of a policy collapse when the policy's entropy falls below this share of its first value while the
    return does not rise and most advantages share one sign (0: off; callbacks/collapse.py)."""
    collapse_window: int = 5000
    """Env steps over which the return must rise for the collapse warning (run.collapse_entropy)."""
    compile: bool = False
    """torch.compile the imagination rollout (about a minute of compilation on CPU; no gain measured per step at size1m)."""


TRACKING_URI_VARIABLE = "MLFLOW_TRACKING_URI"


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI when set, else a SQLite file in the working directory."""
    return os.environ.get(TRACKING_URI_VARIABLE) or "sqlite:///mlflow.db"


LOGGER_BACKENDS = ("mlflow", "tensorboard", "csv", "none")
LOG_CHECKPOINTS = ("last", "all", "none")


@dataclass
class LoggerConfig:
    """Where metrics go: MLflow (the default), TensorBoard or CSV files in the run dir, or nowhere."""

    backend: str = "mlflow"
    """mlflow, tensorboard (run.dir/tensorboard), csv (run.dir/csv/metrics.csv) or none; compare reads MLflow only."""
    tracking_uri: str = field(default_factory=default_tracking_uri)
    """MLflow tracking URI; the default is a SQLite file in the working directory, or $MLFLOW_TRACKING_URI when set."""
    experiment: str = "lit_dreamer"
    """MLflow experiment name."""
    run_name: Optional[str] = None
    """MLflow run name (None: <env id>-seed<seed>-<time>)."""
    log_checkpoints: str = "last"
    """Model checkpoints (not the replay) as MLflow run artifacts: last (checkpoints/last, replaced at each save),
    all (checkpoints/step-N for every save) or none; needs backend=mlflow (the default last is skipped without it)."""
    register_as: Optional[str] = None
    """Register the final policy in the MLflow model registry under this name at the end of fit (None: not)."""


def default_trainer() -> dict[str, Any]:
    # accelerator "auto" is Lightning's own default: a GPU when there is one (trainer.accelerator=cpu forces the CPU).
    return {"accelerator": "auto", "devices": 1, "precision": "32-true", "strategy": "auto"}


# lightning.Trainer arguments that `fit` passes itself, each with the supported way to get its effect.
# Given again in `trainer`, the Trainer call would fail with "got multiple values" after the MLflow
# run is open, so they are refused when the config is checked.
FIT_TRAINER_ARGS: dict[str, str] = {
    "logger": "fit logs to MLflow: set logger.tracking_uri, logger.experiment or logger.run_name",
    "callbacks": "fit adds its own callbacks: to add others, build the Trainer yourself from "
                 "lit_dreamer.train.build (see the README's script example)",
    "max_steps": "set the run's length in env steps with run.steps",
    "max_epochs": "set the run's length in env steps with run.steps",
    "enable_checkpointing": "fit saves checkpoints with their replay: set run.checkpoint_every (env steps)",
    "log_every_n_steps": "set run.log_every (training steps)",
    "num_sanity_val_steps": "fit has no validation loop: evaluation is set with run.eval_every and run.eval_episodes",
    "default_root_dir": "set the run's folder with run.dir",
}


def check_trainer_arg(name: str, source: str) -> None:
    """Refuse a trainer argument that fit sets itself, naming the setting to use instead."""
    if name in FIT_TRAINER_ARGS:
        raise ConfigError(f"trainer.{name} in {source} is set by fit itself and cannot be overridden; "
                          f"{FIT_TRAINER_ARGS[name]}")


INIT_PARTS = ("world_model", "actor", "critic")


@dataclass
class InitConfig:
    """Start a new run from another run's weights (adaptation to a new task or task list)."""

    ckpt: Optional[str] = None
    """A run folder or a model.ckpt whose weights the new run starts from (a new MLflow run, fresh optimizers,
    step 0); parameters load by name and shape, task rows by task name; new tasks start fresh."""
    parts: str = "world_model"
    """Comma-separated parts to load from init.ckpt: world_model, actor, critic (e.g. world_model,actor,critic)."""
    freeze: bool = False
    """Freeze the loaded encoder, RSSM and decoder (not trained); the reward and continue heads still train."""

    def part_list(self) -> list[str]:
        return [part.strip() for part in self.parts.split(",") if part.strip()]


@dataclass
class OfflineConfig:
    """Offline training: world model, actor and critic learn from a saved replay, with no env collection."""

    replay: Optional[str] = None
    """A replay snapshot folder (a checkpoint's replay-rank0, or the output of `convert-episodes`), a checkpoint's
    step-* folder or model.ckpt, or a run folder (its last checkpoint's replay); only read, never written.
    None: an online run. The spaces come from it; an env named with env.id is used only for evaluation."""
    steps: int = 5000
    """Gradient steps of an offline run (run.steps, run.train_ratio and run.prefill do not apply; the run.*_every
    cadences count gradient steps)."""


@dataclass
class Config:
    env: EnvConfig = field(default_factory=EnvConfig)
    run: RunConfig = field(default_factory=RunConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    world_model: WorldModelConfig = field(default_factory=WorldModelConfig)
    loss_scales: LossScales = field(default_factory=LossScales)
    behavior: BehaviorConfig = field(default_factory=BehaviorConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    multitask: MultitaskConfig = field(default_factory=MultitaskConfig)
    init: InitConfig = field(default_factory=InitConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    offline: OfflineConfig = field(default_factory=OfflineConfig)
    trainer: dict[str, Any] = field(default_factory=default_trainer)
    """Keyword arguments of lightning.Trainer (devices, accelerator, precision, strategy, ...)."""
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    ckpt_path: Optional[str] = None
    """'last' continues the run in run.dir; a model.ckpt or a run folder branches into a new run.dir (see --resume)."""

    def agent(self) -> AgentConfig:
        return AgentConfig(model=self.model, world_model=self.world_model, loss_scales=self.loss_scales,
                           behavior=self.behavior, optim=self.optim, multitask=self.multitask)


# --------------------------------------------------------------------------------------------------
# The task table


def task_names(cfg: Config) -> list[str]:
    """The run's task table: env ids in order, a task's index is its position (env.tasks, else [env.id]).

    One task is the table of one entry: every part of a run (collector, replay, evaluation,
    checkpoints) reads the table, so a one-task run takes the same code path as a many-task one.
    An offline run without an env (env.id null) has the empty table: it acts in no env.
    """
    return list(cfg.env.tasks) or ([cfg.env.id] if cfg.env.id is not None else [])


def task_metric_name(task: str) -> str:
    """A task's id as one metric-name segment: `dmc/cartpole-balance` -> `dmc_cartpole-balance`.

    MLflow allows `/` in metric names, but a task segment without it keeps `train/<task>/return`
    three segments long, so that a pattern such as `eval/*/return` matches one metric per task.
    """
    return re.sub(r"[^A-Za-z0-9_.-]", "_", task)


def check_tasks(cfg: Config) -> None:
    """A task table without repeats or metric-name clashes, and no env.id beside env.tasks."""
    if not cfg.env.tasks:
        return
    if cfg.env.id != EnvConfig.id:
        raise ConfigError(f"env.id={cfg.env.id!r} and env.tasks={list(cfg.env.tasks)} are both set; a run trains "
                          "either the one task env.id or the list env.tasks: drop env.id, or add it to env.tasks")
    names = [task_metric_name(task) for task in cfg.env.tasks]
    for index, name in enumerate(names):
        if name in names[:index]:
            first = cfg.env.tasks[names.index(name)]
            same = "twice" if first == cfg.env.tasks[index] else f"as {first!r} and {cfg.env.tasks[index]!r}"
            raise ConfigError(f"env.tasks lists the task {name!r} {same} (its metrics would mix); "
                              "list each task once")


def check_multitask(cfg: Config) -> None:
    """The conditioning mode and the init.* settings."""
    from lit_dreamer.conditioning import CONDITIONING_MODES
    if cfg.multitask.conditioning not in CONDITIONING_MODES:
        raise ConfigError(f"multitask.conditioning must be one of {', '.join(CONDITIONING_MODES)}, "
                          f"got {cfg.multitask.conditioning!r}")
    if cfg.multitask.embed_dim <= 0:
        raise ConfigError(f"multitask.embed_dim must be positive, got {cfg.multitask.embed_dim}")
    parts = cfg.init.part_list()
    unknown = [part for part in parts if part not in INIT_PARTS]
    if unknown or not parts:
        raise ConfigError(f"init.parts={cfg.init.parts!r}: give a comma-separated list of {', '.join(INIT_PARTS)} "
                          "(e.g. init.parts=world_model,actor,critic)")
    if cfg.init.freeze and cfg.init.ckpt is None:
        raise ConfigError("init.freeze=true freezes weights loaded from init.ckpt, but init.ckpt is not set; "
                          "set init.ckpt=RUN_FOLDER_OR_MODEL_CKPT, or drop init.freeze")
    if cfg.init.freeze and "world_model" not in parts:
        raise ConfigError(f"init.freeze=true freezes the loaded world model, but init.parts={cfg.init.parts!r} "
                          "does not load it; add world_model to init.parts, or drop init.freeze")


# --------------------------------------------------------------------------------------------------
# Key listing and help


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (a string literal right after a field) of a dataclass, read from its source.

    Cached: the source is parsed once per class, not on every `load_config`. Callers must not mutate
    the returned dict."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                and isinstance(getattr(nxt, "value", None), ast.Constant) and isinstance(nxt.value.value, str):
            docs[node.target.id] = nxt.value.value.strip()
    return docs


def schema_keys(cls: type = Config, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, doc) for every leaf of the schema."""
    out = []
    docs = field_docs(cls)
    instance = cls()
    for f in fields(cls):
        value = getattr(instance, f.name)
        key = prefix + f.name
        if is_dataclass(value):
            out.extend(schema_keys(type(value), key + "."))
        elif isinstance(value, dict):
            out.extend((f"{key}.{k}", v, docs.get(f.name, "")) for k, v in value.items())
        else:
            out.append((key, value, docs.get(f.name, "")))
    return out


def key_lines(rows: list[tuple[str, Any, str]]) -> list[str]:
    """`  key = default` and its docstring below it, for each (key, default, doc): the --help listing of keys."""
    lines = []
    for key, default, doc in rows:
        lines.append(f"  {key} = {default!r}")
        if doc:
            lines.append(f"      {' '.join(doc.split())}")
    return lines


def help_text() -> str:
    lines = ["Keys (set in YAML overlays with -c FILE, or as key=value; later wins):", ""]
    lines += key_lines(schema_keys())
    lines.append("  trainer.<any lightning.Trainer argument> (e.g. trainer.max_time=00:01:00:00),")
    lines.append("      except those fit sets itself (run.steps, run.dir, run.log_every, ... replace them):")
    lines.append(f"      {', '.join(FIT_TRAINER_ARGS)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Loading and validation


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and not (prefix == "" and k == "trainer" and not v):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def did_you_mean(key: str, known: Sequence[str], shown: Callable[[str], str] = str, n: int = 3,
                 cutoff: float = 0.5) -> str:
    """'did you mean a or b?' with the (at most n) known keys closest to a misspelt one; '' if none is close."""
    close = difflib.get_close_matches(key, list(known), n=n, cutoff=cutoff)
    return f"did you mean {' or '.join(shown(c) for c in close)}?" if close else ""


def check_keys(keys: list[str], source: str) -> None:
    """Fail on keys the schema does not know, suggesting the closest known one."""
    valid = [k for k, _, _ in schema_keys()]
    sections = {k.split(".")[0] for k in valid}
    trainer_args = set(inspect.signature(__import__("lightning").Trainer.__init__).parameters) - {"self"}
    for key in keys:
        head, _, rest = key.partition(".")
        if head == "trainer":
            check_trainer_arg(rest.split(".")[0], source)
            if rest.split(".")[0] not in trainer_args:
                close = difflib.get_close_matches(rest, sorted(trainer_args), n=3)
                raise ConfigError(f"unknown key {key!r} in {source}: lightning.Trainer has no argument {rest!r}"
                                  + (f"; did you mean {', '.join('trainer.' + c for c in close)}?" if close else ""))
            continue
        if key in valid or (head in sections and key in valid):
            continue
        hint = did_you_mean(key, valid)
        hint = f"; {hint}" if hint else "; see `python -m lit_dreamer fit --help`"
        raise ConfigError(f"unknown config key {key!r} in {source}{hint}")


def resolve_config_file(path: str) -> str:
    """A path, or the name of a file in configs/ (with or without .yaml, e.g. `cartpole`)."""
    for candidate in (path, os.path.join(CONFIG_DIR, path), os.path.join(CONFIG_DIR, path + ".yaml")):
        if os.path.isfile(candidate):
            return candidate
    names = sorted(os.path.relpath(os.path.join(d, f), CONFIG_DIR)[:-5] for d, _, fs in os.walk(CONFIG_DIR)
                   for f in fs if f.endswith(".yaml"))
    raise ConfigError(f"config file {path!r} not found; give a path or one of: {', '.join(names)}")


def read_config_file(path: str) -> DictConfig:
    """One YAML overlay; a syntax error names the file, line and column instead of a parser traceback."""
    try:
        layer = OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"YAML syntax error in config file {path}{where}: {problem}; fix the file "
                          "(indent with spaces, close every bracket and quote)") from None
    if not isinstance(layer, DictConfig):
        raise ConfigError(f"config file {path} holds a {type(layer).__name__}, not sections of keys; "
                          "write it as e.g. `run:\n  steps: 5000`")
    layer.pop("defaults", None)
    return layer


def config_file_layers(path: str, including: tuple[str, ...] = ()) -> list[tuple[DictConfig, str]]:
    """A config file as overlay layers: first the files its `include:` list names, in order, then its own keys.

    `include: [budget]` lets task files share one recipe (configs/budget.yaml) and change only what differs.
    Names resolve like `-c` (configs/ or a path); an include cycle is an error naming the files.
    """
    path = resolve_config_file(path)
    if os.path.realpath(path) in including:
        raise ConfigError(f"config file {path} includes itself (through {' -> '.join(including)}); "
                          "remove the cycle from the `include:` lists")
    layer = read_config_file(path)
    names = layer.pop("include", None) or []
    if isinstance(names, str) or not all(isinstance(name, str) for name in names):
        raise ConfigError(f"`include:` in {path} must be a list of config names, e.g. `include: [budget]`")
    layers = []
    for name in names:
        layers += config_file_layers(name, including + (os.path.realpath(path),))
    return layers + [(layer, f"config file {path}")]


def load_config(files: list[str] = (), overrides: list[str] = (), base: dict | None = None) -> Config:
    """Defaults <- base (a saved run's config) <- each YAML overlay in order <- dotted key=value overrides."""
    cfg = OmegaConf.structured(Config)
    if base is not None:
        try:
            cfg = OmegaConf.merge(cfg, migrated(OmegaConf.create(base), "the saved config"))
        except OmegaConfBaseException as err:  # a config saved by an older version with a key since renamed
            reason = str(getattr(err, "msg", err)).splitlines()[0]
            raise ConfigError(f"the saved config does not fit this version ({reason})") from None
    layers = []  # (layer, source, level): each -c file with its includes is one level, the overrides the last
    for level, path in enumerate(files):
        layers += [(layer, source, level) for layer, source in config_file_layers(path)]
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. run.steps=5000)")
        layers.append((OmegaConf.from_dotlist([item]), f"override {item!r}", len(files)))
    task_keys_set: dict[str, tuple[int, str]] = {"env.tasks": (-1, "the saved config")}
    for layer, source, level in layers:
        layer = migrated(layer, source)
        keys = list(flatten(OmegaConf.to_container(layer)))
        check_keys(keys, source)
        task_keys_set.update({key: (level, source) for key in ("env.id", "env.tasks") if key in keys})
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as err:
            key = getattr(err, "full_key", None) or "?"
            reason = str(getattr(err, "msg", err)).splitlines()[0]
            raise ConfigError(f"bad value for {key} in {source}: {reason}") from None
    config: Config = OmegaConf.to_object(cfg)
    settle_id_and_tasks(config, task_keys_set)
    if base is None:  # a saved config (--resume) keeps the env it was saved with
        settle_offline_env(config, task_keys_set)
    validate(config)
    return config


def settle_id_and_tasks(config: Config, set_at: dict[str, tuple[int, str]]) -> None:
    """Of env.id and env.tasks, the one set at the later level wins; both at one level is an error.

    A domain's recipe file names one env.id (configs/dmc_proprio.yaml): `-c dmc_proprio env.tasks=[...]`
    trains the tasks with that recipe; a family's file names a task list (configs/point_goal.yaml):
    `-c point_goal env.id=...` trains that one task with the family's settings. On one command line, or in
    one file, both keys are a contradiction. The task list of a run being continued (level -1) is not
    replaced here: continuing with another task table is refused when the run starts.
    """
    if not config.env.tasks or "env.id" not in set_at:
        return
    (id_level, id_source), (tasks_level, tasks_source) = set_at["env.id"], set_at["env.tasks"]
    if id_level == tasks_level or tasks_level < 0:
        raise ConfigError(f"env.id (in {id_source}) and env.tasks (in {tasks_source}) are both set; a run trains "
                          "either the one task env.id or the list env.tasks: drop env.id, or add it to env.tasks")
    if id_level > tasks_level:
        config.env.tasks = []  # the later env.id replaces the earlier file's task list
    else:
        config.env.id = EnvConfig.id  # the earlier file's env.id gives way to the task list


def settle_offline_env(config: Config, set_at: dict[str, tuple[int, str]]) -> None:
    """An offline run acts in an env only when a config file or override names one (env.id or env.tasks):
    env.id's default, CartPole-v1, would otherwise evaluate a replay of any other env in CartPole."""
    named = "env.id" in set_at or set_at.get("env.tasks", (-1, ""))[0] >= 0
    if config.offline.replay is not None and not named:
        config.env.id = None


def migrated(layer: DictConfig, source: str) -> DictConfig:
    """The layer with keys that moved section (e.g. behavior.free_nats) in their new place: old files still load."""
    try:
        return OmegaConf.create(migrate_moved_keys(OmegaConf.to_container(layer)))
    except ValueError as err:
        raise ConfigError(f"{err} (in {source})") from None


def check_model_logging(logger: LoggerConfig) -> None:
    """logger.log_checkpoints and logger.register_as: known values, and MLflow where they need it.

    log_checkpoints=all and register_as are asked for explicitly, so another backend is an error; the default
    log_checkpoints=last is skipped there (train says so), or every run without MLflow would have to turn it off.
    """
    if logger.log_checkpoints not in LOG_CHECKPOINTS:
        raise ConfigError(f"logger.log_checkpoints must be one of {', '.join(LOG_CHECKPOINTS)} (the last checkpoint, "
                          f"every checkpoint, or none as MLflow artifacts), got {logger.log_checkpoints!r}")
    if logger.backend == "mlflow":
        return
    if logger.log_checkpoints == "all":
        raise ConfigError(f"logger.log_checkpoints=all logs checkpoints as MLflow artifacts, which needs "
                          f"logger.backend=mlflow (it is {logger.backend}); set logger.backend=mlflow or "
                          "logger.log_checkpoints=none")
    if logger.register_as is not None:
        raise ConfigError(f"logger.register_as={logger.register_as} registers the policy in the MLflow model registry, "
                          f"which needs logger.backend=mlflow (it is {logger.backend}); set logger.backend=mlflow, or "
                          "register later with `python -m lit_dreamer register --ckpt RUN name=NAME "
                          "tracking_uri=URI`")


def validate(cfg: Config) -> None:
    """Checks that need values, not just keys."""
    from lit_dreamer.agent_config import SIZES
    for name in cfg.trainer:  # a Config built in code or read back from a run's config.yaml skips check_keys
        check_trainer_arg(name, "the trainer section")
    if cfg.model.size not in SIZES:
        close = difflib.get_close_matches(cfg.model.size, list(SIZES), n=1)
        raise ConfigError(f"unknown model.size {cfg.model.size!r}; choose one of {', '.join(SIZES)}"
                          + (f" (did you mean {close[0]}?)" if close else ""))
    check_tasks(cfg)
    check_offline(cfg)
    check_multitask(cfg)
    check_text(cfg)
    try:
        check_reward(cfg.reward)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if cfg.env.obs not in ("proprio", "pixels"):
        raise ConfigError(f"env.obs must be 'proprio' or 'pixels', got {cfg.env.obs!r}")
    if cfg.env.nonfinite not in ("cut", "error"):
        raise ConfigError(f"env.nonfinite must be 'cut' (end the episode and go on) or 'error' (stop the run), "
                          f"got {cfg.env.nonfinite!r}")
    from lit_dreamer.evaluation import EVAL_MODES
    if cfg.run.eval_mode not in EVAL_MODES:
        raise ConfigError(f"run.eval_mode must be one of {', '.join(EVAL_MODES)}, got {cfg.run.eval_mode!r}")
    if cfg.logger.backend not in LOGGER_BACKENDS:
        raise ConfigError(f"logger.backend must be one of {', '.join(LOGGER_BACKENDS)}, got {cfg.logger.backend!r}")
    check_model_logging(cfg.logger)
    if cfg.replay.sampling not in SAMPLERS:
        close = difflib.get_close_matches(cfg.replay.sampling, list(SAMPLERS), n=1)
        raise ConfigError(f"unknown replay.sampling {cfg.replay.sampling!r}; choose one of {', '.join(SAMPLERS)}"
                          + (f" (did you mean {close[0]}?)" if close else ""))
    if not 0 <= cfg.replay.reward_fraction <= 1:
        raise ConfigError(f"replay.reward_fraction must be within [0, 1], got {cfg.replay.reward_fraction}")
    if cfg.replay.sampling == "reward" and len(task_names(cfg)) > 1:
        raise ConfigError("replay.sampling=reward draws around rewarded steps of any task and would unbalance the "
                          "tasks of env.tasks; use it with one task (env.id), or replay.sampling=uniform")
    if cfg.replay.device not in REPLAY_DEVICES:
        raise ConfigError(f"replay.device must be one of {', '.join(REPLAY_DEVICES)} (auto: on the trainer's "
                          f"accelerator), got {cfg.replay.device!r}")
    if cfg.reward.hindsight is not None and cfg.replay.device != "cpu":
        raise ConfigError("reward.hindsight writes each episode's label into the host replay once the episode ends, "
                          "which the accelerator's copy of replay.device=auto does not follow; set replay.device=cpu")
    for key, value in (("run.steps", cfg.run.steps), ("run.batch_size", cfg.run.batch_size),
                       ("run.batch_length", cfg.run.batch_length), ("env.num_envs", cfg.env.num_envs),
                       ("run.train_ratio", cfg.run.train_ratio), ("behavior.horizon", cfg.behavior.horizon),
                       ("model.cnn_kernel", cfg.model.cnn_kernel)):
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    if cfg.run.checkpoint_every < 0:
        raise ConfigError(f"run.checkpoint_every must be >= 0 (0: only the checkpoint at the end), "
                          f"got {cfg.run.checkpoint_every}")
    if cfg.run.keep_checkpoints < 0:
        raise ConfigError(f"run.keep_checkpoints must be >= 0 (0 keeps every checkpoint), got {cfg.run.keep_checkpoints}")
    if not cfg.model.cnn_mults or min(cfg.model.cnn_mults) <= 0:
        raise ConfigError(f"model.cnn_mults must be a non-empty list of positive channel multiples, "
                          f"e.g. [2,3,4,4]; got {list(cfg.model.cnn_mults)}")
    if not 0.0 <= cfg.run.collapse_entropy < 1.0:
        raise ConfigError(f"run.collapse_entropy must be in [0, 1) (a share of the policy's first entropy; 0 turns "
                          f"the collapse warning off), got {cfg.run.collapse_entropy}")
    if cfg.run.collapse_window <= 0:
        raise ConfigError(f"run.collapse_window must be a positive number of env steps, got {cfg.run.collapse_window}")
    if cfg.run.batch_length < 2:
        raise ConfigError(f"run.batch_length must be at least 2, got {cfg.run.batch_length}")


def check_offline(cfg: Config) -> None:
    """offline.steps, and env.id null only in an offline run."""
    if cfg.offline.steps <= 0:
        raise ConfigError(f"offline.steps must be a positive number of gradient steps, got {cfg.offline.steps}")
    if cfg.env.id is None and not cfg.env.tasks and cfg.offline.replay is None:
        raise ConfigError("env.id=null (no env) is only for an offline run: set offline.replay=PATH to train from "
                          "a saved replay, or name the env to train in with env.id")


def check_text(cfg: Config) -> None:
    """The text-observation settings (used only when an env has a text observation), the one-hot decoder's and
    the grid encoder's."""
    from lit_dreamer.agent_config import GRID_ENCODERS, ONE_HOT_DECODERS, TEXT_ENCODERS
    if cfg.model.one_hot_decoder not in ONE_HOT_DECODERS:
        raise ConfigError(f"unknown model.one_hot_decoder {cfg.model.one_hot_decoder!r}; choose one of "
                          f"{', '.join(ONE_HOT_DECODERS)}")
    if cfg.model.grid_encoder not in GRID_ENCODERS:
        raise ConfigError(f"unknown model.grid_encoder {cfg.model.grid_encoder!r}; choose one of "
                          f"{', '.join(GRID_ENCODERS)}")
    if cfg.model.text_encoder not in TEXT_ENCODERS:
        raise ConfigError(f"unknown model.text_encoder {cfg.model.text_encoder!r}; choose one of "
                          f"{', '.join(TEXT_ENCODERS)}")
    if cfg.model.text_encoder == "minilm":
        from lit_dreamer.minilm import require_minilm
        try:
            require_minilm()
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if cfg.model.text_vocab < 3:
        raise ConfigError(f"model.text_vocab must be at least 3 (padding, out-of-vocabulary and one word), "
                          f"got {cfg.model.text_vocab}")
    for key, value in (("model.text_embed", cfg.model.text_embed), ("env.text_length", cfg.env.text_length)):
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    from lit_dreamer.envs.text import tokenize
    for phrase in cfg.env.held_out:
        if not tokenize(str(phrase)):
            raise ConfigError(f"env.held_out holds {phrase!r}, which has no word; give phrases of an instruction, "
                              "e.g. env.held_out=[red ball,green key]")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def preset_comment(model: ModelConfig, key: str) -> str:
    """What the model.size preset gives a dimension, for a comment beside its value ('' if not a preset key)."""
    from lit_dreamer.agent_config import SIZES
    preset = SIZES.get(model.size, {})
    if key not in preset:
        return ""
    if getattr(model, key) is None:
        return f"{preset[key]} from model.size={model.size}"
    return f"overrides the {preset[key]} of model.size={model.size}"


def to_annotated_yaml(cfg: Config) -> str:
    """`to_yaml` with a comment beside each model dimension giving its model.size preset value.

    The values themselves stay as configured (null: take the preset's), so the printed config loads
    back meaning the same thing, and `-c defaults model.size=size12m` still means size12m."""
    lines, section = [], None
    for line in to_yaml(cfg).splitlines():
        if not line.startswith(" "):
            section = line.split(":")[0]
        elif section == "model" and not line.startswith("   "):
            comment = preset_comment(cfg.model, line.strip().split(":")[0])
            line = f"{line}  # {comment}" if comment else line
        lines.append(line)
    return "\n".join(lines) + "\n"


def to_flat_dict(cfg: Config) -> dict[str, Any]:
    return flatten(OmegaConf.to_container(OmegaConf.structured(cfg)))


def from_container(data: dict | DictConfig) -> Config:
    """A saved config (a run's config.yaml), read through the key migrations like a config file."""
    layer = data if isinstance(data, DictConfig) else OmegaConf.create(data)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), migrated(layer, "the saved config")))
