"""Does the critic of a checkpoint rank states by their real return?

    python scripts/diagnose_critic.py runs/NAME/checkpoints/step-N/model.ckpt [--episodes 1] [--seed 0]

Plays real episodes of the checkpoint's env twice over: acting with the policy's mode, and with
uniform random actions. Along each episode the world model's posterior gives the critic's and the
slow critic's value at every step, to set against the real discounted return from that step
(gamma of the run's config). Prints one JSON object with, per behaviour (`policy`, `random`):
- `episodes`: each episode's return and length, and in windows of `--window` steps the mean reward,
  value, slow value and real discounted return;
- `correlation`: Pearson correlation of value and real return over the first half of each episode.
The critic estimates the return of following the policy. On the `policy` episodes its value should
match the real return. On the `random` episodes the real return is that of random actions, which the
policy would improve on from the same state, so there only the ranking of states is comparable.
A critic whose values hardly move between states that the real returns tell far apart cannot guide
the policy.

The real return sums rewards up to the episode's end. Where a time limit cut the episode, the rewards
after it are missing, so the returns of the last 1 / (1 - gamma) steps are lower bounds; the
correlation therefore uses only the first half of each episode.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from lit_dreamer.envs import make_env
from lit_dreamer.envs.spaces import env_action
from lit_dreamer.evaluation import load_module


def discounted_returns(rewards: np.ndarray, gamma: float) -> np.ndarray:
    """G_t = r_t + gamma * G_{t+1}, with G = 0 after the last step (r_t: the reward of the step from t)."""
    out, acc = np.zeros(len(rewards)), 0.0
    for t in range(len(rewards) - 1, -1, -1):
        acc = rewards[t] + gamma * acc
        out[t] = acc
    return out


@torch.no_grad()
def episode(module, env, behaviour: str, seed: int, rng: np.random.Generator, max_steps: int = 100_000) -> dict:
    """One episode: per step the reward received after acting, and the value of the state acted in."""
    critic, slow = module.actor_critic.critic, module.actor_critic.slow_critic
    obs, _ = env.reset(seed=seed)
    carry = module.initial_carry(1)
    is_first = torch.ones(1, dtype=torch.bool)
    rewards, values, slow_values = [], [], []
    for _ in range(max_steps):
        tensors = {k: torch.as_tensor(v)[None] for k, v in obs.items()}
        action, carry, post = module.act(tensors, is_first, carry, mode="mode")
        if behaviour == "random":
            if module.discrete:
                index = int(rng.integers(action.shape[-1]))
                action = torch.nn.functional.one_hot(torch.tensor([index]), action.shape[-1]).float()
            else:
                action = torch.as_tensor(rng.uniform(-1.0, 1.0, action.shape), dtype=torch.float32)
            carry = (carry[0], action)  # the next posterior step sees the action really taken
        is_first = torch.zeros(1, dtype=torch.bool)
        feat = post.feat()
        values.append(critic(feat).mean().item())
        slow_values.append(slow(feat).mean().item())
        obs, reward, terminated, truncated, _ = env.step(env_action(action[0].numpy(), module.discrete))
        rewards.append(float(reward))
        if terminated or truncated:
            break
    return {"rewards": np.array(rewards), "values": np.array(values), "slow_values": np.array(slow_values)}


def windows(ep: dict, returns: np.ndarray, width: int) -> list[dict]:
    rows = []
    for lo in range(0, len(returns), width):
        s = slice(lo, lo + width)
        rows.append({"from_step": lo, "reward": float(ep["rewards"][s].mean()), "value": float(ep["values"][s].mean()),
                     "slow_value": float(ep["slow_values"][s].mean()), "real_return": float(returns[s].mean())})
    return rows


def diagnose(ckpt: str, episodes: int, seed: int, window: int) -> dict:
    module, cfg = load_module(ckpt)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gamma = module.actor_critic.cfg.gamma
    env = make_env(cfg.env.id, seed=seed, **cfg.env.make_kwargs())
    report = {"checkpoint": ckpt, "env": cfg.env.id, "gamma": gamma}
    try:
        for behaviour in ("policy", "random"):
            runs, first_half = [], {"value": [], "real_return": []}
            for i in range(episodes):
                ep = episode(module, env, behaviour, seed + i, rng)
                returns = discounted_returns(ep["rewards"], gamma)
                half = max(1, len(returns) // 2)
                first_half["value"].extend(ep["values"][:half])
                first_half["real_return"].extend(returns[:half])
                runs.append({"return": float(ep["rewards"].sum()), "length": len(ep["rewards"]),
                             "windows": windows(ep, returns, window)})
            report[behaviour] = {"episodes": runs, "correlation": correlation(first_half["value"],
                                                                              first_half["real_return"])}
    finally:
        env.close()
    return report


def correlation(a: list[float], b: list[float]) -> float | None:
    """Pearson correlation, or None where either side is constant (or has fewer than 2 points)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--episodes", type=int, default=1, help="episodes per behaviour")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", type=int, default=100, help="steps per reported window")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(json.dumps(diagnose(args.checkpoint, args.episodes, args.seed, args.window)))


if __name__ == "__main__":
    main()
