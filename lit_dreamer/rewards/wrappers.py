"""The reward plug-in as gymnasium wrappers, so that the collector, evaluation and replay need no change.

`LanguageReward` wraps one env right where `make_env` built it (inside any tokenizer, so it reads the raw
`mission` / `instruction` string) and gives

    reward_t = (env reward_t if mix=add else 0) + new_t

where new_t is reward.fn's value (source=fn) at every step, or on the last step of each episode only
(when=episode; 0 elsewhere). With source=llm it cannot wait for the model one env at a time: it puts
(instruction, description) into `info["reward/query"]` at each scoring step, and `JudgedRewards`, around the
vector env, asks the model about all of a vector step's queries together and adds the answers.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import gymnasium as gym
import numpy as np

from lit_dreamer.rewards.describe import Episode, describe_from_info, describe_view
from lit_dreamer.rewards.llm import LLMJudge, shared_judge
from lit_dreamer.rewards.settings import RewardConfig, load_callable

QUERY_KEY = "reward/query"
"""info key of a step the language model is to judge: (instruction, description)."""
INSTRUCTION_KEYS = ("mission", "instruction")
"""Raw observation keys read as the instruction, first found wins (minigrid's `mission`, or `instruction`)."""


def instruction_key(keys: Any) -> str | None:
    """The first of INSTRUCTION_KEYS among `keys` (an observation dict, a Dict space's spaces, a spec), or None."""
    return next((key for key in INSTRUCTION_KEYS if key in keys), None)


def instruction_of(observation: Any, env: gym.Env) -> str:
    """The instruction in a raw observation, else the env's own `mission` attribute (minigrid with pixel
    observations), else '' (e.g. CartPole)."""
    key = instruction_key(observation) if isinstance(observation, dict) else None
    if key is not None:
        return str(observation[key])
    mission = getattr(env.unwrapped, "mission", None)
    return mission if isinstance(mission, str) else ""


def is_minigrid(env: gym.Env) -> bool:
    try:
        from minigrid.minigrid_env import MiniGridEnv
    except ImportError:
        return False
    return isinstance(env.unwrapped, MiniGridEnv)


def default_describer(env: gym.Env) -> Callable[[str, Episode], str]:
    """The built-in BabyAI describer for minigrid envs, else the env's own info['description'].

    For minigrid it describes the env's symbolic view at the scoring step (`gen_obs`), which exists whatever
    the observation mode: with env.obs=pixels the raw observation is an image the describer cannot read."""
    if not is_minigrid(env):
        return describe_from_info
    return lambda instruction, episode: describe_view(env.unwrapped.gen_obs()["image"])


class LanguageReward(gym.Wrapper):
    """The env's reward replaced by (or added to) a function's or, with `JudgedRewards`, a language model's."""

    def __init__(self, env: gym.Env, reward: RewardConfig):
        super().__init__(env)
        self.reward_config = reward
        self.fn = load_callable(reward.fn, "reward.fn") if reward.source == "fn" else None
        self.describe: Optional[Callable[[str, Episode], str]] = None
        if reward.source == "llm":
            self.describe = (load_callable(reward.describe, "reward.describe") if reward.describe
                             else default_describer(env))
        self.keep_episode = reward.when == "episode" or reward.source == "llm"
        self.episode = Episode("")

    def reset(self, **kwargs: Any) -> tuple[Any, dict]:
        observation, info = self.env.reset(**kwargs)
        self.episode = Episode(instruction_of(observation, self.env), [observation])
        return observation, info

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        observation, env_reward, terminated, truncated, info = self.env.step(action)
        episode = self.episode
        if self.keep_episode:
            episode.record(action, observation, env_reward, terminated, truncated, info)
        reward = float(env_reward) if self.reward_config.mix == "add" else 0.0
        if self.reward_config.when == "step" or terminated or truncated:
            if self.fn is not None:
                reward += self.call_fn(observation, info)
            else:  # source=llm: JudgedRewards adds the model's answer
                info = {**info, QUERY_KEY: (episode.instruction, self.describe(episode.instruction, episode))}
        return observation, reward, terminated, truncated, info

    def call_fn(self, observation: Any, info: dict) -> float:
        what = self.episode if self.reward_config.when == "episode" else observation
        value = self.fn(self.episode.instruction, what, info)
        try:
            value = float(value)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            raise ValueError(f"reward.fn={self.reward_config.fn!r} returned {value!r}; it must return a finite float")
        return value


class JudgedRewards(gym.vector.VectorWrapper):
    """Adds the language model's answers to the rewards of the steps whose info holds a query."""

    def __init__(self, env: gym.vector.VectorEnv, judge: LLMJudge):
        super().__init__(env)
        self.judge = judge

    def step(self, actions: Any) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict]:
        observation, reward, terminated, truncated, infos = self.env.step(actions)
        asked, queries = infos.pop(f"_{QUERY_KEY}", None), infos.pop(QUERY_KEY, None)
        if asked is not None and asked.any():
            rows = np.flatnonzero(asked)
            reward = np.array(reward, dtype=np.float64)
            reward[rows] += self.judge.score_many([tuple(queries[row]) for row in rows])
        return observation, reward, terminated, truncated, infos


def wrap_env(env: gym.Env, reward: Optional[RewardConfig]) -> gym.Env:
    """`LanguageReward` around a freshly built env (the env itself when the env's reward is kept), and
    `HindsightLabel` around that with reward.hindsight."""
    if reward is None:
        return env
    if reward.source != "env":
        env = LanguageReward(env, reward)
    if reward.hindsight is not None:
        from lit_dreamer.rewards.hindsight import HindsightLabel  # it imports this module
        env = HindsightLabel(env, reward.hindsight)
    return env


def wrap_vector_env(envs: gym.vector.VectorEnv, reward: Optional[RewardConfig]) -> gym.vector.VectorEnv:
    """`JudgedRewards` around a vector env of source=llm envs (with this process's shared judge)."""
    if reward is None or reward.source != "llm":
        return envs
    return JudgedRewards(envs, shared_judge(reward.llm))
