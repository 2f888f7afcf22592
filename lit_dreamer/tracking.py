"""MLflow tracking that cannot stop training: a checked URI up front, and a logger that survives failures."""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger

log = logging.getLogger(__name__)


class TrackingError(ValueError):
    """The MLflow tracking URI cannot be used."""


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before any training, when the tracking store cannot be reached or written."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme in ("http", "https"):
        try:
            urllib.request.urlopen(uri, timeout=timeout).close()
        except urllib.error.HTTPError:
            return  # the server answered, if only with an error page: it is there
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise TrackingError(f"cannot reach the MLflow tracking server at {uri} ({reason}); start it, or log to "
                                "a local file with logger.tracking_uri=sqlite:///mlflow.db") from None
        return
    if parsed.scheme in ("sqlite", "file", ""):
        path = uri[len("sqlite:///"):] if parsed.scheme == "sqlite" else (parsed.path or uri)
        folder = os.path.dirname(os.path.abspath(path)) if parsed.scheme == "sqlite" else os.path.abspath(path)
        if parsed.scheme != "sqlite":
            folder = os.path.dirname(folder) if not os.path.isdir(folder) else folder
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise TrackingError(f"logger.tracking_uri={uri}: folder {folder} does not exist or is not writable; "
                                "create it or choose another path")


class ResilientMLFlowLogger(MLFlowLogger):
    """MLFlowLogger whose failures (server down, disk full, locked database) are reported, not raised.

    A long run must not die because a metric could not be written: the failure is counted and
    logged as a warning (the first few in full, then every 100th), and training goes on.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.failures = 0
        self.end_status: str | None = None  # overrides Lightning's FINISHED / FAILED, e.g. KILLED on Ctrl+C

    def report_failure(self, what: str, err: BaseException) -> None:
        self.failures += 1
        if self.failures <= 5 or self.failures % 100 == 0:
            log.warning("MLflow %s failed (%d failures so far), training goes on: %r", what, self.failures, err)

    def log_metrics(self, metrics, step=None) -> None:
        try:
            super().log_metrics(metrics, step)
        except Exception as err:  # noqa: BLE001
            self.report_failure("log_metrics", err)

    def log_hyperparams(self, params) -> None:
        try:
            super().log_hyperparams(params)
        except Exception as err:  # noqa: BLE001
            self.report_failure("log_hyperparams", err)

    def set_tag(self, key: str, value: str) -> None:
        try:
            self.experiment.set_tag(self.run_id, key, value)
        except Exception as err:  # noqa: BLE001
            self.report_failure("set_tag", err)

    def log_artifact(self, path: str) -> None:
        try:
            self.experiment.log_artifact(self.run_id, path)
        except Exception as err:  # noqa: BLE001
            self.report_failure("log_artifact", err)

    def mark_running(self) -> None:
        """Set the run's status to RUNNING (a resumed run continues one that ended FAILED or KILLED)."""
        try:
            self.experiment.update_run(self.run_id, status="RUNNING")
        except Exception as err:  # noqa: BLE001
            self.report_failure("update_run", err)

    def finalize(self, status: str = "success") -> None:
        try:
            super().finalize(self.end_status or status)
        except Exception as err:  # noqa: BLE001
            self.report_failure("finalize", err)
