"""Does the world model of a text-reading run tie its reward to the instruction, and does imagination keep it?

    python scripts/diagnose_instruction.py runs/NAME/checkpoints/step-N/model.ckpt

For a checkpoint whose world model reads a text observation (an instruction, e.g. BabyAI's `mission`), runs
the model over its own saved replay (each env stream in order, as scripts/diagnose_world_model.py does) and
prints one JSON object. A *success* is a terminal step with a positive reward (BabyAI pays only on success).

- `success`: at success steps, the reward head's prediction and P(continue) on the posterior, once with the
  episode's own text and once with the text of the next episode in the same stream (the whole episode
  observed with it; successes whose neighbour has the same text are left out). A world model that ties the
  reward to the instruction predicts a lower reward with the wrong one; one that does not predicts the same.
  The actor learns from these rewards in imagination, so a model that ignores the text here gives the actor
  no reason to read it.
- `failure`: at the terminal steps without a reward (an episode that ended in failure, e.g. a wrong pickup
  in BabyAI's Pickup levels), the reward head's prediction and P(continue) on the posterior with the
  episode's own text. Next to `success.own_text`, it is what imagination pays for ending the episode the
  wrong way against the right one: a model that predicts about the same for both gives the actor no reason
  to search for the named object. `one_step_imagined_reward`: the same from the prior rolled one step from
  the posterior before it with the action taken (what imagination pays for that action). Counted over the
  env streams that hold a success, as `value` is.
- `actor`: the actor's probability, one step before each success and each failure, of the action that then
  ended the episode (e.g. `pickup`; discrete actions only). An actor that has learned which ending pays
  takes that action more readily before a success than before a failure; one blind to it takes it about as
  readily before both. (Only the steps where that action was then taken are counted, so both figures lean
  high; read their difference.)
- `value`: over every step of the env streams that hold a success (all of them, in a run that has
  succeeded in each env), the mean reward predicted (posterior, own text) against the real one and the
  critic's mean value; the critic's value at the step before each success (where the episode has one), and
  the one-step return that imagination gives the action that succeeded: the predicted reward plus
  gamma x P(continue) x the critic's value at the success. Their difference, `success_one_step_advantage`,
  is the sign the actor sees for that action (lambda and the return scale left out): where it is negative,
  imagination pays less for reaching the goal (a small predicted reward, then an end) than for staying in a
  state the critic values, and the actor learns to avoid the success it cannot yet predict.
- `open_loop`: from the posterior k steps before each success, the prior rolled forward with the actions
  really taken (what imagination does): the predicted reward and P(continue) at the success step, and how
  much of the text the decoder still recovers from the rolled latent (token accuracy over the text's words,
  and the fraction of whole texts recovered). `k = 0` is the posterior itself.

The posterior and prior latents are sampled, as in training: the figures move with `--seed` (by about 15% at
a few hundred successes), so compare checkpoints at the same seed, or over several.
"""

from __future__ import annotations

import argparse
import json

import torch

from diagnose_world_model import checkpoint_replay, observe_stream, roll_prior, stream
from lit_dreamer.conditioning import with_vector
from lit_dreamer.evaluation import load_module

HORIZONS = (0, 1, 3, 5, 10, 15)


def episode_ids(is_first: torch.Tensor) -> torch.Tensor:
    """(T,) index of each step's episode within the stream (a stream's first step opens episode 0)."""
    ids = torch.cumsum(is_first.long(), 0)
    return ids - ids[0]


def neighbour_texts(data: dict[str, torch.Tensor], keys: list[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each step's text replaced by the text of the next episode of the stream (the last episode gets the
    first one's), and (T,) True where that text differs from the step's own."""
    episode = episode_ids(data["is_first"])
    starts = torch.nonzero(episode.diff(prepend=episode[:1] - 1))[:, 0]  # each episode's first step
    other = (episode + 1) % len(starts)
    swapped, differs = {}, torch.zeros_like(episode, dtype=torch.bool)
    for key in keys:
        swapped[key] = data[key][starts[other]]
        differs |= (swapped[key] != data[key]).flatten(1).any(1)
    return swapped, differs


def head_features(wm, feat: torch.Tensor, data: dict[str, torch.Tensor]) -> torch.Tensor:
    """Features (T, F) as the heads read them (1, T, F'): with the data's conditioning vector appended when the
    model takes one (model.text_condition)."""
    return with_vector(feat[None], wm.condition_vector({k: v[None] for k, v in data.items()}))


@torch.no_grad()
def heads(wm, feat: torch.Tensor, data: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The predicted reward and P(continue) (T,) of features (T, F)."""
    head_feat = head_features(wm, feat, data)
    return wm.reward(head_feat).mean()[0], wm.cont(head_feat).mean()[0]


@torch.no_grad()
def critic_values(module, feat: torch.Tensor, data: dict[str, torch.Tensor]) -> torch.Tensor:
    """The critic's value (T,) of features (T, F)."""
    return module.actor_critic.critic(head_features(module.world_model, feat, data), None).mean()[0]


@torch.no_grad()
def last_action_probability(module, feat: torch.Tensor, data: dict[str, torch.Tensor], ends: torch.Tensor
                            ) -> torch.Tensor:
    """Per episode end (N,) inside its episode: the actor's probability, on the posterior one step before, of
    the action taken at the end. Empty for a continuous action space (a density is not a probability)."""
    actor = module.actor_critic.actor
    ends = ends[(ends > 0) & ~data["is_first"][ends].bool()]
    if not actor.discrete or not len(ends):
        return torch.zeros(0)
    before = {key: v[ends - 1] for key, v in data.items()}
    dist = actor.dist(actor(head_features(module.world_model, feat[ends - 1], before), None)[0])
    return dist.log_prob(data["action"][ends].float()).exp()


@torch.no_grad()
def text_recovery(wm, feat: torch.Tensor, data: dict[str, torch.Tensor], steps: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per step (N,), from features (N, F) at `steps`: the fraction of the text's words (padding left out)
    that the decoder recovers, and whether it recovers every text key whole (0 or 1)."""
    dists = wm.decode(feat[None])
    right, words, whole = 0.0, 0.0, torch.ones(len(steps))
    for key in wm.text_keys:
        truth, guess = data[key][steps], dists[key].mode()[0]
        mask = truth != 0
        right = right + ((guess == truth) & mask).sum(-1).float()
        words = words + mask.sum(-1).float()
        whole = whole * (guess == truth).all(-1).float()
    return right / words.clamp(min=1.0), whole


def mean(values: list[torch.Tensor]) -> float | None:
    values = torch.cat(values) if values else torch.zeros(0)
    return round(float(values.mean()), 4) if len(values) else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampled latents (the figures vary with it)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    module, _ = load_module(args.checkpoint)
    wm = module.world_model
    if not wm.text_keys:
        raise SystemExit(f"{args.checkpoint}: the world model reads no text observation; nothing to diagnose")
    if module.cond.active:
        raise SystemExit(f"{args.checkpoint}: a multi-task checkpoint; this diagnostic reads one-task runs")
    replay = checkpoint_replay(args.checkpoint)
    keys = [*wm.decoded_keys, "action", "reward", "is_first", "is_terminal"]

    real, own, own_cont, other, other_cont = [], [], [], [], []
    value_before, imagined, value_all, reward_all, real_all = [], [], [], [], []
    failure_reward, failure_cont, failure_imagined, p_last = [], [], [], {"success": [], "failure": []}
    loops = {k: {"reward": [], "cont": [], "tokens": [], "whole": [], "n": 0} for k in HORIZONS}
    steps = successes = failures = 0
    for env in range(replay.num_envs):
        data = stream(replay, env, keys)
        steps += len(data["reward"])
        success = data["is_terminal"].bool() & (data["reward"] > 0)
        if not success.any():
            continue
        ends = torch.nonzero(success)[:, 0]
        successes += len(ends)
        post, _ = observe_stream(wm, data)
        reward, cont = heads(wm, post.feat(), data)
        swapped_texts, differs = neighbour_texts(data, wm.text_keys)
        swapped = {**data, **swapped_texts}
        swapped_post, _ = observe_stream(wm, swapped)
        swapped_reward, swapped_cont = heads(wm, swapped_post.feat(), swapped)
        failure = data["is_terminal"].bool() & (data["reward"] <= 0)
        failures += int(failure.sum())
        failure_reward.append(reward[failure]), failure_cont.append(cont[failure])
        kept, state = roll_prior(wm, post, data, torch.nonzero(failure)[:, 0], 1)
        if len(kept):
            failure_imagined.append(heads(wm, state.feat(), {key: v[kept] for key, v in data.items()})[0])
        for name, ending in (("success", success), ("failure", failure)):
            p_last[name].append(last_action_probability(module, post.feat(), data, torch.nonzero(ending)[:, 0]))
        compared = success & differs
        real.append(data["reward"][compared].float())
        own.append(reward[compared]), own_cont.append(cont[compared])
        other.append(swapped_reward[compared]), other_cont.append(swapped_cont[compared])
        value = critic_values(module, post.feat(), data)
        value_all.append(value), reward_all.append(reward), real_all.append(data["reward"].float())
        inside = ends[(ends > 0) & ~data["is_first"][ends].bool()]  # successes with a step before them
        value_before.append(value[inside - 1])
        imagined.append(reward[inside] + module.actor_critic.cfg.gamma * cont[inside] * value[inside])
        for k, loop in loops.items():
            kept, state = roll_prior(wm, post, data, ends, k)
            if not len(kept):
                continue
            feat = state.feat()
            r, c = heads(wm, feat, {key: v[kept] for key, v in data.items()})
            tokens, whole = text_recovery(wm, feat, data, kept)
            loop["reward"].append(r), loop["cont"].append(c), loop["tokens"].append(tokens), loop["whole"].append(whole)
            loop["n"] += len(kept)

    report = {
        "checkpoint": args.checkpoint,
        "steps": steps,
        "successes": successes,
        "success": {
            "compared": sum(len(r) for r in real),
            "real_reward": mean(real),
            "own_text": {"reward": mean(own), "p_continue": mean(own_cont)},
            "other_text": {"reward": mean(other), "p_continue": mean(other_cont)},
        },
        "failure": {"count": failures, "reward": mean(failure_reward), "p_continue": mean(failure_cont),
                    "one_step_imagined_reward": mean(failure_imagined)},
        "actor": {f"p_last_action_before_{name}": mean(values) for name, values in p_last.items()},
        "value": {
            "reward_all_steps": mean(reward_all),
            "real_reward_all_steps": mean(real_all),
            "all_steps": mean(value_all),
            "before_success": mean(value_before),
            "success_one_step_return": mean(imagined),
            "success_one_step_advantage": mean([i - v for i, v in zip(imagined, value_before)]),
        },
        "open_loop": {k: {"n": loop["n"], "reward": mean(loop["reward"]), "p_continue": mean(loop["cont"]),
                          "text_token_accuracy": mean(loop["tokens"]), "text_whole_accuracy": mean(loop["whole"])}
                      for k, loop in loops.items() if loop["n"]},
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
