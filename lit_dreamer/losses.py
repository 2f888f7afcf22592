"""Pure loss functions of DreamerV3 (spec sections 3 and 4), tested on golden values.

Shape letters: N sequences (imagination starts B*T, or replayed sequences B), T steps of a sequence,
H imagination horizon, K latent variables, C classes per latent.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lit_dreamer.distributions import Categorical, TwoHot, kl_divergence


def lambda_returns(reward: Tensor, discount: Tensor, bootstrap: Tensor, lam: float | Tensor) -> Tensor:
    """TD(lambda) returns of N sequences of T steps, computed backwards in time.

        R_{T-1} = bootstrap_{T-1}
        R_t     = reward_{t+1} + discount_{t+1} * ((1 - lam_{t+1}) * bootstrap_{t+1} + lam_{t+1} * R_{t+1})

    Args:
        reward: (N, T); reward_t is the reward received on arriving at step t (reward_0 is unused).
        discount: (N, T) full per-step discount, e.g. gamma * continue (0 after a terminal).
        bootstrap: (N, T) values to bootstrap from: critic values in imagination, imagined returns
            on replay.
        lam: float, or (N, T) per-step lambda; lam_t = 0 stops R_{t-1} from reading R_t (used to cut
            the recursion at episode boundaries).

    Returns:
        (N, T-1) returns for t = 0 .. T-2.
    """
    assert reward.ndim == 2 and reward.shape[1] >= 2, f"reward must be (N, T) with T >= 2, got {tuple(reward.shape)}"
    assert discount.shape == reward.shape, f"discount {tuple(discount.shape)} != reward (N, T) {tuple(reward.shape)}"
    assert bootstrap.shape == reward.shape, f"bootstrap {tuple(bootstrap.shape)} != reward (N, T) {tuple(reward.shape)}"
    # A float is filled on the device: as_tensor(float, device=cuda) would be a blocking copy, a sync.
    if torch.is_tensor(lam):
        lam = lam.to(reward.device, reward.dtype)
    else:
        lam = torch.full((), lam, dtype=reward.dtype, device=reward.device)
    assert lam.ndim == 0 or lam.shape == reward.shape, f"lam must be a float or (N, T), got {tuple(lam.shape)}"
    lam = lam.expand_as(reward)
    # The part of each step that does not depend on later returns, computed for all steps at once.
    local = reward[:, 1:] + discount[:, 1:] * (1 - lam[:, 1:]) * bootstrap[:, 1:]
    carry = discount[:, 1:] * lam[:, 1:]
    returns = [bootstrap[:, -1]]
    for t in reversed(range(reward.shape[1] - 1)):
        returns.append(local[:, t] + carry[:, t] * returns[-1])
    # returns holds R_{T-1}, ..., R_0; drop the bootstrap R_{T-1} and put time forwards.
    return torch.stack(returns[1:][::-1], dim=1)


def kl_losses(post_logits: Tensor, prior_logits: Tensor, free_nats: float = 1.0,
              unimix: float = 0.01) -> tuple[Tensor, Tensor]:
    """Dynamics and representation losses with free bits.

        dyn = max(free, KL[sg(post) || prior])    trains the prior
        rep = max(free, KL[post || sg(prior)])    trains the posterior

    Args:
        post_logits, prior_logits: (..., K, C).

    Returns:
        (dyn, rep), each (...) with the KL summed over K and C before the free-bits floor.
    """
    assert post_logits.ndim >= 2, f"logits must be (..., K, C), got {tuple(post_logits.shape)}"
    assert post_logits.shape == prior_logits.shape, (
        f"post (..., K, C) {tuple(post_logits.shape)} != prior {tuple(prior_logits.shape)}")

    def dist(logits: Tensor) -> Categorical:
        return Categorical(logits, unimix=unimix, event_dims=1)

    dyn = kl_divergence(dist(post_logits.detach()), dist(prior_logits))
    rep = kl_divergence(dist(post_logits), dist(prior_logits.detach()))
    # clamp passes no gradient below the floor: a KL under `free_nats` is left alone.
    return dyn.clamp(min=free_nats), rep.clamp(min=free_nats)


def actor_loss(log_prob: Tensor, entropy: Tensor, advantage: Tensor, weight: Tensor,
               entropy_scale: float = 3e-4) -> Tensor:
    """REINFORCE with an entropy bonus, per imagined step.

    Args:
        log_prob: (N, H) log pi(a_t | s_t) of the taken actions.
        entropy: (N, H) entropy of pi(. | s_t).
        advantage: (N, H) normalized advantage (R_t - v_t) / max(1, S); gradient stopped here.
        weight: (N, H) cumulative discount of earlier steps; gradient stopped here.

    Returns:
        (N, H) loss.
    """
    for name, x in (("entropy", entropy), ("advantage", advantage), ("weight", weight)):
        assert x.shape == log_prob.shape, f"{name} {tuple(x.shape)} != log_prob (N, H) {tuple(log_prob.shape)}"
    return -weight.detach() * (advantage.detach() * log_prob + entropy_scale * entropy)


def weight_terminal_steps(loss: Tensor, is_terminal: Tensor, weight: float) -> Tensor:
    """A per-step continue loss with terminal steps weighted `weight` times the others.

    Terminal steps are a few percent of a replay; weighting them lets the continue head learn them in the
    first thousand gradient steps, where the plain cross-entropy is dominated by the other steps.
    """
    return loss if weight == 1.0 else loss * (1.0 + (weight - 1.0) * is_terminal.to(loss.dtype))


def center_advantage(advantage: Tensor, weight: Tensor) -> Tensor:
    """The advantage minus its mean over the batch, weighted as the actor loss weighs each step.

    A baseline that is the same for every sample leaves REINFORCE's expected gradient unchanged. It removes
    the part of the advantage that a lagging critic adds to every step alike: with it, the sampled actions'
    log-probabilities are all pushed one way, a zero-mean push whose noise drives the policy deterministic.
    """
    weight = weight.detach()
    return advantage - (weight * advantage).sum() / weight.sum().clamp_min(1e-8)


def critic_loss(value_dist: TwoHot, target: Tensor, slow_target: Tensor, weight: Tensor,
                slow_reg: float = 1.0) -> Tensor:
    """Two-hot critic loss towards the returns, regularized towards the slow critic's mean.

    Args:
        value_dist: critic output with logits (N, H, n).
        target: (N, H) lambda returns; slow_target: (N, H) slow critic mean; weight: (N, H).
            All three have their gradients stopped here.

    Returns:
        (N, H) loss.
    """
    for name, x in (("slow_target", slow_target), ("weight", weight)):
        assert x.shape == target.shape, f"{name} {tuple(x.shape)} != target (N, H) {tuple(target.shape)}"
    # = value_dist.loss(target) + slow_reg * value_dist.loss(slow_target), in one pass over the logits
    return weight.detach() * value_dist.mixed_loss([target.detach(), slow_target.detach()], [1.0, slow_reg])
