"""Can a head learn a right pickup from a wrong one, and from which input? (issue 23, docs/language.md)

    python scripts/probe_pickups.py runs/NAME/checkpoints/step-N/model.ckpt [--inputs heads,probs,true_cell]
        [--heads mlp,film,bilinear] [--steps 1500] [--seeds 3] [--test-fraction 0.3]

For a checkpoint of a MiniGrid / BabyAI run whose world model reads minigrid's one-hot `grid`, on its own saved
replay (each env stream in order, the posterior as in training): at every terminal step, which in a strict
Pickup level (PickupDistDebug) is a pickup, paid when it was the named object and unpaid when not, it gathers
inputs and fits fresh binary classifiers (right pickup = a paid terminal step) on a random share of the terminal
steps, each input joined with the instruction's embedding (the conditioning vector of model.text_condition, else
the text encoders' output; none in a run without text), and gives their accuracy on the held-out rest against
the majority guess. Inputs (--inputs):

- `deter`, `sample` (the sampled stochastic latent), `probs` (its probabilities), `heads` (deter + sample: what
  the reward and continue heads read), `deter_probs`;
- `decoded_grid` (the grid decoder's whole output), `decoded_cell` (its output at the agent's own cell, where
  minigrid draws what the agent carries), `true_grid`, `true_cell` (the replay's own).

Heads (--heads): `mlp` (2 x 256 on the concatenation), `film` (the instruction scales the first layer's
output), `bilinear` (a rank-32 product of the two plus a linear term). Each is fitted full-batch with Adam
(1e-3, weight decay 1e-4) on standardized inputs for --steps steps, once per seed; the split is drawn once
(--split-seed); --train-fraction fits on a share of the training rows, the held-out rows unchanged. Prints one
JSON object: `terminals`, `right`, `trained_on`, `majority` (the held-out share of the larger class) and
`accuracy[input][head]` (one held-out accuracy per seed). The posterior latents are sampled
(--seed): `sample` and `heads` move a little with it.

Session 46 found on PickupDistDebug that the true grid as 980 numbers gives 73-81% where its one carried cell
gives 100%: a few hundred pickups do not teach a head which inputs decide the reward.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import Tensor, nn

from diagnose_grid import CARRIED, VIEW
from diagnose_world_model import checkpoint_replay, observe_stream, stream
from lit_dreamer.evaluation import load_module

INPUTS = {"deter": ("deter",), "sample": ("sample",), "probs": ("probs",), "heads": ("deter", "sample"),
          "deter_probs": ("deter", "probs"), "decoded_grid": ("decoded_grid",), "decoded_cell": ("decoded_cell",),
          "true_grid": ("true_grid",), "true_cell": ("true_cell",)}
HEAD_KINDS = ("mlp", "film", "bilinear")
WIDTH, RANK = 256, 32


@torch.no_grad()
def terminal_rows(module, replay, key: str = "grid") -> dict[str, Tensor]:
    """At every terminal step of the replay's env streams: the parts of INPUTS, the instruction's embedding
    `instruction` (N, D; D = 0 without text) and `right` (N,) 1.0 where the step paid a reward."""
    wm = module.world_model
    keys = [*wm.decoded_keys, *wm.text_keys, "action", "reward", "is_first", "is_terminal"]
    rows: dict[str, list[Tensor]] = {}
    for env in range(replay.num_envs):
        data = stream(replay, env, list(dict.fromkeys(keys)))
        at = torch.nonzero(data["is_terminal"].bool())[:, 0]
        if not len(at):
            continue
        post, _ = observe_stream(wm, data)
        deter, sample, logits, feat = post.deter, post.stoch, post.logits, post.feat()
        decoded = wm.decode(feat[at][None])[key].mean()[0]
        grid = data[key][at].float()
        per_cell = grid.shape[-1] // VIEW ** 2
        at_data = {k: v[at][None] for k, v in data.items()}
        found = {"deter": deter[at], "sample": sample[at].flatten(1), "probs": logits[at].softmax(-1).flatten(1),
                 "decoded_grid": decoded, "decoded_cell": cell(decoded, per_cell), "true_grid": grid,
                 "true_cell": cell(grid, per_cell), "instruction": instruction(wm, at_data, len(at)),
                 "right": (data["reward"][at] > 0).float()}
        for name, value in found.items():
            rows.setdefault(name, []).append(value.float())
    if not rows:
        return {}
    return {name: torch.cat(values) for name, values in rows.items()}


def cell(grid: Tensor, per_cell: int) -> Tensor:
    """The agent's own cell (N, per_cell) of flattened grids (N, 7 * 7 * per_cell)."""
    return grid.reshape(len(grid), -1, per_cell)[:, CARRIED]


def instruction(wm, obs: dict[str, Tensor], n: int) -> Tensor:
    """The instruction's embedding at n steps (obs (1, n, ...)): the heads' conditioning vector, else the text
    encoders' output, else nothing (n, 0)."""
    vector = wm.condition_vector(obs)
    if vector is None and wm.text_keys:
        vector = torch.cat(wm.encode_texts(obs), -1)
    return torch.zeros(n, 0) if vector is None else vector[0]


class Classifier(nn.Module):
    """A right-or-wrong logit from features f (N, F) and the instruction c (N, D), joined as `kind` says."""

    def __init__(self, kind: str, f_dim: int, c_dim: int):
        super().__init__()
        if kind not in HEAD_KINDS:
            raise ValueError(f"unknown head {kind!r}: choose from {', '.join(HEAD_KINDS)}")
        if kind != "mlp" and c_dim == 0:
            raise ValueError(f"head {kind!r} joins features with an instruction; this run has no text input")
        self.kind = kind
        if kind == "mlp":
            self.first = nn.Linear(f_dim + c_dim, WIDTH)
        elif kind == "film":
            self.first, self.scale = nn.Linear(f_dim, WIDTH), nn.Linear(c_dim, WIDTH)
        else:
            self.p, self.q, self.linear = nn.Linear(f_dim, RANK), nn.Linear(c_dim, RANK), nn.Linear(f_dim + c_dim, 1)
        if kind != "bilinear":
            self.rest = nn.Sequential(nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 1))

    def forward(self, f: Tensor, c: Tensor) -> Tensor:
        if self.kind == "mlp":
            return self.rest(self.first(torch.cat([f, c], -1)))[:, 0]
        if self.kind == "film":
            return self.rest(self.first(f) * (1 + self.scale(c)))[:, 0]
        return (self.p(f) * self.q(c)).sum(-1) + self.linear(torch.cat([f, c], -1))[:, 0]


def standardized(x: Tensor, train: Tensor) -> Tensor:
    """x with each column centred and scaled by the training rows' mean and standard deviation."""
    return (x - x[train].mean(0)) / (x[train].std(0) + 1e-4)


def held_out_accuracy(kind: str, f: Tensor, c: Tensor, right: Tensor, train: Tensor, test: Tensor,
                      steps: int, seed: int) -> float:
    """A fresh classifier fitted on the `train` rows, its accuracy on the `test` rows."""
    torch.manual_seed(seed)
    f, c = standardized(f, train), standardized(c, train)
    net = Classifier(kind, f.shape[1], c.shape[1])
    optimizer = torch.optim.Adam(net.parameters(), 1e-3, weight_decay=1e-4)
    for _ in range(steps):
        loss = nn.functional.binary_cross_entropy_with_logits(net(f[train], c[train]), right[train])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return float(((net(f[test], c[test]) > 0).float() == right[test]).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--key", default="grid", help="the one-hot grid's observation key")
    parser.add_argument("--inputs", default=",".join(INPUTS), help=f"comma-separated, of {', '.join(INPUTS)}")
    parser.add_argument("--heads", default="mlp", help=f"comma-separated, of {', '.join(HEAD_KINDS)}")
    parser.add_argument("--steps", type=int, default=1500, help="full-batch Adam steps per classifier")
    parser.add_argument("--seeds", type=int, default=3, help="classifiers per input and head")
    parser.add_argument("--test-fraction", type=float, default=0.3)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--train-fraction", type=float, default=1.0,
                        help="fit on this share of the training rows only (a learning curve over the pickups' count)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampled latents")
    args = parser.parse_args()
    inputs, kinds = args.inputs.split(","), args.heads.split(",")
    for name, known in [*((i, INPUTS) for i in inputs), *((k, HEAD_KINDS) for k in kinds)]:
        if name not in known:
            parser.error(f"unknown choice {name!r}: choose from {', '.join(known)}")
    torch.manual_seed(args.seed)
    module, _ = load_module(args.checkpoint)
    rows = terminal_rows(module, checkpoint_replay(args.checkpoint), args.key)
    right = rows.get("right", torch.zeros(0))
    if len(right) < 10 or right.min() == right.max():
        raise SystemExit(f"{args.checkpoint}: {len(right)} terminal steps, {int(right.sum())} of them paid; the probe "
                         "needs at least 10 with both paid and unpaid ones (a later checkpoint, or a Pickup level)")
    order = torch.randperm(len(right), generator=torch.Generator().manual_seed(args.split_seed))
    cut = int(round((1 - args.test_fraction) * len(right)))
    train, test = order[:max(1, int(round(args.train_fraction * cut)))], order[cut:]
    share = float(right[test].mean())
    accuracy = {}
    for name in inputs:
        f = torch.cat([rows[part] for part in INPUTS[name]], -1)
        accuracy[name] = {kind: [round(held_out_accuracy(kind, f, rows["instruction"], right, train, test,
                                                         args.steps, seed), 3) for seed in range(args.seeds)]
                          for kind in kinds}
    print(json.dumps({"terminals": len(right), "right": int(right.sum()), "trained_on": len(train),
                      "majority": round(max(share, 1 - share), 3), "accuracy": accuracy}))


if __name__ == "__main__":
    main()
