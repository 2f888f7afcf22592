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

- `facing` (a run that reads an instruction, `--text-key`, with minigrid's discrete actions): over the steps
  where the agent carries nothing and faces an object (key, ball or box), split into `named` (the object the
  instruction names: every colour and object word of the instruction is the object's, as in "pick up the red
  key" or "pick up a ball"; meant for one-object instructions) and `other`: the actor's mean probability of
  `pickup` and its quartiles, the critic's value, and what imagination returns for a pickup there (the prior
  rolled one step with it: predicted reward + gamma x P(continue) x the critic's value after) with its
  advantage over the value. In a Pickup level a wrong pickup ends the episode unpaid: an actor that reads the
  instruction picks up the named object and passes the others by; the advantage says whether imagination
  teaches it to (a wrong pickup's advantage near 0 means turning away is valued no better). Against it, what
  the replay really returned from those steps (the discounted sum of the real rewards to the episode's end, at
  the run's gamma), split by whether the agent then picked up (`real_return_pickup`) or not
  (`real_return_pass`): the critic's value is an estimate of their mix.

A world model whose latent carries no object decodes each cell's most common content (empty or wall): its
type accuracy on object cells is near 0 and its colour accuracy near chance (1/6), even when its grid loss
is low. Instruction following needs that information in the latent: the reward head, critic and actor read
nothing else of the view. The posterior latents are sampled: the figures move a little with `--seed`.
"""

from __future__ import annotations

import argparse
import json

import torch

from diagnose_critic import discounted_returns
from diagnose_instruction import critic_values, head_features, heads
from diagnose_world_model import checkpoint_replay, observe_stream, stream
from lit_dreamer.checkpoint_files import read_checkpoint
from lit_dreamer.envs.minigrid import cell_tables
from lit_dreamer.envs.text import FIRST_WORD, Vocabulary
from lit_dreamer.evaluation import load_module
from lit_dreamer.rssm import State

VIEW = 7
FRONT = (VIEW // 2) * VIEW + VIEW - 2
"""The cell in front of the agent: minigrid's view is indexed [x][y] with the agent at x = 3, y = 6 facing up,
and the grid flattens it row-major, so cell (3, 5) is 3 * 7 + 5."""
CARRIED = (VIEW // 2) * VIEW + VIEW - 1
"""The agent's own cell (3, 6), where the view shows what the agent carries (empty when it carries nothing)."""
BACKGROUND = ("unseen", "empty", "wall", "floor")
PICKABLE = ("key", "ball", "box")
PICKUP = 3
"""minigrid's `pickup` action (minigrid.core.actions.Actions.pickup)."""


def cells(grid: torch.Tensor, widths: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """A flattened one-hot grid, or a decoded one (N, cells * sum(widths)), -> its object and colour index per
    cell (N, cells): the largest entry of each group."""
    per_cell = grid.reshape(grid.shape[0], -1, sum(widths))
    objects, colours, _ = per_cell.split(widths, -1)
    return objects.argmax(-1), colours.argmax(-1)


def names_object(words: list[str], kind: str, colour: str, colours: list[str]) -> bool:
    """Whether a one-object instruction's words name an object of this kind and colour: every colour word and
    every object word in it must be the object's ("pick up a ball" names every ball)."""
    said_colours = [word for word in words if word in colours]
    said_kinds = [word for word in words if word in PICKABLE]
    return all(word == colour for word in said_colours) and all(word == kind for word in said_kinds)


@torch.no_grad()
def facing_steps(module, feat: torch.Tensor, deter: torch.Tensor, stoch: torch.Tensor, data: dict,
                 at: torch.Tensor, pickup: int) -> dict[str, torch.Tensor]:
    """At steps `at` (N,): the actor's P(pickup), the critic's value, and imagination's one-step return of a
    pickup (predicted reward + gamma x P(continue) x the critic's value after)."""
    wm, actor = module.world_model, module.actor_critic.actor
    sub = {key: v[at] for key, v in data.items()}
    action = torch.zeros(len(at), data["action"].shape[-1])
    action[:, pickup] = 1.0
    p_pickup = actor.dist(actor(head_features(wm, feat[at], sub), None)[0]).log_prob(action).exp()
    after = wm.rssm.imagine_step(State(deter[at], stoch[at]), action).feat()
    reward, cont = heads(wm, after, sub)
    returned = reward + module.actor_critic.cfg.gamma * cont * critic_values(module, after, sub)
    return {"p_pickup": p_pickup, "value": critic_values(module, feat[at], sub), "pickup_return": returned}


def stream_returns(reward: torch.Tensor, is_first: torch.Tensor, gamma: float) -> torch.Tensor:
    """(T,) per step t of one env stream: sum_k gamma^k reward[t + 1 + k] over the steps after t in t's episode
    (a stream stores at each step the reward of the action that led to it; 0 at an episode's last step; the
    stream's unfinished last episode counts what it has so far)."""
    returns = torch.zeros(len(reward))
    starts = [*torch.nonzero(is_first.bool())[:, 0].tolist(), len(reward)]
    if starts[0] != 0:
        starts.insert(0, 0)
    for start, end in zip(starts, starts[1:]):
        returns[start:end - 1] = torch.as_tensor(discounted_returns(reward[start + 1:end].double().numpy(), gamma),
                                                 dtype=returns.dtype)
    return returns


def facing_block(rows: list[dict[str, torch.Tensor]]) -> dict:
    """Means over the steps of one side of `facing` (and the quartiles of P(pickup))."""
    if not rows:
        return {"steps": 0}
    p, value, returned, real, picked = (torch.stack([row[k] for row in rows]) for k in
                                        ("p_pickup", "value", "pickup_return", "real_return", "picked"))
    return {"steps": len(rows), "p_pickup": rounded_mean(p),
            "p_pickup_quartiles": [round(float(q), 4) for q in torch.quantile(p, torch.tensor([0.25, 0.5, 0.75]))],
            "value": rounded_mean(value), "pickup_return": rounded_mean(returned),
            "pickup_advantage": rounded_mean(returned - value), "picked_up": rounded_mean(picked),
            "real_return_pickup": rounded_mean(real[picked]), "real_return_pass": rounded_mean(real[~picked])}


def rounded_mean(values: torch.Tensor) -> float | None:
    return round(float(values.float().mean()), 4) if len(values) else None


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--key", default="grid", help="the one-hot grid's observation key")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampled latents")
    parser.add_argument("--text-key", default="mission", help="the instruction's observation key (for `facing`)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    module, _ = load_module(args.checkpoint)
    wm = module.world_model
    object_table, colour_table, state_table = cell_tables()
    widths = (len(object_table), len(colour_table), len(state_table))
    if args.key not in wm.vector_keys:
        raise SystemExit(f"{args.checkpoint}: no vector observation {args.key!r} (it has {wm.vector_keys})")
    replay = checkpoint_replay(args.checkpoint)
    keys = [*wm.decoded_keys, "action", "is_first", "reward"]
    words = read_checkpoint(args.checkpoint).text_vocabulary.get(args.text_key)
    with_facing = args.text_key in wm.text_keys and words is not None and module.actor_critic.actor.discrete
    vocabulary = Vocabulary(words or (), len(words or ()) + FIRST_WORD, grow=False, key=args.text_key)
    names = {index: name for name, index in object_table.items()}
    colour_names = {index: name for name, index in colour_table.items()}
    facing = {"named": [], "other": []}

    truth_obj, truth_col, guess_obj, guess_col, value_at_truth = [], [], [], [], []
    for env in range(replay.num_envs):
        data = stream(replay, env, keys)
        post, _ = observe_stream(wm, data)
        decoded = wm.decode(post.feat()[None])[args.key].mean()[0]  # (T, cells * 20)
        true_obj, true_col = cells(data[args.key].float(), widths)
        if with_facing:
            free = true_obj[:, CARRIED] == object_table["empty"]
            faced = sum(true_obj[:, FRONT] == object_table[kind] for kind in PICKABLE).bool()
            at = torch.nonzero(free & faced)[:, 0]
            if len(at):
                found = facing_steps(module, post.feat(), post.deter, post.stoch, data, at, PICKUP)
                gamma = module.actor_critic.cfg.gamma
                found["real_return"] = stream_returns(data["reward"], data["is_first"], gamma)[at]
                length = len(data["action"])
                after = (at + 1).clamp(max=length - 1)  # the next step, which stores the action taken at `at`
                found["picked"] = ((at + 1 < length) & ~data["is_first"][after].bool()
                                   & (data["action"][after].argmax(-1) == PICKUP))
                for i, t in enumerate(at.tolist()):
                    said = vocabulary.decode(data[args.text_key][t].numpy()).split()
                    named = names_object(said, names[int(true_obj[t, FRONT])], colour_names[int(true_col[t, FRONT])],
                                         list(colour_table))
                    facing["named" if named else "other"].append({k: v[i] for k, v in found.items()})
        obj, col = cells(decoded, widths)
        truth_obj.append(true_obj), truth_col.append(true_col), guess_obj.append(obj), guess_col.append(col)
        per_cell = decoded.reshape(decoded.shape[0], -1, sum(widths))[..., :widths[0]]
        value_at_truth.append(per_cell.gather(-1, true_obj[..., None])[..., 0])
    truth_obj, truth_col = torch.cat(truth_obj), torch.cat(truth_col)
    guess_obj, guess_col, value_at_truth = torch.cat(guess_obj), torch.cat(guess_col), torch.cat(value_at_truth)

    def block(where: torch.Tensor) -> dict:
        return {"cells": int(where.sum()), "type_accuracy": rounded_mean((guess_obj == truth_obj)[where]),
                "colour_accuracy": rounded_mean((guess_col == truth_col)[where]),
                "value_at_true_type": rounded_mean(value_at_truth[where])}

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
    if with_facing:
        report["facing"] = {side: facing_block(rows) for side, rows in facing.items()}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
