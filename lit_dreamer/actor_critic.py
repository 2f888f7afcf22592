"""Actor, critic and slow critic, learned from imagined rollouts of the world model."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from lit_dreamer.agent_config import BehaviorConfig, ModelConfig
from lit_dreamer.conditioning import Conditioning, ConditionedHead, with_vector
from lit_dreamer.distributions import BoundedNormal, Categorical, TwoHot
from lit_dreamer.losses import actor_loss, center_advantage, critic_loss, lambda_returns
from lit_dreamer.normalizer import ReturnNormalizer
from lit_dreamer.rssm import State
from lit_dreamer.timing import PhaseTimer
from lit_dreamer.world_model import WorldModel


class Actor(nn.Module):
    """Policy head: one-hot categorical with unimix for discrete actions, bounded normal for [-1, 1] boxes."""

    def __init__(self, feat_dim: int, action_dim: int, discrete: bool, units: int, layers: int,
                 unimix: float = 0.01, min_std: float = 0.1, max_std: float = 1.0, bias: bool = False,
                 cond: Conditioning = Conditioning()):
        super().__init__()
        self.discrete, self.action_dim = discrete, action_dim
        self.unimix, self.min_std, self.max_std = unimix, min_std, max_std
        # Output scaled by 0.01 at init: the first policy is close to uniform / zero-mean.
        self.net = ConditionedHead(feat_dim, action_dim if discrete else 2 * action_dim, units, layers,
                                   out_scale=0.01, bias=bias, cond=cond)

    def forward(self, feat: Tensor, task: Tensor | None = None) -> Tensor:
        """feat (..., F), task (...) int64 (needed with several tasks) -> raw distribution parameters (..., P)."""
        return self.net(feat, task)

    def dist(self, params: Tensor) -> Categorical | BoundedNormal:
        if self.discrete:
            return Categorical(params, unimix=self.unimix)
        mean, std = params.chunk(2, -1)
        return BoundedNormal(mean, std, self.min_std, self.max_std)


class Critic(nn.Module):
    def __init__(self, feat_dim: int, bins: int, units: int, layers: int, bias: bool = False,
                 cond: Conditioning = Conditioning()):
        super().__init__()
        self.net = ConditionedHead(feat_dim, bins, units, layers, out_scale=0.0, bias=bias, cond=cond)

    def forward(self, feat: Tensor, task: Tensor | None = None) -> TwoHot:
        """feat (..., F), task (...) int64 (needed with several tasks) -> the value distribution."""
        return TwoHot(self.net(feat, task))


@dataclass
class Imagination:
    """What the imagination phase of one training step produced.

    `spread` is the return normalizer's state after this step, not yet stored: `ActorCritic.commit`
    stores it once the update has happened, so a skipped step leaves the normalizer untouched.
    """

    losses: dict[str, Tensor]
    """`policy` and `value`, each (N, H)."""
    metrics: dict[str, Tensor]
    """Scalars keyed `ac/...`."""
    returns: Tensor
    """Lambda returns (N, H)."""
    spread: Tensor
    """() the normalizer's peeked EMA of the return spread; (K,) with several tasks, one per task."""
    task: Tensor | None = None
    """(N,) the task of each start, carried through the horizon (None with one task)."""


def same_device_only(returns: Tensor) -> Tensor:
    """The default `ActorCritic.gather`: on one device the returns are all there is."""
    return returns


class ActorCritic(nn.Module):
    """Actor, critic, slow critic and return normalizer, with the imagination and replay losses.

    With several tasks (`cond`) the actor and critics are conditioned on the task, every imagined step carries
    the task of its start, and the return normalizer keeps one scale per task.

    `gather` collects the imagined returns of all devices before the normalizer's percentiles are taken,
    so every rank computes the same scale; the system that runs several devices sets it (as it sets `timer`).
    """

    def __init__(self, feat_dim: int, action_dim: int, discrete: bool, model: ModelConfig,
                 behavior: BehaviorConfig, cond: Conditioning = Conditioning()):
        super().__init__()
        model = model.resolved()
        self.cfg, self.cond = behavior, cond
        self.actor = Actor(feat_dim, action_dim, discrete, model.units, model.actor_layers, model.unimix,
                           behavior.min_std, behavior.max_std, model.dense_bias, cond=cond)
        self.critic = Critic(feat_dim, model.bins, model.units, model.critic_layers, model.dense_bias, cond=cond)
        self.slow_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.normalizer = ReturnNormalizer(rate=behavior.retnorm_rate, limit=behavior.retnorm_limit,
                                           num_tasks=cond.num_tasks)
        self.timer = PhaseTimer()
        self.gather: Callable[[Tensor], Tensor] = same_device_only

    @torch.no_grad()
    def commit(self, imagination: Imagination) -> None:
        """After an update that happened: step the slow critic and store the normalizer's new spread.

        slow <- (1 - rate) * slow + rate * critic, every training step; skipped steps call neither.
        """
        for slow, fast in zip(self.slow_critic.parameters(), self.critic.parameters()):
            slow.lerp_(fast, self.cfg.slow_rate)
        self.normalizer.commit(imagination.spread)

    def imagine_loss(self, wm: WorldModel, start: State, start_cont: Tensor, start_task: Tensor | None = None,
                     start_vector: Tensor | None = None) -> Imagination:
        """Actor and critic losses on rollouts from N start states (gradient already stopped).

        start_cont (N,) = 1 - is_terminal of the replayed start step; start_task (N,) int64 its task (needed
        with several tasks): every imagined step of a start has the start's task. start_vector (N, D): the
        start's conditioning vector (`cond.vector_dim` > 0), likewise carried through the horizon, without
        gradient. Computed time-major inside, see `behavior_losses`.
        """
        task = self.task_steps(start_task, self.cfg.horizon + 1)  # (H+1, N) or None
        with self.timer("imagination"):
            feat, samples = self.rollout(wm, start, start_task, start_vector)  # (H+1, N, F + D), (H, N, A); no gradient
            # The actor's forward with gradient, over all H rolled-out states at once, instead of a graph kept
            # per step inside the rollout: the rollout stays one function without autograd (run.compile).
            # It costs a second actor forward; interleaved A/B runs showed no difference per step.
            params = self.actor(feat[:-1], steps(task, slice(None, -1)))
            with torch.no_grad():
                # reward_0 is never used and cont_0 is the replayed start's: the heads read steps 1..H.
                reward = wm.reward(feat[1:], steps(task, slice(1, None))).mean()
                reward = torch.cat([torch.zeros_like(reward[:1]), reward])
                cont = wm.cont(feat[1:], steps(task, slice(1, None))).mean()
                cont = torch.cat([start_cont[None].to(cont.dtype), cont])
        with self.timer("actor_critic"):
            return self.behavior_losses(feat, samples, params, reward, cont, task)

    def task_steps(self, start_task: Tensor | None, length: int) -> Tensor | None:
        """The task of each start at every step, (length, N); None with one task (the heads ignore it)."""
        if not self.cond.active:
            return None
        assert start_task is not None, "several tasks: imagination needs the task of every start"
        return start_task[None].expand(length, *start_task.shape)

    @torch.no_grad()
    def rollout(self, wm: WorldModel, start: State, start_task: Tensor | None = None,
                start_vector: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Imagine H steps from the starts under the policy: features (H+1, N, F + D) and raw action samples
        (H, N, A).

        start_task (N,): the policy acts for each start's task at every step; start_vector (N, D) (or None):
        the conditioning vector appended to every step's features. One function over the whole loop, so that
        `torch.compile` (run.compile) can fuse all of it.
        """
        samples = []
        task = start_task if self.cond.active else None

        def policy(feat: Tensor) -> Tensor:
            action = self.actor.dist(self.actor(with_vector(feat, start_vector), task)).sample()
            samples.append(action)
            # The env clips a continuous action to [-1, 1] and the replay stores it clipped, so the
            # dynamics see the clipped action here too: an unclipped sample would ask the world model
            # about actions it never saw, and the policy could exploit its extrapolation. REINFORCE
            # uses the log-prob of the sample itself, which stays unbiased for the clipped execution.
            return action if self.actor.discrete else action.clamp(-1.0, 1.0)

        feat = wm.rssm.imagine(start, policy, self.cfg.horizon)
        return with_vector(feat, start_vector), torch.stack(samples)

    def behavior_losses(self, feat: Tensor, actions: Tensor, policy_params: Tensor, reward: Tensor, cont: Tensor,
                        task: Tensor | None = None) -> Imagination:
        """Actor and critic losses on imagined trajectories: lambda returns, advantages, weights.

        Inputs are time-major: feat, reward, cont (H+1, N); actions and policy_params (H, N), those
        of states 0..H-1. Only those H states are trained; the last state is only the returns'
        bootstrap, so the critic reads it without gradient and the slow critic not at all.
        Its losses and lambda returns are batch-major, (N, H) (transposed views). task (H+1, N): the task of
        each state with several tasks (None with one); advantages are divided by their task's return scale.
        """
        policy_dist = self.actor.dist(policy_params)
        head, last = steps(task, slice(None, -1)), steps(task, slice(-1, None))
        with torch.no_grad():
            slow_value = self.slow_critic(feat[:-1], head).mean()
            last_value = self.critic(feat[-1:], last).mean()
        value_dist = self.critic(feat[:-1], head)
        value = torch.cat([value_dist.mean().detach(), last_value])  # (H+1, N)
        discount = self.cfg.gamma * cont
        # Weight of step t: product of the discounts up to it (a terminal start contributes nothing).
        weight = (torch.cumprod(discount, 0) / self.cfg.gamma)[:-1]
        returns = lambda_returns(reward.T, discount.T, value.T, self.cfg.lam).T  # (H, N); the function is batch-major
        spread = self.peek_spread(returns, head)
        scale = self.normalizer.scale(spread)
        advantage = (returns - value[:-1]) / (scale if head is None else scale[head])
        actor_advantage = center_advantage(advantage, weight) if self.cfg.advantage_center else advantage
        entropy = policy_dist.entropy()
        losses = {
            "policy": actor_loss(policy_dist.log_prob(actions), entropy, actor_advantage, weight, self.cfg.entropy).T,
            "value": critic_loss(value_dist, returns, slow_value, weight, self.cfg.slow_reg).T,
        }
        advantage_abs = advantage.abs().mean()
        metrics = {
            "ac/return": returns.mean(), "ac/value": value.mean(), "ac/advantage": advantage.mean(),
            "ac/advantage_abs": advantage_abs, "ac/entropy": entropy.mean(),
            # Near +1 or -1: nearly every advantage has one sign, the critic lags the returns (CollapseWatch).
            "ac/advantage_sign_bias": advantage.mean() / advantage_abs.clamp_min(1e-8),
            "ac/reward": reward[1:].mean(), "ac/cont": cont.mean(), "ac/weight": weight.mean(),
            "ac/return_scale": scale.mean(), "ac/slow_value": slow_value.mean(),
        }
        return Imagination(losses, metrics, returns.T, spread, None if task is None else task[0])

    def peek_spread(self, returns: Tensor, task: Tensor | None) -> Tensor:
        """The normalizer's next spread from the returns of all devices (and their tasks, with several)."""
        if task is None:
            return self.normalizer.peek(self.gather(returns))
        return self.normalizer.peek(self.gather(returns), self.gather(task.contiguous()))

    def replay_value_loss(self, post_feat: Tensor, batch: dict[str, Tensor], imagined_returns: Tensor,
                          vector: Tensor | None = None) -> Tensor:
        """Critic loss on the replayed sequence itself (its gradient reaches the world model).

        post_feat (B, T, F) with gradient; imagined_returns (B, T): the lambda return of the
        imagined rollout from each replayed step, used as its bootstrap. Lambda returns over real
        rewards and terminals; the recursion is cut at is_last. With several tasks the critics read the
        batch's `task` (B, T); with a conditioning vector (B, T, D), the features with it appended. Returns (B, T-1).
        """
        post_feat = with_vector(post_feat, vector)
        task = batch["task"] if self.cond.active else None
        reward, last = batch["reward"].float(), batch["is_last"].float()
        discount = self.cfg.gamma * (1.0 - batch["is_terminal"].float())
        lam = self.cfg.lam * (1.0 - last)
        returns = lambda_returns(reward, discount, imagined_returns.detach(), lam)
        value_dist = self.critic(post_feat, task)
        with torch.no_grad():
            slow_value = self.slow_critic(post_feat, task).mean()
        return critic_loss(TwoHot(value_dist.logits[:, :-1]), returns, slow_value[:, :-1],
                           1.0 - last[:, :-1], self.cfg.slow_reg)


def steps(task: Tensor | None, which: slice) -> Tensor | None:
    """The task of some imagined steps (task (H+1, N) sliced in time), None for one task."""
    return None if task is None else task[which]
