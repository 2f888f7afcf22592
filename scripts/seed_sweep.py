"""Train one config with several seeds, one run after the other, then compare them.

    python scripts/seed_sweep.py --seeds 3 -c cartpole -- run.steps=20000
    python scripts/seed_sweep.py --seeds 2 -c debug --out sweep.png -- run.steps=80

Each seed runs `python -m lit_dreamer fit` in its own process (run name `<name>-seed<k>`, run folder
`runs/<name>-seed<k>`), all in one MLflow experiment; `python -m lit_dreamer compare` then prints the
table and writes the curves of the group (mean and 95% bootstrap interval, IQM) for exactly these runs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("-c", "--config", action="append", default=[])
    parser.add_argument("--name", default="sweep")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--experiment", default="lit_dreamer")
    parser.add_argument("--metric", default="eval/return")
    parser.add_argument("--out", default="sweep.png")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every seed (after --)")
    args = parser.parse_args()

    configs = [arg for path in args.config for arg in ("-c", path)]
    run_ids = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        name = f"{args.name}-seed{seed}"
        command = [sys.executable, "-m", "lit_dreamer", "fit", *configs, *args.overrides, f"run.seed={seed}",
                   f"logger.run_name={name}", f"run.dir=runs/{name}", f"logger.tracking_uri={args.tracking_uri}",
                   f"logger.experiment={args.experiment}"]
        print("$", " ".join(command), flush=True)
        if subprocess.run(command).returncode != 0:
            print(f"seed {seed} failed; stopping the sweep", file=sys.stderr)
            return 1
        with open(f"runs/{name}/mlflow_run_id") as f:
            run_ids.append(f.read().strip())
    return subprocess.run([sys.executable, "-m", "lit_dreamer", "compare", f"experiment={args.experiment}",
                           f"metric={args.metric}", f"out={args.out}", f"tracking_uri={args.tracking_uri}",
                           f"runs={','.join(run_ids)}"]).returncode


if __name__ == "__main__":
    sys.exit(main())
