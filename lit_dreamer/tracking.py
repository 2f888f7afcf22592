"""A run's logger and record: MLflow tracking that cannot stop training, and a run folder's record of its run.

The logger logger.backend names (make_logger), the run folder's config.yaml, params and tags
(record_run), and where the metrics went (logs_location). For MLflow: a checked URI up front; a logger that survives store failures; which MLflow run a run folder continues
(`mlflow_run_id`, checked against the store a resume logs to); and which process is writing it
(`running.json`), so that the next `fit` can end the run of a process that was killed outright.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING, Any

from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from lit_dreamer.config import to_flat_dict, to_yaml

if TYPE_CHECKING:
    from lit_dreamer.config import Config

log = logging.getLogger(__name__)

KIND_TAG = "lit_dreamer.kind"
"""MLflow tag of every run lit_dreamer logs: train (fit) or eval (eval --ckpt); compare shows train runs by default."""


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

    A long run must not die because a metric could not be written: the first failure is logged as a
    warning, later ones are only counted, and the count is reported when the run ends. Training goes on.

    A logger that continues an existing run (`run_id=`) leaves that run's status alone until this process
    logs its first metric: a resume attempt that fails before it trains does not relabel the run it tried
    to continue (a FINISHED run stays FINISHED).
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.failures: dict[str, int] = {}
        self.end_status: str | None = None  # overrides Lightning's FINISHED / FAILED, e.g. KILLED on Ctrl+C
        self.continues = kwargs.get("run_id") is not None
        self.started = not self.continues  # a new run is RUNNING from its creation
        self._reported = False
        self.lease_dir: str | None = None  # the run dir this process holds a lease on (see claim_run_dir)

    @property
    def failure_count(self) -> int:
        return sum(self.failures.values())

    def report_failure(self, what: str, err: BaseException) -> None:
        """Warn about the first failure; count the others (reported by finalize, not on every call)."""
        self.failures[what] = self.failures.get(what, 0) + 1
        if self.failure_count == 1:
            log.warning("MLflow %s failed (%s); training goes on. Further MLflow failures are counted and "
                        "reported at the end of the run.", what, one_line(err))

    def log_metrics(self, metrics, step=None) -> None:
        if not self.started:
            self.started = True
            self.mark_running()
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

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        try:
            self.experiment.log_artifact(self.run_id, path, artifact_path)
        except Exception as err:  # noqa: BLE001
            self.report_failure("log_artifact", err)

    def mark_running(self) -> None:
        """Set the run's status to RUNNING (a resumed run continues one that ended FAILED or KILLED)."""
        try:
            self.experiment.update_run(self.run_id, status="RUNNING")
        except Exception as err:  # noqa: BLE001
            self.report_failure("update_run", err)

    def finalize(self, status: str = "success") -> None:
        if self.started:  # a continued run this process never trained in keeps the status it had
            try:
                super().finalize(self.end_status or status)
            except Exception as err:  # noqa: BLE001
                self.report_failure("finalize", err)
        if self.failures and not self._reported:
            self._reported = True
            detail = ", ".join(f"{what} {count}" for what, count in sorted(self.failures.items()))
            log.warning("MLflow: %d calls failed in this run (%s); what they carried is missing from run %s",
                        self.failure_count, detail, self._run_id)
        if self.lease_dir is not None:
            release_run_dir(self.lease_dir)


def one_line(err: BaseException) -> str:
    """An exception as one short line: MLflow's messages can hold whole HTTP bodies or SQL statements."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text[:300]}"


# --------------------------------------------------------------------------------------------------
# The MLflow run a run folder records, and which process is writing to it

RUN_ID_FILE = "mlflow_run_id"
LEASE_FILE = "running.json"  # written at the start of fit, removed at its end: left behind only by a killed process


def absolute_uri(uri: str) -> str:
    """A sqlite URI with a relative path made absolute (relative to the working directory), others unchanged."""
    if uri.startswith("sqlite:///") and not os.path.isabs(uri[len("sqlite:///"):]):
        return "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    return uri


def read_run_id(directory: str) -> tuple[str | None, str]:
    """The MLflow run id recorded in a run folder, or None and why there is none usable."""
    path = os.path.join(directory, RUN_ID_FILE)
    if not os.path.isfile(path):
        return None, f"{path} does not exist"
    try:
        with open(path, "rb") as f:
            text = f.read().decode("ascii").strip()
    except OSError as err:
        return None, f"{path} cannot be read ({one_line(err)})"
    except UnicodeDecodeError:
        return None, f"{path} is damaged (it holds bytes that are no run id)"
    # MLflow run ids are 32 hex digits (a uuid4); anything else is a damaged file, not an id to ask the store for.
    if not text:
        return None, f"{path} is empty"
    if not all(c in "0123456789abcdef" for c in text.lower()) or len(text) > 64:
        return None, f"{path} is damaged (it holds {text[:40]!r}, not a run id)"
    return text, ""


def continued_run_id(directory: str, uri: str) -> str | None:
    """The MLflow run a resume in this run dir continues, or None (and a line saying why) for a new one.

    None when the run dir's mlflow_run_id is missing, empty or damaged, or names a run this store does
    not hold (another tracking URI, or a relative sqlite path started from another folder).
    """
    run_id, problem = read_run_id(directory)
    if run_id is not None and run_status(uri, run_id) is None:
        problem = f"MLflow run {run_id} of {directory} is not in the tracking store {uri}{saved_uri_hint(directory, uri)}"
    if problem:
        log.warning("%s: this resume logs to a new MLflow run, tagged resumed_from", problem)
        return None
    return run_id


def saved_uri_hint(directory: str, uri: str) -> str:
    """Where the run's config.yaml says it logged, when that differs from uri (relative paths: from where fit ran)."""
    from omegaconf import OmegaConf
    try:
        saved = OmegaConf.load(os.path.join(directory, "config.yaml")).logger.tracking_uri
    except Exception:  # noqa: BLE001 - only a hint: no file, bad YAML, no such key
        return ""
    return f" (its config.yaml logged to {saved})" if saved != uri else ""


def run_status(uri: str, run_id: str) -> str | None:
    """The status of an MLflow run (RUNNING, FINISHED, ...), or None when the store has no such run."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    try:
        return MlflowClient(tracking_uri=uri).get_run(run_id).info.status
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def process_start_time(pid: int) -> str | None:
    """When a process started, in clock ticks since boot (Linux /proc); None where unknown.

    With the pid it tells a live process from a newer one that reuses the pid of a dead one.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def claim_run_dir(directory: str, run_id: str, uri: str) -> None:
    """Record that this process writes to the MLflow run run_id (removed again by release_run_dir)."""
    pid = os.getpid()
    lease = {"pid": pid, "started": process_start_time(pid), "host": socket.gethostname(),
             "mlflow_run_id": run_id, "tracking_uri": absolute_uri(uri)}
    path = os.path.join(directory, LEASE_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(lease, f)
    os.replace(path + ".tmp", path)


def release_run_dir(directory: str) -> None:
    """The process ended its run (finished, failed or stopped): its MLflow run's status is final."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(directory, LEASE_FILE))


def lease_holder_alive(lease: dict) -> bool | None:
    """Whether the process that wrote a lease still runs: True, False, or None (another host: unknown)."""
    if lease.get("host") != socket.gethostname():
        return None
    pid = int(lease["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # a process of another user holds the pid: alive, though not necessarily ours
    started = process_start_time(pid)
    return started is None or lease.get("started") is None or started == lease["started"]


def mark_orphaned_run(directory: str) -> str | None:
    """Mark KILLED the MLflow run that a killed process left RUNNING in this run folder; returns its id.

    A SIGKILL (or an OOM kill, or a power cut) leaves no chance to end the run, so it stays RUNNING
    forever. The next `fit` in the folder finds the dead process's lease and ends the run for it.
    """
    path = os.path.join(directory, LEASE_FILE)
    try:
        with open(path) as f:
            lease = json.load(f)
        run_id, uri, alive = lease["mlflow_run_id"], lease["tracking_uri"], lease_holder_alive(lease)
    except (FileNotFoundError, NotADirectoryError):  # no lease, or run.dir is no folder (refused right after)
        return None
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("ignoring the damaged %s (%s)", path, one_line(err))
        release_run_dir(directory)
        return None
    if alive is None:
        log.warning("%s: MLflow run %s was started on host %s; if that run is dead, end it in MLflow by hand",
                    path, run_id, lease.get("host"))
        return None
    if alive:
        return None  # it is still training: not an orphan
    try:
        check_tracking_uri(uri)
        if run_status(uri, run_id) == "RUNNING":
            end_killed_run(uri, run_id)
            log.warning("MLflow run %s was left RUNNING by process %s, which was killed; marked KILLED",
                        run_id, lease["pid"])
            return run_id
    except Exception as err:  # noqa: BLE001 - any store failure: leave the run as it is, train anyway
        log.warning("could not mark the killed MLflow run %s as KILLED (%s)", run_id, one_line(err))
        return None
    finally:
        release_run_dir(directory)
    return None


def ready_store(uri: str) -> None:
    """Create or upgrade a SQLite tracking store in one process at a time; other stores are left alone.

    MLflow creates and migrates a new SQLite database when a client first opens it, without a lock: two
    processes opening the same new file at once (two seeds started side by side) both run the migrations, and
    the file can be left half-migrated ("duplicate column name: step"), refused by every later run. An
    exclusive flock on the database file makes the others wait until the first has built the tables; they
    then find them in place. (SQLite locks byte ranges with fcntl, which flock does not touch.)
    """
    path = uri[len("sqlite:///"):]
    if not uri.startswith("sqlite:///") or "?" in uri or path in ("", ":memory:"):
        return
    from mlflow.tracking import MlflowClient
    with open(path, "ab") as database:  # an empty file is an empty SQLite database
        fcntl.flock(database, fcntl.LOCK_EX)
        try:
            MlflowClient(tracking_uri=uri)  # opening the store creates or upgrades its tables
        finally:
            fcntl.flock(database, fcntl.LOCK_UN)


def end_killed_run(uri: str, run_id: str) -> None:
    """Set the run KILLED, ending at its last logged metric (its last sign of life), not now."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    last = [m.timestamp for key in run.data.metrics for m in client.get_metric_history(run_id, key)]
    client.set_terminated(run_id, status="KILLED", end_time=max(last, default=run.info.start_time))


def git_commit(directory: str = os.path.dirname(os.path.abspath(__file__))) -> str:
    """HEAD of the git checkout holding the code, '+dirty' if tracked files differ from it; 'unknown' outside git.

    Untracked files do not count: run outputs (mlflow.db, runs/) would otherwise mark every run dirty.
    """
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=directory, capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()
    try:
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):  # no git, not a checkout, or a checkout git refuses
        return "unknown"
    return head + ("+dirty" if dirty else "")


def make_logger(cfg: Config, directory: str, resuming: bool) -> tuple[Logger | None, bool]:
    """The run's logger (logger.backend), and whether it continues the run recorded in the run dir (rank 0 only).

    MLflow: a resume in the run dir of the checkpoint continues its MLflow run, unless that run is not in
    this tracking store (another URI, a relative sqlite path from another folder, a damaged mlflow_run_id):
    then, as for a checkpoint started in a new run dir (a branch), a new MLflow run is opened.
    TensorBoard and CSV write into the run dir (tensorboard/, csv/) and append on a resume.
    """
    backend = cfg.logger.backend
    if backend == "none":
        return None, resuming
    if backend == "csv":
        return CSVLogger(directory, name="", version="csv"), resuming
    if backend == "tensorboard":
        return TensorBoardLogger(directory, name="", version="tensorboard", default_hp_metric=False), resuming
    ready_store(cfg.logger.tracking_uri)
    run_id = continued_run_id(directory, cfg.logger.tracking_uri) if resuming else None
    logger = ResilientMLFlowLogger(experiment_name=cfg.logger.experiment, run_name=cfg.logger.run_name,
                                   tracking_uri=cfg.logger.tracking_uri, run_id=run_id, tags={KIND_TAG: "train"})
    return logger, run_id is not None


def record_run(cfg: Config, directory: str, logger: Logger | None, continued: bool, ckpt_path: str | None) -> None:
    """Write the run dir's config.yaml (and mlflow_run_id) and the new run's params, tags and config artifact.

    A continued run has them all from its start. A new MLflow run holds a lease on the run dir until it
    ends, so that the next `fit` there can tell a killed run from a live one (tracking.mark_orphaned_run).
    """
    if continued:
        if isinstance(logger, ResilientMLFlowLogger):
            claim_run_dir(directory, logger.run_id, cfg.logger.tracking_uri)
            logger.lease_dir = directory
        return
    config_file = os.path.join(directory, "config.yaml")
    with open(config_file, "w") as f:
        f.write(to_yaml(cfg))
    params = {k: v for k, v in to_flat_dict(cfg).items() if k != "ckpt_path"}
    if cfg.env.tasks:
        del params["env.id"]  # unused beside a task list (left at its default): env.tasks names what is trained
    if not isinstance(logger, ResilientMLFlowLogger):
        if logger is not None:
            logger.log_hyperparams(params)
        return
    with open(os.path.join(directory, RUN_ID_FILE), "w") as f:
        f.write(logger.run_id)
    claim_run_dir(directory, logger.run_id, cfg.logger.tracking_uri)
    logger.lease_dir = directory
    logger.log_hyperparams(params)
    logger.set_tag("git_commit", git_commit())
    if ckpt_path is not None:
        logger.set_tag("resumed_from", os.path.abspath(ckpt_path))
    if cfg.offline.replay is not None:  # an offline run: the replay snapshot it learns from
        from lit_dreamer.offline import snapshot_folder
        logger.set_tag("offline_replay", os.path.abspath(snapshot_folder(cfg.offline.replay)))
    if cfg.init.ckpt is not None:  # a new run started from another run's weights (init.ckpt)
        from lit_dreamer.adapt import init_tag
        logger.set_tag("init_ckpt", init_tag(cfg))
    logger.log_artifact(config_file)


def logs_location(cfg: Config, logger: Logger | None) -> str:
    """Where this run's metrics went, in words (for the summary the CLI prints)."""
    if isinstance(logger, ResilientMLFlowLogger):
        return f"MLflow run {logger.run_id} at {cfg.logger.tracking_uri}"
    if isinstance(logger, CSVLogger):
        return f"metrics in {os.path.join(logger.log_dir, 'metrics.csv')}"
    if isinstance(logger, TensorBoardLogger):
        return f"TensorBoard logs in {logger.log_dir}"
    return "no metrics logged (logger.backend=none)" if rank_zero_only.rank == 0 else "metrics on rank 0"
