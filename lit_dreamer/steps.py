"""The vocabulary of a replay step: what each key means, who writes it, and the spec types that describe it.

One step is what one env stream yields at time t, as a dict of arrays (the replay stores
(rows, num_envs, *shape) of each key; a batch holds (B, T, *shape)):

==================  ====================================================================================
observation keys    o_t, written by the env through ``envs.adapters.DictObservation``: uint8 images
                    HxWxC and float32 vectors. Keys starting with ``log_`` (``LOG_PREFIX``) are the
                    env's diagnostics, stored but neither encoded nor decoded by the world model.
``action``          a_{t-1}, the action that *led to* o_t (zeros at ``is_first``), written by the
                    collector: one-hot for discrete actions, the box action for continuous ones.
``reward``          r_t, received together with o_t (zero at ``is_first``); written by the collector.
``is_first``        o_t starts an episode; written by the collector.
``is_last``         o_t ends an episode, by termination or truncation; written by the collector.
``is_terminal``     o_t is a true end of the MDP (no bootstrap); written by the collector.
``task``            index of the env's task in the run's task table (``config.task_names``), int64; written
                    by the collector. Not an observation: the world model never sees it.
``hindsight_*``     with ``reward.hindsight``: an episode's second label (instruction tokens, reward, flag;
                    ``lit_dreamer.relabel``), written by the collector over the episode once it ended. Not
                    observations: ``Replay.sample`` swaps them in for a share of the sequences and drops them.
==================  ====================================================================================

``Replay.sample`` adds to a batch (``SAMPLE_KEYS`` and ``CONTEXT_PREFIX``; no step may use them):

==================  ====================================================================================
``index``           (B, T) int64 id of each replayed slot, which ``Replay.update_context`` takes back.
``context_valid``   (B,) whether ``context/*`` holds a stored latent (else zeros).
``context/<name>``  (B, ...) the model's posterior latent ``<name>`` (deter, stoch) of the step just
                    before each sequence (replay context), written back by ``DreamerModule`` through
                    ``ReplayDataModule.update_context``.
==================  ====================================================================================

Free of torch and Lightning: the envs, the replay and the agent core all import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

NON_OBS_KEYS = ("action", "reward", "is_first", "is_last", "is_terminal", "task")
"""Keys of a stored step that are not observations (written by the collector)."""
SAMPLE_KEYS = ("index", "context_valid")
"""Keys that ``Replay.sample`` adds to a batch."""
RESERVED_KEYS = NON_OBS_KEYS + SAMPLE_KEYS
"""Keys an observation may not use."""
CONTEXT_PREFIX = "context/"
"""Prefix of the replay-context latents in a batch, ``context/<name>``."""
LOG_PREFIX = "log_"
"""Prefix of observation keys that are diagnostics, not inputs of the world model."""

Shape = tuple[int, ...]
Spec = dict[str, tuple[Shape, np.dtype]]
"""Shape (without batch or time) and dtype of every key of a step, as ``envs.space_spec`` returns it."""
SpecLike = Mapping[str, tuple[Shape, Any]]
"""A spec whose dtypes may also be given as a type or a name (``np.float32``, ``"uint8"``): what the
replay, the world model and ``DreamerModule`` accept (the module keeps names, so its hyperparameters
stay plain YAML)."""


def clashes_with_a_batch_key(key: str) -> bool:
    """Would a step key collide with what ``Replay.sample`` adds?"""
    return key in SAMPLE_KEYS or key.startswith(CONTEXT_PREFIX)


def is_reserved(key: str) -> bool:
    """May an observation not be called ``key``?"""
    return key in RESERVED_KEYS or key.startswith(CONTEXT_PREFIX)


def is_model_input(key: str) -> bool:
    """Is ``key`` an observation for the world model to encode (not a step flag, diagnostic or latent)?"""
    return not (key in NON_OBS_KEYS or key.startswith(LOG_PREFIX) or key.startswith(CONTEXT_PREFIX))
