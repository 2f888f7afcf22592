"""Time to solve: the wall time from a fit's process start until its eval return first reaches a threshold and holds it.

    python scripts/time_to_solve.py [--seeds 0 1 2] [--threads 2] [--threshold 475] [--hold 2] [-c cartpole]
        [--out time_to_solve] [--csv timeline.csv] [--no-stop-when-solved] [-- KEY=VALUE ...]

Each seed runs `python -m lit_dreamer fit` alone (one after the other, OMP_NUM_THREADS=--threads) in a fresh
folder OUT/seed<k> (its run.dir, with its own MLflow store mlflow.db and the fit's output in fit.log). A seed
is solved at the eval that completes the first streak of hold + 1 evals in a row at or above the threshold;
its time is that eval's MLflow timestamp (taken in the fit process when eval/return is logged, right after
the episodes end) minus the moment the process was started, so start-up, compilation and every eval count.
Once solved the fit is sent SIGTERM (it stops after the current step, with a checkpoint) unless
--no-stop-when-solved. Prints one JSON line per seed, then a summary line; --csv writes every eval.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from typing import NamedTuple, Sequence

import mlflow


class Eval(NamedTuple):
    wall_s: float  # seconds from the fit's process start to the moment eval/return was logged
    env_steps: int
    eval_return: float


def qualifying_streak(returns: Sequence[float], threshold: float, hold: int) -> tuple[int, int] | None:
    """(first, last) index of the first hold + 1 evals in a row that are all >= threshold; None if no such run."""
    streak = 0
    for index, value in enumerate(returns):
        streak = streak + 1 if value >= threshold else 0  # NaN compares False: it breaks a streak
        if streak == hold + 1:
            return index - hold, index
    return None


def read_evals(client: mlflow.MlflowClient, run_dir: str, started: float) -> list[Eval]:
    """The evals the fit in run_dir has logged so far, in env-step order (none before its MLflow run exists)."""
    # The run id file fit writes first thing (lit_dreamer.tracking.RUN_ID_FILE), read here without importing
    # lit_dreamer, which would load torch and Lightning into this process beside the run it times.
    try:
        with open(os.path.join(run_dir, "mlflow_run_id")) as f:
            run_id = f.read().strip()
    except FileNotFoundError:
        return []
    if not run_id:
        return []  # written but not yet filled
    history = sorted(client.get_metric_history(run_id, "eval/return"), key=lambda m: (m.step, m.timestamp))
    return [Eval(round(m.timestamp / 1000 - started, 3), m.step, m.value) for m in history]


def watch(proc: subprocess.Popen, client: mlflow.MlflowClient, folder: str, started: float,
          opts: argparse.Namespace) -> bool:
    """Wait for the fit to end, reading its evals every opts.poll s; True if it was sent SIGTERM once solved."""
    while proc.poll() is None:
        try:
            proc.wait(timeout=opts.poll)
        except subprocess.TimeoutExpired:
            pass
        try:
            evals = read_evals(client, folder, started)
        except Exception:  # noqa: BLE001 - e.g. a locked database or a half-written run id: read again later
            continue
        solved = qualifying_streak([e.eval_return for e in evals], opts.threshold, opts.hold) is not None
        if solved and opts.stop_when_solved and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the fit ends after this step, with a checkpoint
            proc.wait()
            return True
    return False


def run_seed(seed: int, folder: str, fit_args: list[str], opts: argparse.Namespace) -> dict:
    """Run one seed's fit to its end or until it is solved; returns its JSON record."""
    uri = f"sqlite:///{os.path.abspath(folder)}/mlflow.db"
    os.makedirs(folder)
    # Opening the store here creates its tables before the clock starts; later reads are single queries.
    client = mlflow.MlflowClient(uri)
    client.search_experiments()
    command = [sys.executable, "-m", "lit_dreamer", "fit", *fit_args, f"run.seed={seed}", f"run.dir={folder}",
               "logger.backend=mlflow", f"logger.tracking_uri={uri}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(opts.threads))
    with open(os.path.join(folder, "fit.log"), "w") as log:
        started = time.time()  # MLflow's timestamps are wall-clock milliseconds of this same clock
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        stopped = watch(proc, client, folder, started, opts)
    if proc.returncode != 0 and not (stopped and proc.returncode in (143, -signal.SIGTERM)):
        raise SystemExit(f"seed {seed}: fit failed (exit {proc.returncode}); see {folder}/fit.log")
    evals = read_evals(client, folder, started)
    streak = qualifying_streak([e.eval_return for e in evals], opts.threshold, opts.hold)
    return {"seed": seed, "solved": streak is not None,
            "seconds_to_solve": evals[streak[1]].wall_s if streak else None,
            "env_steps_at_solve": evals[streak[0]].env_steps if streak else None,
            "best_return": max((e.eval_return for e in evals), default=None),
            "run_seconds": round(time.time() - started, 3), "evals": [list(e) for e in evals]}


def summary(records: list[dict], opts: argparse.Namespace) -> dict:
    """Solved count and the median, min and max seconds to solve over the solved seeds."""
    seconds = [r["seconds_to_solve"] for r in records if r["solved"]]
    return {"solved": len(seconds), "seeds": len(records), "threshold": opts.threshold, "hold": opts.hold,
            "median_seconds": statistics.median(seconds) if seconds else None,
            "min_seconds": min(seconds, default=None), "max_seconds": max(seconds, default=None)}


def write_timeline(path: str, records: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["seed", "wall_s", "env_steps", "eval_return"])
        writer.writerows([r["seed"], *e] for r in records for e in r["evals"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each fit")
    parser.add_argument("--threshold", type=float, default=475.0)
    parser.add_argument("--hold", type=int, default=2, help="evals after the first one that must stay >= threshold")
    parser.add_argument("-c", "--config", action="append", help="fit config (repeatable; default cartpole)")
    parser.add_argument("--out", default="time_to_solve", help="folder of the runs, one seed<k> folder each")
    parser.add_argument("--csv", help="write every eval (seed, wall_s, env_steps, eval_return) to this file")
    parser.add_argument("--poll", type=float, default=5.0, help="seconds between reads of the MLflow store")
    parser.add_argument("--stop-when-solved", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("overrides", nargs="*", help="key=value overrides passed to fit (after --)")
    opts = parser.parse_args()
    if opts.hold < 0 or opts.threads < 1 or opts.poll <= 0 or len(set(opts.seeds)) < len(opts.seeds):
        parser.error("--hold must be >= 0, --threads >= 1, --poll > 0 and the --seeds distinct")
    folders = {seed: os.path.join(opts.out, f"seed{seed}") for seed in opts.seeds}
    taken = [folder for folder in folders.values() if os.path.exists(folder)]
    if taken:  # a fresh run folder per seed: a resumed run would not time from its start
        parser.error(f"{', '.join(taken)} already exist; choose another --out or remove them")
    fit_args = [arg for config in opts.config or ["cartpole"] for arg in ("-c", config)] + opts.overrides
    records = []
    for seed, folder in folders.items():
        records.append(run_seed(seed, folder, fit_args, opts))
        print(json.dumps(records[-1]), flush=True)
    if opts.csv:
        write_timeline(opts.csv, records)
    print(json.dumps(summary(records, opts)), flush=True)


if __name__ == "__main__":
    main()
