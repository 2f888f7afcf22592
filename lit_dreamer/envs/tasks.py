"""Several tasks stepped as one vector env: the collector's view of a run's task table.

``make_task_vector_env(tasks, n, ...)`` builds one gymnasium vector env of ``n`` envs per task and
joins them side by side: sub-env ``k * n + j`` is env ``j`` of task ``k``, and ``.task`` (K * n,)
says which task each sub-env runs. A one-task run is the table of one entry, so every run goes
through this path. All tasks must share their observation and action spaces (``check_same_spaces``).
"""

from __future__ import annotations

from typing import Any, Sequence

import gymnasium as gym
import numpy as np

from lit_dreamer.envs.make import close_by_force, make_vector_env

TASK_SEED_STRIDE = 100_003
"""Seeds of task k's envs start at seed + k * TASK_SEED_STRIDE (task 0 keeps the one-task seeds)."""


def check_same_spaces(named_envs: Sequence[tuple[str, Any]]) -> None:
    """ValueError naming the first two tasks whose observation or action spaces differ.

    Takes (task, env) pairs of single or vector envs. This version trains tasks of one body only:
    one world model input and one action head for all tasks."""
    def single(env: Any, kind: str) -> gym.Space:
        vector = isinstance(env, gym.vector.VectorEnv)
        return getattr(env, f"single_{kind}_space" if vector else f"{kind}_space")

    (first, first_env), rest = named_envs[0], named_envs[1:]
    for name, env in rest:
        for kind in ("observation", "action"):
            expected, found = single(first_env, kind), single(env, kind)
            if expected != found:
                raise ValueError(f"tasks {first!r} and {name!r} have different {kind} spaces ({expected} vs "
                                 f"{found}); every task of env.tasks needs the same observation and action "
                                 "spaces: train tasks of one body together")


class TaskVectorEnv(gym.vector.VectorEnv):
    """One vector env per task, stepped together as one wider vector env (tasks side by side)."""

    def __init__(self, names: Sequence[str], envs: Sequence[gym.vector.VectorEnv]):
        super().__init__()
        if len(names) != len(envs) or not envs:
            raise ValueError(f"need one vector env per task, got {len(envs)} for {len(names)} tasks")
        check_same_spaces(list(zip(names, envs)))
        self.names, self.envs = list(names), list(envs)
        self.sizes = [env.num_envs for env in envs]
        self.num_envs = sum(self.sizes)
        self.task = np.repeat(np.arange(len(envs)), self.sizes).astype(np.int64)
        """(num_envs,) the task index of each sub-env."""
        first = envs[0]
        self.single_observation_space = first.single_observation_space
        self.single_action_space = first.single_action_space
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, self.num_envs)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, self.num_envs)
        self.metadata = first.metadata  # frames_per_step and the autoreset mode, the same for every task

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[Any, dict]:
        results = [env.reset(seed=None if seed is None else seed + k * TASK_SEED_STRIDE, options=options)
                   for k, env in enumerate(self.envs)]
        obs, infos = zip(*results)
        return self.join(obs), merge_infos(list(infos), self.sizes)

    def step(self, actions: np.ndarray) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict]:
        parts = np.split(np.asarray(actions), np.cumsum(self.sizes)[:-1])
        obs, rewards, terminated, truncated, infos = zip(*(env.step(part) for env, part in zip(self.envs, parts)))
        return (self.join(obs), np.concatenate(rewards), np.concatenate(terminated), np.concatenate(truncated),
                merge_infos(list(infos), self.sizes))

    def join(self, parts: Sequence[Any]) -> Any:
        """The tasks' batched observations (dicts of arrays) as one batch."""
        if isinstance(parts[0], dict):
            return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
        return np.concatenate(parts)

    def close_extras(self, **kwargs: Any) -> None:
        # Every task's envs are closed even if one of them fails to close (say, a dead subprocess).
        for env in self.envs:
            try:
                env.close(**kwargs)
            except Exception:  # noqa: BLE001 - a broken env is closed by force instead
                close_by_force(env)


def merge_infos(infos: list[dict], sizes: list[int]) -> dict:
    """Vector-env info dicts of consecutive sub-env groups as one: every key over all sub-envs.

    A key that a group lacks is filled with zeros there (its ``_key`` mask False), nested dicts merge alike.
    """
    merged: dict = {}
    keys = list(dict.fromkeys(key for info in infos for key in info))
    for key in keys:
        present = [info[key] for info in infos if key in info]
        if isinstance(present[0], dict):
            merged[key] = merge_infos([info.get(key, {}) for info in infos], sizes)
            continue
        reference = np.asarray(present[0])
        parts = [np.asarray(info[key]) if key in info else np.zeros((size, *reference.shape[1:]), reference.dtype)
                 for info, size in zip(infos, sizes)]
        merged[key] = np.concatenate(parts)
    return merged


def make_task_vector_env(tasks: Sequence[str], num_envs: int, *, seed: int, **vector_kwargs: Any) -> TaskVectorEnv:
    """``num_envs`` envs of each task (``make_vector_env``), task k seeded from seed + k * TASK_SEED_STRIDE."""
    envs: list[gym.vector.VectorEnv] = []
    try:
        for k, task in enumerate(tasks):
            envs.append(make_vector_env(task, num_envs, seed=seed + k * TASK_SEED_STRIDE, **vector_kwargs))
        return TaskVectorEnv(tasks, envs)
    except BaseException:
        for env in envs:
            env.close()
        raise
