"""`python -m lit_dreamer bench`: time real training steps and the collector of the configured agent.

The training steps run through the real Lightning Trainer and DreamerModule on a replay filled with
random data of the env's shapes (the env is used for its spaces); the collector is timed on the
real envs with the current policy. The last line printed is one JSON object.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.flop_counter import FlopCounterMode

from lit_dreamer.callbacks import EnvCollector
from lit_dreamer.config import Config, task_names
from lit_dreamer.data import ReplayDataModule
from lit_dreamer.envs.text import TextVocabularies
from lit_dreamer.module import DreamerModule
from lit_dreamer.options import at_least, checked
from lit_dreamer.sampling import ReplayConfig
from lit_dreamer.train import probe_env
from lit_dreamer.timing import PhaseTimer, synchronize


@dataclass
class BenchConfig:
    """How long to measure."""

    steps: int = checked(5, at_least(1))
    """Timed training steps (at least 1)."""
    warmup: int = checked(2, at_least(1))
    """Untimed training steps first (allocations, lazy init, compilation); at least 1, the FLOP count runs on the last."""
    collector_steps: int = checked(200, at_least(0))
    """Timed env steps of the collector with the current policy."""
    profile_steps: int = checked(0, at_least(0))
    """Extra training steps after the timed ones, run under torch.profiler: per-op table (self CPU time)."""


TEXTS = 32


def random_step(spec: dict, num_envs: int, rng: np.random.Generator, action_dim: int, discrete: bool,
                text_vocab: int = 2) -> dict:
    """One vector step of random data with the shapes and dtypes of a replay step (integer observation keys are
    text token ids below `text_vocab`: one of TEXTS fixed random texts, as instructions repeat in a run, which
    model.text_encoder=minilm then embeds once each)."""
    step = {}
    for key, (shape, dtype) in spec.items():
        dtype = np.dtype(dtype)
        if key == "action":
            step[key] = (np.eye(action_dim, dtype=np.float32)[rng.integers(0, action_dim, num_envs)] if discrete
                         else rng.uniform(-1, 1, (num_envs, action_dim)).astype(np.float32))
        elif key == "task":
            step[key] = np.arange(num_envs, dtype=dtype)  # stream k holds task k, as the collector lays them out
        elif dtype == np.uint8:
            step[key] = rng.integers(0, 256, (num_envs, *shape), dtype=np.uint8)
        elif np.issubdtype(dtype, np.integer):
            texts = np.random.default_rng(0).integers(0, text_vocab, (TEXTS, *shape), dtype=dtype)
            step[key] = texts[rng.integers(0, TEXTS, num_envs)]
        elif dtype == np.bool_:
            # Episodes of about 100 steps, so resets inside sequences are exercised.
            step[key] = rng.random((num_envs, *shape)) < (0.01 if key in ("is_first", "is_last") else 0.0)
        else:
            step[key] = rng.standard_normal((num_envs, *shape)).astype(dtype)
    return step


class StepTimer(Callback):
    """Times whole training steps after the warmup, counts the FLOPs of one of them and optionally
    profiles a few more after the timed ones (so the profiler's overhead is not in the timings)."""

    def __init__(self, warmup: int, steps: int, profile_steps: int = 0):
        self.warmup, self.steps, self.profile_steps = warmup, steps, profile_steps
        self.durations: list[float] = []
        self.cpu_durations: list[float] = []  # the process's CPU time: what other load on the machine moves least
        self.phases: dict[str, float] = {}
        self.flops = 0
        self.profile: torch.profiler.profile | None = None
        self._counter: FlopCounterMode | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            pl_module.timer.reset()
        if batch_idx == self.warmup - 1:  # count FLOPs (which slows the step down) on the last untimed step
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()
        if batch_idx == self.warmup + self.steps and self.profile_steps:
            self.profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.profile.__enter__()
        synchronize()  # the step starts with nothing queued and ends when its last kernel does
        self._start, self._cpu_start = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        synchronize()
        elapsed, cpu = time.perf_counter() - self._start, time.process_time() - self._cpu_start
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.flops = self._counter.get_total_flops()
            self._counter = None
        if self.warmup <= batch_idx < self.warmup + self.steps:
            self.durations.append(elapsed)
            self.cpu_durations.append(cpu)
        if batch_idx == self.warmup + self.steps - 1:
            self.phases = pl_module.timer.mean()
        if batch_idx == self.warmup + self.steps + self.profile_steps - 1 and self.profile is not None:
            self.profile.__exit__(None, None, None)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def bench(cfg: Config, options: BenchConfig) -> dict[str, Any]:
    L.seed_everything(cfg.run.seed, verbose=False)
    vocabularies = TextVocabularies(cfg.model.text_vocab)
    info, num_tasks = probe_env(cfg, vocabularies), len(task_names(cfg))
    module = DreamerModule(info.obs_spec, info.action_dim, info.discrete, cfg.agent(), compile=cfg.run.compile,
                           num_tasks=num_tasks, text_words=vocabularies.words(), one_hot=info.one_hot)
    module.timer.enabled = True
    B, T = cfg.run.batch_size, cfg.run.batch_length
    # One stream per task (the collector's layout with one env each), batches balanced as in training.
    settings = ReplayConfig(capacity=max(4 * T, 2048) * num_tasks, device=cfg.replay.device,
                            task_balance=cfg.replay.task_balance)
    datamodule = ReplayDataModule(info.spec, settings, num_envs=num_tasks, batch_size=B, batch_length=T,
                                  seed=cfg.run.seed, num_tasks=num_tasks)
    datamodule.setup("fit")
    rng = np.random.default_rng(cfg.run.seed)
    for _ in range(datamodule.replay.capacity // num_tasks):
        datamodule.replay.add(random_step(info.spec, num_tasks, rng, info.action_dim, info.discrete,
                                          cfg.model.text_vocab))

    timer = StepTimer(options.warmup, options.steps, options.profile_steps)
    trainer_kwargs = {k: v for k, v in cfg.trainer.items() if k in ("accelerator", "devices", "precision", "strategy")}
    # Under manual optimization global_step counts optimizer steps: 3 per training step.
    trainer = L.Trainer(**trainer_kwargs, max_steps=3 * (options.warmup + options.steps + options.profile_steps),
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[timer], num_sanity_val_steps=0)
    trainer.fit(module, datamodule=datamodule)
    phases = dict(timer.phases)
    phases["replay_sampling"] = time_sampling(datamodule)

    env_steps_per_s, collector_time = time_collector(cfg, trainer, module, options.collector_steps)
    phases["collector_per_env_step"] = collector_time
    step_time = float(np.mean(timer.durations))
    ac = module.actor_critic
    # The strategy's device, not the module's: Lightning moves the module back to the CPU when fit ends.
    result = {
        "train_steps_per_s": 1.0 / step_time,
        "seconds_per_train_step": step_time,
        "cpu_seconds_per_train_step": float(np.mean(timer.cpu_durations)),
        "env_steps_per_s": env_steps_per_s,
        "params": {"world_model": count(module.world_model), "actor": count(ac.actor), "critic": count(ac.critic)},
        "flops_per_step": timer.flops,
        "achieved_gflops": timer.flops / step_time / 1e9,
        "phases_seconds": phases,
        "config": {
            "env": ",".join(task_names(cfg)),
            "obs": cfg.env.obs, "size": cfg.model.size, "model": vars(cfg.model.resolved()),
            "batch": B, "length": T, "horizon": cfg.behavior.horizon,
            "device": str(trainer.strategy.root_device), "precision": str(trainer.precision),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
    }
    if timer.profile is not None:
        result["profile"] = profile_rows(timer.profile, options.profile_steps)
    return result


def time_sampling(datamodule: ReplayDataModule, batches: int = 20) -> float:
    """Seconds per batch as training draws it (on the trainer's device with replay.device=auto), with
    the host-to-device copy of the batch included."""
    sample_timer = PhaseTimer(enabled=True)
    device = datamodule.target_device()
    for _ in range(batches):
        with sample_timer("replay_sampling"):
            datamodule.transfer_batch_to_device(datamodule.sample_batch(), device, 0)
    return sample_timer.mean()["replay_sampling"]


def profile_rows(profile: torch.profiler.profile, steps: int, top: int = 25) -> list[dict[str, Any]]:
    """The ops with the most self CPU time, per training step."""
    events = sorted(profile.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps, "calls_per_step": e.count / steps}
            for e in events]


def time_collector(cfg: Config, trainer: L.Trainer, module: DreamerModule, steps: int) -> tuple[float, float]:
    """Env steps per second of the collector acting with the current policy, and seconds per env step."""
    tasks = task_names(cfg)
    collector = EnvCollector(tasks, num_envs=cfg.env.num_envs, seed=cfg.run.seed, **cfg.env.make_kwargs())
    collector.setup(trainer, module, "fit")
    try:
        collector.reset_envs(module)
        collector.step(trainer, module, random=False)  # first call allocates
        start = time.perf_counter()
        vector_steps = max(1, steps // (cfg.env.num_envs * len(tasks)))
        for _ in range(vector_steps):
            collector.step(trainer, module, random=False)
        elapsed = time.perf_counter() - start
    finally:
        collector.teardown(trainer, module, "fit")
    env_steps = vector_steps * cfg.env.num_envs * len(tasks)
    return env_steps / elapsed, elapsed / env_steps


def main(cfg: Config, options: BenchConfig) -> dict:
    result = bench(cfg, options)
    phases = result["phases_seconds"]
    print(f"{result['train_steps_per_s']:.3f} train steps/s ({result['seconds_per_train_step']:.3f} s/step), "
          f"{result['env_steps_per_s']:.1f} env steps/s, {result['achieved_gflops']:.1f} GFLOP/s")
    print("per step: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in phases.items()))
    for row in result.get("profile", []):
        print(f"  {row['self_ms_per_step']:9.1f} ms {row['calls_per_step']:7.0f} calls  {row['op']}")
    print(json.dumps(result))
    return result
