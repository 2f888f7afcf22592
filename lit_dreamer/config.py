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
import textwrap
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lit_dreamer.agent_config import AgentConfig, BehaviorConfig, LossScales, ModelConfig, OptimConfig

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


class ConfigError(ValueError):
    """A configuration problem, with a message that names the key and the fix."""


@dataclass
class EnvConfig:
    """The environment."""

    id: str = "CartPole-v1"
    """Gymnasium id (CartPole-v1, Pendulum-v1, ...), dmc/<domain>-<task> (dm_control), atari/<game>."""
    obs: str = "proprio"
    """Observation mode: proprio (the env's vectors) or pixels (64x64 RGB renders)."""
    num_envs: int = 1
    """Environments stepped in parallel per device."""
    action_repeat: int = 1
    """Env frames per agent step (not for Atari, which uses the protocol's frame skip of 4)."""
    image_size: int = 64
    """Side of image observations, a power of two."""
    time_limit: Optional[int] = None
    """Extra episode time limit in agent steps (None: the env's own)."""
    asynchronous: bool = False
    """Step the envs in subprocesses (gymnasium AsyncVectorEnv)."""


@dataclass
class RunConfig:
    """Length, seed, train ratio and batch shape of a run."""

    steps: int = 2000
    """Total env steps over all devices (agent steps, before action repeat)."""
    seed: int = 0
    """Seed of networks, envs and replay sampling."""
    train_ratio: float = 512.0
    """Replayed steps per env step; gradient steps per env step = train_ratio / (batch_size * batch_length)."""
    prefill: int = 1000
    """Env steps collected with a random policy before training."""
    batch_size: int = 16
    """Sequences per batch (B)."""
    batch_length: int = 64
    """Steps per sequence (T)."""
    log_every: int = 10
    """Log metrics every this many training steps."""
    checkpoint_every: int = 10000
    """Save a checkpoint (with replay) every this many env steps, and at the end."""
    keep_checkpoints: int = 2
    """Newest checkpoint folders kept in run.dir/checkpoints (older ones are deleted; 0: keep all)."""
    eval_every: int = 5000
    """Evaluate in separate envs every this many env steps and at the end (0: never)."""
    eval_episodes: int = 10
    """Episodes per evaluation, run in parallel envs."""
    eval_mode: str = "mode"
    """Evaluation policy: mode (the most likely action) or sample."""
    video_every: int = 20000
    """Write an episode video and the world model's open-loop prediction every this many env steps (0: never)."""
    dir: Optional[str] = None
    """Folder for checkpoints and the run's files (None: runs/<run name>)."""
    compile: bool = False
    """torch.compile the RSSM's per-step functions (faster steps after a few seconds of compilation)."""


@dataclass
class ReplayConfig:
    """Replay storage."""

    capacity: int = 1_000_000
    """Steps kept per device; the oldest are overwritten."""
    directory: Optional[str] = None
    """Keep the replay in memory-mapped files here instead of RAM."""
    sampling: str = "uniform"
    """uniform or recency (exponentially more weight on recent steps)."""
    recency_half_life: float = 10000.0
    """Half-life in steps of the recency sampling."""


TRACKING_URI_VARIABLE = "MLFLOW_TRACKING_URI"


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI when set, else a SQLite file in the working directory."""
    return os.environ.get(TRACKING_URI_VARIABLE) or "sqlite:///mlflow.db"


LOGGER_BACKENDS = ("mlflow", "tensorboard", "csv", "none")


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


def default_trainer() -> dict[str, Any]:
    return {"accelerator": "cpu", "devices": 1, "precision": "32-true", "strategy": "auto"}


@dataclass
class Config:
    env: EnvConfig = field(default_factory=EnvConfig)
    run: RunConfig = field(default_factory=RunConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss_scales: LossScales = field(default_factory=LossScales)
    behavior: BehaviorConfig = field(default_factory=BehaviorConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: dict[str, Any] = field(default_factory=default_trainer)
    """Keyword arguments of lightning.Trainer (devices, accelerator, precision, strategy, ...)."""
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    ckpt_path: Optional[str] = None
    """Resume from this checkpoint: a model.ckpt path, or 'last' for the newest one in run.dir."""

    def agent(self) -> AgentConfig:
        return AgentConfig(model=self.model, loss_scales=self.loss_scales, behavior=self.behavior, optim=self.optim)


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


def help_text() -> str:
    lines = ["Keys (set in YAML overlays with -c FILE, or as key=value; later wins):", ""]
    for key, default, doc in schema_keys():
        lines.append(f"  {key} = {default!r}")
        if doc:
            lines.append(f"      {doc}")
    lines.append("  trainer.<any lightning.Trainer argument> (e.g. trainer.max_time=00:01:00:00)")
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


def check_keys(keys: list[str], source: str) -> None:
    """Fail on keys the schema does not know, suggesting the closest known one."""
    valid = [k for k, _, _ in schema_keys()]
    sections = {k.split(".")[0] for k in valid}
    trainer_args = set(inspect.signature(__import__("lightning").Trainer.__init__).parameters) - {"self"}
    for key in keys:
        head, _, rest = key.partition(".")
        if head == "trainer":
            if rest.split(".")[0] not in trainer_args:
                close = difflib.get_close_matches(rest, sorted(trainer_args), n=3)
                raise ConfigError(f"unknown key {key!r} in {source}: lightning.Trainer has no argument {rest!r}"
                                  + (f"; did you mean {', '.join('trainer.' + c for c in close)}?" if close else ""))
            continue
        if key in valid or (head in sections and key in valid):
            continue
        close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(close)}?" if close else "; see `python -m lit_dreamer fit --help`"
        raise ConfigError(f"unknown config key {key!r} in {source}{hint}")


def resolve_config_file(path: str) -> str:
    """A path, or the name of a file in configs/ (with or without .yaml, e.g. `cartpole`)."""
    for candidate in (path, os.path.join(CONFIG_DIR, path), os.path.join(CONFIG_DIR, path + ".yaml")):
        if os.path.isfile(candidate):
            return candidate
    names = sorted(os.path.relpath(os.path.join(d, f), CONFIG_DIR)[:-5] for d, _, fs in os.walk(CONFIG_DIR)
                   for f in fs if f.endswith(".yaml"))
    raise ConfigError(f"config file {path!r} not found; give a path or one of: {', '.join(names)}")


def load_config(files: list[str] = (), overrides: list[str] = ()) -> Config:
    """Defaults <- each YAML overlay in order <- dotted key=value overrides; validated and typed."""
    cfg = OmegaConf.structured(Config)
    layers = []
    for path in files:
        path = resolve_config_file(path)
        layer = OmegaConf.load(path)
        layer.pop("defaults", None)
        layers.append((layer, f"config file {path}"))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. run.steps=5000)")
        layers.append((OmegaConf.from_dotlist([item]), f"override {item!r}"))
    for layer, source in layers:
        check_keys(list(flatten(OmegaConf.to_container(layer))), source)
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as err:
            key = getattr(err, "full_key", None) or "?"
            reason = str(getattr(err, "msg", err)).splitlines()[0]
            raise ConfigError(f"bad value for {key} in {source}: {reason}") from None
    config: Config = OmegaConf.to_object(cfg)
    validate(config)
    return config


def validate(cfg: Config) -> None:
    """Checks that need values, not just keys."""
    from lit_dreamer.agent_config import SIZES
    if cfg.model.size not in SIZES:
        close = difflib.get_close_matches(cfg.model.size, list(SIZES), n=1)
        raise ConfigError(f"unknown model.size {cfg.model.size!r}; choose one of {', '.join(SIZES)}"
                          + (f" (did you mean {close[0]}?)" if close else ""))
    if cfg.env.obs not in ("proprio", "pixels"):
        raise ConfigError(f"env.obs must be 'proprio' or 'pixels', got {cfg.env.obs!r}")
    if cfg.run.eval_mode not in ("mode", "sample"):
        raise ConfigError(f"run.eval_mode must be 'mode' or 'sample', got {cfg.run.eval_mode!r}")
    if cfg.logger.backend not in LOGGER_BACKENDS:
        raise ConfigError(f"logger.backend must be one of {', '.join(LOGGER_BACKENDS)}, got {cfg.logger.backend!r}")
    if cfg.replay.sampling not in ("uniform", "recency"):
        raise ConfigError(f"replay.sampling must be 'uniform' or 'recency', got {cfg.replay.sampling!r}")
    for key, value in (("run.steps", cfg.run.steps), ("run.batch_size", cfg.run.batch_size),
                       ("run.batch_length", cfg.run.batch_length), ("env.num_envs", cfg.env.num_envs),
                       ("run.train_ratio", cfg.run.train_ratio), ("behavior.horizon", cfg.behavior.horizon),
                       ("model.cnn_kernel", cfg.model.cnn_kernel)):
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    if cfg.run.keep_checkpoints < 0:
        raise ConfigError(f"run.keep_checkpoints must be >= 0 (0 keeps every checkpoint), got {cfg.run.keep_checkpoints}")
    if not cfg.model.cnn_mults or min(cfg.model.cnn_mults) <= 0:
        raise ConfigError(f"model.cnn_mults must be a non-empty list of positive channel multiples, "
                          f"e.g. [2,3,4,4]; got {list(cfg.model.cnn_mults)}")
    if cfg.run.batch_length < 2:
        raise ConfigError(f"run.batch_length must be at least 2, got {cfg.run.batch_length}")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_flat_dict(cfg: Config) -> dict[str, Any]:
    return flatten(OmegaConf.to_container(OmegaConf.structured(cfg)))


def from_container(data: dict | DictConfig) -> Config:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), data))
