"""Register a trained policy in the MLflow model registry: `python -m lit_dreamer register --ckpt RUN name=NAME`.

The registered model is a pyfunc model (lit_dreamer.pyfunc_policy) whose artifact is the checkpoint's model.ckpt,
with a signature: the agent's flat observation dict in, the env's actions out, `mode` and `task` as params. It is
logged into the checkpoint's training run when the tracking store holds it (the run keeps its status), else into
a new run of kind `register`. `mlflow.pyfunc.load_model("models:/NAME/1")` and `Agent.load("models:/NAME/1")`
both load it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from lit_dreamer.config import ConfigError

MODEL_NAME = "policy"
"""The name of the logged model inside its run."""


@dataclass
class RegisterOptions:
    """The `key=value` options of `python -m lit_dreamer register` (parsed by lit_dreamer.options)."""

    name: str = ""
    """Registered model name (required); each register adds a version: models:/NAME/1, models:/NAME/2, ..."""
    tracking_uri: str | None = None
    """MLflow store holding the registry (None: the training run's logger.tracking_uri); given, registering works
    even when the run used another logger.backend."""


def register_checkpoint(ckpt_path: str, options: RegisterOptions) -> dict[str, Any]:
    """`register --ckpt`: register a checkpoint's policy; returns {"name", "version", "uri", "run_id"}."""
    from lit_dreamer.checkpoint_files import read_checkpoint
    if not options.name:
        raise ConfigError("register needs name=NAME, the registered model's name")
    info = read_checkpoint(ckpt_path)
    logger = (info.run_config or {}).get("logger", {})
    if options.tracking_uri is None and logger.get("backend", "mlflow") != "mlflow":
        raise ConfigError(f"register puts the policy in an MLflow model registry, and this run logged to "
                          f"logger.backend={logger.get('backend')}; pass tracking_uri=URI (e.g. sqlite:///mlflow.db) "
                          "to name the MLflow store to register in")
    uri = options.tracking_uri or logger.get("tracking_uri") or "sqlite:///mlflow.db"
    return register_policy(ckpt_path, options.name, uri, experiment=logger.get("experiment", "lit_dreamer"),
                           run_id=info.mlflow_run_id)


def register_policy(ckpt_path: str, name: str, tracking_uri: str, experiment: str = "lit_dreamer",
                    run_id: str | None = None) -> dict[str, Any]:
    """Log the checkpoint's policy as a pyfunc model with its signature and register it as `name`.

    Into run `run_id` when the store holds it (its status is put back afterwards), else into a new run."""
    import mlflow

    from lit_dreamer.pyfunc_policy import CHECKPOINT_ARTIFACT, DreamerPolicy
    from lit_dreamer.tracking import KIND_TAG, ready_store
    ready_store(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    status = existing_status(client, run_id)
    # log_model logs through MLflow's fluent API, which reads the process-wide tracking URI: set it for this call
    # only (a private helper of MLflow's, the one its own tests use; the pinned MLflow has it).
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    with _use_tracking_uri(tracking_uri):
        if status is not None:
            run = mlflow.start_run(run_id=run_id)
        else:
            found = client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else client.create_experiment(experiment)
            run = mlflow.start_run(experiment_id=experiment_id, run_name=f"register-{name}",
                                   tags={KIND_TAG: "register"})
        with run:
            model = mlflow.pyfunc.log_model(name=MODEL_NAME, python_model=DreamerPolicy(),
                                            artifacts={CHECKPOINT_ARTIFACT: os.path.abspath(ckpt_path)},
                                            signature=policy_signature(ckpt_path), registered_model_name=name,
                                            pip_requirements=requirements())
            used_run = run.info.run_id
    if status is not None:
        client.set_terminated(used_run, status=status)  # a FINISHED or KILLED training run stays so
    version = model.registered_model_version
    return {"name": name, "version": version, "uri": f"models:/{name}/{version}", "run_id": used_run,
            "tracking_uri": tracking_uri}


def existing_status(client: Any, run_id: str | None) -> str | None:
    """The status of run `run_id` in the client's store, None when there is no such run there."""
    from mlflow.exceptions import MlflowException
    if not run_id:
        return None
    try:
        return client.get_run(run_id).info.status
    except MlflowException:
        return None


def policy_signature(ckpt_path: str):
    """Inputs: one tensor per key of the agent's flat observation dict, (N, *shape); output: the env's actions,
    (N,) int64 for Discrete or (N, *shape) for Box; params: mode (mode|sample) and task (a name or an index)."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    from lit_dreamer.checkpoint_files import read_checkpoint
    info = read_checkpoint(ckpt_path)
    inputs = Schema([TensorSpec(np.dtype(dtype), (-1, *shape), name=key)
                     for key, (shape, dtype) in info.hparams["obs_spec"].items()])
    action = (info.spaces or {}).get("action")
    if info.hparams["discrete"]:
        output = TensorSpec(np.dtype(np.int64), (-1,))
    else:
        dtype = np.dtype(action["dtype"]) if action else np.dtype(np.float32)
        output = TensorSpec(dtype, (-1, *(action["shape"] if action else [info.hparams["action_dim"]])))
    params = ParamSchema([ParamSpec("mode", "string", "mode"), ParamSpec("task", "string", "")])
    return ModelSignature(inputs=inputs, outputs=Schema([output]), params=params)


def requirements() -> list[str]:
    """What the serving environment needs besides lit_dreamer itself (given, so MLflow does not infer them by
    importing the model)."""
    import gymnasium
    import torch
    return [f"torch=={torch.__version__.split('+')[0]}", f"gymnasium=={gymnasium.__version__}",
            f"numpy=={np.__version__}"]
