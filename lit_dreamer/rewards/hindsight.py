"""Hindsight labels: at each episode's end, the instruction the episode carried out instead of its own.

`HindsightLabel` wraps one env where `make_env` built it (inside the tokenizer, so it reads the raw instruction
string) and, on the last step of an episode, asks ``reward.hindsight`` what the episode achieved:

    label(instruction, episode) -> (achieved instruction, reward of the last step under it) or None

An answer whose words differ from the episode's own instruction goes into the step's info as
``hindsight_<key>`` (the text, made token ids by ``TextTokens``) and ``hindsight_reward``; the collector writes
it over the episode's steps in the replay (``lit_dreamer.relabel``). ``reward.hindsight=babyai`` is the
built-in labeller of BabyAI's pickup missions; any other value is a ``module:callable``.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Optional

import gymnasium as gym

from lit_dreamer.envs.text import tokenize
from lit_dreamer.relabel import REWARD_KEY, text_label_key
from lit_dreamer.rewards.describe import Episode
from lit_dreamer.rewards.settings import load_callable
from lit_dreamer.rewards.wrappers import INSTRUCTION_KEYS, instruction_key, is_minigrid

BUILT_IN = "babyai"
"""reward.hindsight's built-in labeller: BabyAI pickups (`babyai_pickups`)."""

Label = Callable[[str, Episode], Optional[tuple[str, float]]]


class HindsightLabel(gym.Wrapper):
    """Adds the label of what an episode achieved to the info of its last step (see the module's docstring)."""

    def __init__(self, env: gym.Env, spec: str):
        super().__init__(env)
        space = env.observation_space
        self.key = instruction_key(space.spaces if isinstance(space, gym.spaces.Dict) else {})
        if self.key is None:
            raise ValueError(f"reward.hindsight={spec!r} relabels an episode's instruction, but this env has no "
                             f"{' or '.join(INSTRUCTION_KEYS)} observation; drop reward.hindsight")
        self.label: Label = babyai_pickups(env) if spec == BUILT_IN else load_callable(spec, "reward.hindsight")
        self.setting = spec
        self.episode = Episode("")
        self.held_out = held_out_filter(env)

    def reset(self, **kwargs: Any) -> tuple[Any, dict]:
        observation, info = self.env.reset(**kwargs)
        self.episode = Episode(str(observation[self.key]), [observation])
        return observation, info

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        observation, reward, terminated, truncated, info = self.env.step(action)
        episode = self.episode
        episode.record(action, observation, reward, terminated, truncated, info)
        if terminated or truncated:
            answer = self.label(episode.instruction, episode)
            if answer is not None:
                text, label_reward = self.check(answer)
                # A label holding a held-out phrase (env.held_out) would train on what the run holds out.
                held_out = self.held_out is not None and not self.held_out.wanted(text)
                if tokenize(text) != tokenize(episode.instruction) and not held_out:
                    info = {**info, text_label_key(self.key): text, REWARD_KEY: label_reward}
        return observation, reward, terminated, truncated, info

    def check(self, answer: Any) -> tuple[str, float]:
        try:
            text, value = answer
            return str(text), float(value)
        except (TypeError, ValueError):
            raise ValueError(f"reward.hindsight={self.setting!r} returned {answer!r}; it must return None or "
                             "(instruction, reward)") from None


def held_out_filter(env: gym.Env) -> Any:
    """The env's HeldOutInstructions wrapper (env.held_out), or None."""
    from lit_dreamer.envs.instructions import HeldOutInstructions

    layer = env
    while isinstance(layer, gym.Wrapper):
        if isinstance(layer, HeldOutInstructions):
            return layer
        layer = layer.env
    return None


def babyai_pickups(env: gym.Env) -> Label:
    """The built-in labeller: a BabyAI pickup episode that ended by picking up another object than the one named
    is a success of "pick up <that object>" in one of the forms PickupDist draws (by kind, by colour, or both, each a
    third of the time; "the" when the object is the only one that matches, else "a", as minigrid's ObjDesc
    words it), paying the reward the env pays a success at that step. Other episodes get no label."""
    if not is_minigrid(env):
        raise ValueError(f"reward.hindsight={BUILT_IN} labels BabyAI pickups and needs a babyai/ or minigrid/ env, "
                         "not this one; write a labeller and set reward.hindsight=module:callable")
    base = env.unwrapped
    forms = random.Random(0)  # the wrapper's own draws: the env's generator stays as it would be without labels

    def label(instruction: str, episode: Episode) -> tuple[str, float] | None:
        carried = base.carrying
        # Only a pickup that ended the episode (strict levels such as PickupDistDebug end at a wrong one) is a
        # success of another instruction: one held to a time limit was picked up earlier.
        picked = episode.terminated and episode.actions and int(episode.actions[-1]) == int(base.actions.pickup)
        if carried is None or not picked or not instruction.startswith("pick up") or episode.rewards[-1] > 0:
            return None
        kind, color = {0: (carried.type, None), 1: (None, carried.color), 2: (carried.type, carried.color)}[
            forms.randrange(3)]
        matches = 1 + sum(cell is not None and (kind is None or cell.type == kind)
                          and (color is None or cell.color == color) for cell in base.grid.grid)
        words = " ".join(word for word in (color, kind or "object") if word)
        return f"pick up {'the' if matches == 1 else 'a'} {words}", float(base._reward())

    return label
