"""How often each discrete action was taken, window by window of env steps, from a checkpoint's own replay.

    python scripts/action_shares.py runs/NAME/checkpoints/step-N/model.ckpt [--window 2500] [--names a,b,c]

The replay keeps every step the run collected (prefill included, until its capacity wraps), so one late
checkpoint tells how the policy's choices moved over the whole run: a policy that collapses onto a few
actions shows it here before its entropy or return say why. Prints one JSON object with, for each window of
env steps (counted over all envs, as `run.steps` is): its size (the last one may be short), the share of
each action, the number of episodes that ended in it and how many of them ended in a success (a terminal
step with a positive reward: BabyAI and MiniGrid pay only on success; for other tasks read it as "ended
with a reward"). `--names` labels the actions (BabyAI's: left,right,forward,pickup,drop,toggle,done).
Discrete (one-hot) actions only.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from diagnose_world_model import checkpoint_replay


def action_shares(actions: np.ndarray, window_rows: int) -> list[list[float]]:
    """(rows, envs, A) one-hot actions -> per window of rows, the share of each action (A floats)."""
    shares = []
    for start in range(0, len(actions), window_rows):
        counts = actions[start:start + window_rows].reshape(-1, actions.shape[-1]).sum(0)
        shares.append((counts / max(counts.sum(), 1)).round(4).tolist())
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a model.ckpt file (the replay snapshot beside it is read)")
    parser.add_argument("--window", type=int, default=2500, help="env steps per window (all envs together)")
    parser.add_argument("--names", default="", help="comma-separated action names, in index order")
    args = parser.parse_args()

    replay = checkpoint_replay(args.checkpoint)
    data = replay.storage
    rows = len(replay) // replay.num_envs
    actions = np.asarray(data["action"][:rows], dtype=np.float64)
    if actions.ndim != 3 or not np.all((actions == 0) | (actions == 1)):
        raise SystemExit(f"{args.checkpoint}: the replay's actions are not one-hot (shape {actions.shape}); "
                         "this script reads discrete-action runs only")
    names = args.names.split(",") if args.names else [str(i) for i in range(actions.shape[-1])]
    if len(names) != actions.shape[-1]:
        raise SystemExit(f"--names gives {len(names)} names for {actions.shape[-1]} actions")
    window_rows = max(args.window // replay.num_envs, 1)
    out = {"checkpoint": args.checkpoint, "env_steps": rows * replay.num_envs, "window": window_rows * replay.num_envs,
           "actions": names, "windows": []}
    ends = np.asarray(data["is_last"][:rows])
    success = np.asarray(data["is_terminal"][:rows]) & (np.asarray(data["reward"][:rows]) > 0)
    for index, share in enumerate(action_shares(actions, window_rows)):
        part = slice(index * window_rows, min((index + 1) * window_rows, rows))
        out["windows"].append({"from": part.start * replay.num_envs,
                               "env_steps": (part.stop - part.start) * replay.num_envs,
                               "share": dict(zip(names, share)),
                               "episodes": int(ends[part].sum()), "successes": int(success[part].sum())})
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
