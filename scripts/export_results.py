"""Export learning curves of MLflow runs as a CSV (one row per logged point) for docs/results/.

    python scripts/export_results.py OUT.csv RUN_ID [RUN_ID ...] [--tracking-uri sqlite:///mlflow.db]

Columns: run_name, run_id, seed, metric, env_steps, value, for train/return and eval/return.
Pair it with `python -m lit_dreamer compare runs=... out=OUT.png` for the figure.
"""

from __future__ import annotations

import argparse
import csv

import mlflow

METRICS = ("train/return", "eval/return")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("run_ids", nargs="+")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    args = parser.parse_args()
    client = mlflow.MlflowClient(args.tracking_uri)
    rows = []
    for run_id in args.run_ids:
        run = client.get_run(run_id)
        for metric in METRICS:
            for point in client.get_metric_history(run_id, metric):
                rows.append([run.info.run_name, run_id, run.data.params.get("run.seed", ""), metric, point.step,
                             point.value])
    with open(args.out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run_name", "run_id", "seed", "metric", "env_steps", "value"])
        writer.writerows(sorted(rows, key=lambda r: (r[1], r[3], r[4])))
    print(f"{len(rows)} points from {len(args.run_ids)} runs -> {args.out}")


if __name__ == "__main__":
    main()
