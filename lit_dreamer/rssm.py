"""The recurrent state-space model: sequence model, prior, posterior, observe and imagine.

State at step t: deterministic h_t (deter) and stochastic z_t, K categorical latents of C classes
held as one-hot (K, C). Shapes: B batch, T time, N = flattened starts, H horizon.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from lit_dreamer.distributions import Categorical
from lit_dreamer.nets import BlockGRU, Head, NormAct


@dataclass
class State:
    """RSSM state; leading dims are (N,) for one step or (B, T) for a sequence."""

    deter: Tensor  # (..., D)
    stoch: Tensor  # (..., K, C) one-hot
    logits: Tensor | None = None  # (..., K, C) of the distribution stoch was drawn from

    def feat(self) -> Tensor:
        """[h, flatten(z)]: what every head reads."""
        return torch.cat([self.deter, self.stoch.flatten(-2)], -1)

    def detach(self) -> "State":
        return State(self.deter.detach(), self.stoch.detach(), None if self.logits is None else self.logits.detach())

    def flatten(self) -> "State":
        """(B, T, ...) -> (B*T, ...)."""
        return State(self.deter.flatten(0, 1), self.stoch.flatten(0, 1),
                     None if self.logits is None else self.logits.flatten(0, 1))


class RSSM(nn.Module):
    """Recurrent state-space model: a block GRU over h, a prior p(z | h) and a posterior q(z | h, embed).

    Holds the projections of h, z and the action into the GRU, the GRU, and the prior and posterior heads
    (K categorical latents of C classes, `unimix` mixed with uniform). `observe(embed (B, T, E), action
    (B, T, A), is_first (B, T))` returns the posterior State (B, T) and the prior logits (B, T, K, C);
    `imagine(start State (N,), policy, H)` returns features (H+1, N, F) time-major, F = `feat_dim` = D + K*C.
    """

    def __init__(self, embed_dim: int, action_dim: int, *, deter: int, hidden: int, stoch: int, classes: int,
                 blocks: int = 8, prior_layers: int = 2, post_layers: int = 1, unimix: float = 0.01,
                 bias: bool = False):
        super().__init__()
        self.deter_dim, self.stoch_dim, self.classes = deter, stoch, classes
        self.action_dim, self.embed_dim, self.unimix = action_dim, embed_dim, unimix
        self.deter_proj = NormAct(deter, hidden, bias)
        self.stoch_proj = NormAct(stoch * classes, hidden, bias)
        self.action_proj = NormAct(action_dim, hidden, bias)
        self.gru = BlockGRU(3 * hidden, deter, blocks)
        self.prior = Head(deter, stoch * classes, hidden, prior_layers, bias=bias)
        self.post = Head(deter + embed_dim, stoch * classes, hidden, post_layers, bias=bias)

    @property
    def feat_dim(self) -> int:
        return self.deter_dim + self.stoch_dim * self.classes

    def initial(self, n: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> State:
        """The learned-free initial state: zeros, as in the reference code."""
        deter = torch.zeros(n, self.deter_dim, device=device, dtype=dtype)
        stoch = torch.zeros(n, self.stoch_dim, self.classes, device=device, dtype=dtype)
        return State(deter, stoch)

    def dist(self, logits: Tensor) -> Categorical:
        return Categorical(logits, unimix=self.unimix, event_dims=1)

    def sequence_step(self, state: State, action: Tensor) -> Tensor:
        """h_t = GRU(h_{t-1}, [proj(z_{t-1}), proj(a_{t-1}), proj(h_{t-1})])."""
        # Large continuous actions would dominate the input: squash them into [-1, 1] first.
        action = action / action.abs().clamp(min=1.0).detach()
        x = torch.cat([self.deter_proj(state.deter), self.stoch_proj(state.stoch.flatten(-2)),
                       self.action_proj(action)], -1)
        return self.gru(x, state.deter)

    def prior_logits(self, deter: Tensor) -> Tensor:
        return self.prior(deter).unflatten(-1, (self.stoch_dim, self.classes))

    def post_logits(self, deter: Tensor, embed: Tensor) -> Tensor:
        return self.post(torch.cat([deter, embed], -1)).unflatten(-1, (self.stoch_dim, self.classes))

    def observe(self, embed: Tensor, action: Tensor, is_first: Tensor, start: State | None = None
                ) -> tuple[State, Tensor]:
        """Posterior states over a replayed sequence.

        embed (B, T, E), action (B, T, A) = the action that led to each step, is_first (B, T).
        The carried state (and the action) are reset to the initial state at every is_first,
        inside the sequence too. Returns the posterior State (B, T) and prior logits (B, T, K, C).
        """
        B, T = is_first.shape
        assert embed.shape[:2] == (B, T) and action.shape[:2] == (B, T), (
            f"observe: embed {tuple(embed.shape)} and action {tuple(action.shape)} must lead with (B, T)=({B}, {T})")
        state = start if start is not None else self.initial(B, embed.device, embed.dtype)
        keep = (~is_first.bool()).to(embed.dtype)
        deters, stochs, logits = [], [], []
        for t in range(T):
            state = self.observe_step(state, action[:, t], embed[:, t], keep[:, t, None])
            deters.append(state.deter), stochs.append(state.stoch), logits.append(state.logits)
        post = State(torch.stack(deters, 1), torch.stack(stochs, 1), torch.stack(logits, 1))
        # The prior only depends on h_t, so it runs once over the whole sequence.
        return post, self.prior_logits(post.deter)

    def observe_step(self, state: State, action: Tensor, embed: Tensor, keep: Tensor,
                     noise: Tensor | None = None) -> State:
        """One posterior step. keep (N, 1) is 0 where the step is_first: carried state and action reset.

        noise (N, K, C): standard Gumbel noise that draws the latent (`Categorical.sample_from`; zeros give its
        mode), for policies whose noise is an input (lit_dreamer.export); None samples it as in training.
        """
        state = State(state.deter * keep, state.stoch * keep[..., None])
        deter = self.sequence_step(state, action * keep)
        logits = self.post_logits(deter, embed)
        dist = self.dist(logits)
        return State(deter, dist.sample() if noise is None else dist.sample_from(noise), logits)

    def imagine_step(self, state: State, action: Tensor) -> State:
        deter = self.sequence_step(state, action)
        logits = self.prior_logits(deter)
        return State(deter, self.dist(logits).sample(), logits)

    @torch.no_grad()
    def imagine(self, start: State, policy: Callable[[Tensor], Tensor], horizon: int) -> Tensor:
        """Roll out the prior for `horizon` steps from N start states under `policy(feat) -> action`.

        Returns the features of the H+1 states, time-major: (H+1, N, F), feat[0] the starts'.
        Time-major because the heads then read the states they need (1..H, 0..H-1, H) as contiguous
        slices; each step writes its features straight into its slice of the result, so the
        (B*T*(H+1)*F floats, 39 MB at size1m) tensor is not built again by a final stack.
        No action is drawn in the last state: nothing would use it. The whole rollout runs without
        gradient: nothing reaches the world model, and the actor learns by REINFORCE from its own
        forward over the returned states (`ActorCritic.imagine_loss`).
        """
        state = State(start.deter, start.stoch)
        feats = start.deter.new_empty((horizon + 1, start.deter.shape[0], self.feat_dim))
        torch.cat([state.deter, state.stoch.flatten(-2)], -1, out=feats[0])
        for t in range(horizon):
            state = self.imagine_step(state, policy(feats[t]))
            torch.cat([state.deter, state.stoch.flatten(-2)], -1, out=feats[t + 1])
        return feats
