"""Golden-value tests of lit_dreamer.losses and lit_dreamer.normalizer."""

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from lit_dreamer.distributions import TwoHot
from lit_dreamer.losses import (actor_loss, center_advantage, critic_loss, kl_losses, lambda_returns,
                                weight_terminal_steps)
from lit_dreamer.normalizer import ReturnNormalizer


# lambda returns

def nstep_mixture_returns(reward, discount, bootstrap, lam):
    """Textbook lambda return: a lambda-weighted mixture of n-step returns, in plain Python floats.

    G_t^(n) = sum_{k=1..n} (prod_{j<k} d_{t+j}) r_{t+k} + (prod_{j<=n} d_{t+j}) v_{t+n}
    R_t     = (1 - lam) sum_{n=1}^{M-1} lam^(n-1) G_t^(n) + lam^(M-1) G_t^(M), with M = T-1-t.
    """
    T = len(reward)
    out = []
    for t in range(T - 1):
        horizon = T - 1 - t
        nstep = []
        for n in range(1, horizon + 1):
            total, running = 0.0, 1.0
            for k in range(1, n + 1):
                total += running * reward[t + k]
                running *= discount[t + k]
            nstep.append(total + running * bootstrap[t + n])
        mixed = sum((1 - lam) * lam ** (n - 1) * nstep[n - 1] for n in range(1, horizon))
        out.append(mixed + lam ** (horizon - 1) * nstep[horizon - 1])
    return out


def test_lambda_returns_hand_computed():
    # R_2 = v_2 = 20
    # R_1 = r_2 + d_2 ((1 - .5) v_2 + .5 R_2) = 2 + .5 (10 + 10)  = 12
    # R_0 = r_1 + d_1 ((1 - .5) v_1 + .5 R_1) = 1 + .5 (5 + 6)    = 6.5
    reward = torch.tensor([[0.0, 1.0, 2.0]])
    discount = torch.tensor([[1.0, 0.5, 0.5]])
    bootstrap = torch.tensor([[0.0, 10.0, 20.0]])
    assert_close(lambda_returns(reward, discount, bootstrap, 0.5), torch.tensor([[6.5, 12.0]]), rtol=0.0, atol=1e-6)


def test_lambda_returns_with_terminal_against_nstep_mixture():
    gamma, lam = 0.99, 0.95
    reward = [0.0, 1.0, 2.0, -3.0]
    discount = [gamma, gamma, 0.0, gamma]  # step 2 is terminal: nothing after it counts for t < 2
    bootstrap = [0.5, 4.0, 7.0, 9.0]
    expected = nstep_mixture_returns(reward, discount, bootstrap, lam)
    # The terminal step cuts everything after it: R_1 = r_2 = 2 exactly.
    assert expected[1] == 2.0
    got = lambda_returns(*(torch.tensor([x], dtype=torch.float64) for x in (reward, discount, bootstrap)), lam)
    assert_close(got, torch.tensor([expected], dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_lambda_returns_random_batch_against_nstep_mixture():
    generator = torch.Generator().manual_seed(0)
    reward, bootstrap = torch.randn(2, 3, 16, generator=generator, dtype=torch.float64)
    discount = 0.997 * (torch.rand(3, 16, generator=generator, dtype=torch.float64) > 0.1)
    got = lambda_returns(reward, discount, bootstrap, 0.95)
    assert got.shape == (3, 15)
    for row in range(3):
        expected = nstep_mixture_returns(reward[row].tolist(), discount[row].tolist(), bootstrap[row].tolist(), 0.95)
        assert_close(got[row], torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-10)


def test_lambda_returns_extreme_lambdas():
    generator = torch.Generator().manual_seed(1)
    reward, discount, bootstrap = torch.rand(3, 2, 5, generator=generator, dtype=torch.float64)
    # lam = 0: one-step TD targets r_{t+1} + d_{t+1} v_{t+1}.
    td = reward[:, 1:] + discount[:, 1:] * bootstrap[:, 1:]
    assert_close(lambda_returns(reward, discount, bootstrap, 0.0), td, rtol=1e-12, atol=1e-12)
    # lam = 1: discounted sum of all later rewards plus the discounted last value.
    expected = torch.zeros(2, 4, dtype=torch.float64)
    for t in range(4):
        running = torch.ones(2, dtype=torch.float64)
        for k in range(t + 1, 5):
            expected[:, t] += running * reward[:, k]
            running = running * discount[:, k]
        expected[:, t] += running * bootstrap[:, 4]
    assert_close(lambda_returns(reward, discount, bootstrap, 1.0), expected, rtol=1e-12, atol=1e-12)


def recursive_returns(reward, discount, bootstrap, lams):
    """The recursion written out by hand, per-step lambda, plain Python."""
    T = len(reward)

    def value(t):
        if t == T - 1:
            return bootstrap[t]
        n = t + 1
        return reward[n] + discount[n] * ((1 - lams[n]) * bootstrap[n] + lams[n] * value(n))

    return [value(t) for t in range(T - 1)]


def test_per_step_lambda_cuts_at_is_last():
    reward = [0.0, 1.0, 2.0, 3.0, 4.0]
    discount = [0.9] * 5  # time-limit truncation at step 2: not terminal, discount stays
    bootstrap = [10.0, 20.0, 30.0, 40.0, 50.0]
    is_last = [0.0, 0.0, 1.0, 0.0, 0.0]
    lams = [0.95 * (1 - last) for last in is_last]
    to_tensor = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    got = lambda_returns(to_tensor(reward), to_tensor(discount), to_tensor(bootstrap), to_tensor(lams))
    # Step 1 bootstraps fully from v_2: R_1 = r_2 + 0.9 * 30 = 29.
    assert got[0, 1].item() == pytest.approx(29.0, abs=1e-12)
    expected = recursive_returns(reward, discount, bootstrap, lams)
    assert_close(got, to_tensor(expected), rtol=1e-12, atol=1e-12)
    # Nothing after the cut reaches R_0 or R_1.
    later = to_tensor([0.0, 1.0, 2.0, 300.0, -400.0])
    changed = lambda_returns(later, to_tensor(discount), to_tensor([10.0, 20.0, 30.0, 1e3, 50.0]), to_tensor(lams))
    assert_close(changed[0, :2], got[0, :2], rtol=0.0, atol=0.0)


def test_lambda_returns_rejects_bad_shapes():
    with pytest.raises(AssertionError, match="N, T"):
        lambda_returns(torch.zeros(2, 5), torch.zeros(2, 4), torch.zeros(2, 5), 0.95)
    with pytest.raises(AssertionError, match="N, T"):
        lambda_returns(torch.zeros(2, 5), torch.zeros(2, 5), torch.zeros(2, 5), torch.zeros(2, 4))


# KL losses with free bits

def test_free_bits_below_threshold_give_exactly_one_and_zero_gradient():
    logits = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(0))
    post = logits.clone().requires_grad_()
    prior = logits.clone().requires_grad_()
    dyn, rep = kl_losses(post, prior)
    assert dyn.shape == rep.shape == (4,)
    assert torch.equal(dyn, torch.ones(4)) and torch.equal(rep, torch.ones(4))
    (dyn.sum() + rep.sum()).backward()
    assert torch.equal(post.grad, torch.zeros_like(post))
    assert torch.equal(prior.grad, torch.zeros_like(prior))


def test_kl_losses_value_and_gradient_routing():
    generator = torch.Generator().manual_seed(1)
    post = (3 * torch.randn(4, 3, 5, generator=generator)).requires_grad_()
    prior = (3 * torch.randn(4, 3, 5, generator=generator)).requires_grad_()
    dyn, rep = kl_losses(post, prior)
    # Independent KL: sum over K and C of p (log p - log q) with p = 0.99 softmax + 0.01 / C.
    p = 0.99 * torch.softmax(post.detach().double(), -1) + 0.002
    q = 0.99 * torch.softmax(prior.detach().double(), -1) + 0.002
    kl = (p * (p.log() - q.log())).sum((-2, -1))
    assert (kl > 1).all()
    assert_close(dyn.double(), kl, rtol=1e-5, atol=1e-5)
    assert_close(rep.double(), kl, rtol=1e-5, atol=1e-5)

    grad_post, grad_prior = torch.autograd.grad(dyn.sum(), (post, prior), allow_unused=True)
    assert grad_post is None and grad_prior.abs().sum() > 0
    grad_post, grad_prior = torch.autograd.grad(rep.sum(), (post, prior), allow_unused=True)
    assert grad_prior is None and grad_post.abs().sum() > 0


# actor and critic losses

def test_actor_loss_hand_values_and_stop_gradients():
    log_prob = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    entropy = torch.tensor([[0.5, 1.0]], requires_grad=True)
    advantage = torch.tensor([[2.0, -1.0]], requires_grad=True)
    weight = torch.tensor([[1.0, 0.5]], requires_grad=True)
    loss = actor_loss(log_prob, entropy, advantage, weight, entropy_scale=0.1)
    # step 0: -1.0 * (2 * -1 + 0.1 * 0.5) = 1.95;  step 1: -0.5 * (-1 * -2 + 0.1 * 1) = -1.05
    assert_close(loss, torch.tensor([[1.95, -1.05]]), rtol=0.0, atol=1e-6)
    loss.sum().backward()
    assert_close(log_prob.grad, torch.tensor([[-2.0, 0.5]]), rtol=0.0, atol=1e-7)  # -w * adv
    assert_close(entropy.grad, torch.tensor([[-0.1, -0.05]]), rtol=0.0, atol=1e-7)  # -w * scale
    assert advantage.grad is None and weight.grad is None


def test_centered_advantage_hand_values():
    advantage = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    weight = torch.tensor([[1.0, 1.0], [0.0, 2.0]], requires_grad=True)
    # Weighted mean (1*1 + 1*2 + 0*3 + 2*6) / (1 + 1 + 0 + 2) = 15 / 4 = 3.75; a zero-weight step does not count.
    centered = center_advantage(advantage, weight)
    assert_close(centered, torch.tensor([[-2.75, -1.75], [-0.75, 2.25]]), rtol=0.0, atol=1e-6)
    assert not centered.requires_grad  # the weight's gradient is stopped, as in the actor loss
    # An advantage the same at every step (a critic lagging by the same amount everywhere) becomes zero.
    assert_close(center_advantage(torch.full((3, 4), 0.7), torch.rand(3, 4) + 0.1), torch.zeros(3, 4))


def test_terminal_steps_weighted_in_the_continue_loss_hand_values():
    loss = torch.tensor([[0.5, 2.0, 1.0]])
    is_terminal = torch.tensor([[False, True, False]])
    assert_close(weight_terminal_steps(loss, is_terminal, 4.0), torch.tensor([[0.5, 8.0, 1.0]]))
    assert weight_terminal_steps(loss, is_terminal, 1.0) is loss  # the spec's loss, untouched


def test_critic_loss_hand_values_and_stop_gradients():
    # Same case as the TwoHot loss test: L = logsumexp(0..4) = 4.4519144;
    # target expm1(0.25) -> loss L - 2.25 = 2.2019144; slow target 0 -> loss L - 2 = 2.4519144.
    # 0.5 * (2.2019144 + 1.0 * 2.4519144) = 2.3269144.
    logits = torch.arange(5.0).reshape(1, 1, 5).requires_grad_()
    target = torch.tensor([[math.expm1(0.25)]], requires_grad=True)
    slow_target = torch.zeros(1, 1, requires_grad=True)
    weight = torch.tensor([[0.5]], requires_grad=True)
    loss = critic_loss(TwoHot(logits, low=-2.0, high=2.0), target, slow_target, weight)
    assert_close(loss, torch.tensor([[2.3269143959]]), rtol=1e-6, atol=1e-6)
    loss.sum().backward()
    assert logits.grad.abs().sum() > 0
    assert target.grad is None and slow_target.grad is None and weight.grad is None
    no_slow = critic_loss(TwoHot(logits, low=-2.0, high=2.0), target, slow_target, weight, slow_reg=0.0)
    assert_close(no_slow, torch.tensor([[0.5 * 2.2019143959]]), rtol=1e-6, atol=1e-6)


# return normalizer

def test_normalizer_hand_value_and_peek_does_not_mutate():
    normalizer = ReturnNormalizer()
    # 0, 1, ..., 100: the 5th and 95th percentiles are 5 and 95, spread 90; EMA from 0: 0.01 * 90.
    value = normalizer.peek(torch.arange(101.0))
    assert_close(value, torch.tensor(0.9), rtol=0.0, atol=1e-6)
    assert normalizer.spread.item() == 0.0
    normalizer.commit(value)
    assert_close(normalizer.spread, torch.tensor(0.9), rtol=0.0, atol=1e-6)
    assert normalizer.spread.dtype == torch.float32


def test_normalizer_against_numpy_over_three_batches():
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(16, 15, generator=generator) * scale + shift
               for scale, shift in ((50.0, 3.0), (200.0, -10.0), (5.0, 100.0))]
    normalizer = ReturnNormalizer(rate=0.01)
    ema = 0.0
    for batch in batches:
        array = batch.double().numpy().ravel()
        ema = 0.99 * ema + 0.01 * (np.percentile(array, 95) - np.percentile(array, 5))
        normalizer.commit(normalizer.peek(batch))
        assert_close(normalizer.spread.double(), torch.tensor(ema, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert_close(normalizer.scale().double(), torch.tensor(max(1.0, ema), dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert normalizer.scale().item() > 1.0  # the three batches push S past the floor


def test_normalizer_scale_floors_at_limit():
    normalizer = ReturnNormalizer()
    assert normalizer.scale().item() == 1.0
    assert normalizer.scale(torch.tensor(0.3)).item() == 1.0
    assert normalizer.scale(torch.tensor(3.0)).item() == 3.0
    state = ReturnNormalizer()
    state.load_state_dict({"spread": torch.tensor(2.5)})
    assert state.scale().item() == 2.5
