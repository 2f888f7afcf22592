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


# ------------------------------------------------------------------------------------------------
# Batches to the device: pinned and non-blocking on CUDA, untouched on the CPU.

def sampled_on(datamodule: ReplayDataModule, device: str, monkeypatch) -> dict[str, torch.Tensor]:
    """A batch drawn and transferred as for a trainer on `device` (faked: no trainer is attached)."""
    monkeypatch.setattr(ReplayDataModule, "target_device", lambda self: torch.device(device))
    batch = datamodule.sample_batch()
    return datamodule.transfer_batch_to_device(batch, torch.device(device), 0)


def spy_transfers(monkeypatch, cuda: bool) -> dict[str, list]:
    """Record pin_memory() and .to(device, non_blocking) calls; tensors stay where they are."""
    calls = {"pinned": [], "to": []}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)

    def pin_memory(tensor, *args, **kwargs):
        calls["pinned"].append(tuple(tensor.shape))
        return tensor

    def to(tensor, device, *args, non_blocking=False, **kwargs):
        calls["to"].append((str(device), non_blocking))
        return tensor

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "to", to)
    return calls


def test_batches_for_cuda_are_pinned_and_copied_without_blocking_except_the_host_only_index(monkeypatch):
    _, datamodule = tiny_parts()
    calls = spy_transfers(monkeypatch, cuda=True)
    batch = sampled_on(datamodule, "cuda", monkeypatch)
    moved = [key for key in batch if key != "index"]
    assert len(calls["pinned"]) == len(batch)  # every host tensor of the batch, index included
    assert calls["to"] == [("cuda", True)] * len(moved)


def test_batches_for_the_cpu_are_neither_pinned_nor_copied_asynchronously(monkeypatch):
    _, datamodule = tiny_parts()
    calls = spy_transfers(monkeypatch, cuda=True)  # even with a GPU present, a CPU run pins nothing
    sampled_on(datamodule, "cpu", monkeypatch)
    assert calls["pinned"] == [] and all(not non_blocking for _, non_blocking in calls["to"])


def test_the_trainer_moves_batches_through_the_datamodule_and_leaves_the_index_on_the_host(monkeypatch):
    module, datamodule = tiny_parts()
    assert "transfer_batch_to_device" in vars(ReplayDataModule)  # its own hook, not Lightning's default
    seen = []
    original = datamodule.transfer_batch_to_device

    def transfer(batch, device, dataloader_idx):
        seen.append(device)
        return original(batch, device, dataloader_idx)

    datamodule.transfer_batch_to_device = transfer
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=datamodule)
    assert seen == [torch.device("cpu")]


# ------------------------------------------------------------------------------------------------
# replay.device=auto: the steps kept and sampled on the accelerator.

def test_device_replay_draws_the_batches_of_the_host_replay_and_follows_its_additions():
    """On the CPU the device copy is just another copy: it must give the host's batches, bit for bit,
    while the replay keeps growing and wraps its ring (few rows per refresh, then a whole ring)."""
    from lit_dreamer.data import DeviceReplay
    from lit_dreamer.replay import Replay
    from lit_dreamer.sampling import ReplayConfig

    spec = {"obs": ((3,), np.float32), "action": ((2,), np.float32), "reward": ((), np.float32),
            "is_first": ((), np.bool_), "is_last": ((), np.bool_), "is_terminal": ((), np.bool_)}
    host, mirrored = (Replay(spec, ReplayConfig(capacity=40), num_envs=2, seed=3) for _ in range(2))
    device = DeviceReplay(mirrored, torch.device("cpu"))
    rng = np.random.default_rng(0)
    for additions in (6, 1, 3, 25, 0, 40):
        for _ in range(additions):
            step = random_step(spec, 2, rng, 2, False)
            host.add(step), mirrored.add(step)
        expected, got = host.sample(5, 4), device.sample(5, 4)
        assert expected.keys() == got.keys()
        for key in expected:
            np.testing.assert_array_equal(got[key].numpy(), expected[key], err_msg=key)


def test_replay_device_auto_samples_on_the_trainers_accelerator_and_cpu_runs_are_unchanged(monkeypatch):
    import dataclasses
    _, datamodule = tiny_parts()
    datamodule.settings = dataclasses.replace(datamodule.settings, device="auto")
    # A trainer on the CPU: the host path, exactly what replay.device=cpu gives.
    on_cpu = sampled_on(datamodule, "cpu", monkeypatch)
    assert all(value.device.type == "cpu" for value in on_cpu.values())
    # An accelerator (the meta device stands in): step keys are gathered there, small keys come from the host.
    monkeypatch.setattr(ReplayDataModule, "target_device", lambda self: torch.device("meta"))
    batch = datamodule.sample_batch()
    step_keys = set(datamodule.replay.storage)
    assert {key for key, value in batch.items() if value.device.type == "meta"} == step_keys
    assert all(batch[key].shape == on_cpu[key].shape for key in step_keys)
    assert batch["index"].device.type == "cpu" and batch["context_valid"].device.type == "cpu"
    # A replay restored on resume replaces the old one: the device copy follows it.
    first_copy = datamodule._device_replay
    datamodule.replay = datamodule.new_replay()
    for step in range(8):
        datamodule.replay.add(random_step(datamodule.spec, 1, np.random.default_rng(step), 2, True))
    datamodule.sample_batch()
    assert datamodule._device_replay is not first_copy and datamodule._device_replay.replay is datamodule.replay


@pytest.mark.parametrize("value", ["gpu", "cuda", "tpu"])
def test_an_unknown_replay_device_is_a_config_error_naming_the_choices(value):
    from lit_dreamer.config import ConfigError
    with pytest.raises(ConfigError, match=r"replay.device must be one of cpu, auto"):
        load_config(["debug"], [f"replay.device={value}"])


# ------------------------------------------------------------------------------------------------
# bench: phases and whole steps are timed between CUDA synchronizations.

def test_phase_timer_synchronizes_cuda_at_both_ends_of_every_phase(monkeypatch):
    from lit_dreamer.timing import PhaseTimer
    syncs = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: syncs.append("sync"))
    timer = PhaseTimer(enabled=True)
    for name in ("world_model", "imagination", "backward"):
        with timer(name):
            syncs.append(name)
    assert syncs == ["sync", "world_model", "sync", "sync", "imagination", "sync", "sync", "backward", "sync"]
    syncs.clear()
    with PhaseTimer(enabled=False)("world_model"):  # off (training runs): no sync at all
        pass
    assert syncs == []


def test_bench_step_timer_synchronizes_cuda_at_the_start_and_end_of_each_step(monkeypatch):
    from types import SimpleNamespace
    from lit_dreamer.bench import StepTimer
    from lit_dreamer.timing import PhaseTimer
    syncs = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: syncs.append("sync"))
    timer, module = StepTimer(warmup=1, steps=1), SimpleNamespace(timer=PhaseTimer())
    timer.on_train_batch_start(None, module, None, 1)
    assert syncs == ["sync"]
    timer.on_train_batch_end(None, module, None, None, 1)
    assert syncs == ["sync", "sync"] and len(timer.durations) == 1
