"""The `reward` config section: where the training reward comes from (the env, a function, a language model).

Plain dataclasses and checks that raise ValueError (config.validate turns them into ConfigError), free of
torch and Lightning. The API key is never a field: only the NAME of the environment variable that holds it.
"""

from __future__ import annotations

import importlib
import string
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

REWARD_SOURCES = ("env", "fn", "llm")
REWARD_MIXES = ("replace", "add")
REWARD_WHEN = ("step", "episode")
PROMPT_FIELDS = ("instruction", "description")

DEFAULT_PROMPT = (
    "You judge whether an agent in a game achieved its instruction. Instruction: {instruction}. "
    "What the agent observes: {description} Was the instruction achieved? Answer with one word: yes or no."
)
"""One line, so that it reads the same in YAML, in MLflow's params and in a table of docs/configs.md."""


@dataclass
class LLMConfig:
    """An OpenAI-compatible chat-completions endpoint that judges episodes (reward.source=llm)."""

    url: str = "http://127.0.0.1:8000/v1"
    """Base URL of the server; requests go to {url}/chat/completions (vLLM, Ollama's /v1, any OpenAI-compatible)."""
    model: str = ""
    """The `model` field of each request (the name the server serves)."""
    api_key_env: str = "LIT_DREAMER_LLM_API_KEY"
    """NAME of the environment variable holding the API key, sent as `Authorization: Bearer`; unset: no header."""
    prompt: str = DEFAULT_PROMPT
    """The user message, with {instruction} and {description} filled in; the answer must be yes/no or a number."""
    timeout: float = 30.0
    """Seconds to wait for one answer before it counts as a timeout (then retried)."""
    max_concurrency: int = 4
    """Requests in flight at most (the episode ends of several envs are asked together)."""
    fallback: float = 0.0
    """Reward used when an answer fails or cannot be parsed (counted in reward/llm_failures)."""
    retries: int = 2
    """Retries after a timeout, a 5xx answer or a connection error, with exponential backoff (0.5 s, 1 s, ...)."""


@dataclass
class RewardConfig:
    """The training reward: the env's own, a function's, or a language model's judgement of each episode."""

    source: str = "env"
    """env (the env's reward), fn (reward.fn) or llm (reward.llm, asked about reward.describe's text)."""
    mix: str = "replace"
    """replace (train on the new reward alone) or add (env reward + new reward)."""
    when: str = "step"
    """step (the new reward at every step) or episode (once, on the last step of each episode)."""
    fn: Optional[str] = None
    """module:callable for source=fn: fn(instruction, observation, info) -> float per step, or with
    when=episode fn(instruction, episode, info) once per episode (episode: lit_dreamer.rewards.Episode)."""
    describe: Optional[str] = None
    """module:callable describe(instruction, episode) -> str for source=llm (None: the built-in BabyAI/MiniGrid
    describer, else the env's info['description'])."""
    llm: LLMConfig = field(default_factory=LLMConfig)
    hindsight: Optional[str] = None
    """Hindsight relabelling of the instruction (a deviation from DreamerV3, docs/deviations.md): babyai (the
    built-in labeller of BabyAI pickups) or module:callable label(instruction, episode) -> (instruction, reward)
    | None, asked at each episode's end what it achieved; needs source=env and replay.device=cpu."""
    hindsight_fraction: float = 0.5
    """With reward.hindsight: the share of the replayed sequences holding a relabelled episode that train on
    its label (the instruction observation and the reward swapped); the rest keep the episode's own."""


def check_reward(reward: RewardConfig) -> None:
    """ValueError naming the key and the fix for a reward section that cannot work (no imports, no network)."""
    for key, value, choices in (("source", reward.source, REWARD_SOURCES), ("mix", reward.mix, REWARD_MIXES),
                                ("when", reward.when, REWARD_WHEN)):
        if value not in choices:
            raise ValueError(f"reward.{key} must be one of {', '.join(choices)}, got {value!r}")
    if reward.source == "fn" and not reward.fn:
        raise ValueError("reward.source=fn needs reward.fn=module:callable (called fn(instruction, observation, info))")
    if reward.source != "fn" and reward.fn:
        raise ValueError(f"reward.fn={reward.fn!r} is set but reward.source={reward.source}; set reward.source=fn "
                         "or drop reward.fn")
    for key, spec in (("fn", reward.fn), ("describe", reward.describe)):
        if spec is not None:
            split_callable(spec, f"reward.{key}")
    if reward.source == "llm":
        check_llm(reward.llm)
    if reward.hindsight is not None:
        if reward.source != "env":
            raise ValueError(f"reward.hindsight relabels episodes with the reward its labeller gives, which would mix "
                             f"into the reward of reward.source={reward.source}; use it with reward.source=env")
        if reward.hindsight != "babyai":
            split_callable(reward.hindsight, "reward.hindsight")
    if not 0 <= reward.hindsight_fraction <= 1:
        raise ValueError(f"reward.hindsight_fraction must be within [0, 1], got {reward.hindsight_fraction}")


def check_llm(llm: LLMConfig) -> None:
    if not llm.url.startswith(("http://", "https://")):
        raise ValueError(f"reward.llm.url must start with http:// or https://, got {llm.url!r}")
    if not llm.model:
        raise ValueError("reward.source=llm needs reward.llm.model, the model name the server serves "
                         "(e.g. reward.llm.model=qwen2.5-7b-instruct)")
    if llm.timeout <= 0 or llm.max_concurrency < 1 or llm.retries < 0:
        raise ValueError(f"reward.llm.timeout must be > 0, reward.llm.max_concurrency >= 1 and reward.llm.retries "
                         f">= 0; got {llm.timeout}, {llm.max_concurrency}, {llm.retries}")
    fields = {name for _, name, _, _ in string.Formatter().parse(llm.prompt) if name is not None}
    if not fields <= set(PROMPT_FIELDS) or "description" not in fields:
        raise ValueError(f"reward.llm.prompt may use only {{instruction}} and {{description}} and must use "
                         f"{{description}}; it uses {sorted(fields)} (write a literal brace as {{{{ or }}}})")


def split_callable(spec: str, key: str) -> tuple[str, str]:
    """`module:callable` as (module, attribute path), or a ValueError naming the key."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"{key}={spec!r} must be module:callable, e.g. {key}=my_rewards:score")
    return module, name


def load_callable(spec: str, key: str) -> Callable[..., Any]:
    """Import `module:callable` (the attribute may be dotted, e.g. `pkg.mod:Class.method`)."""
    module_name, name = split_callable(spec, key)
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{key}={spec!r}: cannot import {module_name!r} ({err}); add its folder to PYTHONPATH "
                         "or install its package") from None
    for part in name.split("."):
        if not hasattr(target, part):
            raise ValueError(f"{key}={spec!r}: {module_name!r} has no attribute {name!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"{key}={spec!r} names a {type(target).__name__}, not a function")
    return target
