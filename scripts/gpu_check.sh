#!/usr/bin/env bash
# The project's GPU check, one device call (docs/performance.md "GPU readiness"): install the packages the GPU
# machine's image lacks from wheels in .devwhl/ (git-ignored; made here with `python -m pip download --no-deps
# --python-version 3.12 --platform manylinux2014_x86_64 --only-binary=:all: -d .devwhl gymnasium==1.4.0
# farama-notifications omegaconf==2.4.0 pygame-ce==2.5.8`), bench on CUDA, the sync check, then three CartPole
# fits side by side (32-true, bf16-mixed, bf16-mixed with replay.device=auto) until BUDGET seconds.
#   device run: bash scripts/gpu_check.sh   (carry .devwhl; figures under $OUT; about 560 s of a 600 s call)
# Knobs for a dry run on a CPU: DRY=1 (no pip, no nvidia-smi), SKIPBENCH=1, BSTEPS (timed bench steps), BTIME
# (seconds per bench), FSTEPS (env steps per fit), BUDGET (seconds from the start until the fits are stopped).
set -u
T0=$(date +%s); el() { echo "[t=$(( $(date +%s) - T0 ))s] $*"; }
export SDL_VIDEODRIVER=dummy PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
[ -n "${DRY:-}" ] || python3 -m pip install -q --no-index --no-deps .devwhl/*.whl 2>&1 | tail -2
[ -n "${DRY:-}" ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, lightning, gymnasium, omegaconf; print(torch.__version__, lightning.__version__,
gymnasium.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
B="python3 -m lit_dreamer bench -c configs/cartpole.yaml logger.backend=none bench.warmup=3 bench.steps=${BSTEPS:-10}
  bench.collector_steps=50"
bench() {  # NAME [overrides]: one bench, its JSON line appended to bench.jsonl, its summary printed
  [ -n "${SKIPBENCH:-}" ] && return
  el "bench $1"; timeout -k 10 ${BTIME:-75} $B "${@:2}" > $OUT/b_$1.txt 2>&1
  tail -1 $OUT/b_$1.txt >> $OUT/bench.jsonl; tail -3 $OUT/b_$1.txt | head -2 | cut -c1-250; rm $OUT/b_$1.txt
}
bench s1m_fp32
bench s1m_bf16 trainer.precision=bf16-mixed
bench s12m_fp32 model.size=size12m run.batch_length=64
bench s12m_bf16 model.size=size12m run.batch_length=64 trainer.precision=bf16-mixed
bench s12m_bf16_pix model.size=size12m run.batch_length=64 trainer.precision=bf16-mixed env.obs=pixels
BTIME=150 bench s12m_fp32_compile model.size=size12m run.batch_length=64 run.compile=true
el "sync check"  # at 3 and at 8 timed steps: the difference is what each step adds, the rest is once per run
for n in 3 8; do
  PYTHONPATH=. timeout -k 10 75 python3 scripts/sync_check.py bench -c configs/cartpole.yaml logger.backend=none \
    bench.warmup=2 bench.steps=$n bench.collector_steps=20 > $OUT/sync$n.txt 2>&1
  grep -A30 "distinct sync" $OUT/sync$n.txt | cut -c1-400
done
el "fits"
F="python3 -m lit_dreamer fit -c configs/cartpole.yaml logger.backend=csv run.steps=${FSTEPS:-10000} run.eval_every=2500
  run.eval_episodes=5 run.video_every=0 run.checkpoint_every=100000"
LEFT=$(( ${BUDGET:-555} - ($(date +%s) - T0) )); [ $LEFT -lt 60 ] && LEFT=60; el "fits get ${LEFT}s"
for v in "fp32:" "bf16:trainer.precision=bf16-mixed" "bf16auto:trainer.precision=bf16-mixed replay.device=auto"; do
  name=${v%%:*}; over=${v#*:}
  OMP_NUM_THREADS=4 timeout -s INT -k 25 $LEFT $F run.dir=/tmp/fit_$name $over > /tmp/fit_$name.log 2>&1 &
done
wait
for name in fp32 bf16 bf16auto; do
  el "fit $name"
  tr '\r' '\n' < /tmp/fit_$name.log | grep -E "steps:|Error|error|summary|env steps [0-9]|best" | tail -4 | cut -c1-200
  cp /tmp/fit_$name/csv/metrics.csv $OUT/fit_$name.csv 2>/dev/null
done
tr '\r' '\n' < /tmp/fit_bf16.log | grep -iE "traceback|error" | head -5
el done
