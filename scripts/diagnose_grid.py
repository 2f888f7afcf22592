"""Does the world model of a MiniGrid / BabyAI run represent the objects it sees?

    python scripts/diagnose_grid.py runs/NAME/checkpoints/step-N/model.ckpt

For a checkpoint whose world model reads minigrid's one-hot `grid` (lit_dreamer.envs.minigrid), runs the
model over its own saved replay (each env stream in order, the posterior as in training) and decodes the
grid back from the latent. Per cell, the decoded object type is the largest entry of the cell's object group
and the decoded colour the largest of its colour group, whatever the decoder's loss (model.one_hot_decoder):
a symlog squared error predicts each entry's value, a softmax its probability. Prints one JSON object:

- `by_type`: for each object type present in the views (unseen, empty, wall, key, ball, box, ...): how many
  cells hold it, how often the decoded type is right, how often the decoded colour is right, and the mean
  decoded value of the right type's entry.
- `objects`: the same over every cell holding something other than unseen, empty, wall or floor (the things
  an instruction names), `front` over the cell in front of the agent when it holds one, and `carried` over
  the agent's own cell when it holds one: minigrid draws what the agent carries there. In a Pickup level the
  episode ends at the pickup, so `carried` counts the last steps of pickups, where the reward is paid: a
  reward head can tell a right pickup from a wrong one only from what the latent keeps of that cell.

A world model whose latent carries no object decodes each cell's most common content (empty or wall): its
type accuracy on object cells is near 0 and its colour accuracy near chance (1/6), even when its grid loss
is low. Instruction following needs that information in the latent: the reward head, critic and actor read
nothing else of the view. The posterior latents are sampled: the figures move a little with `--seed`.
"""

from __future__ import annotations

import argparse
import json

import torch

from diagnose_world_model import checkpoint_replay, observe_stream, stream
from lit_dreamer.envs.minigrid import cell_tables
from lit_dreamer.evaluation import load_module

VIEW = 7
FRONT = (VIEW // 2) * VIEW + VIEW - 2
"""The cell in front of the agent: minigrid's view is indexed [x][y] with the agent at x = 3, y = 6 facing up,
and the grid flattens it row-major, so cell (3, 5) is 3 * 7 + 5."""
CARRIED = (VIEW // 2) * VIEW + VIEW - 1
"""The agent's own cell (3, 6), where the view shows what the agent carries (empty when it carries nothing)."""
BACKGROUND = ("unseen", "empty", "wall", "floor")


def cells(grid: torch.Tensor, widths: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """A flattened one-hot grid, or a decoded one (N, cells * sum(widths)), -> its object and colour index per
    cell (N, cells): the largest entry of each group."""
    per_cell = grid.reshape(grid.shape[0], -1, sum(widths))
    objects, colours, _ = per_cell.split(widths, -1)
    return objects.argmax(-1), colours.argmax(-1)


def accuracy(right: torch.Tensor) -> float | None:
    return round(float(right.float().mean()), 4) if len(right) else None


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--key", default="grid", help="the one-hot grid's observation key")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampled latents")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    module, _ = load_module(args.checkpoint)
    wm = module.world_model
    object_table, colour_table, state_table = cell_tables()
    widths = (len(object_table), len(colour_table), len(state_table))
    if args.key not in wm.vector_keys:
        raise SystemExit(f"{args.checkpoint}: no vector observation {args.key!r} (it has {wm.vector_keys})")
    replay = checkpoint_replay(args.checkpoint)
    keys = [*wm.decoded_keys, "action", "is_first"]

    truth_obj, truth_col, guess_obj, guess_col, value_at_truth = [], [], [], [], []
    for env in range(replay.num_envs):
        data = stream(replay, env, keys)
        post, _ = observe_stream(wm, data)
        decoded = wm.decode(post.feat()[None])[args.key].mean()[0]  # (T, cells * 20)
        true_obj, true_col = cells(data[args.key].float(), widths)
        obj, col = cells(decoded, widths)
        truth_obj.append(true_obj), truth_col.append(true_col), guess_obj.append(obj), guess_col.append(col)
        per_cell = decoded.reshape(decoded.shape[0], -1, sum(widths))[..., :widths[0]]
        value_at_truth.append(per_cell.gather(-1, true_obj[..., None])[..., 0])
    truth_obj, truth_col = torch.cat(truth_obj), torch.cat(truth_col)
    guess_obj, guess_col, value_at_truth = torch.cat(guess_obj), torch.cat(guess_col), torch.cat(value_at_truth)

    def block(where: torch.Tensor) -> dict:
        return {"cells": int(where.sum()), "type_accuracy": accuracy((guess_obj == truth_obj)[where]),
                "colour_accuracy": accuracy((guess_col == truth_col)[where]),
                "value_at_true_type": accuracy(value_at_truth[where])}

    names = {index: name for name, index in object_table.items()}
    objects = torch.ones_like(truth_obj, dtype=torch.bool)
    for name in BACKGROUND:
        objects &= truth_obj != object_table[name]
    front, carried = torch.zeros_like(objects), torch.zeros_like(objects)
    front[:, FRONT] = True
    carried[:, CARRIED] = True
    report = {
        "checkpoint": args.checkpoint,
        "steps": int(truth_obj.shape[0]),
        "by_type": {names[int(t)]: block(truth_obj == t) for t in truth_obj.unique()},
        "objects": block(objects),
        "front": block(objects & front),
        "carried": block(objects & carried),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
