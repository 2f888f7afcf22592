"""ChannelRMSNorm and RMSNorm: their hand-written backward against golden values, autograd of the plain
formula, and gradcheck."""

import math

import pytest
import torch

from lit_dreamer.nets import NORM_EPS, ChannelRMSNorm, RMSNorm, _ChannelRMSNormFn, _RMSNormFn


def plain_channel_rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The textbook formula, differentiated by autograd: the reference for the hand-written backward."""
    return x * torch.rsqrt(x.square().mean(1, keepdim=True) + NORM_EPS) * weight[:, None, None]


def test_channel_rms_norm_golden_values():
    # One pixel with channels (3, 4): mean square 12.5, so y = (3, 4) / sqrt(12.5 + eps) * (1, 2).
    norm = ChannelRMSNorm(2)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0]))
    y = norm(torch.tensor([3.0, 4.0]).view(1, 2, 1, 1))
    scale = 1.0 / math.sqrt(12.5 + NORM_EPS)
    assert y.flatten().tolist() == pytest.approx([3.0 * scale, 8.0 * scale], rel=1e-6)


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_channel_rms_norm_matches_the_plain_formula_and_its_autograd(memory_format):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 4, 6).to(memory_format=memory_format).requires_grad_()
    norm = ChannelRMSNorm(5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(5))
    y = norm(x)
    grad = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, norm.weight), grad)
    x_ref = x.detach().clone().requires_grad_()
    w_ref = norm.weight.detach().clone().requires_grad_()
    y_ref = plain_channel_rms_norm(x_ref, w_ref)
    gx_ref, gw_ref = torch.autograd.grad(y_ref, (x_ref, w_ref), grad)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gw, gw_ref)
    # The next conv reads channels-last fastest; the norm keeps that layout.
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_channel_rms_norm_passes_gradcheck():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 2, 3, dtype=torch.float64).to(memory_format=torch.channels_last).requires_grad_()
    weight = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_ChannelRMSNormFn.apply, (x, weight))


def test_channel_rms_norm_computes_in_float32_and_returns_the_input_dtype_under_bf16_autocast():
    torch.manual_seed(2)
    x = torch.randn(2, 8, 3, 3).to(memory_format=torch.channels_last)
    norm = ChannelRMSNorm(8)
    x16 = x.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x16)
    assert y.dtype == torch.bfloat16
    # float32 inside: the result is the float32 formula on the bf16 input, rounded once to bf16. A
    # different float32 summation order may flip a rare rounding; bf16 arithmetic inside changes
    # about a third of the 144 values.
    expected = plain_channel_rms_norm(x16.detach().float(), norm.weight.detach()).bfloat16()
    assert (y != expected).sum() <= 2, (y != expected).sum()
    torch.testing.assert_close(y, expected, rtol=2 ** -8, atol=0)
    y.float().sum().backward()
    assert x16.grad.dtype == torch.bfloat16 and norm.weight.grad.dtype == torch.float32


def test_rms_norm_golden_values():
    # Rows (3, 4) and (0, 0): mean squares 12.5 and 0; y = x / sqrt(ms + eps) * (1, 2).
    norm = RMSNorm(2)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0]))
    y = norm(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    scale = 1.0 / math.sqrt(12.5 + NORM_EPS)
    assert y.flatten().tolist() == pytest.approx([3.0 * scale, 8.0 * scale, 0.0, 0.0], rel=1e-6)


def test_rms_norm_matches_torch_rms_norm_values_gradients_and_state_dict():
    torch.manual_seed(3)
    reference = torch.nn.RMSNorm(7, eps=NORM_EPS)
    with torch.no_grad():
        reference.weight.copy_(torch.randn(7))
    norm = RMSNorm(7)
    norm.load_state_dict(reference.state_dict())  # same parameter name: checkpoints load either way
    x = (torch.randn(2, 3, 7) * 3).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = norm(x), reference(x_ref)
    grad = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, norm.weight), grad)
    gx_ref, gw_ref = torch.autograd.grad(y_ref, (x_ref, reference.weight), grad)
    assert y.shape == (2, 3, 7)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gw, gw_ref)


def test_rms_norm_passes_gradcheck():
    torch.manual_seed(4)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_RMSNormFn.apply, (x, weight))


def test_rms_norm_computes_in_float32_and_returns_the_input_dtype_under_bf16_autocast():
    torch.manual_seed(5)
    x16 = torch.randn(16, 9).bfloat16().requires_grad_()
    norm = RMSNorm(9)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x16)
    assert y.dtype == torch.bfloat16
    # The float32 formula on the bf16 input, rounded once (a rare last-bit flip from summation order).
    expected = torch.nn.functional.rms_norm(x16.detach().float(), (9,), norm.weight.detach(), NORM_EPS).bfloat16()
    assert (y != expected).sum() <= 2, (y != expected).sum()
    grad = torch.randn(16, 9)
    y.backward(grad.bfloat16())
    x32 = x16.detach().float().requires_grad_()
    w32 = norm.weight.detach().clone().requires_grad_()
    torch.nn.functional.rms_norm(x32, (9,), w32, NORM_EPS).backward(grad.bfloat16().float())
    assert x16.grad.dtype == torch.bfloat16 and norm.weight.grad.dtype == torch.float32
    # float32 gradients, rounded once: bf16 arithmetic inside would be off by several bf16 ulps.
    torch.testing.assert_close(x16.grad, x32.grad.bfloat16(), rtol=2 ** -8, atol=1e-6)
    torch.testing.assert_close(norm.weight.grad, w32.grad, rtol=1e-5, atol=1e-6)
