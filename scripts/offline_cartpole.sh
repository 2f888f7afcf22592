#!/usr/bin/env bash
# Offline CartPole benchmark (issue 24): a fresh agent trained for 5,000 gradient steps on the replay of a
# finished `fit -c cartpole` run (20k env steps), with no env collection, evaluated in CartPole-v1 every 500
# gradient steps. Not run in CI (about as long as the online run's training).
#
#   scripts/offline_cartpole.sh SEED [SOURCE_RUN] [key=value ...]
#
# SOURCE_RUN: the run folder of a finished `fit -c cartpole` run (default runs/offline-cartpole-source; trained
# first, with run.seed=0, when it holds no checkpoint). The offline run goes to runs/offline-cartpole-seed<SEED>,
# with the cartpole recipe (configs/budget.yaml), its replay only read; extra key=value overrides are passed on.
# Prints the eval curve (gradient steps, eval/return) from MLflow at the end and writes it beside the run as
# eval_curve.csv. Run from the repository root with lit_dreamer's venv active.
set -euo pipefail
SEED=${1:?usage: scripts/offline_cartpole.sh SEED [SOURCE_RUN] [key=value ...]}
SOURCE=${2:-runs/offline-cartpole-source}
shift $(( $# >= 2 ? 2 : 1 ))
RUN=runs/offline-cartpole-seed$SEED
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

if [ ! -e "$SOURCE/checkpoints/last" ]; then
  echo "training the source run in $SOURCE (fit -c cartpole, 20k env steps)"
  python -m lit_dreamer fit -c cartpole run.seed=0 run.dir="$SOURCE" logger.run_name=offline-cartpole-source
fi

python -m lit_dreamer fit -c cartpole offline.replay="$SOURCE" offline.steps=5000 run.eval_every=500 \
  run.checkpoint_every=1000 run.video_every=0 run.seed="$SEED" run.dir="$RUN" \
  logger.run_name="offline-cartpole-seed$SEED" "$@"

python - "$RUN" <<'EOF'
import csv, os, sys
import mlflow
from lit_dreamer.config import default_tracking_uri
run_dir = sys.argv[1]
run_id = open(os.path.join(run_dir, "mlflow_run_id")).read().strip()
client = mlflow.MlflowClient(tracking_uri=default_tracking_uri())
points = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "eval/return"))
with open(os.path.join(run_dir, "eval_curve.csv"), "w", newline="") as f:
    csv.writer(f).writerows([("gradient_steps", "eval_return"), *points])
for step, value in points:
    print(f"gradient steps {step:5d}  eval/return {value:6.1f}")
reached = next((step for step, value in points if value >= 450), None)
print(f"first eval >= 450 at {reached} gradient steps" if reached else
      f"no eval reached 450 (best {max((v for _, v in points), default=float('nan')):.1f})")
EOF
