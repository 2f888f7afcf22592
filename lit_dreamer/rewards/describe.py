"""Episodes as text for a language model: the Episode record and the built-in BabyAI / MiniGrid describer.

The describer reads an egocentric 7x7 symbolic view (minigrid's `image`: per cell object, colour, state;
the reward wrapper takes it from the env's `gen_obs()` at the scoring step, whatever the observation mode)
and phrases it the way BabyAI-Text does: "You carry a red key. You see a
blue ball 2 steps forward and 1 step left." Walls, floor and empty or unseen cells are left out:
what a BabyAI instruction names is an object, a door or a goal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# minigrid.core.constants, spelt out so that the describer works without importing minigrid.
OBJECTS = {4: "door", 5: "key", 6: "ball", 7: "box", 8: "goal", 9: "lava"}
CARRIABLE = {"key", "ball", "box"}
COLORS = {0: "red", 1: "green", 2: "blue", 3: "purple", 4: "yellow", 5: "grey"}
DOOR_STATES = {0: "open", 1: "closed", 2: "locked"}


@dataclass
class Episode:
    """One episode as the reward wrapper saw it: raw observations (before any tokenizer) and the env's values.

    `observations[0]` is the reset observation; step t gave `actions[t]`, `observations[t + 1]`, `rewards[t]`
    (the env's own reward) and `infos[t]`."""

    instruction: str
    observations: list[Any] = field(default_factory=list)
    actions: list[Any] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    infos: list[dict] = field(default_factory=list)
    terminated: bool = False
    truncated: bool = False

    def record(self, action: Any, observation: Any, reward: float, terminated: bool, truncated: bool,
               info: dict) -> None:
        """One env step, appended."""
        self.observations.append(observation)
        self.actions.append(action)
        self.rewards.append(float(reward))
        self.infos.append(info)
        self.terminated, self.truncated = bool(terminated), bool(truncated)


def steps(count: int, word: str) -> str:
    return f"{count} step{'s' if count != 1 else ''} {word}"


def object_name(kind: str, color: int, state: int) -> str:
    """`a red key`, `a locked blue door`, `lava` (lava has no colour in minigrid's phrasing)."""
    if kind == "lava":
        return "lava"
    words = ([DOOR_STATES.get(state, "")] if kind == "door" else []) + [COLORS.get(color, ""), kind]
    phrase = " ".join(word for word in words if word)
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def where(forward: int, lateral: int) -> str:
    """`2 steps forward and 1 step left` relative to the agent (lateral < 0: left)."""
    parts = [steps(forward, "forward")] if forward else []
    if lateral:
        parts.append(steps(abs(lateral), "left" if lateral < 0 else "right"))
    return " and ".join(parts)


def describe_view(image: np.ndarray) -> str:
    """A minigrid egocentric view (W, H, 3), agent at the bottom middle facing up, as BabyAI-Text-like phrases."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"the BabyAI describer needs minigrid's symbolic view (W, H, 3), got shape {image.shape}")
    width, height = image.shape[:2]
    agent_x, agent_y = width // 2, height - 1
    sentences = []
    kind = OBJECTS.get(int(image[agent_x, agent_y, 0]))
    if kind in CARRIABLE:  # minigrid draws the carried object in the agent's own cell
        sentences.append(f"You carry {object_name(kind, *image[agent_x, agent_y, 1:])}.")
    seen = []
    for x in range(width):
        for y in range(height):
            kind = OBJECTS.get(int(image[x, y, 0]))
            if kind is None or (x, y) == (agent_x, agent_y):
                continue
            forward, lateral = agent_y - y, x - agent_x
            seen.append((abs(forward) + abs(lateral), forward, lateral, kind, image[x, y, 1], image[x, y, 2]))
    for _, forward, lateral, kind, color, state in sorted(seen, key=lambda s: s[:3]):
        sentences.append(f"You see {object_name(kind, int(color), int(state))} {where(forward, lateral)}.")
    return " ".join(sentences) or "You see no objects."


def describe_from_info(instruction: str, episode: Episode) -> str:
    """The env's own description: the last step's info['description']."""
    del instruction
    description = episode.infos[-1].get("description") if episode.infos else None
    if not isinstance(description, str):
        raise ValueError("reward.source=llm needs a text description of each episode, and this env gives no "
                         "info['description']: set reward.describe=module:callable (describe(instruction, "
                         "episode) -> str)")
    return description
