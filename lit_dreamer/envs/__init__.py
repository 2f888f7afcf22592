"""Environments in lit_dreamer's convention: dict observations, Discrete or [-1, 1] Box actions."""

from lit_dreamer.envs import point_goals  # noqa: F401 - registers lit_dreamer/PointGoal-<k>-v0
from lit_dreamer.envs.adapters import DictObservation, adapt_action_space
from lit_dreamer.envs.make import OBS_MODES, ResolvedEnvId, close_by_force, make_env, make_vector_env, resolve_env_id
from lit_dreamer.envs.spaces import Spec, action_dim, action_kind, env_action, frames_per_step, space_spec
from lit_dreamer.envs.tasks import TASK_SEED_STRIDE, TaskVectorEnv, check_same_spaces, make_task_vector_env

__all__ = [
    "OBS_MODES",
    "TASK_SEED_STRIDE",
    "TaskVectorEnv",
    "DictObservation",
    "ResolvedEnvId",
    "Spec",
    "action_dim",
    "action_kind",
    "adapt_action_space",
    "check_same_spaces",
    "close_by_force",
    "env_action",
    "frames_per_step",
    "make_env",
    "make_task_vector_env",
    "make_vector_env",
    "resolve_env_id",
    "space_spec",
]
