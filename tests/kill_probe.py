"""Test helper (not collected by pytest): run the real CLI, but SIGKILL this process at a chosen point of
the N-th checkpoint save, the way a crash or an OOM killer would.

    python tests/kill_probe.py POINT N fit -c debug ...

POINT: replay_write (half-way through writing the replay snapshot), model_write (after part of
model.ckpt.tmp is on disk), link_swap (model.ckpt in place, `last` not yet moved).
"""

from __future__ import annotations

import os
import signal
import sys

import lightning.pytorch.plugins.io.torch_plugin as torch_io

import lit_dreamer.replay as replay_module
from lit_dreamer.__main__ import main


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str, save_number: int) -> None:
    counts = {"replay_saves": 0, "arrays": 0, "models": 0}
    original_save = replay_module.Replay.save
    original_array = replay_module._save_array
    original_model = torch_io.TorchCheckpointIO.save_checkpoint
    original_replace = os.replace

    def save(self, path):
        counts["replay_saves"] += 1
        counts["arrays"] = 0
        return original_save(self, path)

    def save_array(path, array):
        counts["arrays"] += 1
        if point == "replay_write" and counts["replay_saves"] == save_number and counts["arrays"] == 2:
            with open(path, "wb") as f:
                f.write(b"\x93NUMPY partial")
            die()
        return original_array(path, array)

    def save_model(self, checkpoint, path, storage_options=None):
        counts["models"] += 1
        if point == "model_write" and counts["models"] == save_number:
            with open(path, "wb") as f:
                f.write(b"PK\x03\x04 partial zip")
            die()
        return original_model(self, checkpoint, path, storage_options)

    def replace(src, dst, *args, **kwargs):
        if point == "link_swap" and str(dst).endswith(os.sep + "last") and counts["models"] == save_number:
            die()
        return original_replace(src, dst, *args, **kwargs)

    replay_module.Replay.save = save
    replay_module._save_array = save_array
    torch_io.TorchCheckpointIO.save_checkpoint = save_model
    os.replace = replace


if __name__ == "__main__":
    install(sys.argv[1], int(sys.argv[2]))
    sys.exit(main(sys.argv[3:]))
