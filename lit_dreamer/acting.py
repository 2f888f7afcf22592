"""One policy step, and the Lightning-free policy that a trained agent acts with.

`policy_step` is the acting half of the agent: encode the observation, one posterior step of the RSSM, the
actor. DreamerModule.act (collector, evaluation, videos) and lit_dreamer.agent.Agent (deployment) both call it.
`Policy` holds what acting needs (world model, actor-critic, task conditioning) and loads the `world_model.*`
and `actor_critic.*` entries of a DreamerModule's state dict; it imports no Lightning.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from lit_dreamer.actor_critic import ActorCritic
from lit_dreamer.agent_config import AgentConfig, agent_config_from
from lit_dreamer.conditioning import Conditioning, with_vector
from lit_dreamer.rssm import State
from lit_dreamer.world_model import WorldModel

Carry = tuple[State, Tensor]
"""(posterior state, previous action (N, A)) carried from one policy step to the next."""
POLICY_PARTS = ("world_model.", "actor_critic.")
"""The state-dict prefixes of a DreamerModule that the policy holds (not its step counters)."""


def build_parts(obs_spec: dict, action_dim: int, discrete: bool, cfg: AgentConfig, num_tasks: int = 1,
                text_words: Mapping[str, Sequence[str]] | None = None,
                one_hot: Mapping[str, Sequence[int]] | None = None) -> tuple[WorldModel, ActorCritic]:
    """The world model and actor-critic of an agent, as DreamerModule trains them and Policy acts with them. The
    world model's `cond` holds the task conditioning with the width of the text vector (model.text_condition)."""
    cond = Conditioning(num_tasks, cfg.multitask.conditioning, cfg.multitask.embed_dim)
    world_model = WorldModel(obs_spec, action_dim, cfg.model, free_nats=cfg.world_model.free_nats, cond=cond,
                             text_words=text_words, one_hot=one_hot)
    actor_critic = ActorCritic(world_model.rssm.feat_dim, action_dim, discrete, cfg.model, cfg.behavior,
                               cond=world_model.cond)
    return world_model, actor_critic


def initial_carry(world_model: WorldModel, action_dim: int, n: int, device: torch.device | str) -> Carry:
    """The carry before the first step of n envs: the RSSM's initial state and a zero previous action."""
    return world_model.rssm.initial(n, device), torch.zeros(n, action_dim, device=device)


@torch.no_grad()
def policy_step(world_model: WorldModel, actor_critic: ActorCritic, cond: Conditioning, discrete: bool,
                obs: dict[str, Tensor], is_first: Tensor, carry: Carry, mode: str = "sample",
                task: Tensor | int | None = None) -> tuple[Tensor, Carry, State]:
    """One policy step for N parallel environments.

    obs values (N, ...), is_first (N,) bool (the step starts an episode: the carry is reset). carry = (posterior
    state, previous action). task (N,) int64 or one int: the task of each env, needed by an agent of several
    tasks (ignored with one). mode="mode" takes the actor's most likely action, "sample" samples it (the latent
    is sampled in both). Returns the action (N, A) (one-hot, or in [-1, 1]), the new carry, and the posterior of
    this step (what the replay stores as context).
    """
    state, prev_action = carry
    keep = (~is_first.bool()).float()[:, None]
    embed, vector = world_model.encode_with_vector({k: v[:, None] for k, v in obs.items()})
    post = world_model.rssm.observe_step(state, prev_action, embed[:, 0], keep)
    if cond.active:
        if task is None:
            raise ValueError(f"a {cond.num_tasks}-task agent acts for a task: pass the task of each env")
        task = torch.as_tensor(task, device=post.deter.device, dtype=torch.long).expand(is_first.shape[0])
    # The instruction's embedding (model.text_condition) beside the latent, as the actor was trained to read it.
    feat = with_vector(post.feat(), None if vector is None else vector[:, 0])
    dist = actor_critic.actor.dist(actor_critic.actor(feat, task if cond.active else None))
    action = dist.mode() if mode == "mode" else dist.sample()
    if not discrete:
        action = action.clamp(-1.0, 1.0)
    return action, (post, action), post


class Policy(nn.Module):
    """World model, actor-critic and task conditioning of a trained agent, built from its checkpoint's
    hyperparameters (obs_spec, action_dim, discrete, config, num_tasks), as DreamerModule builds them.
    text_words: the checkpoint's text vocabulary ({key: words in id order}), read by model.text_encoder=minilm."""

    def __init__(self, hparams: dict[str, Any], text_words: Mapping[str, Sequence[str]] | None = None):
        super().__init__()
        cfg = agent_config_from(hparams["config"])
        self.obs_spec = {k: (tuple(int(d) for d in shape), str(np.dtype(dtype)))
                         for k, (shape, dtype) in hparams["obs_spec"].items()}
        self.action_dim, self.discrete = int(hparams["action_dim"]), bool(hparams["discrete"])
        self.world_model, self.actor_critic = build_parts(self.obs_spec, self.action_dim, self.discrete, cfg,
                                                          hparams.get("num_tasks", 1), text_words,
                                                          hparams.get("one_hot"))
        self.cond = self.world_model.cond

    @classmethod
    def from_state(cls, hparams: dict[str, Any], state_dict: dict[str, Tensor],
                   text_words: Mapping[str, Sequence[str]] | None = None) -> Policy:
        """The policy with a DreamerModule's weights (its world_model.* and actor_critic.* entries), in eval mode."""
        policy = cls(hparams, text_words)
        policy.load_state_dict({k: v for k, v in state_dict.items() if k.startswith(POLICY_PARTS)})
        return policy.eval()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def initial_carry(self, n: int) -> Carry:
        return initial_carry(self.world_model, self.action_dim, n, self.device)

    def step(self, obs: dict[str, Tensor], is_first: Tensor, carry: Carry, mode: str = "sample",
             task: Tensor | int | None = None) -> tuple[Tensor, Carry, State]:
        """policy_step with this policy's parts."""
        return policy_step(self.world_model, self.actor_critic, self.cond, self.discrete, obs, is_first, carry,
                           mode, task)
