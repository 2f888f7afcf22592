"""Time two commits of lit_dreamer against each other with `bench`, interleaved, on this machine.

    python scripts/bench_ab.py BEFORE AFTER [--repeats 2] [--threads 2] [-- BENCH_ARGS ...]

    python scripts/bench_ab.py bcdce98~1 bcdce98 -- env.id=dmc/walker-walk model.size=size12m

Each commit is checked out into a temporary git worktree and its own `python -m lit_dreamer bench`
runs from there (the current environment's packages, the worktree's code). The runs alternate
(before, after, before, after, ...) so that a change in machine load hits both sides alike. Prints
one line per run (seconds per training step and the phases) and, last, a JSON object with every
run's seconds per step per side. Run it on an otherwise idle machine: two jobs on two cores
time each other's contention.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile


def bench(tree: str, threads: int, args: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-m", "lit_dreamer", "bench", *args], cwd=tree, env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"bench failed in {tree} (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before"), parser.add_argument("after")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    opts = parser.parse_args(argv[:split])
    opts.bench_args = argv[split + 1:]  # passed to `python -m lit_dreamer bench`
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout this script is in
    with tempfile.TemporaryDirectory(prefix="bench_ab_") as tmp:
        trees = {}
        try:
            for side in ("before", "after"):
                rev = getattr(opts, side)
                tree = os.path.join(tmp, side)
                add = subprocess.run(["git", "-C", repo, "worktree", "add", "--detach", tree, rev],
                                     capture_output=True, text=True)
                if add.returncode != 0:
                    raise SystemExit(f"cannot check out {side} revision {rev!r}: {add.stderr.strip()}")
                trees[side] = tree
            seconds: dict[str, list[float]] = {"before": [], "after": []}
            for rep in range(opts.repeats):
                for side in ("before", "after"):
                    # run.dir inside the worktree: the runs leave nothing in the caller's folders
                    result = bench(trees[side], opts.threads, [*opts.bench_args, f"run.dir={trees[side]}/runs"])
                    seconds[side].append(result["seconds_per_train_step"])
                    phases = {k: round(v, 3) for k, v in result["phases_seconds"].items()}
                    print(f"{side} {getattr(opts, side)} repeat {rep + 1}: "
                          f"{result['seconds_per_train_step']:.3f} s/step {phases}", flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", repo, "worktree", "remove", "--force", tree], capture_output=True)
    print(json.dumps({"before": opts.before, "after": opts.after, "threads": opts.threads,
                      "bench_args": opts.bench_args, "seconds_per_train_step": seconds}))


if __name__ == "__main__":
    main()
