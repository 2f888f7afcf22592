"""EvalCallback: every N env steps, run evaluation episodes in separate envs and log eval/return."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lit_dreamer.callbacks.env_collector import EnvStepSchedule, total_env_steps
from lit_dreamer.envs import make_vector_env
from lit_dreamer.evaluation import run_episodes


class EvalCallback(Callback):
    """Evaluate the policy (its mode by default) on `episodes` fresh episodes every `every_env_steps`.

    Runs on global rank 0 only, between training steps; the other ranks wait at the next collective.
    Logs eval/return (mean), eval/return_std, eval/return_min, eval/return_max, eval/length against
    env steps, and at the end of training once more.
    """

    def __init__(self, env_id: str, *, every_env_steps: int = 5000, episodes: int = 10, mode: str = "mode",
                 seed: int = 1_000_000, **env_kwargs: Any):
        super().__init__()
        self.env_id, self.episodes, self.mode = env_id, episodes, mode
        self.seed, self.env_kwargs = seed, env_kwargs
        self.schedule = EnvStepSchedule(every_env_steps)
        self.evaluations = 0
        self.history: list[tuple[int, dict[str, float]]] = []

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        steps = total_env_steps(trainer)
        if self.schedule.due(steps):
            self.evaluate(trainer, pl_module, steps)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        steps = total_env_steps(trainer)
        if not self.history or self.history[-1][0] != steps:
            self.evaluate(trainer, pl_module, steps)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, env_steps: int) -> dict[str, float] | None:
        if not trainer.is_global_zero:
            return None
        envs = make_vector_env(self.env_id, self.episodes, seed=self.seed + 1000 * self.evaluations,
                               **self.env_kwargs)
        try:
            stats = run_episodes(pl_module, envs, mode=self.mode, seed=self.seed + 1000 * self.evaluations)
        finally:
            envs.close()
        self.evaluations += 1
        summary = stats.summary()
        self.history.append((env_steps, summary))
        if trainer.logger is not None:
            metrics = {f"eval/{k}": float(v) for k, v in summary.items() if k != "episodes"}
            trainer.logger.log_metrics(metrics, step=env_steps)
        return summary

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"next_at": self.schedule.next_at, "evaluations": self.evaluations}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.schedule.next_at, self.evaluations = state_dict["next_at"], state_dict["evaluations"]
