"""Tiny envs with a text observation, for the tests of lit_dreamer.envs.text (no minigrid needed).

`lit_dreamer_tests/TextChoice-v0`: each episode draws one of two instructions ("go left" / "go right"); the
action that the instruction names gives reward 1, the other 0; episodes last 5 steps. The vector part of the
observation is the same in both, so only the text tells the instruction apart.
`lit_dreamer_tests/DeclaredTextChoice-v0` is the same env declaring its words in env.metadata.
"""

from __future__ import annotations

import string
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from lit_dreamer.envs.text import VOCABULARY_METADATA_KEY

INSTRUCTIONS = ("go left", "go right")
WORDS = ["go", "left", "right"]


class TextChoice(gym.Env):
    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, length: int = 5):
        self.observation_space = spaces.Dict({"vector": spaces.Box(-1.0, 1.0, (2,), np.float32),
                                              "mission": spaces.Text(max_length=64, charset=string.ascii_lowercase + " ")})
        self.action_space = spaces.Discrete(2)
        self.length, self.t, self.target = length, 0, 0

    def observe(self) -> dict[str, Any]:
        return {"vector": np.array([self.t / self.length, 0.0], np.float32), "mission": INSTRUCTIONS[self.target]}

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        self.t, self.target = 0, int(self.np_random.integers(2))
        return self.observe(), {}

    def step(self, action: int) -> tuple[dict, float, bool, bool, dict]:
        self.t += 1
        reward = float(int(action) == self.target)
        return self.observe(), reward, self.t >= self.length, False, {}


class DeclaredTextChoice(TextChoice):
    metadata: dict[str, Any] = {"render_modes": [], VOCABULARY_METADATA_KEY: {"mission": WORDS}}


gym.register("lit_dreamer_tests/TextChoice-v0", entry_point=TextChoice)
gym.register("lit_dreamer_tests/DeclaredTextChoice-v0", entry_point=DeclaredTextChoice)

TEXT_ENV = "tests.text_envs:lit_dreamer_tests/TextChoice-v0"
DECLARED_TEXT_ENV = "tests.text_envs:lit_dreamer_tests/DeclaredTextChoice-v0"
