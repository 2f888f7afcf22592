"""Times sheeprl 0.8.4's own DreamerV3 gradient step (`sheeprl.algos.dreamer_v3.dreamer_v3.train`) per call.

Run it with the interpreter of the separate sheeprl venv (never a dependency of lit_dreamer):

    OMP_NUM_THREADS=1 /tmp/sheeprl_venv/bin/python scripts/peers/sheeprl_time.py --obs proprio --steps 5 --warmup 1

The config is sheeprl's own `exp=dreamer_v3_dmc_walker_walk algo=dreamer_v3_S` (batch 16 x sequence 64), on CPU,
with fp32 (`fabric.precision=32-true`) unless --precision says otherwise. The agent and its optimizers are built as
sheeprl's dreamer_v3 `main` builds them (`build_agent`, `hydra.utils.instantiate` of the optimizers,
`fabric.setup_optimizers`, `Moments`); the batch is random data of the shapes and dtypes that `sample_batches` gives
`train()` ([T, B, ...] float32, pixels 0..255). The walker's observation and action sizes come from dm_control itself
(no rendering). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--obs", choices=["proprio", "pixels"], default="proprio")
    parser.add_argument("--steps", type=int, default=5, help="timed train() calls")
    parser.add_argument("--warmup", type=int, default=1, help="untimed train() calls first")
    parser.add_argument("--precision", default="32-true", help="fabric precision: 32-true or bf16-mixed")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "overrides",
        nargs="*",
        help="extra sheeprl hydra overrides, e.g. algo.actor.objective_mix=1.0 (REINFORCE for continuous actions, "
        "imagination without gradients, as lit_dreamer) or float32_matmul_precision=highest",
    )
    args = parser.parse_args()

    os.environ.setdefault("MUJOCO_GL", "egl")
    threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or None
    import torch

    if threads:
        torch.set_num_threads(threads)

    import gymnasium as gym
    import hydra
    import numpy as np
    from dm_control import suite
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    import sheeprl
    from sheeprl.algos.dreamer_v3 import dreamer_v3 as dv3
    from sheeprl.algos.dreamer_v3.agent import build_agent
    from sheeprl.algos.dreamer_v3.utils import Moments
    from sheeprl.utils.metric import MetricAggregator
    from sheeprl.utils.timer import timer
    from sheeprl.utils.utils import dotdict

    pixels = args.obs == "pixels"
    overrides = [
        "exp=dreamer_v3_dmc_walker_walk",
        "algo=dreamer_v3_S",
        "fabric.accelerator=cpu",
        f"fabric.precision={args.precision}",
        "fabric.devices=1",
        f"algo.per_rank_batch_size={args.batch}",
        f"algo.per_rank_sequence_length={args.seq}",
        "metric.log_level=0",
        "algo.run_test=False",
        "checkpoint.save_last=False",
        f"num_threads={threads or 1}",
        f"seed={args.seed}",
        f"env.wrapper.from_pixels={pixels}",
        f"env.wrapper.from_vectors={not pixels}",
        "algo.cnn_keys.encoder=[rgb]" if pixels else "algo.cnn_keys.encoder=[]",
        "algo.mlp_keys.encoder=[]" if pixels else "algo.mlp_keys.encoder=[state]",
        "algo.cnn_keys.decoder=[rgb]" if pixels else "algo.cnn_keys.decoder=[]",
        "algo.mlp_keys.decoder=[]" if pixels else "algo.mlp_keys.decoder=[state]",
    ] + list(args.overrides)
    with initialize_config_module(config_module="sheeprl.configs", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    cfg = dotdict(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True))

    # What `run_algorithm` sets up before `main`
    torch.set_float32_matmul_precision(cfg.float32_matmul_precision)
    MetricAggregator.disabled = True
    timer.disabled = True
    fabric = hydra.utils.instantiate(cfg.fabric, strategy="auto", _convert_="all")
    fabric.seed_everything(cfg.seed)

    # The spaces of sheeprl's DMCWrapper for walker-walk, sizes from dm_control (physics only, nothing rendered)
    env = suite.load("walker", "walk")
    state_dim = int(sum(int(np.prod(s.shape)) for s in env.observation_spec().values()))
    act_dim = int(env.action_spec().shape[0])
    size = cfg.env.screen_size
    spaces = {}
    if pixels:
        spaces["rgb"] = gym.spaces.Box(0, 255, (3, size, size), np.uint8)
    else:
        spaces["state"] = gym.spaces.Box(-np.inf, np.inf, (state_dim,), np.float64)
    obs_space = gym.spaces.Dict(spaces)
    actions_dim = (act_dim,)
    is_continuous = True

    # As sheeprl's dreamer_v3 `main` builds them
    world_model, actor, critic, target_critic, player = build_agent(fabric, actions_dim, is_continuous, cfg, obs_space)
    world_optimizer = hydra.utils.instantiate(
        cfg.algo.world_model.optimizer, params=world_model.parameters(), _convert_="all"
    )
    actor_optimizer = hydra.utils.instantiate(cfg.algo.actor.optimizer, params=actor.parameters(), _convert_="all")
    critic_optimizer = hydra.utils.instantiate(cfg.algo.critic.optimizer, params=critic.parameters(), _convert_="all")
    world_optimizer, actor_optimizer, critic_optimizer = fabric.setup_optimizers(
        world_optimizer, actor_optimizer, critic_optimizer
    )
    moments = Moments(
        cfg.algo.actor.moments.decay,
        cfg.algo.actor.moments.max,
        cfg.algo.actor.moments.percentile.low,
        cfg.algo.actor.moments.percentile.high,
    )
    # The first target-network update of `main` (tau = 1)
    for cp, tcp in zip(critic.module.parameters(), target_critic.parameters()):
        tcp.data.copy_(cp.data)

    T, B = args.seq, args.batch
    gen = torch.Generator().manual_seed(args.seed)

    def batch():
        # The layout of `sample_batches`: [T, B, ...], float32 (`.float()`), pixels in 0..255
        data = {}
        if pixels:
            data["rgb"] = torch.randint(0, 256, (T, B, 3, size, size), generator=gen).float()
        else:
            data["state"] = torch.randn(T, B, state_dim, generator=gen)
        data["actions"] = torch.rand(T, B, act_dim, generator=gen) * 2 - 1
        data["rewards"] = torch.rand(T, B, 1, generator=gen)
        data["terminated"] = torch.zeros(T, B, 1)
        data["truncated"] = torch.zeros(T, B, 1)
        data["is_first"] = torch.zeros(T, B, 1)
        return {k: v.to(fabric.device) for k, v in data.items()}

    def step(data):
        dv3.train(
            fabric,
            world_model,
            actor,
            critic,
            target_critic,
            world_optimizer,
            actor_optimizer,
            critic_optimizer,
            data,
            None,
            cfg,
            is_continuous,
            actions_dim,
            moments,
        )

    for _ in range(args.warmup):
        step(batch())
    times = []
    for _ in range(args.steps):
        data = batch()  # made outside the timed region (train() writes into data["is_first"], so a fresh one each call)
        t0 = time.perf_counter()
        step(data)
        times.append(time.perf_counter() - t0)

    n_params = {
        "world_model": sum(p.numel() for p in world_model.parameters()),
        "actor": sum(p.numel() for p in actor.parameters()),
        "critic": sum(p.numel() for p in critic.parameters()),
    }
    print(
        json.dumps(
            {
                "impl": f"sheeprl {getattr(sheeprl, '__version__', '?')}",
                "obs": args.obs,
                "precision": args.precision,
                "overrides": list(args.overrides),
                "batch": B,
                "seq": T,
                "seconds_per_step": [round(t, 4) for t in times],
                "median_s": round(statistics.median(times), 4) if times else None,
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "params": n_params,
                "dims": {
                    "deter": cfg.algo.world_model.recurrent_model.recurrent_state_size,
                    "hidden": cfg.algo.world_model.transition_model.hidden_size,
                    "units": cfg.algo.dense_units,
                    "mlp_layers": cfg.algo.mlp_layers,
                    "stoch": cfg.algo.world_model.stochastic_size,
                    "classes": cfg.algo.world_model.discrete_size,
                    "cnn_depth": cfg.algo.world_model.encoder.cnn_channels_multiplier,
                },
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
