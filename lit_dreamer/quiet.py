"""A quiet start for the command line: only lit_dreamer's own lines and the progress bar.

Libraries announce themselves on every start (MLflow's database set-up, Lightning's device lines and
advertising tip, a torch deprecation inside Lightning, SDL's complaint about a missing XDG_RUNTIME_DIR
when pygame renders a frame). Warnings that concern the user's run stay.
"""

from __future__ import annotations

import logging
import os
import warnings

# Lines Lightning logs at start-up that say nothing about this run (the device choice is in config.yaml).
LIGHTNING_NOISE = ("💡 Tip:", "GPU available:", "TPU available:", "HPU available:")
MLFLOW_NOISE = ("Experiment with name ",)  # "... not found. Creating it." on the first run of a new store


class DropLines(logging.Filter):
    """Drops log records whose message starts with one of the given prefixes."""

    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefixes)


def set_environment_defaults() -> None:
    """Defaults read when MLflow, pygame and SDL load: must run before they are imported."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # its INFO lines on opening a database
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    # pygame renders classic-control frames off-screen; SDL's audio and (without a display) video drivers
    # would look for XDG_RUNTIME_DIR and print "error: XDG_RUNTIME_DIR is invalid" from C, past Python's logging.
    os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")


def quiet_startup() -> None:
    """Set the environment defaults and filter the start-up noise of MLflow, Lightning and torch."""
    set_environment_defaults()
    import lightning.pytorch  # noqa: F401 - on import it gives its loggers their handlers (or leaves them to root's)
    # A filter on a handler sees the records of every child logger that reach it (one on a logger would not).
    for name in ("lightning.pytorch", "lightning.fabric", None):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(DropLines(LIGHTNING_NOISE + MLFLOW_NOISE))
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # where mlflow was imported before the default was set
    # Lightning 2.6 calls torch's deprecated LeafSpec; nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
