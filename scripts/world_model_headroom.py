"""Keep training only the world model of a checkpoint on its frozen replay: is it under-trained?

    python scripts/world_model_headroom.py CKPT [--steps 1500] [--every 500] [--lr 4e-5] [--fresh]
                                                [--scale 1,1,10,1]

Loads the module and its world-model optimizer state from the checkpoint, then takes world-model
gradient steps (the run's loss scales, batch and length) on uniform samples of the checkpoint's own
replay. Every `--every` steps it prints the mean world-model losses since the last report and the
`cont` and `rec_rmse` diagnostics of `diagnose_world_model.py` (continue head at terminals,
reconstruction RMSE per dimension). If these keep improving on data the model has already seen, the run was short of
gradient steps (raise the train ratio); if they stall, the model is short of capacity.
`--fresh` starts from a newly initialized world model instead; `--scale` multiplies the (single)
vector observation by fixed per-dimension factors before the model sees it (RMSEs stay in the
original units), to test whether a dimension's small numeric range is what the model neglects.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from diagnose_world_model import checkpoint_replay, scaled, stream_pass, summary
from lit_dreamer.evaluation import load_module
from lit_dreamer.replay import Replay


def diagnostics(wm, replay: Replay, keys: list[str], scale: torch.Tensor | None) -> dict:
    parts = list(stream_pass(wm, replay, keys, scale))
    terminal = torch.cat([data["is_terminal"].bool() for data, *_ in parts])
    p_cont = torch.cat([p for _, _, _, p, _ in parts])
    sq = torch.cat([error for *_, error in parts]) if wm.vector_keys else None
    return summary(p_cont, terminal, sq)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--every", type=int, default=500)
    parser.add_argument("--lr", type=float, default=None, help="default: the run's world-model learning rate")
    parser.add_argument("--fresh", action="store_true", help="a newly initialized world model and optimizer")
    parser.add_argument("--scale", default=None, help="comma-separated factors for the vector observation")
    args = parser.parse_args()
    module, cfg = load_module(args.checkpoint)
    if args.fresh:
        torch.manual_seed(cfg.run.seed)
        module = type(module)(module.obs_spec, module.action_dim, module.discrete, module.hparams["config"])
    module.train()
    wm = module.world_model
    scale = torch.tensor([float(x) for x in args.scale.split(",")]) if args.scale else None
    replay = checkpoint_replay(args.checkpoint)
    keys = [*wm.image_keys, *wm.vector_keys, "action", "reward", "is_first", "is_terminal"]
    opt = module.configure_optimizers()[0]  # the world model's, as the run built it
    if not args.fresh:
        opt.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True)["optimizer_states"][0])
    if args.lr is not None:
        for group in opt.param_groups:
            group["lr"] = args.lr

    print(json.dumps({"step": 0, **diagnostics(wm, replay, keys, scale)}), flush=True)
    sums, start = {}, time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = {k: torch.as_tensor(v) for k, v in replay.sample(cfg.run.batch_size, cfg.run.batch_length).items()
                 if k in keys}
        batch = scaled(wm, batch, scale)
        batch["action"] = batch["action"].float()
        losses = {k: v.float().mean() for k, v in wm.loss(batch)[0].items()}
        opt.zero_grad(set_to_none=True)
        sum(module.scales[k] * v for k, v in losses.items()).backward()
        opt.step()
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        if step % args.every == 0:
            means = {k: round(v / args.every, 4) for k, v in sums.items()}
            print(json.dumps({"step": step, "seconds": round(time.perf_counter() - start), "losses": means,
                              **diagnostics(wm, replay, keys, scale)}), flush=True)
            sums = {}


if __name__ == "__main__":
    main()
