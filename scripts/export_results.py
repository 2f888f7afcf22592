"""Export learning curves of MLflow runs as a CSV (one row per logged point) for docs/results/.

    python scripts/export_results.py OUT.csv RUN_ID [RUN_ID ...] [--tracking-uri sqlite:///mlflow.db]
        [--metrics train/return,eval/return] [--bin N]

Columns: run_name, run_id, seed, metric, env_steps, value. A step logged twice (a resumed run repeats
the steps since its checkpoint) keeps its newer value, as in `compare`. `--bin N` averages each metric over bins
of N env steps (labelled by the bin's end), which keeps per-training-step metrics such as
`ac/advantage` small enough to commit. Pair it with `python -m lit_dreamer compare runs=... out=OUT.png`
for the figure.
"""

from __future__ import annotations

import argparse
import csv
import math
from collections import defaultdict

import mlflow

from lit_dreamer.compare import history_arrays

METRICS = "train/return,eval/return"


def binned(points: list[tuple[int, float]], width: int) -> list[tuple[int, float]]:
    """Mean value per bin (lo, lo + width], labelled by the bin's upper end."""
    bins: dict[int, list[float]] = defaultdict(list)
    for step, value in points:
        bins[math.ceil(step / width) * width].append(value)
    return [(end, sum(values) / len(values)) for end, values in sorted(bins.items())]


def export(out: str, run_ids: list[str], tracking_uri: str, metrics: list[str], width: int = 0) -> int:
    """Write the CSV; returns the number of rows."""
    client = mlflow.MlflowClient(tracking_uri)
    rows = []
    for run_id in run_ids:
        run = client.get_run(run_id)
        for metric in metrics:
            steps, values = history_arrays([(m.step, m.timestamp, m.value)
                                            for m in client.get_metric_history(run_id, metric)])
            points = [(int(step), float(value)) for step, value in zip(steps, values)]
            if width > 0:
                points = binned(points, width)
            rows.extend([run.info.run_name, run_id, run.data.params.get("run.seed", ""), metric, step, value]
                        for step, value in points)
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run_name", "run_id", "seed", "metric", "env_steps", "value"])
        writer.writerows(sorted(rows, key=lambda r: (r[1], r[3], r[4])))
    return len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("run_ids", nargs="+")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--metrics", default=METRICS, help="comma-separated metric names")
    parser.add_argument("--bin", type=int, default=0, help="average over bins of this many env steps (0: every point)")
    args = parser.parse_args()
    if args.bin < 0:
        parser.error(f"--bin must be >= 0, got {args.bin}")
    n = export(args.out, args.run_ids, args.tracking_uri, args.metrics.split(","), args.bin)
    print(f"{n} points from {len(args.run_ids)} runs -> {args.out}")


if __name__ == "__main__":
    main()
