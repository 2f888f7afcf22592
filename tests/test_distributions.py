"""Golden-value tests of lit_dreamer.distributions."""

import math

import pytest
import torch
from torch.testing import assert_close

from lit_dreamer.distributions import (
    MSE, SMALL_SOFTMAX, Bernoulli, BoundedNormal, Categorical, SymlogMSE, TwoHot, kl_divergence, softmax, symexp,
    symlog, symmetric_linspace, twohot_encode)

LOG2 = math.log(2.0)


# symlog / symexp

def test_symlog_exact_values():
    x = torch.tensor([0.0, 1.0, -1.0, 1e6, -1e6], dtype=torch.float64)
    expected = torch.tensor([0.0, LOG2, -LOG2, 13.815511557963774, -13.815511557963774], dtype=torch.float64)
    assert_close(symlog(x), expected, rtol=1e-12, atol=0.0)
    assert symlog(torch.tensor(0.0)).item() == 0.0


def test_symexp_exact_values():
    x = torch.tensor([0.0, LOG2, -LOG2, 13.815511557963774], dtype=torch.float64)
    expected = torch.tensor([0.0, 1.0, -1.0, 1e6], dtype=torch.float64)
    assert_close(symexp(x), expected, rtol=1e-12, atol=1e-12)


def test_symlog_symexp_round_trip():
    x = torch.tensor([-1e6, -37.5, -1.0, -1e-3, 0.0, 1e-3, 0.5, 1.0, 250.0, 1e6], dtype=torch.float64)
    assert_close(symexp(symlog(x)), x, rtol=1e-12, atol=1e-15)
    y = torch.linspace(-15, 15, 31, dtype=torch.float64)
    assert_close(symlog(symexp(y)), y, rtol=1e-12, atol=1e-12)


# two-hot encoding

BINS5 = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0])


def test_twohot_on_a_bin_is_one_hot():
    weights = twohot_encode(torch.tensor([-1.0, 0.0, -2.0, 2.0]), BINS5)
    assert torch.equal(weights, torch.eye(5)[[1, 2, 0, 4]])


def test_twohot_between_bins():
    # 0.25 lies a quarter of the way from bin 0.0 (index 2) to bin 1.0 (index 3): weights 0.75 / 0.25.
    # -1.5 is halfway between -2 and -1: 0.5 / 0.5.
    weights = twohot_encode(torch.tensor([0.25, -1.5]), BINS5)
    expected = torch.tensor([[0.0, 0.0, 0.75, 0.25, 0.0], [0.5, 0.5, 0.0, 0.0, 0.0]])
    assert_close(weights, expected, rtol=0.0, atol=1e-7)


def test_twohot_clips_outside_the_bins():
    weights = twohot_encode(torch.tensor([-5.0, 7.0, -1e30, 1e30]), BINS5)
    assert torch.equal(weights, torch.eye(5)[[0, 4, 0, 4]])


def test_twohot_weights_sum_to_one_and_reconstruct():
    bins = symmetric_linspace(-20.0, 20.0, 255)
    x = torch.rand(3, 50, generator=torch.Generator().manual_seed(0)) * 39.0 - 19.5  # inside the bins
    weights = twohot_encode(x, bins)
    assert weights.shape == (3, 50, 255)
    assert_close(weights.sum(-1), torch.ones(3, 50), rtol=0.0, atol=1e-6)
    assert ((weights > 0).sum(-1) <= 2).all()
    assert_close((weights * bins).sum(-1), x, rtol=1e-5, atol=1e-5)


def test_twohot_real_bin_is_one_hot():
    bins = symmetric_linspace(-20.0, 20.0, 255)
    weights = twohot_encode(bins[[0, 100, 127, 130, 254]], bins)
    assert torch.equal(weights, torch.eye(255)[[0, 100, 127, 130, 254]])


# TwoHot distribution

def test_bins_are_exactly_antisymmetric():
    bins = symmetric_linspace(-20.0, 20.0, 255)
    assert bins[127].item() == 0.0
    assert torch.equal(bins, -bins.flip(0))
    assert bins[0].item() == -20.0 and bins[-1].item() == 20.0


def test_twohot_zero_logits_mean_is_exactly_zero():
    assert TwoHot(torch.zeros(255)).mean().item() == 0.0
    assert torch.equal(TwoHot(torch.zeros(4, 7, 255)).mean(), torch.zeros(4, 7))


@pytest.mark.parametrize("target", [3.7, -0.2, 1234.5, 0.0])
def test_twohot_mean_recovers_a_two_hot_target(target):
    bins = symmetric_linspace(-20.0, 20.0, 255)
    weights = twohot_encode(symlog(torch.tensor(target)), bins)
    dist = TwoHot(torch.log(weights))  # log(0) = -inf: all mass on the two nearest bins
    assert_close(dist.mean(), torch.tensor(target), rtol=1e-5, atol=1e-6)
    assert_close(dist.mode(), torch.tensor(target), rtol=1e-5, atol=1e-6)


def test_twohot_loss_hand_computed():
    # bins [-2, -1, 0, 1, 2] in symlog space, logits [0, 1, 2, 3, 4].
    # log_softmax_i = i - L with L = logsumexp(0..4) = 4 + log(1 + e^-1 + e^-2 + e^-3 + e^-4) = 4.4519144.
    # target expm1(0.25) has symlog 0.25 -> weights 0.75 on bin 0, 0.25 on bin 1:
    #   loss = -(0.75 * (2 - L) + 0.25 * (3 - L)) = L - 2.25 = 2.2019144.
    # target 0 -> one-hot on bin 0: loss = L - 2 = 2.4519144.
    dist = TwoHot(torch.arange(5.0), low=-2.0, high=2.0)
    losses = torch.stack([dist.loss(torch.tensor(0.2840254166877415)), dist.loss(torch.tensor(0.0))])
    assert_close(losses, torch.tensor([2.2019143959, 2.4519143959]), rtol=1e-6, atol=1e-6)
    assert_close(dist.log_prob(torch.tensor(0.0)), torch.tensor(-2.4519143959), rtol=1e-6, atol=1e-6)


def dense_twohot_loss(logits, target, low=-20.0, high=20.0):
    """The textbook formula: dense two-hot weights times log_softmax (what TwoHot.loss computes sparsely)."""
    bins = symmetric_linspace(low, high, logits.shape[-1])
    return -(twohot_encode(symlog(target), bins).to(logits.dtype) * torch.log_softmax(logits, -1)).sum(-1)


def test_twohot_loss_and_gradient_equal_the_dense_formula():
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(6, 5, 255, generator=g)).requires_grad_()
    target = symexp(torch.randn(6, 5, generator=g) * 8)
    bins = symmetric_linspace(-20.0, 20.0, 255)
    target[0, :3] = symexp(bins[[0, 127, 254]])  # on the end bins and the middle one
    target[1, :2] = torch.tensor([-1e30, 1e30])  # clipped to the end bins
    slow = symexp(torch.randn(6, 5, generator=g) * 8)
    grad_out = torch.rand(6, 5, generator=g)
    dist = TwoHot(logits)
    got = dist.mixed_loss([target, slow], [1.0, 0.3])
    (got * grad_out).sum().backward()
    got_grad, logits.grad = logits.grad, None
    ref = dense_twohot_loss(logits, target) + 0.3 * dense_twohot_loss(logits, slow)
    (ref * grad_out).sum().backward()
    assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert_close(got_grad, logits.grad, rtol=1e-5, atol=1e-7)
    assert_close(dist.loss(target), dense_twohot_loss(logits, target), rtol=1e-5, atol=1e-5)


def test_twohot_sparse_cross_entropy_gradcheck():
    from lit_dreamer.distributions import _SparseCrossEntropy, twohot_indices
    g = torch.Generator().manual_seed(1)
    bins = torch.linspace(-2.0, 2.0, 7, dtype=torch.float64)
    logits = torch.randn(3, 4, 7, dtype=torch.float64, generator=g).requires_grad_()
    index, weight = twohot_indices(torch.tensor([-3.0, -2.0, -0.3, 0.0, 0.4, 1.99, 2.0, 5.0, 1.2, -1.5, 0.7, -0.9],
                                                dtype=torch.float64).view(3, 4), bins)
    index2, weight2 = twohot_indices(torch.randn(3, 4, dtype=torch.float64, generator=g), bins)
    index, weight = torch.cat([index, index2], -1), torch.cat([weight, 0.5 * weight2], -1)
    assert torch.autograd.gradcheck(lambda x: _SparseCrossEntropy.apply(x, index, weight), (logits,))


def test_twohot_float32_under_bf16_logits():
    dist = TwoHot(torch.zeros(2, 255, dtype=torch.bfloat16))
    assert dist.mean().dtype == torch.float32
    assert dist.loss(torch.ones(2)).dtype == torch.float32


# symlog MSE and MSE

def test_symlog_mse():
    # targets e-1 and -(e^2-1) have symlogs 1 and -2: loss = (0-1)^2 + (1+2)^2 = 10.
    pred = torch.tensor([[0.0, 1.0]])
    target = torch.tensor([[math.e - 1, -(math.e**2 - 1)]])
    dist = SymlogMSE(pred)
    assert_close(dist.loss(target), torch.tensor([10.0]), rtol=1e-6, atol=1e-6)
    assert_close(dist.log_prob(target), torch.tensor([-10.0]), rtol=1e-6, atol=1e-6)
    assert_close(dist.mean(), torch.tensor([[0.0, math.e - 1]]), rtol=1e-6, atol=1e-6)
    assert SymlogMSE(pred, event_dims=0).loss(target).shape == (1, 2)


def test_image_mse_sums_over_hwc():
    pred = torch.full((2, 4, 4, 3), 0.5)
    target = torch.zeros(2, 4, 4, 3)
    target[1] = 1.0
    # every pixel is off by 0.5: 48 pixels x 0.25 = 12 per image.
    assert_close(MSE(pred).loss(target), torch.tensor([12.0, 12.0]), rtol=0.0, atol=1e-6)
    assert torch.equal(MSE(pred).mode(), pred)


# Categorical with unimix

@pytest.mark.parametrize("classes", [2, 4, SMALL_SOFTMAX, SMALL_SOFTMAX + 1, 255])
def test_softmax_values_and_gradients_equal_torch_softmax(classes):
    """The written-out softmax for few classes (and the kernel above) against torch.softmax, large logits too."""
    logits = (torch.randn(64, 3, classes, dtype=torch.float64) * 30).requires_grad_()
    upstream = torch.randn(64, 3, classes, dtype=torch.float64)
    ours, = torch.autograd.grad((softmax(logits) * upstream).sum(), logits)
    ref, = torch.autograd.grad((torch.softmax(logits, -1) * upstream).sum(), logits)
    assert_close(softmax(logits), torch.softmax(logits, -1), rtol=1e-12, atol=1e-15)
    assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    assert torch.isfinite(softmax(torch.tensor([[1e4, -1e4, 0.0]]))).all()


def test_unimix_floor():
    dist = Categorical(torch.tensor([100.0, 0.0, 0.0, 0.0]), unimix=0.01)
    assert_close(dist.probs, torch.tensor([0.99 + 0.0025, 0.0025, 0.0025, 0.0025]), rtol=1e-6, atol=1e-7)
    logits = torch.randn(64, 8, generator=torch.Generator().manual_seed(1)) * 30
    probs = Categorical(logits).probs
    assert (probs >= 0.01 / 8 - 1e-9).all()
    assert_close(probs.sum(-1), torch.ones(64), rtol=0.0, atol=1e-6)


def test_categorical_log_prob_entropy_with_event_dims():
    # zero logits: uniform over C = 4, K = 3 latents -> log_prob = 3 log(1/4), entropy = 3 log 4.
    dist = Categorical(torch.zeros(2, 3, 4), event_dims=1)
    onehot = torch.eye(4)[torch.tensor([[0, 1, 2], [3, 3, 0]])]
    assert_close(dist.log_prob(onehot), torch.full((2,), -3 * math.log(4)), rtol=1e-6, atol=1e-6)
    assert_close(dist.entropy(), torch.full((2,), 3 * math.log(4)), rtol=1e-6, atol=1e-6)


def test_categorical_matches_torch_distributions():
    logits = torch.randn(5, 3, 6, generator=torch.Generator().manual_seed(2)) * 3
    other = torch.randn(5, 3, 6, generator=torch.Generator().manual_seed(3)) * 3
    mix = lambda x: 0.99 * torch.softmax(x, -1) + 0.01 / 6  # noqa: E731
    ref_p = torch.distributions.Categorical(probs=mix(logits))
    ref_q = torch.distributions.Categorical(probs=mix(other))
    p = Categorical(logits, event_dims=1)
    q = Categorical(other, event_dims=1)
    assert_close(p.entropy(), ref_p.entropy().sum(-1), rtol=1e-5, atol=1e-6)
    assert_close(kl_divergence(p, q), torch.distributions.kl_divergence(ref_p, ref_q).sum(-1), rtol=1e-5, atol=1e-6)
    index = torch.randint(0, 6, (5, 3), generator=torch.Generator().manual_seed(4))
    assert_close(p.log_prob(torch.eye(6)[index]), ref_p.log_prob(index).sum(-1), rtol=1e-5, atol=1e-6)


def test_categorical_sample_is_one_hot_with_right_frequencies():
    torch.manual_seed(0)
    probs = torch.tensor([0.7, 0.2, 0.1])
    dist = Categorical(torch.log(probs).expand(20000, 3), unimix=0.0)
    sample = dist.sample()
    assert torch.equal(sample.sum(-1), torch.ones(20000))
    assert set(sample.unique().tolist()) <= {0.0, 1.0}
    assert_close(sample.mean(0), probs, rtol=0.0, atol=0.02)
    assert torch.equal(Categorical(torch.tensor([0.0, 2.0, 1.0])).mode(), torch.tensor([0.0, 1.0, 0.0]))


@pytest.mark.parametrize("method", ["sample", "mode"])
def test_categorical_straight_through_gradient(method):
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 3, 5, generator=generator).requires_grad_()
    weights = torch.randn(4, 3, 5, generator=generator)
    dist = Categorical(logits, event_dims=1)
    (grad_sample,) = torch.autograd.grad((weights * getattr(dist, method)()).sum(), logits)
    (grad_probs,) = torch.autograd.grad((weights * Categorical(logits).probs).sum(), logits)
    assert_close(grad_sample, grad_probs, rtol=1e-6, atol=1e-7)
    assert grad_sample.abs().sum() > 0


def test_categorical_float32_under_bf16():
    dist = Categorical(torch.zeros(2, 4, dtype=torch.bfloat16))
    assert dist.probs.dtype == torch.float32 and dist.sample().dtype == torch.float32


# Bernoulli

def test_bernoulli_log_prob_hand_values():
    # log sigmoid(0) = -log 2; log(1 - sigmoid(2)) = -softplus(2) = -(2 + log1p(e^-2)) = -2.1269280;
    # log sigmoid(-3) = -softplus(3) = -(3 + log1p(e^-3)) = -3.0485874; log(1 - sigmoid(100)) = -100.
    dist = Bernoulli(torch.tensor([0.0, 2.0, -3.0, 100.0]))
    log_prob = dist.log_prob(torch.tensor([1.0, 0.0, 1.0, 0.0]))
    expected = torch.tensor([-LOG2, -2.1269280110, -3.0485873516, -100.0])
    assert_close(log_prob, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(dist.mode(), torch.tensor([0.0, 1.0, 0.0, 1.0]))  # 0.5 is not > 0.5


def test_bernoulli_entropy():
    dist = Bernoulli(torch.tensor([0.0, 200.0, -200.0]))
    assert_close(dist.entropy(), torch.tensor([LOG2, 0.0, 0.0]), rtol=1e-6, atol=1e-6)
    assert set(dist.sample().tolist()) <= {0.0, 1.0}


# Bounded normal

def test_bounded_normal_std_bounds_for_extreme_inputs():
    raw = torch.tensor([[-1e4, 0.0, 1e4]])
    dist = BoundedNormal(raw, raw)
    assert (dist.std >= 0.1).all() and (dist.std <= 1.0).all()
    assert_close(dist.std, torch.tensor([[0.1, 0.9 * torch.sigmoid(torch.tensor(2.0)).item() + 0.1, 1.0]]),
                 rtol=1e-6, atol=1e-7)
    assert_close(dist.mode(), torch.tensor([[-1.0, 0.0, 1.0]]), rtol=0.0, atol=1e-7)


def test_bounded_normal_log_prob_entropy_and_rsample():
    mean_raw = torch.zeros(2, 3, requires_grad=True)
    std_raw = torch.full((2, 3), 1e4)  # std = 1
    dist = BoundedNormal(mean_raw, std_raw)
    # standard normal at its mean, 3 independent dims: 3 * -0.5 log(2 pi); entropy 3 * 0.5 log(2 pi e).
    assert_close(dist.log_prob(torch.zeros(2, 3)), torch.full((2,), -1.5 * math.log(2 * math.pi)),
                 rtol=1e-6, atol=1e-6)
    assert_close(dist.entropy(), torch.full((2,), 1.5 * math.log(2 * math.pi * math.e)), rtol=1e-6, atol=1e-6)
    dist.sample().sum().backward()
    assert_close(mean_raw.grad, torch.ones(2, 3), rtol=0.0, atol=1e-6)  # d tanh / dx at 0 is 1
