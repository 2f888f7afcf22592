"""The MLflow pyfunc model of a trained policy: what `register` (and `fit logger.register_as=NAME`) registers.

    model = mlflow.pyfunc.load_model("models:/NAME/1")
    actions = model.predict({"vector": observations})            # (N, ...) per key, lit_dreamer's convention
    actions = model.predict(inputs, params={"mode": "sample", "task": "CartPole-v1"})

Input: a dict of arrays, one per key of the agent's flat observation dict (the keys and shapes of the model's
signature, with N in front): lit_dreamer's convention, as `make_env` gives observations. Output: the actions
of the N observations in the env's own action space, as Agent.act gives a batch (indices for Discrete, env units
for Box).

State: every predict call is stateless. Its N observations are N independent first steps of episodes: the
recurrent state starts fresh in each call and is not kept between calls (a served model shared by many clients
could not tell their episodes apart). An agent that acts well only with the memory of its episode should be
run with lit_dreamer.agent.Agent, which carries the state: `Agent.load("models:/NAME/1")`.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import numpy as np

CHECKPOINT_ARTIFACT = "checkpoint"
"""The pyfunc artifact that holds the model.ckpt."""


class DreamerPolicy(mlflow.pyfunc.PythonModel):
    """A lit_dreamer Agent behind MLflow's pyfunc interface; stateless per predict call (see the module doc)."""

    def load_context(self, context: Any) -> None:
        from lit_dreamer.agent import Agent
        self.agent = Agent.load(context.artifacts[CHECKPOINT_ARTIFACT])

    # No type hints: MLflow reads predict's hints as an input schema of its own, which would replace the
    # signature registered with the model.
    def predict(self, context, model_input, params=None):
        """The actions of a batch of observations ({key: (N, ...)}), each a first step (stateless)."""
        params = params or {}
        task = params.get("task") or None
        if isinstance(task, str) and task.isdigit():
            task = int(task)
        obs = {key: np.asarray(value) for key, value in dict(model_input).items()}
        action, _ = self.agent.act(obs, mode=params.get("mode", "mode"), task=task)
        return np.asarray(action)
