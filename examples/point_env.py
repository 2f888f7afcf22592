"""A custom gymnasium environment with a Dict observation (an image and two vectors), for lit_dreamer.

Train on it from the folder holding this file:
    python -m lit_dreamer fit env.id=point_env:PointDict-v0
(`module:Id` imports the module, which registers the id, before the env is made.)
"""

import gymnasium as gym
import numpy as np
from gymnasium import spaces


class PointDict(gym.Env):
    """Move a point towards a goal in the unit square. Observes a 16x16 top view and both positions."""

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, render_mode=None):
        self.render_mode = render_mode
        self.observation_space = spaces.Dict({
            "image": spaces.Box(0, 255, (16, 16, 3), np.uint8),  # uint8 HxWxC: read by the CNN encoder
            "position": spaces.Box(0.0, 1.0, (2,), np.float32),  # rank-1 floats: read by the MLP encoder
            "goal": spaces.Box(0.0, 1.0, (2,), np.float32),
        })
        self.action_space = spaces.Box(-1.0, 1.0, (2,), np.float32)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.position = self.np_random.uniform(0, 1, 2).astype(np.float32)
        self.goal = self.np_random.uniform(0, 1, 2).astype(np.float32)
        self.steps = 0
        return self._obs(), {}

    def step(self, action):
        self.position = np.clip(self.position + 0.1 * np.asarray(action, np.float32), 0.0, 1.0)
        self.steps += 1
        distance = float(np.linalg.norm(self.position - self.goal))
        reached = distance < 0.05
        return self._obs(), -distance + 10.0 * reached, reached, self.steps >= 50, {}

    def render(self):
        return self._obs()["image"]

    def _obs(self):
        image = np.zeros((16, 16, 3), np.uint8)
        for point, channel in ((self.position, 0), (self.goal, 1)):
            row, col = np.minimum((point * 16).astype(int), 15)
            image[row, col, channel] = 255
        return {"image": image, "position": self.position.copy(), "goal": self.goal.copy()}


gym.register(id="PointDict-v0", entry_point=PointDict)
