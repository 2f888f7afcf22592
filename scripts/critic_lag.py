"""How many gradient steps does the critic need to reach its target? One cause at a time.

    python scripts/critic_lag.py CKPT [--steps 400] [--variant NAME:key=value,...]...

Loads a checkpoint with its replay, freezes the world model and the actor, and trains only the critic,
exactly as a training step does (imagined lambda returns, slow-critic regularizer, replay value loss,
LaProp at the critic's learning rate), once per variant from the same starting critic. With the policy
frozen, the critic's target is fixed: the policy's value in the world model, measured here on held-out
start states as the discounted sum of a long imagined rollout (`--long` steps, the predicted rewards
weighted by gamma times the predicted continues). Every `--every` steps it records, on those starts:
- `value`: the critic's mean value; `target`: the long-rollout value; `closed`: the fraction of the
  starting gap (target - value) closed so far;
- `return`: the mean 15-step lambda return the critic is trained towards, and `sign_bias`: mean / mean
  |.| of the lambda return minus the value (the `ac/advantage_sign_bias` of a training run).

A variant sets behavior keys (horizon, gamma, lam, slow_reg, slow_rate) or `critic_lr`, `repval`,
`warmup`, e.g. `--variant noslow:slow_reg=0 --variant lr4x:critic_lr=2.56e-3`. Variant `base` (the
checkpoint's settings) always runs first. Prints one JSON object per line: a row per recorded step
(`"variant", "step", ...`), then a summary per variant with the steps to close 50% and 90% of the gap.

    python scripts/critic_lag.py --report OUT.jsonl [--csv OUT.csv] [--plot OUT.png] [--title TEXT]

turns that output into a CSV of the rows and a figure: the critic's value per variant against gradient
steps, each variant's target dashed.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import json
import os
import sys
import time

import torch

from lit_dreamer.evaluation import load_module
from lit_dreamer.replay import Replay
from lit_dreamer.rssm import State

BEHAVIOR_KEYS = ("horizon", "gamma", "lam", "slow_reg", "slow_rate")
OTHER_KEYS = ("critic_lr", "repval", "warmup")


def parse_variant(text: str) -> tuple[str, dict[str, float]]:
    name, _, body = text.partition(":")
    settings = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        if key not in BEHAVIOR_KEYS + OTHER_KEYS:
            raise SystemExit(f"unknown variant key {key!r}; use one of {', '.join(BEHAVIOR_KEYS + OTHER_KEYS)}")
        settings[key] = int(value) if key in ("horizon", "warmup") else float(value)
    return name, settings


def replay_batches(module, replay: Replay, count: int, batch: int, length: int) -> list[tuple[dict, State]]:
    """`count` replayed batches as tensors, each with its posterior states (B, T), without gradient."""
    out = []
    with torch.no_grad():
        for _ in range(count):
            arrays = replay.sample(batch, length)
            tensors = {k: torch.as_tensor(v) for k, v in arrays.items()}
            _, post, _ = module.world_model.loss(tensors, module.replay_context(tensors))
            out.append((tensors, post))
    return out


@torch.no_grad()
def long_value(module, start: State, gamma: float, steps: int) -> torch.Tensor:
    """Per start, the discounted sum of predicted rewards over `steps` imagined steps of the frozen policy."""
    ac, wm = module.actor_critic, module.world_model
    behavior = ac.cfg
    ac.cfg = dataclasses.replace(behavior, horizon=steps)
    try:
        feat, _ = ac.rollout(wm, start)  # (steps+1, N, F)
    finally:
        ac.cfg = behavior
    reward, cont = wm.reward(feat[1:]).mean(), wm.cont(feat[1:]).mean()
    # As in the lambda returns: reward_t+1 counts with the discounts of the steps before it.
    weight = torch.cumprod(torch.cat([torch.ones_like(cont[:1]), gamma * cont[:-1]]), 0)
    return (weight * reward).sum(0)


@torch.no_grad()
def measure(module, start: State, start_cont: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """The critic's value against its target, and the lambda returns it is trained towards, on fixed starts."""
    ac = module.actor_critic
    imagination = ac.imagine_loss(module.world_model, start, start_cont)
    m = imagination.metrics
    return {"value": float(ac.critic(start.feat()).mean().mean()), "target": float(target.mean()),
            "return": float(imagination.returns.mean()), "slow_value": float(m["ac/slow_value"]),
            "advantage": float(m["ac/advantage"]), "return_scale": float(m["ac/return_scale"]),
            "sign_bias": float(m["ac/advantage_sign_bias"])}


def freeze_all_but_the_critic(module) -> None:
    """World model, actor and slow critic take no gradient; only the critic learns."""
    module.requires_grad_(False)
    module.actor_critic.critic.requires_grad_(True)


def train_critic(module, settings: dict, batches, steps: int, every: int, probe, seed: int):
    """Critic-only updates under `settings`; yields a measurement every `every` steps (step 0 included)."""
    ac = module.actor_critic
    ac.cfg = dataclasses.replace(ac.cfg, **{k: v for k, v in settings.items() if k in BEHAVIOR_KEYS})
    # The critic's optimizer as training builds it, fresh, with the variant's rate and (default: no) warmup.
    # configure_optimizers leaves frozen parameters out, so it is built with every part trainable, and the
    # world model and actor are frozen again after.
    module.requires_grad_(True)
    optimizer = module.configure_optimizers()[2]
    freeze_all_but_the_critic(module)
    group = optimizer.param_groups[0]
    group["lr"] = settings.get("critic_lr", group["lr"])
    group["warmup"] = int(settings.get("warmup", 0))
    repval_scale = settings.get("repval", module.scales["repval"])
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    for step in range(steps + 1):
        if step % every == 0:
            yield step, probe()
        if step == steps:
            return
        tensors, post = batches[int(torch.randint(len(batches), (), generator=generator))]
        B, T = tensors["is_first"].shape
        start = post.flatten()
        start_cont = 1.0 - tensors["is_terminal"].flatten(0, 1).float()
        imagination = ac.imagine_loss(module.world_model, start, start_cont)
        repval = ac.replay_value_loss(post.feat(), tensors, imagination.returns[:, 0].view(B, T))
        loss = module.scales["value"] * imagination.losses["value"].mean() + repval_scale * repval.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ac.commit(imagination)


def report(lines: list[str], csv_path: str | None, plot_path: str | None, title: str) -> None:
    """The rows of a run's JSON lines as a CSV, and the value-against-steps figure."""
    rows = [row for row in map(json.loads, lines) if "summary" not in row]
    if csv_path:
        columns = list(rows[0])
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    if plot_path:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, name in enumerate(dict.fromkeys(row["variant"] for row in rows)):
            mine = [row for row in rows if row["variant"] == name]
            line, = ax.plot([r["step"] for r in mine], [r["value"] for r in mine], label=name, color=f"C{i}")
            ax.axhline(mine[0]["target"], color=line.get_color(), linestyle="--", linewidth=0.8)
        ax.set_xlabel("critic gradient steps (world model and actor frozen)")
        ax.set_ylabel("critic value at held-out starts (dashed: target)")
        ax.set_title(title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(plot_path, dpi=110)


def main() -> None:
    if "--report" in sys.argv:
        parser = argparse.ArgumentParser(description="CSV and figure of a critic_lag.py output")
        parser.add_argument("--report", required=True)
        parser.add_argument("--csv")
        parser.add_argument("--plot")
        parser.add_argument("--title", default="")
        args = parser.parse_args()
        with open(args.report) as f:
            report(f.read().splitlines(), args.csv, args.plot, args.title)
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--variant", action="append", default=[], help="NAME:key=value,... (repeatable)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--batches", type=int, default=16, help="replayed batches to train from")
    parser.add_argument("--probe-starts", type=int, default=512)
    parser.add_argument("--long", type=int, default=1500, help="imagined steps of the target rollout")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    module, cfg = load_module(args.checkpoint)
    freeze_all_but_the_critic(module)
    replay = Replay.load(os.path.join(os.path.dirname(args.checkpoint), "replay-rank0"))
    B, T = cfg.run.batch_size, cfg.run.batch_length
    batches = replay_batches(module, replay, args.batches + 1, B, T)
    held_out, held_post = batches.pop()
    pick = torch.randperm(B * T)[: args.probe_starts]
    probe_start = held_post.flatten()
    probe_start = State(probe_start.deter[pick], probe_start.stoch[pick])
    probe_cont = (1.0 - held_out["is_terminal"].flatten(0, 1).float())[pick]
    base = copy.deepcopy(module)
    variants = [("base", {})] + [parse_variant(v) for v in args.variant]
    summaries, targets = [], {}
    for name, settings in variants:
        module = copy.deepcopy(base)
        gamma = settings.get("gamma", module.actor_critic.cfg.gamma)
        if gamma not in targets:  # the frozen policy's value depends on the discount only
            torch.manual_seed(args.seed)
            targets[gamma] = long_value(module, probe_start, gamma, args.long)
        target = targets[gamma]
        rows, began = [], time.time()

        def probe():
            return measure(module, probe_start, probe_cont, target)

        for step, row in train_critic(module, settings, batches, args.steps, args.every, probe, args.seed):
            row = {"variant": name, "step": step, **row}
            first = rows[0] if rows else row
            gap0 = first["target"] - first["value"]
            row["closed"] = 1.0 - (row["target"] - row["value"]) / gap0 if gap0 else 1.0
            rows.append(row)
            print(json.dumps(row), flush=True)
        summaries.append({"variant": name, "settings": settings, "seconds": round(time.time() - began, 1),
                          "target": rows[0]["target"], "value_start": rows[0]["value"], "value_end": rows[-1]["value"],
                          "steps_to_50": next((r["step"] for r in rows if r["closed"] >= 0.5), None),
                          "steps_to_90": next((r["step"] for r in rows if r["closed"] >= 0.9), None)})
    for summary in summaries:
        print(json.dumps({"summary": summary}))


if __name__ == "__main__":
    main()
