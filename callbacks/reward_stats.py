"""RewardStats: the language-model judge's counters (requests, failures, cache hits) as MLflow metrics.

The judge lives in this process (`lit_dreamer.rewards.shared_judge`, the one `JudgedRewards` asks), so its
counters are read here directly rather than threaded through the envs' infos and the collector. Logged
against env steps every run.log_every training steps and at the end; a resumed run goes on from the
checkpointed totals. Under DDP each rank has its own judge and rank 0's counts are logged.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lit_dreamer.callbacks.env_collector import run_step_count
from lit_dreamer.rewards.llm import LLMJudge


class RewardStats(Callback):
    """Logs reward/llm_calls, reward/llm_failures and reward/llm_cache_hits (totals over the run)."""

    def __init__(self, judge: LLMJudge, every: int = 10):
        super().__init__()
        self.judge, self.every = judge, every
        self.saved: dict[str, float] = {}   # totals of earlier sessions of this run (from the checkpoint)
        self.start: dict[str, float] = {}   # the judge's counts when this session began (it may outlive a fit)
        self.batches = 0

    def totals(self) -> dict[str, float]:
        now = self.judge.stats()
        return {key: self.saved.get(key, 0.0) + value - self.start.get(key, 0.0) for key, value in now.items()}

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Before any hook steps the envs: the collector's prefill runs in its on_fit_start.
        self.start = self.judge.stats()

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.batches += 1
        if self.batches % self.every == 0:
            self.log_counts(trainer)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.log_counts(trainer)

    def log_counts(self, trainer: L.Trainer) -> None:
        if trainer.logger is not None and trainer.is_global_zero:
            trainer.logger.log_metrics(self.totals(), step=run_step_count(trainer))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"totals": self.totals()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.saved = dict(state_dict["totals"])
