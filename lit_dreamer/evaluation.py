"""Run whole episodes with a DreamerModule's policy: used by the eval callback and the eval command."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lit_dreamer.envs import action_kind


@dataclass
class EpisodeStats:
    returns: list[float]
    lengths: list[int]

    def summary(self) -> dict[str, float]:
        r = np.asarray(self.returns, np.float64)
        return {"return": float(r.mean()), "return_std": float(r.std()), "return_min": float(r.min()),
                "return_max": float(r.max()), "length": float(np.mean(self.lengths)), "episodes": len(r)}


@torch.no_grad()
def run_episodes(module, envs, *, mode: str = "mode", seed: int = 0, max_steps: int = 1_000_000) -> EpisodeStats:
    """One episode in each sub-env of a gymnasium vector env, acting with `module.act`.

    mode="mode" acts with the policy's most likely action (deterministic evaluation);
    mode="sample" samples as during training. Steps after a sub-env's episode ended are ignored.
    """
    n = envs.num_envs
    discrete = action_kind(envs) == "discrete"
    obs, _ = envs.reset(seed=seed)
    carry = module.initial_carry(n)
    is_first = torch.ones(n, dtype=torch.bool, device=module.device)
    done = np.zeros(n, bool)
    returns, lengths = np.zeros(n), np.zeros(n, np.int64)
    for _ in range(max_steps):
        tensors = {k: torch.as_tensor(v, device=module.device) for k, v in obs.items()}
        action, carry, _ = module.act(tensors, is_first, carry, mode=mode)
        action = action.float().cpu().numpy()
        env_action = action.argmax(-1) if discrete else np.clip(np.nan_to_num(action), -1.0, 1.0)
        obs, reward, terminated, truncated, _ = envs.step(env_action)
        live = ~done
        returns[live] += reward[live]
        lengths[live] += 1
        done |= np.asarray(terminated) | np.asarray(truncated)
        is_first = torch.zeros(n, dtype=torch.bool, device=module.device)
        if done.all():
            break
    return EpisodeStats([float(r) for r in returns], [int(x) for x in lengths])
