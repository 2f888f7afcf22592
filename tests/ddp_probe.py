"""Test helper (not collected by pytest): run `python -m lit_dreamer fit ...` through the real CLI with one
extra callback that writes, per rank, a checksum of the parameters and the collector's counters at the end
of training. Under DDP Lightning re-runs this script for every rank, so each rank gets the probe.

    python tests/ddp_probe.py OUT_DIR fit -c debug trainer.devices=2 ...
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import lightning as L

import lit_dreamer.train as train
from lit_dreamer.__main__ import main


def checksum(module: L.LightningModule) -> str:
    digest = hashlib.sha256()
    for name, param in sorted(module.named_parameters(), key=lambda item: item[0]):
        digest.update(name.encode())
        digest.update(param.detach().cpu().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


class ParameterProbe(L.Callback):
    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.initial_params = checksum(pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        collector = next(cb for cb in trainer.callbacks if isinstance(cb, train.EnvCollector))
        report = {"rank": trainer.global_rank, "world_size": trainer.world_size,
                  "initial_params": self.initial_params, "params": checksum(pl_module),
                  "train_steps": int(pl_module.train_steps), "skipped_steps": int(pl_module.skipped_steps),
                  "env_steps": collector.env_steps, "replay_len": len(trainer.datamodule.replay)}
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump(report, f)


def build_with_probe(cfg, _build=train.build):
    module, datamodule, callbacks, info = _build(cfg)
    return module, datamodule, [*callbacks, ParameterProbe(OUT_DIR)], info


if __name__ == "__main__":
    OUT_DIR = sys.argv[1]
    train.build = build_with_probe
    sys.exit(main(sys.argv[2:]))
