"""Held-out instructions: phrases that training episodes never get, to measure generalization to them.

`env.held_out=['red ball', 'green key']` redraws every episode whose instruction (the raw `mission` or
`instruction` string, lit_dreamer.rewards.wrappers.instruction_of) contains one of the phrases as consecutive
words; the `eval` command's `instructions=held_out` keeps only those episodes instead. Redrawing is a plain
`reset()` without a seed, which continues the env's own random stream, so a seeded env stays reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym

from lit_dreamer.envs.text import tokenize
from lit_dreamer.rewards.wrappers import instruction_of

MAX_REDRAWS = 1000
"""Resets tried for one episode before the filter gives up (a phrase that every instruction or none holds)."""


def holds_phrase(instruction: str, phrase: str) -> bool:
    """Whether the phrase's words appear consecutively among the instruction's ('the red ball' holds 'red ball',
    'a red box and a ball' does not)."""
    words, wanted = tokenize(instruction), tokenize(phrase)
    return any(words[i:i + len(wanted)] == wanted for i in range(len(words) - len(wanted) + 1))


class HeldOutInstructions(gym.Wrapper):
    """Redraws episodes at reset until the instruction holds none of `phrases` (`only=False`: training) or at
    least one of them (`only=True`: evaluating on the held-out instructions)."""

    def __init__(self, env: gym.Env, phrases: Sequence[str], only: bool = False):
        super().__init__(env)
        if not phrases:
            raise ValueError("HeldOutInstructions needs at least one phrase")
        self.phrases, self.only = tuple(phrases), only

    def wanted(self, instruction: str) -> bool:
        held_out = any(holds_phrase(instruction, phrase) for phrase in self.phrases)
        return held_out if self.only else not held_out

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        observation, info = self.env.reset(seed=seed, options=options)
        for _ in range(MAX_REDRAWS):
            instruction = instruction_of(observation, self.env)
            if self.wanted(instruction):
                return observation, info
            observation, info = self.env.reset(options=options)
        kind = "holds one of" if self.only else "avoids all of"
        raise ValueError(f"no instruction in {MAX_REDRAWS} resets {kind} the held-out phrases {list(self.phrases)} "
                         f"(the last: {instruction!r}); check env.held_out against the env's instructions")
