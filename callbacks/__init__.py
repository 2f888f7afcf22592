"""Lightning callbacks of lit_dreamer: environment collection and checkpoints with replay."""

from callbacks.checkpoint import DreamerCheckpoint, resolve_last
from callbacks.env_collector import EnvCollector
from callbacks.evaluation import EvalCallback
from callbacks.video import VideoCallback

__all__ = ["DreamerCheckpoint", "EnvCollector", "EvalCallback", "VideoCallback", "resolve_last"]
