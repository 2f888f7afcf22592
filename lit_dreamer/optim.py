"""LaProp with adaptive gradient clipping, the DreamerV3 optimizer (spec section 5)."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor


class LaProp(torch.optim.Optimizer):
    """LaProp with per-tensor adaptive gradient clipping (AGC) and linear learning-rate warmup.

    For each parameter tensor p with gradient g at its step t (1, 2, ...), in the reference order
    AGC -> RMS -> momentum -> learning rate:

    1. AGC: g <- g / max(1, ||g|| / (agc * max(pmin, ||p||))), Frobenius norms of the whole tensor.
       Caps each gradient relative to its weights; agc = 0 disables it.
    2. RMS: nu <- beta2 * nu + (1 - beta2) * g^2;  u = g / (sqrt(nu / (1 - beta2^t)) + eps).
    3. Momentum on the RMS-scaled u (LaProp; Adam would average g and divide afterwards):
       m <- beta1 * m + (1 - beta1) * u;  m_hat = m / (1 - beta1^t).
    4. p <- p - lr * min(1, t / warmup) * m_hat; warmup = 0 disables the ramp.

    No weight decay. After each `step`, `clipped_fraction[i]` holds the fraction of group i's
    tensors whose gradient AGC scaled down (a tensor, not synced to the host).
    """

    def __init__(self, params: Iterable, lr: float = 4e-5, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-20, agc: float = 0.3, pmin: float = 1e-3, warmup: int = 1000):
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        if eps < 0 or agc < 0 or pmin <= 0 or warmup < 0:
            raise ValueError(f"need eps >= 0, agc >= 0, pmin > 0, warmup >= 0; got {eps}, {agc}, {pmin}, {warmup}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, agc=agc, pmin=pmin, warmup=warmup)
        super().__init__(params, defaults)
        self.clipped_fraction: list[Tensor | None] = [None] * len(self.param_groups)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.clipped_fraction = [None] * len(self.param_groups)
        for index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self.clipped_fraction[index] = self._update_group(group, params)
        return loss

    def _update_group(self, group: dict, params: list[Tensor]) -> Tensor:
        grads = [p.grad for p in params]
        if any(g.is_sparse for g in grads):
            raise RuntimeError("LaProp does not support sparse gradients")
        grads, clipped = self._clip(grads, params, group["agc"], group["pmin"])
        states = [self._state(p) for p in params]
        for state in states:
            state["step"] += 1
        steps = [state["step"] for state in states]
        beta1, beta2 = group["betas"]

        nus = [state["nu"] for state in states]
        torch._foreach_mul_(nus, beta2)
        torch._foreach_addcmul_(nus, grads, grads, value=1 - beta2)
        denoms = torch._foreach_div(nus, [1 - beta2**t for t in steps])
        torch._foreach_sqrt_(denoms)
        torch._foreach_add_(denoms, group["eps"])
        scaled = torch._foreach_div(grads, denoms)

        moms = [state["momentum"] for state in states]
        torch._foreach_mul_(moms, beta1)
        torch._foreach_add_(moms, scaled, alpha=1 - beta1)
        # Bias correction of the momentum and the warmup ramp fold into one step size per tensor.
        step_sizes = [-self._lr(group, t) / (1 - beta1**t) for t in steps]
        torch._foreach_add_(params, torch._foreach_mul(moms, step_sizes))
        return clipped

    @staticmethod
    def _clip(grads: list[Tensor], params: list[Tensor], agc: float, pmin: float) -> tuple[list[Tensor], Tensor]:
        """AGC without touching p.grad: returns the clipped gradients and the fraction clipped."""
        if agc == 0:
            return grads, torch.zeros((), device=grads[0].device)
        limits = torch._foreach_clamp_min(torch._foreach_norm(params), pmin)
        torch._foreach_mul_(limits, agc)
        ratios = torch._foreach_div(torch._foreach_norm(grads), limits)
        torch._foreach_clamp_min_(ratios, 1.0)
        device = grads[0].device
        clipped = torch.stack([ratio.to(device) for ratio in ratios]).gt(1.0).float().mean()
        return torch._foreach_div(grads, ratios), clipped

    def _state(self, param: Tensor) -> dict:
        state = self.state[param]
        if not state:
            state["step"] = 0
            state["nu"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["momentum"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state

    @staticmethod
    def _lr(group: dict, step: int) -> float:
        warmup = group["warmup"]
        ramp = min(1.0, step / warmup) if warmup > 0 else 1.0
        return group["lr"] * ramp

    def current_lr(self, group_index: int = 0) -> float:
        """The learning rate (with warmup) that the last step of this group used, for logging."""
        group = self.param_groups[group_index]
        steps = [self.state[p]["step"] for p in group["params"] if p in self.state]
        return self._lr(group, max(steps)) if steps else 0.0
