"""Transforms and output distributions of DreamerV3 (spec section 2).

Every head returns an `Output` with one interface (`mean`, `mode`, `sample`, `log_prob`, `loss`,
`entropy`), so each loss term is one line. Constructors cast their parameters to float32: the networks
may run under bf16 autocast, but probabilities, logs and losses must not.

Shape letters: K latent variables, C classes per latent, n bins of the two-hot distribution.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor


def gumbel_noise(shape: tuple[int, ...], generator: torch.Generator | None = None,
                 device: torch.device | None = None) -> Tensor:
    """Standard Gumbel noise -log(-log(U)), U uniform in (0, 1): the noise `Categorical.sample_from` takes."""
    # -log(E) with E ~ Exponential(1) is the same law, and E > 0 keeps every value finite.
    exponential = torch.empty(shape, device=device).exponential_(generator=generator)
    return -exponential.log()


def one_hot_of(index: Tensor, classes: int) -> Tensor:
    """float32 one-hot (..., classes) of integer indices (...), by comparison: exports to any graph format."""
    return (torch.arange(classes, device=index.device) == index.unsqueeze(-1)).float()


def gumbel_max(log_probs: Tensor, gumbel: Tensor) -> Tensor:
    """One-hot (..., C) of argmax(log_probs + gumbel): a draw from softmax(log_probs) for standard Gumbel
    noise (the Gumbel-max trick), its mode for gumbel = 0 (ties go to the first class, as in argmax)."""
    assert gumbel.shape == log_probs.shape, f"gumbel {tuple(gumbel.shape)} != log_probs {tuple(log_probs.shape)}"
    return one_hot_of((log_probs + gumbel).argmax(-1), log_probs.shape[-1])


def normal_from_eps(loc: Tensor, std: Tensor, eps: Tensor) -> Tensor:
    """loc + std * eps: a draw of Normal(loc, std) for standard-normal eps, its mode (loc) for eps = 0."""
    assert eps.shape == loc.shape, f"eps {tuple(eps.shape)} != loc {tuple(loc.shape)}"
    return loc + std * eps


def symlog(x: Tensor) -> Tensor:
    """sign(x) * log(1 + |x|): compresses large magnitudes, identity-like near zero."""
    return torch.sign(x) * torch.log1p(torch.abs(x))


def symexp(x: Tensor) -> Tensor:
    """sign(x) * (exp(|x|) - 1): the inverse of `symlog`."""
    return torch.sign(x) * torch.expm1(torch.abs(x))


def _sum_last(x: Tensor, dims: int) -> Tensor:
    """Sum over the last `dims` dimensions (none when dims == 0)."""
    if dims == 0:
        return x
    return x.sum(dim=tuple(range(-dims, 0)))


# At or below this many classes `softmax` writes the softmax out: aten's kernel over a short last dim
# costs about 3x the four elementwise passes (1.6 vs 0.5 ms over the (1024, 32, 4) prior latents of an
# imagination step at size1m); from 32 classes on the kernel is faster.
SMALL_SOFTMAX = 8


def softmax(logits: Tensor) -> Tensor:
    """torch.softmax over the last dim, written out for few classes (same values to rounding)."""
    if logits.shape[-1] > SMALL_SOFTMAX:
        return torch.softmax(logits, dim=-1)
    # Softmax is shift-invariant, so the max needs no gradient.
    exp = (logits - logits.amax(-1, keepdim=True).detach()).exp()
    return exp / exp.sum(-1, keepdim=True)


class Output:
    """Interface of every head's output distribution."""

    def mean(self) -> Tensor:
        raise NotImplementedError

    def mode(self) -> Tensor:
        raise NotImplementedError

    def sample(self) -> Tensor:
        raise NotImplementedError

    def log_prob(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def loss(self, target: Tensor) -> Tensor:
        """Negative log-likelihood of `target`, one value per event."""
        return -self.log_prob(target)

    def entropy(self) -> Tensor:
        raise NotImplementedError


def twohot_indices(x: Tensor, bins: Tensor) -> tuple[Tensor, Tensor]:
    """The two nearest bins of each value of x (...) and their weights: index, weight (..., 2).

    The weights are linear in the space of `bins` (ascending, shape (n,)) and sum to 1. A value
    exactly on a bin puts weight 1 on it; values outside [bins[0], bins[-1]] put all their weight on
    the end bin (there both indices name that bin, with weights 1 and 0).
    """
    assert bins.ndim == 1, f"bins must be (n,), got {tuple(bins.shape)}"
    n = bins.numel()
    # contiguous: bucketize would copy a strided x anyway (with a warning); time-major callers pass .T views
    x = x.to(bins.dtype).clamp(bins[0], bins[-1]).contiguous()
    below = (torch.bucketize(x, bins, right=True) - 1).clamp(0, n - 1)
    above = (below + 1).clamp(max=n - 1)
    bin_below, bin_above = bins[below], bins[above]
    # At the top end below == above; the gap of 1 only avoids 0/0, the weight there is then 1.
    same = below == above
    gap = torch.where(same, torch.ones_like(x), bin_above - bin_below)
    weight_below = torch.where(same, torch.ones_like(x), (bin_above - x) / gap)
    return torch.stack([below, above], -1), torch.stack([weight_below, 1 - weight_below], -1)


def twohot_encode(x: Tensor, bins: Tensor) -> Tensor:
    """Spread each value of x (...) over its two nearest bins: dense weights (..., n), summing to 1."""
    index, weight = twohot_indices(x, bins)
    weights = torch.zeros(*x.shape, bins.numel(), dtype=bins.dtype, device=bins.device)
    return weights.scatter_add_(-1, index, weight)


class _SparseCrossEntropy(torch.autograd.Function):
    """Cross-entropy of logits (..., n) against targets given sparsely, as bin indices and weights (..., k):

        loss = sum_j weight_j * (logsumexp(logits) - logits[index_j])

    The same value as `-(dense_weights * log_softmax(logits)).sum(-1)`, without the dense (..., n)
    target, log-probabilities and products: over the critic's B*T*H imagined states these are
    full passes over a (N, H, 255) tensor, several times per step. The backward is one pass,
    softmax(logits) * sum(weight) minus the weights scattered at their bins. The weights take no
    gradient (the targets are stopped).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, index: Tensor, weight: Tensor) -> Tensor:
        lse = torch.logsumexp(logits, -1)
        ctx.save_for_backward(logits, lse, index, weight)
        return weight.sum(-1) * lse - (weight * logits.gather(-1, index)).sum(-1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        logits, lse, index, weight = ctx.saved_tensors
        g = grad.unsqueeze(-1)
        grad_logits = (logits - lse.unsqueeze(-1)).exp_().mul_(g * weight.sum(-1, keepdim=True))
        return grad_logits.scatter_add_(-1, index, -g * weight), None, None


def symmetric_linspace(low: float, high: float, n: int, device=None) -> Tensor:
    """linspace(low, high, n) in float32, made exactly antisymmetric when low == -high.

    torch.linspace leaves the middle of linspace(-20, 20, 255) at 7e-8 instead of 0 and its pairs off
    by an ulp, which would keep `TwoHot(zeros).mean()` from being exactly 0.
    """
    bins = torch.linspace(low, high, n, dtype=torch.float32, device=device)
    if low == -high:
        bins = (bins - bins.flip(0)) / 2
    return bins


class TwoHot(Output):
    """Two-hot distribution over bins symexp(linspace(low, high, n)), held in symlog space.

    logits: (..., n). Targets are (...) in the original (un-symlogged) space.
    """

    def __init__(self, logits: Tensor, low: float = -20.0, high: float = 20.0):
        self.logits = logits.float()
        self.bins = symmetric_linspace(low, high, self.logits.shape[-1], device=self.logits.device)

    def mean(self) -> Tensor:
        probs = torch.softmax(self.logits, dim=-1)
        n = self.bins.numel()
        half = n // 2
        # Sum the two halves pairwise from the middle outwards, so that the terms of a symmetric
        # distribution cancel exactly (a left-to-right sum leaves rounding error, a nonzero bias).
        lower = (probs[..., :half] * self.bins[:half]).flip(-1)
        upper = probs[..., n - half:] * self.bins[n - half:]
        expected = (lower + upper).sum(-1)
        if n % 2 == 1:
            expected = expected + probs[..., half] * self.bins[half]
        return symexp(expected)

    def mode(self) -> Tensor:
        return self.mean()

    def sample(self) -> Tensor:
        raise NotImplementedError("TwoHot is used for its mean only")

    def loss(self, target: Tensor) -> Tensor:
        """Cross-entropy between the logits and the two-hot encoding of symlog(target)."""
        return self.mixed_loss([target], [1.0])

    def mixed_loss(self, targets: list[Tensor], scales: list[float]) -> Tensor:
        """sum_i scales[i] * loss(targets[i]), computed in one pass over the logits."""
        indices, weights = [], []
        for target, scale in zip(targets, scales, strict=True):
            assert target.shape == self.logits.shape[:-1], (
                f"target {tuple(target.shape)} must match logits {tuple(self.logits.shape)} without the bin dim")
            index, weight = twohot_indices(symlog(target.float()), self.bins)
            indices.append(index), weights.append(scale * weight)
        return _SparseCrossEntropy.apply(self.logits, torch.cat(indices, -1), torch.cat(weights, -1))

    def log_prob(self, x: Tensor) -> Tensor:
        return -self.loss(x)


class SymlogMSE(Output):
    """Vector decoder output: squared error in symlog space, summed over the last event_dims dims."""

    def __init__(self, pred: Tensor, event_dims: int = 1):
        self.pred = pred.float()
        self.event_dims = event_dims

    def mean(self) -> Tensor:
        return symexp(self.pred)

    def mode(self) -> Tensor:
        return self.mean()

    def sample(self) -> Tensor:
        return self.mean()

    def loss(self, target: Tensor) -> Tensor:
        assert target.shape == self.pred.shape, f"target {tuple(target.shape)} != pred {tuple(self.pred.shape)}"
        return _sum_last((self.pred - symlog(target.float())) ** 2, self.event_dims)

    def log_prob(self, x: Tensor) -> Tensor:
        return -self.loss(x)


class MSE(Output):
    """Image decoder output: pred in [0, 1], squared error summed over the last event_dims (H, W, C)."""

    def __init__(self, pred: Tensor, event_dims: int = 3):
        self.pred = pred.float()
        self.event_dims = event_dims

    def mean(self) -> Tensor:
        return self.pred

    def mode(self) -> Tensor:
        return self.pred

    def sample(self) -> Tensor:
        return self.pred

    def loss(self, target: Tensor) -> Tensor:
        assert target.shape == self.pred.shape, f"target {tuple(target.shape)} != pred {tuple(self.pred.shape)}"
        return _sum_last((self.pred - target.float()) ** 2, self.event_dims)

    def log_prob(self, x: Tensor) -> Tensor:
        return -self.loss(x)


class Categorical(Output):
    """Categorical over the last dim C with `unimix` uniform mixing, one-hot samples.

    logits: (..., C). `event_dims` counts the dims before C that are independent variables of one
    event (latents: (..., K, C) with event_dims=1); log_prob, entropy and KL are summed over them.
    """

    def __init__(self, logits: Tensor, unimix: float = 0.01, event_dims: int = 0):
        logits = logits.float()
        self.event_dims = event_dims
        self.classes = logits.shape[-1]
        if unimix > 0:
            # The floor unimix / C keeps every class reachable and every KL term finite.
            self.probs = softmax(logits) * (1 - unimix) + unimix / self.classes
            self.log_probs = torch.log(self.probs)
        else:
            self.log_probs = torch.log_softmax(logits, dim=-1)
            self.probs = self.log_probs.exp()

    def _straight_through(self, onehot: Tensor) -> Tensor:
        # Forward value is the one-hot; the gradient is that of the probabilities. The bracket is
        # exactly 0 in the forward pass, so the one-hot stays exact (onehot + p - p may round).
        return onehot + (self.probs - self.probs.detach())

    def mean(self) -> Tensor:
        return self.probs

    def mode(self) -> Tensor:
        index = self.probs.argmax(dim=-1)
        return self._straight_through(F.one_hot(index, self.classes).float())

    def sample(self) -> Tensor:
        # Inverse-CDF sampling: one uniform per variable; several times faster than multinomial here.
        probs = self.probs.detach()
        cdf = probs.cumsum(-1)
        u = torch.rand(probs.shape[:-1] + (1,), device=probs.device) * cdf[..., -1:]
        index = (cdf <= u).sum(-1).clamp_(max=self.classes - 1)
        return self._straight_through(F.one_hot(index, self.classes).float())

    def sample_from(self, gumbel: Tensor) -> Tensor:
        """A one-hot draw driven by explicit standard Gumbel noise (..., C), without gradient; gumbel = 0 gives
        the mode. For exported policies, whose noise is an input: training keeps `sample`."""
        return gumbel_max(self.log_probs.detach(), gumbel)

    def log_prob(self, x: Tensor) -> Tensor:
        """x: one-hot (..., C); returns (...) without C and the event dims."""
        assert x.shape == self.probs.shape, f"one-hot {tuple(x.shape)} != probs {tuple(self.probs.shape)}"
        return _sum_last((x.float() * self.log_probs).sum(-1), self.event_dims)

    def entropy(self) -> Tensor:
        return _sum_last(-(self.probs * self.log_probs).sum(-1), self.event_dims)


class OneHotGroups(Output):
    """Decoder output of a vector made of one-hot groups (a Discrete or MultiDiscrete observation, MiniGrid's
    cells): one softmax per group over logits (..., D), D = sum(widths), the groups side by side in that order.

    `loss` is the cross-entropy of each group summed over the groups: a log-likelihood in nats, as the KL it
    is weighed against. The groups are gathered into a padded (..., G, max width) table once per call, the
    padding at -inf, so one log_softmax covers every group whatever their widths.
    """

    def __init__(self, logits: Tensor, widths: tuple[int, ...]):
        assert logits.shape[-1] == sum(widths), f"logits width {logits.shape[-1]} != sum of the widths {sum(widths)}"
        self.logits, self.widths = logits.float(), tuple(widths)
        self.index, self.valid = group_table(self.widths, logits.device)
        padded = self.logits[..., self.index].masked_fill(~self.valid, float("-inf"))
        self.log_probs = torch.log_softmax(padded, -1).masked_fill(~self.valid, 0.0)  # (..., G, W)

    def mean(self) -> Tensor:
        """The probability of each entry (..., D), as the one-hot vector lays them out."""
        return self.ungroup(self.log_probs.exp() * self.valid)

    def mode(self) -> Tensor:
        """The one-hot vector (..., D) of each group's most likely entry."""
        return self.ungroup(one_hot_of(self.log_probs.masked_fill(~self.valid, float("-inf")).argmax(-1),
                                       self.index.shape[-1]) * self.valid)

    def sample(self) -> Tensor:
        draw = torch.distributions.Categorical(logits=self.log_probs.masked_fill(~self.valid, float("-inf"))).sample()
        return self.ungroup(one_hot_of(draw, self.index.shape[-1]) * self.valid)

    def log_prob(self, x: Tensor) -> Tensor:
        """x: the one-hot vector (..., D) (a soft target also works); returns (...), summed over the groups."""
        assert x.shape == self.logits.shape, f"target {tuple(x.shape)} != logits {tuple(self.logits.shape)}"
        return (x.float()[..., self.index] * self.valid * self.log_probs).sum((-2, -1))

    def entropy(self) -> Tensor:
        return -(self.log_probs.exp() * self.valid * self.log_probs).sum((-2, -1))

    def ungroup(self, table: Tensor) -> Tensor:
        """A padded table (..., G, W) back to the vector layout (..., D)."""
        return table[..., self.valid]


@functools.lru_cache(maxsize=16)
def group_table(widths: tuple[int, ...], device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """For groups of `widths` laid side by side in a vector: the vector index of each group's entries, padded to
    the widest group (G, W) (padding repeats index 0), and where the table holds a real entry (G, W) bool."""
    width = max(widths)
    starts = torch.tensor([0, *widths[:-1]], device=device).cumsum(0)
    offsets = torch.arange(width, device=device)
    valid = offsets < torch.tensor(widths, device=device)[:, None]
    return torch.where(valid, starts[:, None] + offsets, 0), valid


class Tokens(Output):
    """One categorical over V words per token position: logits (..., L, V), values token ids (..., L).

    `loss` is the cross-entropy summed over the L positions, padding positions (id 0) included: predicting
    where the text ends is part of predicting the text, so that `mode` decodes it whole.
    """

    def __init__(self, logits: Tensor):
        self.logits = logits.float()
        self.log_probs = torch.log_softmax(self.logits, dim=-1)

    def mean(self) -> Tensor:
        return self.log_probs.exp()

    def mode(self) -> Tensor:
        return self.logits.argmax(-1)

    def sample(self) -> Tensor:
        return torch.distributions.Categorical(logits=self.logits).sample()

    def log_prob(self, x: Tensor) -> Tensor:
        """x: token ids (..., L); returns (...), summed over the positions."""
        assert x.shape == self.logits.shape[:-1], f"tokens {tuple(x.shape)} != logits {tuple(self.logits.shape)}"
        return self.log_probs.gather(-1, x.long().unsqueeze(-1)).squeeze(-1).sum(-1)

    def entropy(self) -> Tensor:
        return -(self.log_probs.exp() * self.log_probs).sum((-2, -1))


def kl_divergence(p: Categorical, q: Categorical) -> Tensor:
    """KL[p || q], summed over the classes and the event dims."""
    assert p.event_dims == q.event_dims, f"event_dims differ: {p.event_dims} vs {q.event_dims}"
    assert p.probs.shape == q.probs.shape, f"shapes differ: {tuple(p.probs.shape)} vs {tuple(q.probs.shape)}"
    return _sum_last((p.probs * (p.log_probs - q.log_probs)).sum(-1), p.event_dims)


class Bernoulli(Output):
    """Bernoulli with the given logits (continue head); one independent variable per element."""

    def __init__(self, logits: Tensor):
        self.logits = logits.float()

    def mean(self) -> Tensor:
        return torch.sigmoid(self.logits)

    def mode(self) -> Tensor:
        return (self.mean() > 0.5).float()

    def sample(self) -> Tensor:
        return torch.bernoulli(self.mean().detach())

    def log_prob(self, x: Tensor) -> Tensor:
        return -F.binary_cross_entropy_with_logits(self.logits, x.float(), reduction="none")

    def entropy(self) -> Tensor:
        # H(p) is the cross-entropy of p with itself; the logits form stays stable for large |logits|.
        return F.binary_cross_entropy_with_logits(self.logits, torch.sigmoid(self.logits), reduction="none")


class BoundedNormal(Output):
    """Normal with mean tanh(mean_raw) and std in [min_std, max_std], independent over the last dim."""

    def __init__(self, mean_raw: Tensor, std_raw: Tensor, min_std: float = 0.1, max_std: float = 1.0):
        assert mean_raw.shape == std_raw.shape, f"mean {tuple(mean_raw.shape)} != std {tuple(std_raw.shape)}"
        self.loc = torch.tanh(mean_raw.float())
        # The +2 starts the std near its upper bound (sigmoid(2) = 0.88) for early exploration.
        self.std = (max_std - min_std) * torch.sigmoid(std_raw.float() + 2.0) + min_std
        self.normal = torch.distributions.Normal(self.loc, self.std, validate_args=False)

    def mean(self) -> Tensor:
        return self.loc

    def mode(self) -> Tensor:
        return self.loc

    def sample(self) -> Tensor:
        return self.normal.rsample()

    def sample_from(self, eps: Tensor) -> Tensor:
        """A draw driven by explicit standard-normal noise eps (..., A); eps = 0 gives the mode (for exported
        policies, whose noise is an input: training keeps `sample`)."""
        return normal_from_eps(self.loc, self.std, eps)

    def log_prob(self, x: Tensor) -> Tensor:
        return self.normal.log_prob(x.float()).sum(-1)

    def entropy(self) -> Tensor:
        return self.normal.entropy().sum(-1)
