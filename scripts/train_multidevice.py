"""Train with a hand-built lightning.Trainer: the pieces `fit` uses, assembled in a script.

    python scripts/train_multidevice.py --devices 4 --precision bf16-mixed --steps 20000
    python scripts/train_multidevice.py --devices 2 --accelerator cpu --precision bf16-mixed --steps 200 --debug

Each DDP rank owns its envs and its replay shard; --steps counts env steps over all ranks.
"""

from __future__ import annotations

import argparse

import lightning as L
from lightning.pytorch.loggers import MLFlowLogger

from lit_dreamer.callbacks import DreamerCheckpoint, EnvCollector, EvalCallback
from lit_dreamer.callbacks.env_collector import run_step_count
from lit_dreamer.agent_config import AgentConfig, BehaviorConfig, ModelConfig
from lit_dreamer.data import ReplayDataModule
from lit_dreamer.envs import make_env
from lit_dreamer.module import DreamerModule
from lit_dreamer.train import env_info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="CartPole-v1")
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--dir", default="runs/multidevice")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--debug", action="store_true", help="tiny model and batches, for a smoke test")
    args = parser.parse_args()

    env = make_env(args.env)
    info = env_info(env)
    env.close()
    if args.debug:
        config = AgentConfig(model=ModelConfig(deter=64, hidden=16, classes=4, stoch=4, depth=2, units=16, blocks=4),
                             behavior=BehaviorConfig(horizon=4))
        batch_size, batch_length, train_ratio, prefill = 4, 8, 32, 40
    else:
        config, batch_size, batch_length, train_ratio, prefill = AgentConfig(), 16, 64, 512, 1000

    module = DreamerModule(info.obs_spec, info.action_dim, info.discrete, config)
    datamodule = ReplayDataModule(info.spec, batch_size=batch_size, batch_length=batch_length)
    callbacks = [
        EnvCollector(args.env, train_ratio=train_ratio, prefill=prefill, total_steps=args.steps),
        DreamerCheckpoint(f"{args.dir}/checkpoints", every_env_steps=max(args.steps // 4, 1)),
        EvalCallback(args.env, every_env_steps=max(args.steps // 4, 1), episodes=4),
    ]
    trainer = L.Trainer(devices=args.devices, accelerator=args.accelerator, strategy="ddp",
                        precision=args.precision, max_epochs=-1, callbacks=callbacks, enable_checkpointing=False,
                        logger=MLFlowLogger(experiment_name="lit_dreamer", tracking_uri=args.tracking_uri,
                                            run_name="multidevice"), log_every_n_steps=10)
    trainer.fit(module, datamodule=datamodule)
    if trainer.is_global_zero:
        print(f"env steps {run_step_count(trainer)}, train steps {int(module.train_steps)}")


if __name__ == "__main__":
    main()
