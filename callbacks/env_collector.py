"""EnvCollector: steps the environments between training steps so that the train ratio holds.

The collector owns this rank's envs: `num_envs` envs of each task of the run's task table, stepped
together as one vector env (`lit_dreamer.envs.TaskVectorEnv`; one task is the table of one entry).
Before every training step it steps the envs with the current policy until the fractional credit of
training steps reaches one:

    credit += num_tasks * num_envs * train_ratio / (B * T)    per vector step
    credit -= 1                                               per training step

so that replayed steps / env steps (of all tasks) equals train_ratio exactly over a run, at any ratio, and
the count is per rank (each rank trains on its own replay shard, so the ratio means the same at
any device count). It never steps an environment inside `training_step`.

Collection stops at `total_steps` (run.steps, env steps of all tasks and ranks): a prefill longer
than the run is cut to the run's length, and the steps a training step is owed are not taken past
the end.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torchmetrics import MeanMetric
from typing_extensions import override

from lit_dreamer.callbacks.step_source import StepSource
from lit_dreamer.config import task_metric_name
from lit_dreamer.envs import action_dim, action_kind, close_by_force, env_action, frames_per_step, make_task_vector_env
from lit_dreamer.envs.faults import ERROR_KEY, NONFINITE_KEY, NonFiniteEnvError
from lit_dreamer.envs.text import check_text_growth
from lit_dreamer.evaluation import final_successes
from lit_dreamer.relabel import REWARD_KEY, VALID_KEY, is_hindsight_key

log = logging.getLogger(__name__)


class EnvCollector(StepSource):
    """Collects experience into `trainer.datamodule.replay` from a gymnasium vector env per task.

    Args:
        env_id: an id accepted by `lit_dreamer.envs.make_env` (gymnasium id, `dmc/walker-walk`, `atari/pong`),
            or the task table: a list of such ids, each trained as a task (same spaces), in this order.
        num_envs: envs per task; the vector env and each replay row hold num_tasks * num_envs of them.
        total_steps: env steps over all ranks and tasks after which training stops (None: never).
        prefill: env steps over all ranks and tasks collected with a uniform random policy before training.
        train_ratio: replayed steps per env step.
        nonfinite: what a NaN or inf reward or observation does: "cut" ends that episode as truncated at
            the last finite step (warned once, counted), "error" raises NonFiniteEnvError.
        env_kwargs: passed to `make_env` (obs, action_repeat, image_size, time_limit).
    """

    def __init__(self, env_id: str | Sequence[str], *, num_envs: int = 1, seed: int = 0, train_ratio: float = 512.0,
                 prefill: int = 1000, total_steps: int | None = None, asynchronous: bool = False,
                 nonfinite: str = "cut", **env_kwargs: Any):
        super().__init__()
        if nonfinite not in ("cut", "error"):
            raise ValueError(f"nonfinite must be 'cut' or 'error', got {nonfinite!r}")
        if total_steps is not None and prefill > total_steps:
            log.warning("run.prefill=%d is more than run.steps=%d: prefilling %d steps, so the whole run acts "
                        "randomly", prefill, total_steps, total_steps)
            prefill = total_steps
        self.tasks = [env_id] if isinstance(env_id, str) else list(env_id)
        self.env_id = self.tasks[0]
        # num_envs from here on counts the envs of all tasks: the width of the vector env and of a replay row.
        self.envs_per_task, self.num_envs, self.seed = num_envs, num_envs * len(self.tasks), seed
        self.task_of_env = np.repeat(np.arange(len(self.tasks), dtype=np.int64), num_envs)
        """(num_envs,) the task index of each env, as the replay stores it: task k has envs k*n .. k*n + n - 1."""
        self.train_ratio, self.prefill = train_ratio, prefill
        self.asynchronous, self.nonfinite, self.env_kwargs = asynchronous, nonfinite, env_kwargs
        self.envs = None
        # Counters of this rank, kept in checkpoints.
        self.total_steps = total_steps
        self.env_steps = 0
        self.credit = 0.0
        self.episodes = 0
        self.train_steps_seen = 0
        self.nonfinite_actions = 0
        self.env_restarts = 0
        self.cut_episodes = 0
        self.nonfinite_env_values = 0
        self.hindsight_episodes = 0  # episodes given a hindsight label (reward.hindsight)
        self.label_blank: dict[str, np.ndarray] = {}  # the replay's hindsight keys, zero (set at fit start)
        self.labels: dict[int, dict[str, np.ndarray]] = {}  # hindsight labels of episodes ending at this step
        self.warned_nonfinite = False
        self.best_return = -math.inf
        self.last_return = math.nan
        self.episode_returns = [MeanMetric() for _ in self.tasks]  # per task, for train/<task>/return
        self.episode_lengths = [MeanMetric() for _ in self.tasks]
        self.episode_successes = [MeanMetric() for _ in self.tasks]  # of episodes whose env reports `success`
        self.return_log: list[tuple[int, float]] = []  # (env steps, mean return) as logged, for CollapseWatch
        self.rank, self.world_size = 0, 1
        # Throughput of this process only (a resumed run restarts them).
        self.collect_time = 0.0
        self.session_env_steps = 0
        self.session_train_steps = 0
        self._timer_start = None

    # ----------------------------------------------------------------------------------------------
    # Lightning hooks

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.envs is not None:
            return
        self.rank, self.world_size = trainer.global_rank, trainer.world_size
        check_text_growth(self.env_kwargs.get("vocabularies"), self.asynchronous, self.world_size)
        self.envs = self.make_envs(self.env_seed())
        self.discrete = action_kind(self.envs) == "discrete"
        self.action_size = action_dim(self.envs)
        self.frames_per_step = frames_per_step(self.envs)
        self.rng = np.random.default_rng(self.env_seed())
        for metric in (*self.episode_returns, *self.episode_lengths, *self.episode_successes):
            metric.to(pl_module.device)

    def make_envs(self, seed: int) -> Any:
        # The envs cut at a non-finite value in both modes; in "error" mode the collector then stops.
        return make_task_vector_env(self.tasks, self.envs_per_task, seed=seed, asynchronous=self.asynchronous,
                                    cut_nonfinite=True, **self.env_kwargs)

    def env_seed(self) -> int:
        # Each rank gets its own seeds; each env of a rank gets seed + index inside make_vector_env.
        return self.seed + 10_000 * self.rank

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Not on_train_start: Lightning draws the first batch between the two.
        self.restore_replay(trainer)
        # Hindsight label keys (reward.hindsight): zero in each step as it is recorded, written over an episode's
        # steps once its last step is in (lit_dreamer.relabel).
        spec = trainer.datamodule.replay.spec
        self.label_blank = {key: np.zeros((self.num_envs, *shape), dtype) for key, (shape, dtype) in spec.items()
                            if is_hindsight_key(key)}
        self.reset_envs(pl_module)
        prefill_per_rank = math.ceil(self.prefill / self.world_size)
        batch_length = trainer.datamodule.batch_length
        replay = trainer.datamodule.replay
        # The first batch needs batch_length + 1 steps per env, even in a run shorter than that.
        while len(replay) < max(prefill_per_rank, self.num_envs * (batch_length + 1)):
            if len(replay) >= self.num_envs * (batch_length + 1) and self.budget_spent():
                break
            self.step(trainer, pl_module, random=True)
        # Episodes of the prefill count too (a short run may have no other); against env steps as always.
        self.log_episodes(trainer, self.env_steps * self.world_size)
        self._timer_start = time.perf_counter()

    def run_steps(self, world_size: int) -> int:
        return self.env_steps * world_size

    def budget_spent(self) -> bool:
        """Whether the run's env steps (all ranks) reached total_steps."""
        return self.total_steps is not None and self.env_steps * self.world_size >= self.total_steps

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        dm = trainer.datamodule
        credit_per_step = self.num_envs * self.train_ratio / (dm.batch_size * dm.batch_length)
        # At the end of the run the last training step may be owed a fraction of its env steps: the
        # run stops at total_steps rather than overshoot it.
        while self.credit < 1.0 and not self.budget_spent():
            self.step(trainer, pl_module, random=False)
            self.credit += credit_per_step
        self.credit -= 1.0
        self.train_steps_seen += 1
        self.session_train_steps += 1

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        total = self.env_steps * self.world_size
        # "step" is the x-axis Lightning gives to every metric logged in this batch: env steps.
        pl_module.log("step", float(total), on_step=True, batch_size=1)
        metrics = {"train/env_steps": float(total), "train/frames": float(total * self.frames_per_step),
                   "train/episodes": float(self.episodes * self.world_size),
                   "train/nonfinite_actions": float(self.nonfinite_actions),
                   "train/env_restarts": float(self.env_restarts), "train/cut_episodes": float(self.cut_episodes),
                   "train/nonfinite_env_values": float(self.nonfinite_env_values),
                   **({"train/hindsight_episodes": float(self.hindsight_episodes)} if self.label_blank else {}),
                   "replay/steps": float(len(trainer.datamodule.replay)),
                   "replay/capacity_mb": trainer.datamodule.replay.nbytes / 2**20}
        if self.collect_time > 0:
            # Collector throughput with the current policy (policy forward, env step, replay insert).
            metrics["perf/env_steps_per_s"] = self.session_env_steps / self.collect_time
        if self._timer_start is not None:
            elapsed = time.perf_counter() - self._timer_start
            metrics["perf/train_steps_per_s"] = self.session_train_steps / max(elapsed, 1e-9)
        pl_module.log_dict(metrics, on_step=True, batch_size=1)
        # The progress bar counts env steps itself (callbacks/progress.py).
        bar = {"train_steps": float(pl_module.host_train_steps), "return": self.last_return}
        if "perf/train_steps_per_s" in metrics:
            bar["train_steps/s"] = metrics["perf/train_steps_per_s"]
        pl_module.log_dict(bar, on_step=True, batch_size=1, prog_bar=True, logger=False)
        if self.train_steps_seen % trainer.log_every_n_steps == 0:
            self.log_episodes(trainer, total)
        if self.total_steps is not None and total >= self.total_steps:
            trainer.should_stop = True

    def log_episodes(self, trainer: L.Trainer, env_steps: int) -> None:
        """Mean return and length of the episodes that ended since the last call, over all ranks.

        With several tasks, each task's as train/<task>/return and train/<task>/length, and train/return,
        train/length as the mean over the tasks that ended episodes; train/success (and train/<task>/success)
        likewise where the env reports `success` in its final info. Logged straight to the logger against
        env steps, so that no episode is lost to Lightning's logging interval. Every rank calls compute()
        (it synchronizes) on every task's metric, even with no episodes.
        """
        means, successes = {}, {}
        for task, ret_metric, length_metric, success_metric in zip(self.tasks, self.episode_returns,
                                                                   self.episode_lengths, self.episode_successes):
            ret, length, success = (take_mean(metric) for metric in (ret_metric, length_metric, success_metric))
            if math.isfinite(ret):
                means[task] = (ret, length)
            if math.isfinite(success):
                successes[task] = success
        if not means:
            return
        ret = float(np.mean([r for r, _ in means.values()]))
        metrics = {"train/return": ret, "train/length": float(np.mean([n for _, n in means.values()]))}
        if successes:
            metrics["train/success"] = float(np.mean(list(successes.values())))
        if len(self.tasks) > 1:
            for task, (task_return, task_length) in means.items():
                metrics[f"train/{task_metric_name(task)}/return"] = task_return
                metrics[f"train/{task_metric_name(task)}/length"] = task_length
            for task, task_success in successes.items():
                metrics[f"train/{task_metric_name(task)}/success"] = task_success
        self.return_log.append((env_steps, ret))
        if trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=env_steps)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Episodes that ended after the last logging interval would otherwise never reach the logger.
        self.log_episodes(trainer, self.env_steps * self.world_size)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.envs is not None:
            self.envs.close()
            self.envs = None

    # Counters that are equal on every rank go into the Lightning checkpoint (which holds rank 0's
    # callback state); what differs per rank is saved by DreamerCheckpoint beside the replay shard.
    SHARED_STATE = ("env_steps", "credit", "train_steps_seen")
    RANK_STATE = ("episodes", "nonfinite_actions", "best_return", "last_return", "env_restarts", "cut_episodes",
                  "nonfinite_env_values", "hindsight_episodes")

    def rank_state(self) -> dict[str, Any]:
        """This rank's own counters and RNG state (JSON-able)."""
        state = {key: getattr(self, key) for key in self.RANK_STATE}
        state["rng"] = self.rng.bit_generator.state
        return state

    def load_rank_state(self, state: dict[str, Any]) -> None:
        for key in self.RANK_STATE:
            setattr(self, key, state.get(key, getattr(self, key)))
        self.rng.bit_generator.state = state["rng"]

    # ----------------------------------------------------------------------------------------------
    # Collection

    def restore_replay(self, trainer: L.Trainer) -> None:
        """On resume, load this rank's replay and counters saved beside the checkpoint."""
        ckpt_path = trainer.ckpt_path
        if not ckpt_path:
            return
        folder = os.path.dirname(os.path.abspath(ckpt_path))
        path = os.path.join(folder, f"replay-rank{self.rank}")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"checkpoint {ckpt_path} has no replay for rank {self.rank} at {path}; "
                                    "resume with the same number of devices it was saved with")
        trainer.datamodule.load_replay(path)
        state_file = os.path.join(folder, f"collector-rank{self.rank}.json")
        # Never skipped when missing: this rank's counters and RNG would silently start from zero.
        with open(state_file) as f:
            self.load_rank_state(json.load(f))

    def reset_envs(self, pl_module: L.LightningModule) -> None:
        obs, infos = self.envs.reset(seed=self.env_seed() + self.env_steps)
        n = self.num_envs
        self.obs = obs
        self.reward = np.zeros(n, np.float32)
        self.is_first = np.ones(n, bool)
        self.is_last = np.zeros(n, bool)
        self.is_terminal = np.zeros(n, bool)
        self.prev_action = np.zeros((n, self.action_size), np.float32)
        self.carry = pl_module.initial_carry(n)
        self.running_return = np.zeros(n, np.float64)
        self.running_length = np.zeros(n, np.int64)
        self.cut = np.zeros(n, bool)
        self.success_reported, self.success = np.zeros(n, bool), np.zeros(n, bool)
        self.labels = {}
        self.check_nonfinite(infos, np.zeros(n, bool))  # a first observation CutNonFinite had to reset again for

    def random_actions(self) -> np.ndarray:
        n = self.num_envs
        if self.discrete:
            return np.eye(self.action_size, dtype=np.float32)[self.rng.integers(0, self.action_size, n)]
        return self.rng.uniform(-1.0, 1.0, (n, self.action_size)).astype(np.float32)

    def policy_actions(self, pl_module: L.LightningModule) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        device = pl_module.device
        obs = {k: torch.as_tensor(v, device=device) for k, v in self.obs.items()}
        is_first = torch.as_tensor(self.is_first, device=device)
        task = torch.as_tensor(self.task_of_env, device=device)
        action, self.carry, post = pl_module.act(obs, is_first, self.carry, task=task)
        context = {k: v.cpu().numpy() for k, v in pl_module.context_entries(post).items()}
        action = action.float().cpu().numpy()
        bad = ~np.isfinite(action).all(-1)
        if bad.any():
            # Never send NaN to an environment: act randomly there and count it.
            self.nonfinite_actions += int(bad.sum())
            action[bad] = self.random_actions()[bad]
        return action, context

    def step(self, trainer: L.Trainer, pl_module: L.LightningModule, random: bool) -> None:
        """Pick actions for the current observations, advance the envs, and record the current step.

        The current step goes into the replay after the envs moved, so that if the whole vector env
        died (say, a killed subprocess) it can be recorded as the truncated last step of its episode.
        """
        start = time.perf_counter()
        action, context = (self.random_actions(), None) if random else self.policy_actions(pl_module)
        try:
            result = self.envs.step(env_action(action, self.discrete))
        except Exception as err:  # noqa: BLE001 - whatever killed the envs, collection goes on
            result, failure = None, err
            self.is_last = np.ones(self.num_envs, bool)
            self.cut[:] = True
        keep = (~self.is_first)[:, None]
        record = {**self.obs, "action": self.prev_action * keep, "reward": self.reward, "is_first": self.is_first,
                  "is_last": self.is_last, "is_terminal": self.is_terminal, "task": self.task_of_env,
                  **self.label_blank}
        trainer.datamodule.replay.add(record, context=context)
        self.track_episodes(trainer.datamodule.replay)
        self.env_steps += self.num_envs
        self.session_env_steps += self.num_envs
        if result is None:
            self.restart_envs(pl_module, failure)
        else:
            self.advance(result, action)
        self.collect_time += time.perf_counter() - start

    def advance(self, result: tuple, action: np.ndarray) -> None:
        obs, reward, terminated, truncated, infos = result
        # Gymnasium's NEXT_STEP autoreset: the call after an episode's last step returns the first
        # observation of the next episode (its action is ignored): that step is_first.
        self.is_first = self.is_last.copy()
        self.obs = obs
        self.reward = np.where(self.is_first, 0.0, reward).astype(np.float32)
        self.is_terminal = np.asarray(terminated, bool) & ~self.is_first
        self.is_last = (np.asarray(terminated, bool) | np.asarray(truncated, bool)) & ~self.is_first
        self.prev_action = action.astype(np.float32)
        self.success_reported, self.success = final_successes(infos, self.is_last)
        self.labels = self.take_labels(infos)
        self.check_nonfinite(infos, self.is_last)
        crashed = np.asarray(infos.get(f"_{ERROR_KEY}", np.zeros(self.num_envs, bool)), bool)
        if crashed.any():
            # RestartOnError rebuilt these envs and cut their episodes (truncated, reward 0).
            self.env_restarts += int(crashed.sum())
            self.cut |= crashed
            log.warning("env restarted after an error: %s", [infos[ERROR_KEY][i] for i in np.flatnonzero(crashed)])

    def restart_envs(self, pl_module: L.LightningModule, failure: BaseException) -> None:
        """Replace a vector env that raised (e.g. a dead subprocess) and start new episodes everywhere."""
        self.env_restarts += self.num_envs
        log.warning("vector env failed with %r; restarting all %d envs", failure, self.num_envs)
        try:
            self.envs.close(**({"terminate": True} if self.asynchronous else {}))
        except Exception:  # noqa: BLE001 - closing a broken env may fail too
            close_by_force(self.envs)
        self.envs = self.make_envs(self.env_seed() + 7919 * self.env_restarts)
        self.reset_envs(pl_module)

    def check_nonfinite(self, infos: dict, is_last: np.ndarray) -> None:
        """Count the envs whose step (or reset) held a NaN or inf; stop in "error" mode, else warn once.

        CutNonFinite already replaced such a step by the truncated end of its episode (the last finite
        observation, reward 0): here the episode is marked cut, so its return is not logged.
        """
        flagged = np.asarray(infos.get(f"_{NONFINITE_KEY}", np.zeros(self.num_envs, bool)), bool)
        if not flagged.any():
            return
        self.nonfinite_env_values += int(flagged.sum())
        where = "; ".join(f"env {i}: {infos[NONFINITE_KEY][i]}" for i in np.flatnonzero(flagged))
        at = f"after {self.env_steps * self.world_size} env steps (rank {self.rank}, {where})"
        if self.nonfinite == "error":
            raise NonFiniteEnvError(f"the environment returned a NaN or infinite value {at}; fix the env, or set "
                                    "env.nonfinite=cut to end such episodes as truncated and go on")
        self.cut |= flagged & is_last
        if not self.warned_nonfinite:
            self.warned_nonfinite = True
            log.warning("the environment returned a NaN or infinite value %s; its episode ends there as truncated "
                        "(warned once; counted in train/nonfinite_env_values; env.nonfinite=error stops instead)", at)

    def take_labels(self, infos: dict) -> dict[int, dict[str, np.ndarray]]:
        """{env: its hindsight label's step keys} for the envs whose episode ended with one at this step."""
        if not self.label_blank:
            return {}
        labelled = np.asarray(infos.get(f"_{REWARD_KEY}", np.zeros(self.num_envs, bool)), bool) & self.is_last
        keys = [key for key in self.label_blank if key != VALID_KEY]
        return {int(i): {key: np.asarray(infos[key][i]) for key in keys} for i in np.flatnonzero(labelled)}

    def track_episodes(self, replay: Any) -> None:
        """Count the step just recorded; close the episodes whose last step it was, and write the hindsight
        label of those that have one over their steps in `replay`.

        Episodes cut short by an env crash are counted in train/cut_episodes, not in the returns.
        """
        self.running_return += np.where(self.is_first, 0.0, self.reward)
        self.running_length += 1
        for i in np.flatnonzero(self.is_last):
            if self.cut[i]:
                self.cut_episodes += 1
                continue
            ret, length = float(self.running_return[i]), int(self.running_length[i])
            if i in self.labels:
                self.write_label(replay, i, length, self.labels.pop(i))
            self.episode_returns[self.task_of_env[i]].update(ret)
            self.episode_lengths[self.task_of_env[i]].update(length)
            if self.success_reported[i]:
                self.episode_successes[self.task_of_env[i]].update(float(self.success[i]))
            self.episodes += 1
            self.last_return = ret
            self.best_return = max(self.best_return, ret)
        self.running_return[self.is_last] = 0.0
        self.running_length[self.is_last] = 0
        self.cut[self.is_last] = False

    def write_label(self, replay: Any, env: int, length: int, label: dict[str, np.ndarray]) -> None:
        """An episode's hindsight label over its `length` steps in the replay: its instruction's token ids at every
        step, its reward on the last step only (lit_dreamer.relabel)."""
        rewards = np.zeros(length, np.float32)
        rewards[-1] = label.pop(REWARD_KEY)
        replay.write_recent(env, length, {**label, REWARD_KEY: rewards, VALID_KEY: True})
        self.hindsight_episodes += 1


def take_mean(metric: MeanMetric) -> float:
    """The metric's mean over all ranks (NaN when no rank updated it), then reset."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # compute() before update() on a rank without episodes
        value = float(metric.compute())
    metric.reset()
    return value


def find_collector(trainer: L.Trainer) -> StepSource:
    """The run's StepSource among the trainer's callbacks: its EnvCollector, or an offline run's OfflineReplay."""
    for callback in trainer.callbacks:
        if isinstance(callback, StepSource):
            return callback
    raise RuntimeError("this callback needs an EnvCollector (or OfflineReplay) callback in the same Trainer")


def run_step_count(trainer: L.Trainer) -> int:
    """The run's step count over all ranks: env steps (every rank steps the same number of envs in lockstep),
    or in an offline run, which steps no env, gradient steps."""
    return find_collector(trainer).run_steps(trainer.world_size)


class EnvStepSchedule:
    """Due once per `every` env steps: at the first check at or past each multiple of `every`."""

    def __init__(self, every: int):
        self.every, self.next_at = every, every

    def due(self, env_steps: int) -> bool:
        if env_steps < self.next_at:
            return False
        self.next_at = (env_steps // self.every + 1) * self.every
        return True
