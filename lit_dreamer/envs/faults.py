"""Keep collecting when an environment crashes: restart it and end its episode as truncated."""

from __future__ import annotations

import logging
from typing import Any, Callable

import gymnasium as gym

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
