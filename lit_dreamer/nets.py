"""Network building blocks: norms, MLPs, block-diagonal layers, the block GRU, CNN encoder and decoder.

Plain `nn.Module`s; nothing here knows about Lightning. Every hidden layer is
Linear (with a zero-initialized bias when `bias=True`) -> RMSNorm -> SiLU, initialized with a truncated
normal scaled by fan-in, as in the DreamerV3 reference code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_dreamer.distributions import symlog
from lit_dreamer.minilm import MINILM_DIM, SentenceTable

NORM_EPS = 1e-4


def trunc_normal_fan_in_(weight: Tensor, fan_in: int, scale: float = 1.0) -> Tensor:
    """Truncated normal (at 2 std) with std scale / sqrt(fan_in) after truncation."""
    # A normal truncated at +-2 std has std 0.8796 of the untruncated one: correct for it.
    std = scale * math.sqrt(1.0 / fan_in) / 0.87962566103423978
    with torch.no_grad():
        return nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


def linear(in_dim: int, out_dim: int, bias: bool = True, scale: float = 1.0) -> nn.Linear:
    """nn.Linear with fan-in truncated-normal init, weights times `scale` (0: zero-initialized)."""
    layer = nn.Linear(in_dim, out_dim, bias=bias)
    if scale == 0.0:
        nn.init.zeros_(layer.weight)
    else:
        trunc_normal_fan_in_(layer.weight, in_dim, scale)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


class NormAct(nn.Sequential):
    """Linear, RMSNorm, SiLU: the hidden layer used everywhere.

    Without a bias (the spec) the layer cannot tell x from c * x for any c > 0: RMSNorm divides
    the scale out. For a 1-dim action that leaves only its sign. `bias=True` (the reference code's
    Linear, zero-initialized) lets the layer learn to keep the magnitude.
    """

    def __init__(self, in_dim: int, out_dim: int, bias: bool = False):
        super().__init__(linear(in_dim, out_dim, bias=bias), RMSNorm(out_dim), nn.SiLU())


class MLP(nn.Sequential):
    """`layers` hidden layers of `units`; output size is `units` (or `in_dim` when layers == 0)."""

    def __init__(self, in_dim: int, units: int, layers: int, bias: bool = False):
        dims = [in_dim] + [units] * layers
        super().__init__(*[NormAct(a, b, bias) for a, b in zip(dims[:-1], dims[1:])])
        self.out_dim = dims[-1]


class Head(nn.Module):
    """MLP trunk plus an output layer. `out_scale` 0 zero-initializes it (reward, critic)."""

    def __init__(self, in_dim: int, out_dim: int, units: int, layers: int, out_scale: float = 1.0,
                 bias: bool = False):
        super().__init__()
        self.trunk = MLP(in_dim, units, layers, bias)
        self.out = linear(self.trunk.out_dim, out_dim, scale=out_scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.trunk(x))


class BlockLinear(nn.Module):
    """Block-diagonal linear layer: `blocks` independent (in/blocks -> out/blocks) maps.

    Saves a factor `blocks` of parameters and FLOPs over a dense layer of the same width,
    which is what lets the recurrent state grow to thousands of units.
    """

    def __init__(self, in_dim: int, out_dim: int, blocks: int, bias: bool = True, fan_in: int | None = None):
        super().__init__()
        assert in_dim % blocks == 0 and out_dim % blocks == 0, (in_dim, out_dim, blocks)
        self.blocks = blocks
        self.weight = nn.Parameter(torch.empty(blocks, in_dim // blocks, out_dim // blocks))
        # Like the reference code, the fan-in is the whole input width, not one block's.
        trunc_normal_fan_in_(self.weight, fan_in or in_dim)
        self.bias = nn.Parameter(torch.zeros(out_dim)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.blocks, x.shape[-1] // self.blocks)  # (N, G, in/G)
        y = torch.einsum("ngi,gio->ngo", x, self.weight).reshape(*lead, -1)
        return y if self.bias is None else y + self.bias


class BlockGRU(nn.Module):
    """The DreamerV3 recurrent core: a GRU whose weights are block-diagonal over `blocks` groups.

    Each block sees its own slice of h plus the shared input projections, goes through one
    normalized hidden layer, then produces its slice of the reset, candidate and update gates.
    The update gate is sigmoid(u - 1), which biases the cell towards keeping its state.
    """

    def __init__(self, input_dim: int, deter: int, blocks: int = 8):
        super().__init__()
        assert deter % blocks == 0, f"deter={deter} must be divisible by blocks={blocks}"
        self.deter, self.blocks = deter, blocks
        # Block g reads [h_g, x] through its own weight W_g. Split W_g into its h rows and x rows:
        # the h rows form a block-diagonal layer and the x rows of all blocks side by side form one
        # dense layer. Same function and parameter count, but no copy of x per block.
        fan_in = deter + blocks * input_dim  # the reference's fan-in of the per-block input layer
        self.hidden_h = BlockLinear(deter, deter, blocks, bias=False, fan_in=fan_in)
        self.hidden_x = nn.Linear(input_dim, deter, bias=False)
        trunc_normal_fan_in_(self.hidden_x.weight, fan_in)
        self.norm = RMSNorm(deter)
        self.gates = BlockLinear(deter, 3 * deter, blocks)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        """x: (N, input_dim) shared input; h: (N, deter). Returns the next h (N, deter)."""
        n, g = h.shape[0], self.blocks
        hidden = F.silu(self.norm(self.hidden_h(h) + self.hidden_x(x)))
        reset, cand, update = self.gates(hidden).view(n, g, 3, -1).unbind(2)
        reset = torch.sigmoid(reset)
        cand = torch.tanh(reset * cand)
        update = torch.sigmoid(update - 1.0)
        return (update * cand + (1 - update) * h.view(n, g, -1)).reshape(n, -1)


def _float_rows(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (N*H*W, C) in float32 or wider; a view when x is channels-last float32."""
    rows = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    return rows.to(torch.promote_types(x.dtype, torch.float32))


def _rms_norm_rows(rows: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """y = rows * rsqrt(mean(rows^2) + eps) * weight over the last dim of rows (M, C), in float32 at least.

    Returns y and inv (M, 1). bf16 rows are read as they are: the norm accumulates in float32 and
    the first product promotes, so no float32 copy of the input is made.
    """
    c = rows.shape[-1]
    dtype = torch.promote_types(rows.dtype, torch.float32)
    norm = torch.linalg.vector_norm(rows, dim=-1, keepdim=True, dtype=dtype)
    inv = torch.rsqrt(norm.square_().div_(c).add_(NORM_EPS))
    return torch.mul(rows, inv).mul_(weight.to(dtype)), inv


def _rms_norm_rows_backward(rows: Tensor, grad: Tensor, weight: Tensor, inv: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of `_rms_norm_rows` for the input rows and the weight (C,), from the saved inv (M, 1)."""
    c = rows.shape[-1]
    scale = weight.to(rows.dtype)
    g_x = grad * rows  # one product serves both reductions
    grad_weight = (g_x.T @ inv).view(c)
    dot = g_x @ (scale / c).view(c, 1)  # mean_c(g * w * x), (M, 1)
    grad_rows = (grad * scale).sub_(rows * (inv * inv * dot)).mul_(inv)
    return grad_rows, grad_weight


class _ChannelRMSNormFn(torch.autograd.Function):
    """y = x * rsqrt(mean_c(x^2) + eps) * w over the channels of an NCHW map, in float32 at least.

    Works on the map's (N*H*W, C) rows, a free view of a channels-last tensor. Written out because
    autograd of the plain formula spends most of its time in reductions over the short channel axis
    and in temporaries: here the channel reductions are matrix-vector products, and the backward
    is five elementwise passes. Same values and gradients (tests/test_nets.py).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        n, c, h, w = x.shape
        with torch.autocast(x.device.type, enabled=False):
            y, inv = _rms_norm_rows(_float_rows(x), weight)
        ctx.save_for_backward(x, weight, inv)
        return y.to(x.dtype).view(n, h, w, c).permute(0, 3, 1, 2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        x, weight, inv = ctx.saved_tensors
        n, c, h, w = x.shape
        with torch.autocast(x.device.type, enabled=False):
            gx, grad_weight = _rms_norm_rows_backward(_float_rows(x), _float_rows(grad), weight, inv)
        return gx.to(x.dtype).view(n, h, w, c).permute(0, 3, 1, 2), grad_weight.to(weight.dtype)


class _RMSNormFn(torch.autograd.Function):
    """y = x * rsqrt(mean(x^2) + eps) * w over the last dim, in float32 at least, returned in x's dtype.

    The same written-out forward and backward as the channel norm. `nn.RMSNorm` has a fused forward
    but its backward is autograd of the decomposed formula: at S dims its backward over the
    actor's and critic's imagined states took about 8x its forward (and bf16 inputs miss the fused
    forward too). Same values and gradients (tests/test_nets.py).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            y, inv = _rms_norm_rows(x.reshape(-1, x.shape[-1]), weight)
        ctx.save_for_backward(x, weight, inv)
        return y.to(x.dtype).view(x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        x, weight, inv = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            dtype = torch.promote_types(x.dtype, torch.float32)
            rows, g = (t.reshape(-1, x.shape[-1]).to(dtype) for t in (x, grad))
            gx, grad_weight = _rms_norm_rows_backward(rows, g, weight, inv)
        return gx.to(x.dtype).view(x.shape), grad_weight.to(weight.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim with a learned scale: `nn.RMSNorm(dim, eps=NORM_EPS)` with a faster backward.

    Its parameter is `weight`, as in `nn.RMSNorm`, so state dicts of either load into the other.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return _RMSNormFn.apply(x, self.weight)


class ChannelRMSNorm(nn.Module):
    """RMSNorm over the channel axis of an NCHW feature map (channels-last memory is fastest)."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        return _ChannelRMSNormFn.apply(x, self.weight)


def conv(in_ch: int, out_ch: int, kernel: int, bias: bool, stride: int = 1, transpose: bool = False
         ) -> nn.Conv2d | nn.ConvTranspose2d:
    """Conv with 'same' padding: stride 1 keeps the size, stride 2 halves it (transpose: doubles it)."""
    if transpose:
        # Output (in - 1) * 2 - 2 * pad + kernel + extra = 2 * in for any kernel size.
        layer = nn.ConvTranspose2d(in_ch, out_ch, kernel, stride=2, padding=(kernel - 1) // 2,
                                   output_padding=kernel % 2, bias=bias)
    elif stride == 1:
        layer = nn.Conv2d(in_ch, out_ch, kernel, padding="same", bias=bias)
    else:
        layer = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=(kernel - 1) // 2, bias=bias)
    trunc_normal_fan_in_(layer.weight, in_ch * kernel * kernel)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


def stage_channels(depth: int, mults: tuple[int, ...]) -> list[int]:
    return [depth * m for m in mults]


class ImageEncoder(nn.Module):
    """CNN over one or more stacked uint8 HxWxC images: 4 stages of conv 5x5, 2x2 max-pool, RMSNorm, SiLU.

    The reference code pools right after the conv, before norm and activation; we follow it
    (the spec lists pool last): the result is nearly identical and norm/act run on 4x fewer pixels.
    `strided=True` is the reference code's cheaper option: each stage is one stride-2 conv, no pooling
    (with kernel 4 and mults (1, 2, 4, 8) it is the CNN of older DreamerV3 ports).
    """

    def __init__(self, in_channels: int, image_size: int, depth: int, mults=(2, 3, 4, 4), kernel: int = 5,
                 strided: bool = False):
        super().__init__()
        min_size = image_size // 2 ** len(mults)
        if image_size & (image_size - 1) or min_size < 1:
            raise ValueError(f"image size {image_size} must be a power of two >= {2 ** len(mults)}")
        chans = [in_channels] + stage_channels(depth, mults)
        self.strided = strided
        self.convs = nn.ModuleList(conv(a, b, kernel, bias=False, stride=2 if strided else 1)
                                   for a, b in zip(chans[:-1], chans[1:]))
        self.norms = nn.ModuleList(ChannelRMSNorm(c) for c in chans[1:])
        self.out_dim = chans[-1] * min_size * min_size

    def forward(self, image: Tensor) -> Tensor:
        """image: (N, H, W, C) uint8 or float in [0, 255]. Returns (N, out_dim)."""
        x = image.permute(0, 3, 1, 2).float() / 255.0 - 0.5
        x = x.to(memory_format=torch.channels_last)
        for conv_layer, norm in zip(self.convs, self.norms):
            x = conv_layer(x) if self.strided else F.max_pool2d(conv_layer(x), 2)
            x = F.silu(norm(x))
        return x.flatten(1)


class ImageDecoder(nn.Module):
    """Linear to a (C_last, S/16, S/16) map, RMSNorm + SiLU, then 4 stages of 2x nearest upsample + conv 5x5.

    All but the last stage are followed by RMSNorm + SiLU; the last conv outputs the image
    channels, squashed by a sigmoid to [0, 1]. `strided=True`: each stage is one stride-2
    transposed conv instead of upsample + conv.

    `projection_norm=False` is the layout of checkpoints made before it existed: the projection
    (with a bias, whatever `bias` says) goes straight into the first upsample + conv, so the two
    compose into one linear map.
    """

    def __init__(self, feat_dim: int, out_channels: int, image_size: int, depth: int,
                 mults=(2, 3, 4, 4), kernel: int = 5, strided: bool = False, projection_norm: bool = True,
                 bias: bool = False):
        super().__init__()
        self.strided = strided
        chans = stage_channels(depth, mults)
        self.min_size = image_size // 2 ** len(mults)
        self.top_channels = chans[-1]
        self.project = linear(feat_dim, chans[-1] * self.min_size ** 2, bias=bias or not projection_norm)
        # Normalized over channels at each position of the map, like the conv stages (and the reference).
        self.project_norm = ChannelRMSNorm(chans[-1]) if projection_norm else None
        ins = chans[::-1]  # e.g. [4d, 4d, 3d, 2d]
        outs = chans[::-1][1:] + [out_channels]  # e.g. [4d, 3d, 2d, C]
        self.convs = nn.ModuleList(
            conv(a, b, kernel, bias=(i == len(ins) - 1), transpose=strided) for i, (a, b) in enumerate(zip(ins, outs)))
        self.norms = nn.ModuleList(ChannelRMSNorm(c) for c in outs[:-1])

    def forward(self, feat: Tensor) -> Tensor:
        """feat: (N, F). Returns (N, H, W, C) in [0, 1]."""
        x = self.project(feat).view(-1, self.top_channels, self.min_size, self.min_size)
        x = x.contiguous(memory_format=torch.channels_last)
        if self.project_norm is not None:
            x = F.silu(self.project_norm(x))
        for i, conv_layer in enumerate(self.convs):
            x = conv_layer(x if self.strided else F.interpolate(x, scale_factor=2, mode="nearest"))
            if i < len(self.norms):
                x = F.silu(self.norms[i](x))
        return torch.sigmoid(x.float()).permute(0, 2, 3, 1)


class VectorEncoder(nn.Module):
    """Symlog the concatenated vector inputs, then an MLP."""

    def __init__(self, in_dim: int, units: int, layers: int, bias: bool = False):
        super().__init__()
        self.mlp = MLP(in_dim, units, layers, bias)
        self.out_dim = self.mlp.out_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(symlog(x))


def grid_side(widths: tuple[int, ...]) -> tuple[int, int] | None:
    """One-hot group widths -> (side, cell): the grid of side x side cells of `cell` entries each that they
    repeat (the shortest repeating pattern whose count is a square of side >= 3), or None."""
    for period in range(1, len(widths) // 9 + 1):
        count, rest = divmod(len(widths), period)
        side = math.isqrt(count)
        if not rest and side >= 3 and side * side == count and widths == widths[:period] * count:
            return side, sum(widths[:period])
    return None


class GridEncoder(nn.Module):
    """A square grid of one-hot cells, flattened (N, side * side * cell) cell by cell, -> (N, channels * side *
    side): two 3x3 convolutions ('same' padding), each with RMSNorm over channels and SiLU.

    Every cell is read through the same weights, where the vector MLP learns each cell's own: an object seen at
    one place of MiniGrid's view is encoded as at any other, so what is learned of a red ball in one cell holds
    in all 49 (the CNN of the BabyAI baselines reads the symbolic view the same way).
    """

    def __init__(self, side: int, cell: int, channels: int):
        super().__init__()
        self.side, self.cell = side, cell
        self.convs = nn.ModuleList([conv(cell, channels, 3, bias=False), conv(channels, channels, 3, bias=False)])
        self.norms = nn.ModuleList(ChannelRMSNorm(channels) for _ in self.convs)
        self.out_dim = channels * side * side

    def forward(self, grid: Tensor) -> Tensor:
        """grid (..., side * side * cell) -> (..., out_dim)."""
        lead = grid.shape[:-1]
        x = grid.float().reshape(-1, self.side, self.side, self.cell).permute(0, 3, 1, 2)
        for conv_layer, norm in zip(self.convs, self.norms):
            x = F.silu(norm(conv_layer(x)))
        return x.flatten(1).reshape(*lead, self.out_dim)


class GridDecoder(nn.Module):
    """Features (..., F) -> a grid's values (..., side * side * cell), in the encoder's layout: a linear map to
    (channels, side, side) with RMSNorm and SiLU, a 3x3 convolution with RMSNorm and SiLU, and a 3x3
    convolution to each cell's `cell` outputs (logits or values, per model.one_hot_decoder)."""

    def __init__(self, feat_dim: int, side: int, cell: int, channels: int, bias: bool = False):
        super().__init__()
        self.side, self.cell, self.channels = side, cell, channels
        self.project = linear(feat_dim, channels * side * side, bias=bias)
        self.project_norm = ChannelRMSNorm(channels)
        self.hidden, self.hidden_norm = conv(channels, channels, 3, bias=False), ChannelRMSNorm(channels)
        self.out = conv(channels, cell, 3, bias=True)

    def forward(self, feat: Tensor) -> Tensor:
        lead = feat.shape[:-1]
        x = self.project(feat.reshape(-1, feat.shape[-1])).view(-1, self.channels, self.side, self.side)
        x = F.silu(self.project_norm(x))
        x = F.silu(self.hidden_norm(self.hidden(x)))
        return self.out(x).permute(0, 2, 3, 1).reshape(*lead, self.side * self.side * self.cell)


class TextEncoder(nn.Module):
    """Token ids (..., L) -> (..., units): a learned word embedding, mean-pooled over the words, then an MLP.

    Id 0 is padding: its embedding is never read (masked out of the mean), so a text's embedding does not
    depend on how much padding follows it. A text of padding only embeds as zeros before the MLP.
    Mean-pooling forgets word order; BabyAI's instructions ("go to the red ball") are bags of a few words
    whose order rarely matters, and the decoder's per-position targets still make the latent keep the order.
    """

    def __init__(self, vocab: int, embed: int, units: int, layers: int, bias: bool = False):
        super().__init__()
        self.embedding = nn.Embedding(vocab, embed, padding_idx=0)
        self.mlp = MLP(embed, units, layers, bias)
        self.out_dim = self.mlp.out_dim

    def forward(self, tokens: Tensor) -> Tensor:
        mask = (tokens != 0).unsqueeze(-1).float()  # (..., L, 1)
        summed = (self.embedding(tokens.long()) * mask).sum(-2)
        return self.mlp(summed / mask.sum(-2).clamp(min=1.0))


class TextDecoder(nn.Module):
    """Features (..., F) -> token logits (..., L, V): one classification over the V words per position."""

    def __init__(self, feat_dim: int, length: int, vocab: int, units: int, layers: int, bias: bool = False):
        super().__init__()
        self.length, self.vocab = length, vocab
        self.mlp = MLP(feat_dim, units, layers, bias)
        self.out = linear(self.mlp.out_dim, length * vocab)

    def forward(self, feat: Tensor) -> Tensor:
        return self.out(self.mlp(feat)).unflatten(-1, (self.length, self.vocab))


class SentenceEncoder(nn.Module):
    """model.text_encoder=minilm: token ids (..., L) -> (..., units), the frozen sentence embedding of the text's
    words (lit_dreamer.minilm.SentenceTable, cached, no gradient), then an MLP. Only the MLP has parameters."""

    def __init__(self, table: SentenceTable, units: int, layers: int, bias: bool = False):
        super().__init__()
        self.table = table  # a plain object: not in the state dict, never trained
        self.mlp = MLP(MINILM_DIM, units, layers, bias)
        self.out_dim = self.mlp.out_dim

    def forward(self, tokens: Tensor) -> Tensor:
        return self.mlp(self.table(tokens))

