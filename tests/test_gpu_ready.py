"""GPU readiness, checked on the CPU: host-device syncs of one training step, pinned non-blocking batch
transfer, replay.device, and the phase timer's CUDA synchronization.

There is no GPU in CI: a sync is caught here by counting the calls that would force one on an accelerator
(a tensor read on the host: `.item()`, `bool(t)`, `float(t)`, `int(t)`, `.tolist()`, `.numpy()`, `.cpu()`,
`.to("cpu")`), each counted with the stack line that made it.
"""

from __future__ import annotations

import collections
import traceback

import lightning as L
import numpy as np
import pytest
import torch

from lit_dreamer.bench import random_step
from lit_dreamer.config import load_config
from lit_dreamer.data import ReplayDataModule
from lit_dreamer.module import DreamerModule
from lit_dreamer.train import probe_env

# Host reads of a tensor: each would wait for the accelerator to finish everything queued before it.
HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")

# The host reads one training step may make, with the reason for each. Anything else is a regression.
ALLOWED = {
    # The skip decision: the optimizers step only if every loss and gradient norm is finite on every rank.
    # Deciding on the device would need a torch.where over every parameter and both LaProp moments
    # (3x the parameters read and written again per step), so the one sync stays (docs/performance.md).
    ("module.py", "all_finite"): 1,
}


class HostReadCounter:
    """Counts host reads of tensors by (file, function) of the lit_dreamer frame that made them."""

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()
        self.where: dict[tuple[str, str], str] = collections.defaultdict(str)
        self.active = False

    def patch(self, monkeypatch) -> None:
        for name in HOST_READS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))
        original_to, original_tensor = torch.Tensor.to, torch.tensor

        def to(tensor, *args, **kwargs):
            # On a CPU-only machine every device is "cpu": only an explicit host move can be told apart.
            target = kwargs.get("device", args[0] if args else None)
            if target == "cpu":
                self._record('to("cpu")')
            return original_to(tensor, *args, **kwargs)

        def tensor(data, *args, **kwargs):
            # Host data made into a tensor: on CUDA a blocking copy to the device (a stream sync), either
            # here (device=...) or when it meets device tensors in self.log.
            self._record("torch.tensor")
            return original_tensor(data, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "to", to)
        monkeypatch.setattr(torch, "tensor", tensor)
        monkeypatch.setattr(torch, "as_tensor", self._wrap("torch.as_tensor", torch.as_tensor))

    def _wrap(self, name, function):
        def counted(*args, **kwargs):
            self._record(name)
            return function(*args, **kwargs)
        return counted

    def _record(self, name: str) -> None:
        if not self.active:
            return
        # Attribute the read to the innermost frame of our own code (Lightning's reads are logging).
        for frame in reversed(traceback.extract_stack()[:-2]):
            if "/lit_dreamer/" in frame.filename:
                key = (frame.filename.rsplit("/", 1)[-1], frame.name)
                self.where.setdefault(key, f"{name} at line {frame.lineno}")
                break
        else:
            key = ("<outside lit_dreamer>", name)
        self.counts[key] += 1


def tiny_parts(seed: int = 0):
    """The debug-sized module and a datamodule whose replay is full of random steps of CartPole's shapes."""
    cfg = load_config(["debug"], ["run.batch_size=2", "run.batch_length=4"])
    L.seed_everything(seed, verbose=False)
    info = probe_env(cfg)
    module = DreamerModule(info.obs_spec, info.action_dim, info.discrete, cfg.agent())
    datamodule = ReplayDataModule(info.spec, cfg.replay, batch_size=2, batch_length=4, seed=seed)
    datamodule.setup("fit")
    rng = np.random.default_rng(seed)
    for _ in range(16):
        datamodule.replay.add(random_step(info.spec, 1, rng, info.action_dim, info.discrete))
    return module, datamodule


def count_training_step_reads(monkeypatch, steps: int = 2) -> HostReadCounter:
    """Run `steps` real training steps through a Trainer; count host reads inside training_step only.

    Two steps, so the second runs with state (optimizer moments, counters) already allocated.
    """
    module, datamodule = tiny_parts()
    counter = HostReadCounter()
    counter.patch(monkeypatch)
    original = module.training_step

    def training_step(batch, batch_idx):
        counter.active = batch_idx == steps - 1
        try:
            return original(batch, batch_idx)
        finally:
            counter.active = False

    module.training_step = training_step
    trainer = L.Trainer(accelerator="cpu", max_steps=3 * steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=datamodule)
    assert int(module.train_steps) == steps
    return counter


def test_one_training_step_reads_the_device_only_where_allowed(monkeypatch):
    counter = count_training_step_reads(monkeypatch)
    found = dict(counter.counts)
    unexpected = {key: (n, counter.where[key]) for key, n in found.items() if n > ALLOWED.get(key, 0)}
    assert not unexpected, f"host-device syncs in the training step beyond {ALLOWED}: {unexpected}"
    assert found == ALLOWED, f"the allowed sync is gone or moved: {found}; update ALLOWED and the docs"


def test_the_host_mirror_of_train_steps_follows_the_checkpointed_buffer():
    module, _ = tiny_parts()
    state = module.state_dict()
    state["train_steps"] = torch.tensor(7)
    module.load_state_dict(state)
    assert module.host_train_steps == 7
    module.count_step()
    assert module.host_train_steps == int(module.train_steps) == 8
