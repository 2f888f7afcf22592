"""Lightning callbacks of lit_dreamer: environment collection and checkpoints with replay."""

from callbacks.checkpoint import DreamerCheckpoint, resolve_last
from callbacks.env_collector import EnvCollector

__all__ = ["DreamerCheckpoint", "EnvCollector", "resolve_last"]
