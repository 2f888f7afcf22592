"""Lightning callbacks of lit_dreamer: env collection, checkpoints with replay, eval, videos, graceful stop, progress, collapse warning."""

from lit_dreamer.callbacks.artifacts import CheckpointArtifacts
from lit_dreamer.callbacks.checkpoint import DreamerCheckpoint, resolve_last
from lit_dreamer.callbacks.collapse import CollapseWatch
from lit_dreamer.callbacks.env_collector import EnvCollector
from lit_dreamer.callbacks.evaluation import EvalCallback
from lit_dreamer.callbacks.progress import EnvStepProgressBar
from lit_dreamer.callbacks.stop import GracefulStop
from lit_dreamer.callbacks.video import VideoCallback

__all__ = ["CheckpointArtifacts", "CollapseWatch", "DreamerCheckpoint", "EnvCollector", "EnvStepProgressBar",
           "EvalCallback", "GracefulStop", "VideoCallback", "resolve_last"]
