"""Lightning callbacks of lit_dreamer: environment collection, checkpoints with replay, eval, videos, graceful stop."""

from lit_dreamer.callbacks.checkpoint import DreamerCheckpoint, resolve_last
from lit_dreamer.callbacks.env_collector import EnvCollector
from lit_dreamer.callbacks.evaluation import EvalCallback
from lit_dreamer.callbacks.stop import GracefulStop
from lit_dreamer.callbacks.video import VideoCallback

__all__ = ["DreamerCheckpoint", "EnvCollector", "EvalCallback", "GracefulStop", "VideoCallback", "resolve_last"]
