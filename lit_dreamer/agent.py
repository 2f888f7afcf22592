"""Act with a trained agent, without Lightning and without the training stack.

    from lit_dreamer.agent import Agent
    agent = Agent.load("runs/X")                   # a run folder (its last checkpoint), a model.ckpt, or models:/NAME/1
    obs, _ = env.reset()                            # the user's own gymnasium env: gym.make("CartPole-v1")
    action, state = agent.act(obs)                  # a fresh state when state is None
    obs, reward, terminated, truncated, _ = env.step(action)
    action, state = agent.act(obs, state)           # the recurrent state carries the episode's memory

Observations are what the env returns, before lit_dreamer's wrappers: a raw array, a (nested) Dict, Discrete or
MultiDiscrete entries as ints, text (minigrid's `mission`) as a string. A dict already in lit_dreamer's
convention (the flat dict `make_env` gives) is taken too. One observation or a batch: the shapes decide (see
`Agent.act`). Actions come back in the env's own action space, as stable-baselines3's `predict` gives them: an
index (with the Discrete's `start`) for Discrete, env units in the box's dtype for Box.

Agents whose image lit_dreamer renders (obs=pixels on gymnasium and dm_control envs, MiniGrid's RGB view) or
whose frames Atari's preprocessing stacks take observations in lit_dreamer's convention only ({"image": SxSx3
uint8, ...} as make_env gives them): the env's own observation does not hold that image.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor

from lit_dreamer.acting import Policy
from lit_dreamer.agent_config import agent_config_from
from lit_dreamer.checkpoint_files import CheckpointInfo, find_checkpoint, read_checkpoint
from lit_dreamer.config import ConfigError
from lit_dreamer.envs.adapters import to_env_action
from lit_dreamer.envs.described import ObservationAdapter, describe_spaces, space_from_data
from lit_dreamer.envs.spaces import env_action
from lit_dreamer.rssm import State

REGISTRY_PREFIX = "models:/"
MODES = ("mode", "sample")


@dataclass
class AgentState:
    """The recurrent state of N envs: the RSSM posterior, the previous action, and which envs start an episode."""

    latent: State
    action: Tensor
    is_first: Tensor
    """(N,) bool: the next act starts a new episode there (its latent and previous action are reset)."""

    @property
    def batch(self) -> int:
        return int(self.is_first.shape[0])

    def restart(self, done: Any) -> AgentState:
        """The state with the envs where `done` (N,) is True starting a new episode at the next act."""
        done = torch.as_tensor(np.asarray(done, bool).reshape(-1), device=self.is_first.device)
        return AgentState(self.latent, self.action, self.is_first | done)


class Agent:
    """A trained policy that takes the observations of its env and gives actions in the env's action space."""

    def __init__(self, policy: Policy, adapter: ObservationAdapter, action_space: spaces.Space,
                 tasks: list[str], path: str):
        self.policy, self.adapter, self.action_space = policy, adapter, action_space
        self.tasks, self.path = list(tasks), path
        if isinstance(action_space, spaces.Discrete) != policy.discrete:
            raise ConfigError(f"checkpoint {path}: the saved action space {action_space} does not match its policy "
                              f"({'discrete' if policy.discrete else 'continuous'} actions)")

    @classmethod
    def load(cls, source: str, device: str | torch.device = "cpu", tracking_uri: str | None = None) -> Agent:
        """The agent of a run folder (its last checkpoint, as `eval --ckpt` finds it), a model.ckpt (a copy works
        alone: the config travels inside it), or a registered model `models:/NAME/VERSION` (tracking_uri: the
        MLflow store; None: MLflow's own default, $MLFLOW_TRACKING_URI). device: cpu or cuda."""
        path = registered_checkpoint(source, tracking_uri) if source.startswith(REGISTRY_PREFIX) else \
            find_checkpoint(source)
        info = read_checkpoint(path, mmap=False)
        description = info.spaces if info.spaces is not None else spaces_from_env(info)
        policy = Policy.from_state(info.hparams, info.state_dict, info.text_vocabulary).to(device)
        vocab_size = agent_config_from(info.hparams["config"]).model.text_vocab
        adapter = ObservationAdapter(description, policy.obs_spec, info.text_vocabulary, vocab_size)
        return cls(policy, adapter, space_from_data(description["action"]), info.tasks or [], path)

    @property
    def device(self) -> torch.device:
        return self.policy.device

    def reset(self, batch: int = 1) -> AgentState:
        """A fresh state for `batch` envs: their next act starts an episode."""
        latent, action = self.policy.initial_carry(batch)
        return AgentState(latent, action, torch.ones(batch, dtype=torch.bool, device=self.device))

    @torch.no_grad()
    def act(self, obs: Any, state: AgentState | None = None, mode: str = "mode",
            task: str | int | None = None) -> tuple[Any, AgentState]:
        """(action, new state) for one observation or a batch.

        A batch is told from one observation by the shapes: an entry with one dim more in front than the env's
        observation space (or than the agent's obs_spec, for a dict in lit_dreamer's convention) is a batch of N;
        a text entry is a batch when it is a list of strings. One observation gives one action (an int for
        Discrete, an array of the box's shape and dtype for Box); a batch gives an array with N in front.
        state: None starts an episode (`reset`); pass the returned state to the next call, and
        `state.restart(done)` where some envs of a batch start a new episode. mode: "mode" (the most likely
        action, the default) or "sample" (as in training). task: the task (its name or index in the agent's task
        table) an agent of several tasks acts for; ignored by an agent of one task.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        arrays, batched = self.adapter(obs)
        n = next(iter(arrays.values())).shape[0]
        state = self.reset(n) if state is None else state
        if state.batch != n:
            raise ValueError(f"the state is for {state.batch} envs and the observation for {n}: use agent.reset({n})")
        tensors = {key: torch.as_tensor(value, device=self.device) for key, value in arrays.items()}
        action, (latent, prev_action), _ = self.policy.step(tensors, state.is_first, (state.latent, state.action),
                                                            mode=mode, task=self.task_index(task))
        new_state = AgentState(latent, prev_action, torch.zeros_like(state.is_first))
        env = to_env_action(env_action(action.float().cpu().numpy(), self.policy.discrete), self.action_space)
        if batched:
            return env, new_state
        return (int(env[0]) if self.policy.discrete else env[0]), new_state

    def task_index(self, task: str | int | None) -> int | None:
        """The task table index of `task` (a name or an index); None for an agent of one task."""
        if not self.policy.cond.active:
            return None
        if task is None:
            raise ValueError(f"this agent was trained on {len(self.tasks)} tasks ({', '.join(self.tasks)}): pass "
                             "task=NAME or task=INDEX")
        if isinstance(task, str):
            if task not in self.tasks:
                raise ValueError(f"task {task!r} is not one of this agent's tasks: {', '.join(self.tasks)}")
            return self.tasks.index(task)
        if not 0 <= int(task) < self.policy.cond.num_tasks:
            raise ValueError(f"task index {task} is outside this agent's {self.policy.cond.num_tasks} tasks")
        return int(task)


def registered_checkpoint(uri: str, tracking_uri: str | None = None) -> str:
    """The model.ckpt of a registered model version (models:/NAME/VERSION), downloaded from the MLflow store."""
    import mlflow
    from mlflow.exceptions import MlflowException
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=tracking_uri)
    except MlflowException as err:
        raise ConfigError(f"cannot load {uri} from the MLflow registry at {tracking_uri or mlflow.get_tracking_uri()}"
                          f" ({err.message.splitlines()[0]}); check the name and version, and pass tracking_uri= "
                          "or set $MLFLOW_TRACKING_URI to the store it was registered in") from None
    found = [os.path.join(folder, name) for folder, _, names in os.walk(local) for name in names
             if name == "model.ckpt"]
    if not found:
        raise ConfigError(f"{uri} holds no model.ckpt: it was not registered by `python -m lit_dreamer register`")
    return found[0]


def spaces_from_env(info: CheckpointInfo) -> dict:
    """A checkpoint saved before checkpoints carried the env's spaces: make its env once to read them."""
    from lit_dreamer.config import from_container
    from lit_dreamer.envs import make_env
    from lit_dreamer.envs.text import TextVocabularies
    from lit_dreamer.evaluation import config_of_run_folder
    config = info.run_config if info.run_config is not None else config_of_run_folder(info.path)[0]
    cfg = from_container(config)
    task = (info.tasks or [cfg.env.id])[0]
    try:
        env = make_env(task, **cfg.env.make_kwargs(),
                       vocabularies=TextVocabularies(cfg.model.text_vocab, info.text_vocabulary))
    except Exception as err:  # noqa: BLE001 - any failure to build it: the message says what to do
        raise ConfigError(f"checkpoint {info.path} was saved before checkpoints carried the env's spaces, so its env "
                          f"{task!r} is made once to read them, and that failed ({type(err).__name__}: {err}); "
                          "install the env's package where you load the agent, or load a checkpoint saved by a "
                          "newer lit_dreamer") from None
    try:
        return describe_spaces(env)
    finally:
        env.close()
