"""Lightning callbacks of lit_dreamer: environment collection, checkpoints with replay, eval, videos, graceful stop, progress."""

from callbacks.checkpoint import DreamerCheckpoint, resolve_last
from callbacks.env_collector import EnvCollector
from callbacks.evaluation import EvalCallback
from callbacks.progress import EnvStepProgressBar
from callbacks.stop import GracefulStop
from callbacks.video import VideoCallback

__all__ = ["DreamerCheckpoint", "EnvCollector", "EnvStepProgressBar", "EvalCallback", "GracefulStop", "VideoCallback",
           "resolve_last"]
