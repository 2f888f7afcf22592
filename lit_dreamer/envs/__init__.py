"""Environments in lit_dreamer's convention: dict observations, Discrete or [-1, 1] Box actions."""

from lit_dreamer.envs.adapters import DictObservation, adapt_action_space
from lit_dreamer.envs.make import OBS_MODES, ResolvedEnvId, close_by_force, make_env, make_vector_env, resolve_env_id
from lit_dreamer.envs.spaces import Spec, action_dim, action_kind, env_action, frames_per_step, space_spec

__all__ = [
    "OBS_MODES",
    "DictObservation",
    "ResolvedEnvId",
    "Spec",
    "action_dim",
    "action_kind",
    "adapt_action_space",
    "close_by_force",
    "env_action",
    "frames_per_step",
    "make_env",
    "make_vector_env",
    "resolve_env_id",
    "space_spec",
]
