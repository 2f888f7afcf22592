"""Hindsight relabelling in the replay: the step keys that hold a second label of an episode, and the swap.

An episode that carried out another instruction than the one it was given (BabyAI: it picked up the blue key
when told to pick up the red ball) is also a success of that other instruction. With ``reward.hindsight`` the
collector writes, over every step of such an episode, the other instruction's token ids, the reward each step
pays under it (nonzero on the last step only) and a flag. ``relabel_batch`` then trains a share of the replayed
sequences that hold such an episode on its second label: the instruction observation and the reward are
swapped for the episode's steps, nothing else (the dynamics are the same). A sequence swapped so starts without
replay context, whose stored latent read the episode's own instruction.

Step keys (``hindsight_`` + name; not observations, the world model never sees them, and ``Replay.sample``
drops them from the batch once it has applied them):

==========================  ============================================================================
``hindsight_valid``         bool: the step belongs to an episode with a second label.
``hindsight_reward``        float32: the reward of the step under the second label.
``hindsight_<text key>``    the second label's token ids, the same shape and dtype as the text key.
==========================  ============================================================================

Free of torch, Lightning and gymnasium: the replay imports it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

PREFIX = "hindsight_"
VALID_KEY = PREFIX + "valid"
REWARD_KEY = PREFIX + "reward"


def text_label_key(text_key: str) -> str:
    """The step key of the second label of the text observation `text_key`."""
    return PREFIX + text_key


def is_hindsight_key(key: str) -> bool:
    return key.startswith(PREFIX)


def hindsight_spec(spec: Mapping[str, tuple[tuple[int, ...], np.dtype]], text_keys: Sequence[str]) -> dict:
    """The step keys a replay adds to `spec` (an env's step spec) for the second labels of its `text_keys`."""
    keys = {VALID_KEY: ((), np.dtype(np.bool_)), REWARD_KEY: ((), np.dtype(np.float32))}
    for key in text_keys:
        keys[text_label_key(key)] = spec[key]
    return keys


def labelled_text_keys(keys: Sequence[str]) -> list[str]:
    """The text keys whose second label a spec with these keys stores."""
    reserved = (VALID_KEY, REWARD_KEY)
    return [key[len(PREFIX):] for key in keys if is_hindsight_key(key) and key not in reserved]


def relabel_batch(batch: dict[str, np.ndarray], rng: np.random.Generator, fraction: float) -> dict[str, np.ndarray]:
    """`batch` ((B, T, ...) per key, as ``Replay.sample`` gathers it) with each sequence that holds a step of a
    relabelled episode swapped to its second label with probability `fraction`: at those steps each labelled
    text key takes its second label and ``reward`` the second label's reward; the sequence's ``context_valid``
    becomes False and its ``index`` -1 (``Replay.update_context`` then stores none of its latents). The
    ``hindsight_*`` keys are dropped. One draw of `rng` per sequence, swapped or not."""
    out = {key: value for key, value in batch.items() if not is_hindsight_key(key)}
    if VALID_KEY not in batch:
        return out
    valid = np.asarray(batch[VALID_KEY], bool)
    draws = rng.random(valid.shape[0])
    swap = valid.any(axis=1) & (draws < fraction)
    if not swap.any():
        return out
    steps = valid & swap[:, None]  # (B, T)
    for key in labelled_text_keys(list(batch)):
        out[key] = np.where(steps.reshape(*steps.shape, *[1] * (batch[key].ndim - 2)),
                            batch[text_label_key(key)], batch[key])
    out["reward"] = np.where(steps, batch[REWARD_KEY], batch["reward"]).astype(batch["reward"].dtype)
    if "context_valid" in out:
        out["context_valid"] = out["context_valid"] & ~swap
    if "index" in out:  # their latents read the second label: not stored as the replay context of the first
        out["index"] = np.where(swap[:, None], -1, out["index"])
    return out
