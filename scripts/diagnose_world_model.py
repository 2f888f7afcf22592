"""World-model diagnostics of a checkpoint on its own replay: where does the model fall short?

    python scripts/diagnose_world_model.py runs/NAME/checkpoints/step-N/model.ckpt

Runs the world model over every env stream of the checkpoint's saved replay, in order from the first
step (chunks of 64 steps, carrying the posterior), and prints one JSON object:
- `rec_rmse`: per vector-observation dimension, the reconstruction RMSE in the observation's units,
  over all steps and over terminal steps;
- `cont`: the continue head's mean P(continue) at terminal and at other steps, the fraction of
  terminal steps it calls terminal (P < 0.5) and of other steps it calls terminal;
- `open_loop`: from the posterior k steps before each terminal, the prior rolled forward with the
  actions really taken: P(continue) it predicts at the terminal step, and the RMSE of the predicted
  observation there. This is what imagination sees: if the model cannot foresee an episode's end,
  the policy cannot learn to avoid it;
- `reward_mae`, `kl`: mean absolute reward error and mean posterior-prior KL (nats).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from lit_dreamer.distributions import kl_divergence
from lit_dreamer.evaluation import load_module
from lit_dreamer.replay import Replay
from lit_dreamer.rssm import State

CHUNK = 64
HORIZONS = (1, 2, 3, 5, 10)


def checkpoint_replay(checkpoint: str) -> Replay:
    """The replay saved beside a checkpoint's model.ckpt (rank 0's)."""
    return Replay.load(os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "replay-rank0"))


def stream(replay: Replay, env: int, keys: list[str]) -> dict[str, torch.Tensor]:
    rows = len(replay) // replay.num_envs
    return {k: torch.as_tensor(replay._data[k][:rows, env]) for k in keys}


@torch.no_grad()
def observe_stream(wm, data: dict[str, torch.Tensor]) -> tuple[State, torch.Tensor]:
    """Posterior states (T,) of one stream, with their logits, and the KL of each step."""
    state, deters, stochs, logits, kls = None, [], [], [], []
    for start in range(0, len(data["is_first"]), CHUNK):
        chunk = {k: v[start:start + CHUNK][None] for k, v in data.items()}
        post, prior_logits = wm.rssm.observe(wm.encode(chunk), chunk["action"].float(), chunk["is_first"], state)
        kls.append(kl_divergence(wm.rssm.dist(post.logits), wm.rssm.dist(prior_logits))[0])
        deters.append(post.deter[0]), stochs.append(post.stoch[0]), logits.append(post.logits[0])
        state = State(post.deter[:, -1], post.stoch[:, -1])
    return State(torch.cat(deters), torch.cat(stochs), torch.cat(logits)), torch.cat(kls)


def vector_targets(wm, data: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([data[k].float() for k in wm.vector_keys], -1)


def vector_prediction(wm, feat: torch.Tensor) -> torch.Tensor:
    dists = wm.decode(feat[None])
    return torch.cat([dists[k].mean()[0] for k in wm.vector_keys], -1)


def scaled(wm, data: dict[str, torch.Tensor], scale: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The data with the (single) vector observation multiplied by `scale` (unchanged if None)."""
    if scale is None:
        return data
    [key] = wm.vector_keys
    return {**data, key: data[key].float() * scale}


@torch.no_grad()
def stream_pass(wm, replay: Replay, keys: list[str], scale: torch.Tensor | None = None):
    """Per env stream: its data, posterior states, KL per step, P(continue) per step, and the squared
    vector-observation error per step in the data's units (None without vector keys).

    With `scale`, the model sees the vector observation multiplied by it (see world_model_headroom.py).
    """
    for env in range(replay.num_envs):
        data = stream(replay, env, keys)
        post, kl = observe_stream(wm, scaled(wm, data, scale))
        feat = post.feat()
        sq = None
        if wm.vector_keys:
            prediction = vector_prediction(wm, feat) / (1.0 if scale is None else scale)
            sq = (prediction - vector_targets(wm, data)) ** 2
        yield data, post, kl, wm.cont(feat).mean(), sq


def rmse(sq: torch.Tensor) -> list[float]:
    return [round(float(x), 5) for x in sq.mean(0).sqrt()]


def summary(p_cont: torch.Tensor, terminal: torch.Tensor, sq: torch.Tensor | None) -> dict:
    """The continue head at terminal and other steps, and the reconstruction RMSE per dimension."""
    out = {"cont": {
        "p_continue_at_terminal": float(p_cont[terminal].mean()) if terminal.any() else None,
        "p_continue_elsewhere": float(p_cont[~terminal].mean()),
        "terminal_recall": float((p_cont[terminal] < 0.5).float().mean()) if terminal.any() else None,
        "false_terminal_rate": float((p_cont[~terminal] < 0.5).float().mean()),
    }}
    if sq is not None:
        out["rec_rmse"] = {"all": rmse(sq), "terminal": rmse(sq[terminal]) if terminal.any() else None}
    return out


@torch.no_grad()
def roll_prior(wm, post: State, data: dict[str, torch.Tensor], ends: torch.Tensor, k: int
               ) -> tuple[torch.Tensor, State]:
    """The prior rolled k steps from the posterior at each end - k with the real actions, kept where no episode
    starts inside the roll (is_first at start+1 .. end): (the ends kept, their rolled states)."""
    starts = ends - k
    valid = starts >= 0
    for j in range(1, k + 1):
        valid &= ~data["is_first"][(starts + j).clamp(min=0)].bool()
    starts, ends = starts[valid], ends[valid]
    state = State(post.deter[starts], post.stoch[starts])
    if len(starts) == 0:  # nothing to roll (the RSSM's layers refuse an empty batch)
        return ends, state
    for j in range(1, k + 1):
        state = wm.rssm.imagine_step(state, data["action"][starts + j].float())
    return ends, state


@torch.no_grad()
def open_loop(wm, post: State, data: dict[str, torch.Tensor], terminals: torch.Tensor, k: int) -> dict[str, float]:
    """Roll the prior k steps from the posterior at t-k to each terminal t, with the real actions."""
    ends, state = roll_prior(wm, post, data, terminals, k)
    if len(ends) == 0:
        return {}
    feat = state.feat()
    out = {"n": int(len(ends)), "p_continue": float(wm.cont(feat).mean().mean())}
    if wm.vector_keys:
        error = vector_prediction(wm, feat) - vector_targets(wm, data)[ends]
        out["obs_rmse"] = rmse(error.pow(2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    args = parser.parse_args()
    module, _ = load_module(args.checkpoint)
    wm = module.world_model
    replay = checkpoint_replay(args.checkpoint)
    keys = [*wm.image_keys, *wm.vector_keys, "action", "reward", "is_first", "is_terminal"]

    sq, p_cont, terminal, reward_err, kls = [], [], [], [], []
    rollouts: dict[int, list[dict]] = {k: [] for k in HORIZONS}
    for data, post, kl, p, error in stream_pass(wm, replay, keys):
        is_terminal = data["is_terminal"].bool()
        with torch.no_grad():
            reward_err.append((wm.reward(post.feat()).mean() - data["reward"].float()).abs())
        p_cont.append(p), terminal.append(is_terminal), kls.append(kl), sq.append(error)
        for k in HORIZONS:
            rollouts[k].append(open_loop(wm, post, data, torch.nonzero(is_terminal)[:, 0], k))

    terminal = torch.cat(terminal)
    report = {
        "checkpoint": args.checkpoint,
        "steps": int(len(terminal)),
        "terminal_steps": int(terminal.sum()),
        **summary(torch.cat(p_cont), terminal, torch.cat(sq) if wm.vector_keys else None),
        "reward_mae": float(torch.cat(reward_err).mean()),
        "kl": float(torch.cat(kls).mean()),
    }
    report["open_loop"] = {}
    for k, parts in rollouts.items():
        parts = [p for p in parts if p]
        if not parts:
            continue
        n = sum(p["n"] for p in parts)
        entry = {"n": n, "p_continue_at_terminal": sum(p["p_continue"] * p["n"] for p in parts) / n}
        if "obs_rmse" in parts[0]:
            entry["obs_rmse_at_terminal"] = [
                round((sum(p["obs_rmse"][i] ** 2 * p["n"] for p in parts) / n) ** 0.5, 5)
                for i in range(len(parts[0]["obs_rmse"]))]
        report["open_loop"][k] = entry
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
