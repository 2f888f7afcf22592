#!/usr/bin/env bash
# lit_dreamer's bench against sheeprl 0.8.4's own train() at the DreamerV3 "S" dims, interleaved, on this
# machine (docs/performance.md, "Against other implementations"). sheeprl lives in its own venv, never in
# lit_dreamer's; set it up once with (the mujoco / dm-control pins of this project):
#   python3.11 -m venv /tmp/sheeprl_venv && /tmp/sheeprl_venv/bin/pip install torch==2.13.0
#   printf 'torch==2.13.0\nmujoco==3.17.0\ndm-control==1.0.50\n' > /tmp/sheeprl_constraints.txt
#   /tmp/sheeprl_venv/bin/pip install -c /tmp/sheeprl_constraints.txt "sheeprl[dmc]==0.8.4"
# Run from the repository root with lit_dreamer's venv active; one JSON line per measurement.
set -u
SHEEPRL_PY=${SHEEPRL_PY:-/tmp/sheeprl_venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
S="env.id=dmc/walker-walk model.deter=512 model.hidden=512 model.units=512 model.classes=32 model.depth=32 model.encoder_layers=2 model.actor_layers=2 model.critic_layers=2 model.reward_layers=2 model.cont_layers=2 run.batch_length=64 bench.collector_steps=20"
SCNN="model.cnn_mults=[1,2,4,8] model.cnn_kernel=4 model.cnn_strided=true"
ours() {
  python -m lit_dreamer bench $S "$@" 2>/dev/null | tail -1 | python -c "import json, sys
d = json.load(sys.stdin)
print(json.dumps({'impl': 'lit_dreamer', 'args': sys.argv[1:], 's': d['seconds_per_train_step'], 'phases': d['phases_seconds']}))" "$@"
}
peer() { "$SHEEPRL_PY" scripts/peers/sheeprl_time.py "$@" 2>/dev/null | tail -1; }
for repeat in 1 2; do
  ours bench.steps=4
  peer --obs proprio --steps 3 --warmup 1
  peer --obs proprio --steps 3 --warmup 1 algo.actor.objective_mix=1.0
  ours bench.steps=4 trainer.precision=bf16-mixed
  peer --obs proprio --steps 3 --warmup 1 --precision bf16-mixed algo.actor.objective_mix=1.0
  ours bench.steps=3 env.obs=pixels $SCNN
  peer --obs pixels --steps 2 --warmup 1
  peer --obs pixels --steps 2 --warmup 1 algo.actor.objective_mix=1.0
done
ours bench.steps=3 env.obs=pixels $SCNN trainer.precision=bf16-mixed
ours bench.steps=2 bench.warmup=1 env.obs=pixels
