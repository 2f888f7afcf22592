"""Rewards from a function or a language model for an instruction (issue 23): config, describer, judge, wrappers."""

from lit_dreamer.rewards.describe import Episode, describe_view
from lit_dreamer.rewards.llm import LLMJudge, parse_answer, shared_judge
from lit_dreamer.rewards.settings import LLMConfig, RewardConfig, check_reward
from lit_dreamer.rewards.wrappers import JudgedRewards, LanguageReward, wrap_env, wrap_vector_env

__all__ = ["Episode", "JudgedRewards", "LLMConfig", "LLMJudge", "LanguageReward", "RewardConfig", "check_reward",
           "describe_view", "parse_answer", "shared_judge", "wrap_env", "wrap_vector_env"]
