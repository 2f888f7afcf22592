"""Lightning callbacks of lit_dreamer: environment collection, checkpoints with replay, eval, videos, graceful stop."""

from callbacks.checkpoint import DreamerCheckpoint, resolve_last
from callbacks.env_collector import EnvCollector
from callbacks.evaluation import EvalCallback
from callbacks.stop import GracefulStop
from callbacks.video import VideoCallback

__all__ = ["DreamerCheckpoint", "EnvCollector", "EvalCallback", "GracefulStop", "VideoCallback", "resolve_last"]
