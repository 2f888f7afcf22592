"""Keep collecting when an environment crashes or returns NaN: end its episode as truncated and go on."""

from __future__ import annotations

import logging
from typing import Any, Callable

import gymnasium as gym
import numpy as np

log = logging.getLogger(__name__)

ERROR_KEY = "env_error"


class RestartOnError(gym.Wrapper):
    """Rebuilds the env from `factory` when `step` or `reset` raises.

    A failed `step` returns the last observation with reward 0 and truncated=True, so the episode
    ends as a time-limit-like cut (is_last without is_terminal, no false terminal for the critic),
    and `info["env_error"]` names the exception. The vector env's autoreset then resets the fresh env.
    """

    def __init__(self, factory: Callable[[int | None], gym.Env], max_restarts: int = 100):
        super().__init__(factory(None))
        self.factory, self.max_restarts = factory, max_restarts
        self.restarts = 0
        self.last_obs = None

    def reset(self, **kwargs: Any):
        for _ in range(3):
            try:
                obs, info = self.env.reset(**kwargs)
                self.last_obs = obs
                return obs, info
            except Exception as err:  # noqa: BLE001 - any env failure is handled the same way
                self._restart(err)
                kwargs.pop("seed", None)
        raise RuntimeError(f"environment failed to reset 3 times after restarts ({self.restarts} restarts so far)")

    def step(self, action):
        try:
            obs, reward, terminated, truncated, info = self.env.step(action)
        except Exception as err:  # noqa: BLE001
            self._restart(err)
            if self.last_obs is None:
                raise
            return self.last_obs, 0.0, False, True, {ERROR_KEY: f"{type(err).__name__}: {err}"}
        self.last_obs = obs
        return obs, reward, terminated, truncated, info

    def _restart(self, err: BaseException) -> None:
        self.restarts += 1
        if self.restarts > self.max_restarts:
            raise RuntimeError(f"environment crashed more than {self.max_restarts} times; last error: {err!r}") from err
        log.warning("environment raised %r; restarting it (restart %d)", err, self.restarts)
        try:
            self.env.close()
        except Exception:  # noqa: BLE001 - a broken env may fail to close too
            pass
        self.env = self.factory(self.restarts)


NONFINITE_KEY = "env_nonfinite"


def nonfinite_entries(obs: dict[str, Any], reward: float | None = None) -> list[str]:
    """Names of the entries holding NaN or inf: 'reward' and/or "observation 'key'" (images are uint8)."""
    bad = [] if reward is None or np.isfinite(reward) else ["reward"]
    for key, value in obs.items():
        value = np.asarray(value)
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            bad.append(f"observation {key!r}")
    return bad


class CutNonFinite(gym.Wrapper):
    """Ends an episode as truncated where the env returns a NaN or infinite reward or observation.

    A step with a non-finite value returns the last finite observation with reward 0 and
    truncated=True, as RestartOnError does for a crash, so the vector env's autoreset starts a new
    episode at the next step and every stream stays aligned. `info["env_nonfinite"]` names the
    entries (e.g. "reward, observation 'vector'"). A reset whose observation is not finite is
    retried; the info of the reset that succeeds names what the failed ones held.
    """

    RESET_TRIES = 3

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.last_obs = None

    def reset(self, **kwargs: Any):
        failed: list[str] = []
        for _ in range(self.RESET_TRIES):
            obs, info = self.env.reset(**kwargs)
            bad = nonfinite_entries(obs)
            if not bad:
                self.last_obs = obs
                return obs, ({**info, NONFINITE_KEY: ", ".join(failed)} if failed else info)
            failed = bad
            kwargs.pop("seed", None)  # the same seed would give the same first observation
        raise ValueError(f"environment returned a non-finite {', '.join(failed)} at reset {self.RESET_TRIES} "
                         "times in a row")

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        bad = nonfinite_entries(obs, reward)
        if not bad:
            self.last_obs = obs
            return obs, reward, terminated, truncated, info
        return self.last_obs, 0.0, False, True, {**info, NONFINITE_KEY: ", ".join(bad)}


class NonFiniteEnvError(RuntimeError):
    """The environment returned a NaN or infinite reward or observation, and env.nonfinite=error."""
