"""scripts/time_to_solve.py: the solve criterion on hand-made eval sequences, and real debug runs timed by it."""

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "time_to_solve.py"
# The debug config with evals: 40 random prefill steps, then one training step per env step, an eval
# every 20 env steps (the first at the first training step) of 2 episodes, and at the end.
DEBUG = ["-c", "debug", "--", "run.prefill=40", "run.eval_every=20", "run.eval_episodes=2"]


def load_script():
    spec = importlib.util.spec_from_file_location("time_to_solve", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("returns, threshold, hold, expected", [
    ([400, 480, 470, 490, 500, 480], 475, 2, (3, 5)),  # 480 falls back; the streak from 490 holds
    ([400, 480, 470, 490, 500], 475, 2, None),  # the run ends before 490 has held for two more evals
    ([475, 475, 475], 475, 2, (0, 2)),  # at the threshold counts
    ([500, float("nan"), 500, 500, 500], 475, 2, (2, 4)),  # a NaN eval breaks a streak
    ([10, 500], 475, 0, (1, 1)),  # hold 0: the first eval at the threshold
    ([], 475, 2, None),
])
def test_the_streak_must_first_reach_the_threshold_and_hold_it(returns, threshold, hold, expected):
    assert load_script().qualifying_streak(returns, threshold, hold) == expected


def time_to_solve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(SCRIPT), "--seeds", "0", "--threads", "1", "--poll", "0.5",
                           "--out", str(tmp_path / "tts"), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)


def test_a_run_that_solves_is_timed_to_the_eval_that_completes_the_streak_and_stopped(tmp_path):
    # Every CartPole return is >= 1: the first two evals make the streak. run.steps is far past them,
    # so the run ends early only if the script stopped it.
    proc = time_to_solve(tmp_path, "--threshold", "1", "--hold", "1", "--csv", str(tmp_path / "t.csv"),
                         *DEBUG, "run.steps=600")
    assert proc.returncode == 0, proc.stderr[-3000:]
    record, summary = (json.loads(line) for line in proc.stdout.strip().splitlines())
    evals = record["evals"]
    assert record["solved"] and record["seed"] == 0
    assert record["env_steps_at_solve"] == evals[0][1] == 41  # the first eval, at the first training step
    assert 0 < evals[0][0] < record["seconds_to_solve"] == evals[1][0] < record["run_seconds"]
    assert [e[1] for e in evals] == sorted({e[1] for e in evals}) and evals[-1][1] < 600
    assert record["best_return"] == max(e[2] for e in evals) >= 1
    assert "stopped by SIGTERM" in (tmp_path / "tts" / "seed0" / "fit.log").read_text()
    assert summary["solved"] == 1 and summary["median_seconds"] == record["seconds_to_solve"]
    with open(tmp_path / "t.csv") as f:
        rows = list(csv.DictReader(f))
    assert [[float(r["wall_s"]), int(r["env_steps"]), float(r["eval_return"])] for r in rows] == evals
    assert {r["seed"] for r in rows} == {"0"}


def test_a_run_that_never_solves_reports_its_best_eval_and_a_used_folder_is_refused(tmp_path):
    proc = time_to_solve(tmp_path, "--threshold", "1e9", *DEBUG, "run.steps=60")
    assert proc.returncode == 0, proc.stderr[-3000:]
    record, summary = (json.loads(line) for line in proc.stdout.strip().splitlines())
    assert not record["solved"] and record["seconds_to_solve"] is None and record["env_steps_at_solve"] is None
    assert [e[1] for e in record["evals"]] == [41, 60]  # the run went to run.steps: one eval there, at the end
    assert record["best_return"] == max(e[2] for e in record["evals"])
    assert summary == {"solved": 0, "seeds": 1, "threshold": 1e9, "hold": 2, "median_seconds": None,
                       "min_seconds": None, "max_seconds": None}
    again = time_to_solve(tmp_path, "--threshold", "1e9", *DEBUG, "run.steps=60")
    assert again.returncode == 2 and "seed0 already exist" in again.stderr
