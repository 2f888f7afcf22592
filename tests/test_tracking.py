"""Where a run's metrics go, and what its MLflow run says about it: a resume against another store, a killed
run's status, a failed resume, logger backends, and a quiet start-up. Through the real CLI where it matters."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from lit_dreamer.config import load_config
from lit_dreamer.train import fit

PREFILL = 20


def env(**extra: str) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in ("LIT_DREAMER_RUN_NAME", "MLFLOW_TRACKING_URI")}
    return dict(base, MUJOCO_GL="egl", OMP_NUM_THREADS="1", **extra)


def cli(cwd: Path, *args: str, environ: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lit_dreamer", *args], cwd=cwd, env=environ or env(),
                          capture_output=True, text=True, timeout=timeout)


def client(db: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(f"sqlite:///{db}")


def runs_of(db: Path) -> list:
    found = client(db).get_experiment_by_name("lit_dreamer")
    return client(db).search_runs([found.experiment_id]) if found else []


# --------------------------------------------------------------------------------------------------
# Resume against a store that does not hold the run


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A 40-step run in origin/run, logged to origin/mlflow.db through the default relative URI."""
    origin = tmp_path_factory.mktemp("origin")
    proc = cli(origin, "fit", "-c", "debug", "run.dir=run", "run.steps=40", f"run.prefill={PREFILL}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return origin


CASES = {
    # case: (extra fit args, extra environment, folder to start from, store the new run goes to, what is said)
    "another logger.tracking_uri": (["logger.tracking_uri=sqlite:///other.db"], {}, ".", "other.db",
                                    "is not in the tracking store sqlite:///other.db (its config.yaml logged to "
                                    "sqlite:///mlflow.db)"),
    "another MLFLOW_TRACKING_URI": ([], {"MLFLOW_TRACKING_URI": "sqlite:///env.db"}, ".", "env.db",
                                    "is not in the tracking store sqlite:///env.db"),
    "a relative mlflow.db from another folder": ([], {}, "elsewhere", "elsewhere/mlflow.db",
                                                 "is not in the tracking store sqlite:///mlflow.db"),
    "an empty mlflow_run_id": ([], {}, ".", "mlflow.db", "mlflow_run_id is empty"),
    "a damaged mlflow_run_id": ([], {}, ".", "mlflow.db", "mlflow_run_id is damaged"),
}


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", list(CASES))
def test_a_resume_whose_mlflow_run_is_not_in_the_store_opens_a_new_run(finished_run, tmp_path, case):
    args, extra_env, start_in, store, message = CASES[case]
    root = tmp_path / "copy"
    shutil.copytree(finished_run, root, symlinks=True)
    (root / "elsewhere").mkdir()
    old_id = (root / "run" / "mlflow_run_id").read_text()
    if case == "an empty mlflow_run_id":
        (root / "run" / "mlflow_run_id").write_text("")
    if case == "a damaged mlflow_run_id":
        (root / "run" / "mlflow_run_id").write_bytes(b"\x00\x13garbage\xff")
    proc = cli(root / start_in, "fit", "-c", "debug", f"run.dir={root / 'run'}", "run.steps=50",
               f"run.prefill={PREFILL}", "ckpt_path=last", *args, environ=env(**extra_env))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr and "this resume logs to a new MLflow run, tagged resumed_from" in proc.stderr
    [new] = [r for r in runs_of(root / store) if r.info.run_id != old_id]
    assert new.info.status == "FINISHED"
    assert new.data.tags["resumed_from"].endswith("step-000000000040/model.ckpt")
    assert (root / "run" / "mlflow_run_id").read_text() == new.info.run_id  # the folder now names the new run
    steps = client(root / store).get_metric_history(new.info.run_id, "train/env_steps")
    assert max(m.value for m in steps) == 50
    assert client(root / "mlflow.db").get_run(old_id).info.status == "FINISHED"  # the old run is left as it was


# --------------------------------------------------------------------------------------------------
# A run's status describes that run


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_run_killed_before_its_first_checkpoint_is_marked_killed_by_the_next_fit(tmp_path):
    db = tmp_path / "mlflow.db"
    args = ["fit", "-c", "debug", f"run.dir={tmp_path / 'run'}", f"logger.tracking_uri=sqlite:///{db}",
            f"run.prefill={PREFILL}", "run.checkpoint_every=100000"]
    proc = subprocess.Popen([sys.executable, "-m", "lit_dreamer", *args, "run.steps=100000"], cwd=tmp_path, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    # Wait for the run to train (a metric past the prefill), then kill it as an OOM killer would. The store is
    # read only once the run holds its lease: opening it while fit creates it would race its schema set-up.
    while time.time() < deadline and proc.poll() is None:
        runs = runs_of(db) if (tmp_path / "run" / "running.json").exists() else []
        if runs and runs[0].data.metrics.get("train/env_steps", 0) > PREFILL:
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    [killed] = runs_of(db)
    assert killed.info.status == "RUNNING"  # nothing inside a process survives SIGKILL
    assert not (tmp_path / "run" / "checkpoints" / "last").exists()
    lease = json.loads((tmp_path / "run" / "running.json").read_text())
    assert lease["pid"] == proc.pid and lease["mlflow_run_id"] == killed.info.run_id

    done = cli(tmp_path, *args, "run.steps=30")  # a new run in the same folder (not a resume)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"MLflow run {killed.info.run_id} was left RUNNING by process {proc.pid}, which was killed; " \
           "marked KILLED" in done.stderr
    runs = {r.info.run_id: r for r in runs_of(db)}
    assert len(runs) == 2
    old = runs[killed.info.run_id].info
    assert old.status == "KILLED"
    # It ended at its last sign of life (its last metric), not when the next fit noticed.
    last_metric = max(m.timestamp for key in runs[old.run_id].data.metrics
                      for m in client(db).get_metric_history(old.run_id, key))
    assert old.end_time == last_metric
    [new] = [r for r in runs.values() if r.info.run_id != old.run_id]
    assert new.info.status == "FINISHED"
    assert not (tmp_path / "run" / "running.json").exists()  # a run that ended released the folder


def test_a_live_run_is_not_an_orphan(tmp_path):
    from lit_dreamer.tracking import claim_run_dir, mark_orphaned_run
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = mlflow.MlflowClient(uri)
    run = store.create_run(store.create_experiment("lit_dreamer"))
    claim_run_dir(str(tmp_path), run.info.run_id, uri)  # this very process: alive
    assert mark_orphaned_run(str(tmp_path)) is None
    assert store.get_run(run.info.run_id).info.status == "RUNNING"
    assert (tmp_path / "running.json").exists()


@pytest.mark.timeout(300)
def test_a_failed_resume_attempt_leaves_the_finished_run_finished(in_tmp, monkeypatch):
    from lit_dreamer.callbacks import EnvCollector
    db = in_tmp / "mlflow.db"
    overrides = [f"run.dir={in_tmp}/run", f"logger.tracking_uri=sqlite:///{db}", f"run.prefill={PREFILL}"]
    summary = fit(load_config(["debug"], [*overrides, "run.steps=30"]))
    run_id = summary["mlflow_run_id"]
    before = client(db).get_run(run_id).info
    assert before.status == "FINISHED"

    def broken(self, trainer, pl_module):
        raise RuntimeError("simulated failure while resuming")

    monkeypatch.setattr(EnvCollector, "on_fit_start", broken)
    with pytest.raises(RuntimeError, match="simulated failure while resuming"):
        fit(load_config(["debug"], [*overrides, "run.steps=40", "ckpt_path=last"]))
    after = client(db).get_run(run_id).info
    assert (after.status, after.end_time) == ("FINISHED", before.end_time)
    assert [r.info.run_id for r in runs_of(db)] == [run_id]
    assert not (in_tmp / "run" / "running.json").exists()


# --------------------------------------------------------------------------------------------------
# Logger backends


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", ["csv", "none", "tensorboard"])
def test_other_logger_backends_keep_the_run_files_and_eval_writes_a_csv(in_tmp, capsys, backend):
    if backend == "tensorboard":
        pytest.importorskip("tensorboard")
    from lit_dreamer.__main__ import main
    code = main(["fit", "-c", "debug", f"run.dir={in_tmp}/run", f"logger.backend={backend}", "run.steps=30",
                 f"run.prefill={PREFILL}"])
    out = capsys.readouterr().out
    assert code == 0
    run = in_tmp / "run"
    assert (run / "config.yaml").is_file() and "backend: " + backend in (run / "config.yaml").read_text()
    assert (run / "checkpoints" / "last" / "model.ckpt").is_file()
    assert not (in_tmp / "mlflow.db").exists() and not (run / "mlflow_run_id").exists()
    if backend == "csv":
        with open(run / "csv" / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        assert max(float(r["train/env_steps"]) for r in rows if r.get("train/env_steps")) == 30
        assert f"metrics in {run / 'csv' / 'metrics.csv'}" in out
    elif backend == "tensorboard":
        assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())
        assert f"TensorBoard logs in {run / 'tensorboard'}" in out
    else:
        assert "no metrics logged (logger.backend=none)" in out

    code = main(["eval", "--ckpt", str(run), "episodes=2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "CartPole-v1: 2 episodes of" in out and f"table appended to {run / 'eval.csv'}" in out
    with open(run / "eval.csv") as f:
        [row] = list(csv.DictReader(f))
    assert row["env"] == "CartPole-v1" and row["episodes"] == "2" and float(row["length"]) >= 1
    assert f"{float(row['return']):10.2f}" in out  # the printed table's mean, in the file
    assert not (in_tmp / "mlflow.db").exists()


def test_an_unknown_backend_is_refused(in_tmp, capsys):
    from lit_dreamer.__main__ import main
    assert main(["fit", "-c", "debug", "logger.backend=wandb"]) == 2
    assert "logger.backend must be one of mlflow, tensorboard, csv, none, got 'wandb'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Start-up output


NOISE = ("INFO mlflow", "Experiment with name", "litlogger", "💡 Tip", "_pytree", "LeafSpec", "XDG_RUNTIME_DIR",
         "GPU available:", "TPU available:", "pygame-ce")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_start_up_prints_only_lit_dreamers_lines(tmp_path):
    environ = env()
    for key in ("XDG_RUNTIME_DIR", "DISPLAY", "WAYLAND_DISPLAY", "SDL_AUDIODRIVER", "SDL_VIDEODRIVER",
                "MLFLOW_LOGGING_LEVEL", "PYGAME_HIDE_SUPPORT_PROMPT", "PYTHONWARNINGS"):
        environ.pop(key, None)
    # A video at step 60 makes pygame render CartPole (SDL starts); a fresh mlflow.db is created.
    proc = cli(tmp_path, "fit", "-c", "debug", "run.steps=60", f"run.prefill={PREFILL}", "run.video_every=60",
               environ=environ)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((tmp_path / "runs").glob("*/videos/*")), "no video was recorded: SDL was not exercised"
    output = proc.stdout + proc.stderr
    assert [word for word in NOISE if word in output] == [], output
    assert "Ctrl+C (or SIGTERM) ends the run" in output and "=== lit_dreamer run summary ===" in proc.stdout


RACER = """
import os, sys, time
from mlflow.tracking import MlflowClient
from lit_dreamer.tracking import ready_store
uri, folder, name = sys.argv[1:]
open(os.path.join(folder, name + ".ready"), "w").close()
while not os.path.exists(os.path.join(folder, "go")):
    time.sleep(0.005)
ready_store(uri)
client = MlflowClient(tracking_uri=uri)
client.create_run(client.create_experiment(name)).info.run_id
"""


def test_processes_opening_a_new_sqlite_store_at_once_all_get_a_working_store(tmp_path):
    # Without the lock, four processes that open a new database together break it in almost every try (measured:
    # one of four survives, or none, and the file is refused afterwards): MLflow migrates it from each of them.
    uri, names = f"sqlite:///{tmp_path}/mlflow.db", [f"racer{i}" for i in range(4)]
    racers = [subprocess.Popen([sys.executable, "-c", RACER, uri, str(tmp_path), name], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True) for name in names]
    deadline = time.time() + 120
    while not all((tmp_path / f"{name}.ready").exists() for name in names) and time.time() < deadline:
        time.sleep(0.01)
    (tmp_path / "go").touch()  # all imported: they open the store within milliseconds of each other
    outputs = [racer.communicate(timeout=120)[0] for racer in racers]
    assert [racer.returncode for racer in racers] == [0] * 4, "\n".join(outputs)
    experiments = mlflow.MlflowClient(uri).search_experiments()
    assert set(names) <= {experiment.name for experiment in experiments}
