"""Does a multi-task checkpoint's policy use its task input? The cross matrix and the zeroed-task control.

    python scripts/task_control.py runs/NAME [--episodes 10] [--mode mode|sample] [--seed 12345] [--out CSV]

CHECKPOINT is a model.ckpt or a run folder (its checkpoints/last), as for `python -m lit_dreamer eval`.
For the checkpoint's task table (K tasks) it plays `--episodes` episodes per cell of
- the cross matrix: return[k][j], task k's env with the policy acting for task j (the diagonal is each
  task's own policy);
- the zeroed control (multitask.conditioning=embedding only): task k's env with the actor's task vector
  replaced by zeros. With `heads` each task has its own output layer and there is no task-free policy to
  run: the control is reported as not applicable, and the cross matrix is the evidence.
Per task k it prints own = return[k][k], off = the mean over j != k, task average = the mean over all j of
return[k][j] (what a policy given a task's conditioning at random gets), and zeroed. The control passes for
task k when zeroed <= task average + 1 standard error of their difference (episode noise: a zeroed policy
that is no better than the average lands above it by less than that about 84% of the time). Writes one CSV
row per (task, policy or 'zeroed') to `--out` (default <run folder>/task_control.csv) and prints one JSON
line last. Every cell seeds torch and its envs alike (task k's envs get the seeds the eval command gives
them), so the cells of one task share their starts and differ only by the policy.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import sys

import numpy as np
import torch

from lit_dreamer.config import ConfigError, task_names
from lit_dreamer.evaluation import EVAL_MODES, EpisodeStats, eval_csv_folder, load_module, task_episodes
from lit_dreamer.resume import find_checkpoint

CSV_FILE = "task_control.csv"
CSV_COLUMNS = ("task", "policy", "episodes", "return", "return_std")
ZEROED = "zeroed"


def zeroed_task_input(module):
    """A deep copy of `module` whose actor reads a zero task vector for every task (all rows of the actor's
    embedding table zeroed; TaskEmbedding's norm cap leaves a zero row zero). None with `heads`, which has no
    task-free actor. The original module is not touched."""
    if module.cond.mode != "embedding":
        return None
    zeroed = copy.deepcopy(module)
    with torch.no_grad():
        zeroed.actor_critic.actor.net.embedding.rows.zero_()
    return zeroed


def cell(module, tasks: list[str], k: int, policy: int, *, episodes: int, seed: int, mode: str,
         env_kwargs: dict) -> EpisodeStats:
    """Episodes of task k's env, acting for task number `policy`; seeded alone so each cell can be rerun."""
    torch.manual_seed(seed)
    return task_episodes(module, tasks[k], episodes, seed=seed, index=k, mode=mode, policy=policy, **env_kwargs)


def standard_error(returns: list[float]) -> float:
    """Standard error of the mean return (0 with a single episode, where it cannot be estimated)."""
    if len(returns) < 2:
        return 0.0
    return float(np.std(returns, ddof=1) / math.sqrt(len(returns)))


def task_row(k: int, row: list[EpisodeStats], zeroed: EpisodeStats | None) -> dict:
    """One task's own, off-diagonal, task-average and zeroed returns, and whether the control passes."""
    means = [stats.summary()["return"] for stats in row]
    average = float(np.mean(means))
    # The task average is a mean of K independent cell means: its variance is the sum of theirs over K^2.
    average_se = math.sqrt(sum(standard_error(stats.returns) ** 2 for stats in row)) / len(row)
    result = {"own": means[k], "off": float(np.mean([m for j, m in enumerate(means) if j != k])),
              "task_average": average, "task_average_se": average_se, "zeroed": None, "tolerance": None,
              "zeroed_within_average": None}
    if zeroed is not None:
        zeroed_mean, zeroed_se = zeroed.summary()["return"], standard_error(zeroed.returns)
        tolerance = math.sqrt(average_se ** 2 + zeroed_se ** 2)  # 1 standard error of zeroed - average
        result.update(zeroed=zeroed_mean, tolerance=tolerance, zeroed_within_average=zeroed_mean <= average + tolerance)
    return result


def summary(rows: list[dict]) -> dict:
    """Means over tasks, and whether the zeroed control passes on every task (None when not applicable)."""
    applicable = rows[0]["zeroed"] is not None
    return {"mean_own": float(np.mean([r["own"] for r in rows])),
            "mean_off": float(np.mean([r["off"] for r in rows])),
            "mean_task_average": float(np.mean([r["task_average"] for r in rows])),
            "mean_zeroed": float(np.mean([r["zeroed"] for r in rows])) if applicable else None,
            "zeroed_within_average": all(r["zeroed_within_average"] for r in rows) if applicable else None}


def format_table(tasks: list[str], rows: list[dict], totals: dict) -> str:
    lines = [f"{'own':>9} {'off':>9} {'task avg':>9} {'zeroed':>9} {'tol':>7}  task"]
    for task, r in zip(tasks, rows):
        zeroed = "n/a" if r["zeroed"] is None else f"{r['zeroed']:.2f}"
        tolerance = "" if r["tolerance"] is None else f"{r['tolerance']:.2f}"
        verdict = "" if r["zeroed_within_average"] is None else ("  ok" if r["zeroed_within_average"] else "  ABOVE")
        lines.append(f"{r['own']:>9.2f} {r['off']:>9.2f} {r['task_average']:>9.2f} {zeroed:>9} {tolerance:>7}  "
                     f"{task}{verdict}")
    if totals["mean_zeroed"] is None:
        verdict = "zeroed: not applicable with multitask.conditioning=heads (no task-free policy); read own vs off"
    else:
        verdict = (f"mean zeroed {totals['mean_zeroed']:.2f}; zeroed <= task average + 1 SE on every task: "
                   f"{'yes' if totals['zeroed_within_average'] else 'no'}")
    lines.append(f"mean own {totals['mean_own']:.2f}, mean off {totals['mean_off']:.2f}, "
                 f"mean task average {totals['mean_task_average']:.2f}; {verdict}")
    return "\n".join(lines)


def write_csv(path: str, tasks: list[str], matrix: list[list[EpisodeStats]], zeroed: list[EpisodeStats] | None) -> str:
    """One row per (task, policy): the policy is a task name of the table, or 'zeroed'."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for k, task in enumerate(tasks):
            cells = [(tasks[j], stats) for j, stats in enumerate(matrix[k])]
            cells += [(ZEROED, zeroed[k])] if zeroed is not None else []
            for policy, stats in cells:
                s = stats.summary()
                writer.writerow({"task": task, "policy": policy, "episodes": s["episodes"], "return": s["return"],
                                 "return_std": s["return_std"]})
    return path


def task_control(ckpt: str, *, episodes: int = 10, mode: str = "mode", seed: int = 12345, out: str | None = None) -> dict:
    """The cross matrix, the zeroed control and their summary for a checkpoint; writes the CSV."""
    if episodes < 1:
        raise ConfigError(f"--episodes must be at least 1, got {episodes}")
    path = find_checkpoint(ckpt)
    module, cfg = load_module(path)
    tasks = task_names(cfg)
    if not module.cond.active:
        raise ConfigError(f"checkpoint {path} has one task ({tasks[0]}): the control needs a multi-task checkpoint "
                          "(env.tasks with two tasks or more)")
    run = dict(episodes=episodes, seed=seed, mode=mode, env_kwargs=cfg.env.make_kwargs())
    K = len(tasks)
    matrix = [[cell(module, tasks, k, j, **run) for j in range(K)] for k in range(K)]
    zeroed_module = zeroed_task_input(module)
    # The policy index only picks a row of the actor's table, and every row is zero.
    zeroed = None if zeroed_module is None else [cell(zeroed_module, tasks, k, k, **run) for k in range(K)]
    rows = [task_row(k, matrix[k], zeroed[k] if zeroed else None) for k in range(K)]
    out = out or os.path.join(eval_csv_folder(path), CSV_FILE)
    return {"checkpoint": os.path.abspath(path), "tasks": tasks, "conditioning": module.cond.mode,
            "episodes": episodes, "mode": mode, "seed": seed,
            "matrix": [[s.summary()["return"] for s in row] for row in matrix],
            "matrix_std": [[s.summary()["return_std"] for s in row] for row in matrix],
            "zeroed": None if zeroed is None else [s.summary()["return"] for s in zeroed],
            "per_task": dict(zip(tasks, rows)), "summary": summary(rows),
            "csv": write_csv(out, tasks, matrix, zeroed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a model.ckpt, or a run folder (its checkpoints/last)")
    parser.add_argument("--episodes", type=int, default=10, help="episodes per cell (task, policy)")
    parser.add_argument("--mode", choices=EVAL_MODES, default="mode",
                        help="the policy's most likely action (default) or sampled as in training")
    parser.add_argument("--seed", type=int, default=12345, help="seed of the envs and of torch (the eval command's)")
    parser.add_argument("--out", default=None, help=f"CSV to write (default: <run folder>/{CSV_FILE})")
    args = parser.parse_args()
    torch.set_num_threads(1)
    try:
        result = task_control(args.checkpoint, episodes=args.episodes, mode=args.mode, seed=args.seed, out=args.out)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(format_table(result["tasks"], list(result["per_task"].values()), result["summary"]))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
