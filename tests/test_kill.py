"""kill -9 at several moments of a run, including in the middle of a checkpoint write: the last complete
checkpoint loads, and resuming continues the same MLflow run, env steps, replay and optimizer state. Ctrl+C and
SIGTERM end a run after its current step with a checkpoint."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from lit_dreamer.replay import Replay

TESTS = Path(__file__).resolve().parent
PREFILL, TOTAL = 20, 80  # debug config: one training step per env step after the prefill


def env() -> dict:
    return dict(os.environ, MUJOCO_GL="egl", OMP_NUM_THREADS="1")


def fit_args(root: Path, *extra: str) -> list[str]:
    return ["fit", "-c", "debug", f"run.dir={root}/run", f"logger.tracking_uri=sqlite:///{root}/mlflow.db",
            f"run.prefill={PREFILL}", "run.checkpoint_every=10", *extra]


def last_folder(root: Path) -> str:
    return os.path.realpath(root / "run" / "checkpoints" / "last")


def run_ids(root: Path) -> list[str]:
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("lit_dreamer")
    return [r.info.run_id for r in client.search_runs([experiment.experiment_id])]


def resume_and_check(root: Path, expected_last: str, total: int = TOTAL) -> None:
    """Resume from `last` and check that nothing of the checkpoint was lost or duplicated."""
    folder = last_folder(root)
    assert folder.endswith(expected_last), folder
    ckpt = torch.load(os.path.join(folder, "model.ckpt"), weights_only=True)  # the checkpoint loads
    saved_steps = int(folder.rsplit("-", 1)[1])
    saved_train = int(ckpt["state_dict"]["train_steps"])
    assert saved_train == saved_steps - PREFILL
    saved_replay = Replay.load(os.path.join(folder, "replay-rank0"))
    assert len(saved_replay) == saved_steps
    [run_id] = run_ids(root)

    proc = subprocess.run([sys.executable, "-m", "lit_dreamer", *fit_args(root, f"run.steps={total}", "ckpt_path=last")],
                          cwd=root, env=env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert run_ids(root) == [run_id]  # the same MLflow run went on
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    steps = client.get_metric_history(run_id, "train/env_steps")
    assert steps[-1].value == total
    final = last_folder(root)
    assert final.endswith(f"step-{total:012d}")
    ckpt = torch.load(os.path.join(final, "model.ckpt"), weights_only=True)
    # Optimizer state continued from the checkpoint's: every good step counted exactly once.
    assert int(ckpt["state_dict"]["train_steps"]) == total - PREFILL
    counters = [max(s["step"] for s in opt["state"].values()) for opt in ckpt["optimizer_states"]]
    assert counters == [total - PREFILL] * 3
    replay = Replay.load(os.path.join(final, "replay-rank0"))
    assert len(replay) == total
    # The replay restored from the checkpoint is the prefix of the final one: no step lost or repeated.
    for key in ("vector", "action", "reward", "is_first", "is_last"):
        np.testing.assert_array_equal(replay._data[key][:saved_steps], saved_replay._data[key][:saved_steps])
    # The first step recorded after the resume starts a new episode (the envs were reset).
    assert replay._data["is_first"][saved_steps].all()
    # What the killed save left (a half-written snapshot, model.ckpt.tmp, a .last-<pid> link) is gone.
    checkpoints = root / "run" / "checkpoints"
    assert not [str(p) for p in checkpoints.rglob("*") if ".tmp" in p.name or p.name.startswith(".last-")]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("point", ["replay_write", "model_write", "link_swap"])
def test_kill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, point):
    # Saves happen at 21, 31, 41, ... env steps; the process dies inside the third one (41).
    proc = subprocess.run([sys.executable, str(TESTS / "kill_probe.py"), point, "3",
                           *fit_args(tmp_path, f"run.steps={TOTAL}")],
                          cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    resume_and_check(tmp_path, expected_last=f"step-{31:012d}")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kill_at_a_random_moment_of_training(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "lit_dreamer", *fit_args(tmp_path, "run.steps=100000")],
                            cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    link = tmp_path / "run" / "checkpoints" / "last"
    deadline = time.time() + 180
    while not link.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert link.exists(), proc.stderr.read()[-3000:] if proc.poll() is not None else "no checkpoint in time"
    time.sleep(random.Random(0).uniform(0.5, 3.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    saved = int(last_folder(tmp_path).rsplit("-", 1)[1])
    resume_and_check(tmp_path, expected_last=f"step-{saved:012d}", total=saved + 40)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_ends_the_run_after_the_step_with_a_checkpoint(tmp_path):
    # SIGTERM end to end: the signal Lightning also handles (ours must replace its handler for the run).
    # Ctrl+C (SIGINT) reaches the same handler: test_both_signals_reach_the_handler_and_teardown_restores_them.
    # No periodic save before the stop: the only checkpoint is the one the signal asks for.
    signum = signal.SIGTERM
    proc = subprocess.Popen([sys.executable, "-m", "lit_dreamer",
                             *fit_args(tmp_path, "run.steps=100000", "run.checkpoint_every=100000")],
                            cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # not ignored
    seen = []
    for line in proc.stderr:  # wait until the run has set up its handlers
        seen.append(line)
        if "ends the run after the current step" in line:
            break
    assert proc.poll() is None, "".join(seen)[-3000:]
    time.sleep(random.Random(signum).uniform(0.5, 3.0))
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signum, err[-3000:]
    assert f"stopped by {signal.Signals(signum).name}" in out
    [run_id] = run_ids(tmp_path)
    assert mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id).info.status == "KILLED"
    folders = [f for f in os.listdir(tmp_path / "run" / "checkpoints") if f.startswith("step-")]
    assert len(folders) == 1, folders
    saved = int(last_folder(tmp_path).rsplit("-", 1)[1])
    assert saved > PREFILL  # training had begun; the save is at a step boundary (resume_and_check)
    resume_and_check(tmp_path, expected_last=f"step-{saved:012d}", total=saved + 40)


def test_a_second_ctrl_c_aborts_at_once():
    from lit_dreamer.callbacks import GracefulStop
    stop = GracefulStop()
    with pytest.warns(UserWarning, match="SIGINT received"):
        stop.handle(signal.SIGINT, None)
    assert stop.stopped_by == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
        stop.handle(signal.SIGINT, None)


def test_both_signals_reach_the_handler_and_teardown_restores_them():
    from lit_dreamer.callbacks import GracefulStop
    before = {signum: signal.getsignal(signum) for signum in GracefulStop.SIGNALS}
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as under `nohup cmd &`
    try:
        stop = GracefulStop()
        stop.on_train_start(None, None)
        assert signal.getsignal(signal.SIGTERM) == stop.handle
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # an ignored Ctrl+C stays ignored
        stop.teardown(None, None, "fit")
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # restored as it was found
        # Python's own Ctrl+C handler, set here rather than taken from `before`: pytest itself may run
        # under `nohup ... &`, where SIGINT starts ignored.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        found = {signum: signal.getsignal(signum) for signum in GracefulStop.SIGNALS}
        stop = GracefulStop()
        stop.on_train_start(None, None)
        assert all(signal.getsignal(signum) == stop.handle for signum in GracefulStop.SIGNALS)
        with pytest.warns(UserWarning, match="SIGTERM received"):
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal, delivered to this (main) thread
        assert stop.stopped_by == "SIGTERM"
        stop.teardown(None, None, "fit")
        assert {signum: signal.getsignal(signum) for signum in GracefulStop.SIGNALS} == found
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
