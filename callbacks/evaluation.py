"""EvalCallback: every N env steps, run evaluation episodes of every task in separate envs and log eval/return."""

from __future__ import annotations

from typing import Any, Sequence

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lit_dreamer.callbacks.env_collector import EnvStepSchedule, run_step_count
from lit_dreamer.config import task_metric_name
from lit_dreamer.evaluation import EpisodeStats, task_episodes


class EvalCallback(Callback):
    """Evaluate the policy (its mode by default) on `episodes` fresh episodes every `every_env_steps`.

    Runs on global rank 0 only, between training steps; the other ranks wait at the next collective.
    Logs eval/return (mean), eval/return_std, eval/return_min, eval/return_max, eval/length against
    env steps, and at the end of training once more; eval/success (the fraction of successful
    episodes) too when the env reports `success` in the final info of its episodes. `env_id` may be
    the task table (a list of ids): then `episodes` run for each task, eval/<task>/return and
    eval/<task>/length (and eval/<task>/success) are logged per task, and eval/* are over the
    episodes of all tasks (eval/return is the mean of the tasks' means, since every task runs as
    many episodes).
    """

    def __init__(self, env_id: str | Sequence[str], *, every_env_steps: int = 5000, episodes: int = 10,
                 mode: str = "mode", seed: int = 1_000_000, **env_kwargs: Any):
        super().__init__()
        self.tasks = [env_id] if isinstance(env_id, str) else list(env_id)
        self.env_id, self.episodes, self.mode = self.tasks[0], episodes, mode
        self.seed, self.env_kwargs = seed, env_kwargs
        self.schedule = EnvStepSchedule(every_env_steps)
        self.evaluations = 0
        self.history: list[tuple[int, dict[str, float]]] = []

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        steps = run_step_count(trainer)
        if self.schedule.due(steps):
            self.evaluate(trainer, pl_module, steps)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        steps = run_step_count(trainer)
        if not self.history or self.history[-1][0] != steps:
            self.evaluate(trainer, pl_module, steps)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, env_steps: int) -> dict[str, float] | None:
        if not trainer.is_global_zero:
            return None
        per_task = [self.run_task(pl_module, k) for k in range(len(self.tasks))]
        self.evaluations += 1
        pooled = EpisodeStats.pooled(per_task)
        summary: dict[str, float] = pooled.summary()
        if len(self.tasks) > 1:
            for task, stats in zip(self.tasks, per_task):
                task_summary = stats.summary()
                for key in ("return", "length", "success"):
                    if key in task_summary:  # success only where the env reports it
                        summary[f"{task_metric_name(task)}/{key}"] = task_summary[key]
        self.history.append((env_steps, summary))
        if trainer.logger is not None:
            metrics = {f"eval/{k}": float(v) for k, v in summary.items() if k != "episodes"}
            trainer.logger.log_metrics(metrics, step=env_steps)
        return summary

    def run_task(self, pl_module: L.LightningModule, task: int) -> EpisodeStats:
        """`episodes` episodes of task number `task`, on seeds of their own (task 0: the one-task seeds)."""
        return task_episodes(pl_module, self.tasks[task], self.episodes, seed=self.seed + 1000 * self.evaluations,
                             index=task, mode=self.mode, policy=task, **self.env_kwargs)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"next_at": self.schedule.next_at, "evaluations": self.evaluations}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.schedule.next_at, self.evaluations = state_dict["next_at"], state_dict["evaluations"]
