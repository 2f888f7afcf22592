"""Reward functions, describers and a tiny instructed env that tests/test_rewards.py names as module:callable."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from lit_dreamer.rewards import Episode

EPISODE_LENGTH = 3


class Instructed(gym.Env):
    """A raw env with a mission string: reward 1 per step, EPISODE_LENGTH steps, the object in info at the end."""

    def __init__(self, mission: str = "go to the red ball", seen: str = "a red ball"):
        self.mission, self.seen = mission, seen
        self.observation_space = spaces.Dict({"mission": spaces.Text(64), "position": spaces.Box(0, 9, (1,))})
        self.action_space = spaces.Discrete(2)
        self.t = 0

    def observation(self) -> dict:
        return {"mission": self.mission, "position": np.array([self.t], np.float32)}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self.observation(), {}

    def step(self, action):
        self.t += 1
        done = self.t >= EPISODE_LENGTH
        info = {"description": f"You see {self.seen} 1 step forward."} if done else {}
        return self.observation(), 1.0, done, False, info


def half(instruction: str, observation, info) -> float:
    """Per step: 0.5 when the instruction is the red ball's (so a wrong instruction would show)."""
    return 0.5 if instruction == "go to the red ball" else -9.0


def episode_length(instruction: str, episode: Episode, info) -> float:
    """Per episode: the number of steps, read from the episode record."""
    return float(len(episode.actions))


def blue_ball(instruction: str, episode: Episode) -> tuple[str, float]:
    """A hindsight labeller: every episode went to the blue ball, worth its number of steps."""
    return "go to the blue ball", float(len(episode.actions))


def cartpole_length(instruction: str, episode: Episode) -> str:
    """A describer for CartPole (no instruction): how long the pole stayed up."""
    return f"The pole stayed up for {len(episode.actions)} steps."


def upright(instruction: str, observation, info) -> float:
    """Per step on CartPole: 1 minus the pole's angle (radians), a shaped reward the replay must hold."""
    return 1.0 - abs(float(observation[2]))
