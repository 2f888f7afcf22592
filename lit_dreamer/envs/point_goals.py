"""PointGoal: a small multi-task family, a 2-D point mass whose tasks differ only by an unobserved goal.

Every task shares the body and its dynamics; task k rewards reaching goal k of ``GOALS`` (five points on
a circle of radius 0.7), and nothing in the observation says which goal that is. So one world model can
learn the dynamics of all tasks, while reward, value and policy must come from the task. Cheap enough
for a 2-core machine: a step is a few numpy operations, an episode 100 steps.

Registered as gymnasium ids ``lit_dreamer/PointGoal-<k>-v0`` (k = 0..4) when ``lit_dreamer.envs`` is
imported; ``env.tasks=[lit_dreamer/PointGoal-0-v0,...,lit_dreamer/PointGoal-3-v0]`` trains four of
them and leaves the fifth for adaptation.
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

GOAL_RADIUS = 0.7
GOALS = np.array([[GOAL_RADIUS * math.cos(math.pi / 2 + 2 * math.pi * k / 5),
                   GOAL_RADIUS * math.sin(math.pi / 2 + 2 * math.pi * k / 5)] for k in range(5)], np.float32)
"""Goal k of task k: five points evenly spaced on a circle around the arena's centre, the first at the top."""
EPISODE_STEPS = 100
ID_FORMAT = "lit_dreamer/PointGoal-{}-v0"
PROGRESS_SCALE = 10.0  # reward per unit of distance covered toward the goal
SPEED, DAMPING, DT = 1.0, 0.75, 0.1


def progress_reward(distance_before: float, distance_after: float) -> float:
    """PROGRESS_SCALE times the distance covered toward the goal in the step (negative when moving away).

    A potential-based reward: an episode's return is PROGRESS_SCALE x (start distance - end distance) whatever
    the path, so values stay within +-PROGRESS_SCALE x 2.83 (the arena's diagonal) and the critic has no long
    climb to make: budget runs learn a task in a few thousand env steps. (A dense positive reward per step,
    the first design, has values near reward / (1 - gamma) that a small-budget critic climbs to for 10k+ env
    steps: issue 21's critic lag.) Heading to the goal returns about 7 per episode (starts are 0.5-0.9 from
    it), uniform random actions about -2 (they drift away), heading to a neighbouring goal (0.82 from this
    one) about -1 and to a goal two over about -6: the gap that says whether the task is used. At most PROGRESS_SCALE x SPEED x DT x sqrt(2) (a diagonal push at full
    speed), about 1.41, in absolute value per step.
    """
    return PROGRESS_SCALE * (distance_before - distance_after)


class PointGoalEnv(gym.Env):
    """A point in the square [-1, 1]^2 with velocity; the action (2,) in [-1, 1] pushes it.

    Observation: (4,) float32, position and velocity (not the goal). Dynamics: v' = DAMPING v +
    (1 - DAMPING) SPEED a, p' = clip(p + DT v'), with the velocity stopped at a wall. Reward
    ``progress_reward(|p - goal|, |p' - goal|)``, within +-1.42. Episodes start near the centre and end by the
    time limit (EPISODE_STEPS, truncation) only.
    """

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, goal: int = 0, render_mode: str | None = None):
        if not 0 <= goal < len(GOALS):
            raise ValueError(f"goal must be in [0, {len(GOALS)}), got {goal}")
        self.goal = GOALS[goal]
        self.render_mode = render_mode
        self.observation_space = spaces.Box(-1.0, 1.0, (4,), np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.position = np.zeros(2, np.float32)
        self.velocity = np.zeros(2, np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.position = self.np_random.uniform(-0.2, 0.2, 2).astype(np.float32)
        self.velocity = np.zeros(2, np.float32)
        return self.observation(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        push = np.clip(np.asarray(action, np.float32), -1.0, 1.0)
        velocity = DAMPING * self.velocity + (1.0 - DAMPING) * SPEED * push
        position = self.position + DT * velocity
        wall = np.abs(position) > 1.0
        before = float(np.linalg.norm(self.position - self.goal))
        self.position = np.clip(position, -1.0, 1.0).astype(np.float32)
        self.velocity = np.where(wall, 0.0, velocity).astype(np.float32)
        after = float(np.linalg.norm(self.position - self.goal))
        return self.observation(), progress_reward(before, after), False, False, {}

    def observation(self) -> np.ndarray:
        return np.concatenate([self.position, self.velocity]).astype(np.float32)

    def render(self, size: int = 64) -> np.ndarray:
        """The arena as a size x size RGB image with the point as a dark square (the goal is not drawn)."""
        frame = np.full((size, size, 3), 235, np.uint8)
        x, y = ((self.position + 1.0) / 2.0 * (size - 1)).round().astype(int)
        frame[max(size - 1 - y - 2, 0):size - 1 - y + 3, max(x - 2, 0):x + 3] = (30, 30, 160)
        return frame


def register(**kwargs: Any) -> None:
    """Register ``lit_dreamer/PointGoal-<k>-v0`` for every goal (once; importing this module does it)."""
    for goal in range(len(GOALS)):
        env_id = ID_FORMAT.format(goal)
        if env_id not in gym.registry:
            gym.register(env_id, entry_point="lit_dreamer.envs.point_goals:PointGoalEnv", kwargs={"goal": goal},
                         max_episode_steps=EPISODE_STEPS, **kwargs)


register()
