"""Export the acting policy as one graph: ONNX (for onnxruntime) or torch.export (a .pt2 program).

The graph is one step of the policy, encoder -> one RSSM observe step -> actor, with the recurrent state and the
sampling noise as explicit inputs, so that it holds no state and draws no random numbers of its own:

    (obs/<key>..., is_first, [task], state/deter, state/stoch, state/action, noise/latent, noise/action)
        -> (action, next_state/deter, next_state/stoch, next_state/action)

Feed the next_state outputs back as the state inputs of the next step; zeros are the state at an episode's
start (is_first=True resets it too). The noise drives the latent draw (standard Gumbel, Gumbel-max) and the
action draw (standard Gumbel for a discrete actor, standard normal for a continuous one): all zeros give the
deterministic policy, the posterior's most likely latent and the actor's most likely action. A JSON file
beside the graph lists the names, shapes and dtypes, the action space and the noise. Running either file needs
no Lightning (and the ONNX file no torch). This module imports no Lightning either: only `export_checkpoint`
loads a checkpoint through the training stack.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lit_dreamer.conditioning import with_vector
from lit_dreamer.options import checked, one_of
from lit_dreamer.rssm import State

FORMATS = {"onnx": ".onnx", "torch": ".pt2"}
OBS_PREFIX = "obs/"
STATE_INPUTS = ("state/deter", "state/stoch", "state/action")
STATE_OUTPUTS = ("next_state/deter", "next_state/stoch", "next_state/action")
NOISE_INPUTS = ("noise/latent", "noise/action")
BATCH = "batch"  # the name of the dynamic leading dimension in the JSON and the ONNX file
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of the graph: its shape without the batch dimension, numpy dtype name and role."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    role: str
    """observation, is_first, task, state, noise or action."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "shape": [BATCH, *self.shape], "dtype": self.dtype, "role": self.role}


class ActingPolicy(nn.Module):
    """One policy step of a trained agent with its state and noise as inputs: what gets exported.

    Built from the agent's world model and actor (plain modules, no Lightning). `forward` takes the inputs of
    `input_specs` positionally, each with a leading batch dimension B, and returns those of `output_specs`.
    """

    def __init__(self, world_model: nn.Module, actor: nn.Module, obs_spec: dict, *, task_input: bool = False):
        super().__init__()
        self.world_model, self.actor = world_model, actor
        self.obs_keys = list(world_model.decoded_keys)  # the observation keys the encoders read, in their order
        self.discrete, self.action_dim = actor.discrete, actor.action_dim
        self.task_input = task_input
        rssm = world_model.rssm
        latent = (rssm.stoch_dim, rssm.classes)
        obs = [TensorSpec(OBS_PREFIX + k, tuple(obs_spec[k][0]), str(np.dtype(obs_spec[k][1])), "observation")
               for k in self.obs_keys]
        task = [TensorSpec("task", (), "int64", "task")] if task_input else []
        self.input_specs = [*obs, TensorSpec("is_first", (), "bool", "is_first"), *task,
                            *self.state_specs(STATE_INPUTS),
                            TensorSpec(NOISE_INPUTS[0], latent, "float32", "noise"),
                            TensorSpec(NOISE_INPUTS[1], (self.action_dim,), "float32", "noise")]
        action = TensorSpec("action", () if self.discrete else (self.action_dim,),
                            "int64" if self.discrete else "float32", "action")
        self.output_specs = [action, *self.state_specs(STATE_OUTPUTS)]

    def state_specs(self, names: tuple[str, str, str]) -> list[TensorSpec]:
        rssm = self.world_model.rssm
        shapes = ((rssm.deter_dim,), (rssm.stoch_dim, rssm.classes), (self.action_dim,))
        return [TensorSpec(name, shape, "float32", "state") for name, shape in zip(names, shapes)]

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.input_specs]

    @property
    def output_names(self) -> list[str]:
        return [spec.name for spec in self.output_specs]

    def forward(self, *inputs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        named = dict(zip(self.input_names, inputs, strict=True))
        deter, stoch, last_action = (named[name] for name in STATE_INPUTS)
        keep = (~named["is_first"]).to(deter.dtype)[:, None]
        embed, vector = self.world_model.encode_with_vector({k: named[OBS_PREFIX + k][:, None] for k in self.obs_keys})
        post = self.world_model.rssm.observe_step(State(deter, stoch), last_action, embed[:, 0], keep,
                                                  noise=named[NOISE_INPUTS[0]])
        # As DreamerModule.act: with model.text_condition the actor reads the instruction's embedding as well.
        feat = with_vector(post.feat(), None if vector is None else vector[:, 0])
        params = self.actor(feat, named["task"] if self.task_input else None)
        drawn = self.actor.dist(params).sample_from(named[NOISE_INPUTS[1]])
        if self.discrete:
            return drawn.argmax(-1), post.deter, post.stoch, drawn
        # As DreamerModule.act: the env takes the action clipped, and the next step sees it clipped.
        action = drawn.clamp(-1.0, 1.0)
        return action, post.deter, post.stoch, action

    def initial_inputs(self, batch: int, obs: dict[str, Tensor] | None = None) -> tuple[Tensor, ...]:
        """Inputs of a first step: the given observations (else zeros), is_first, task 0, zero state and noise."""
        values = []
        for spec in self.input_specs:
            if spec.role == "observation" and obs is not None:
                values.append(obs[spec.name[len(OBS_PREFIX):]])
            elif spec.role == "is_first":
                values.append(torch.ones(batch, dtype=torch.bool))
            else:
                values.append(torch.zeros(batch, *spec.shape, dtype=getattr(torch, spec.dtype)))
        return tuple(values)


def acting_policy(module: nn.Module) -> ActingPolicy:
    """The ActingPolicy of a DreamerModule (its world model and actor, shared, not copied), in eval mode."""
    if getattr(module.world_model, "text_encoder", "tokens") == "minilm":
        from lit_dreamer.config import ConfigError
        raise ConfigError("this agent reads text with model.text_encoder=minilm, whose sentence encoder (words looked up "
                          "and embedded in Python, cached) cannot be part of an exported graph; export an agent "
                          "trained with model.text_encoder=tokens, or act with lit_dreamer.Agent")
    policy = ActingPolicy(module.world_model, module.actor_critic.actor, module.obs_spec,
                          task_input=module.cond.active)
    return policy.eval()


# --------------------------------------------------------------------------------------------------
# Writing the graph


def dynamic_batch(policy: ActingPolicy) -> tuple[tuple[dict[int, Any], ...]]:
    """torch.export's dynamic_shapes: dim 0 of every input is the batch (one entry, the *inputs tuple)."""
    batch = torch.export.Dim(BATCH, min=1)
    return (tuple({0: batch} for _ in policy.input_specs),)


# The batch the example inputs are traced with: not 0 or 1, which torch.export would specialize on.
TRACE_BATCH = 2


def export_torch(policy: ActingPolicy, path: str) -> None:
    """Write the policy as a torch.export program (.pt2): torch.export.load(path).module()(*inputs)."""
    with torch.no_grad():
        program = torch.export.export(policy, policy.initial_inputs(TRACE_BATCH), dynamic_shapes=dynamic_batch(policy))
    torch.export.save(program, path)


def export_onnx(policy: ActingPolicy, path: str) -> None:
    """Write the policy as one self-contained ONNX file (weights inside), through torch's dynamo exporter."""
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    # Quiet: it logs a line per torchvision op it cannot register, and warns that the one batch dim is named once.
    exporter_log.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(policy, policy.initial_inputs(TRACE_BATCH), path, dynamo=True, external_data=False,
                              input_names=policy.input_names, output_names=policy.output_names,
                              dynamic_shapes=dynamic_batch(policy), verbose=False)
    finally:
        exporter_log.setLevel(level)


def describe(policy: ActingPolicy, format: str, file: str, action_space: dict, source: dict) -> dict[str, Any]:
    """The JSON beside the graph: how to call it, what the action means, which noise is deterministic."""
    latent_noise = {"name": NOISE_INPUTS[0], "distribution": "gumbel", "deterministic": 0.0,
                    "meaning": "standard Gumbel noise, one per latent class (-log(-log(U)), U uniform in (0, 1)); "
                               "the latent is argmax(log probs + noise): zeros take the posterior's most likely class"}
    if policy.discrete:
        action_noise = {"name": NOISE_INPUTS[1], "distribution": "gumbel", "deterministic": 0.0,
                        "meaning": "standard Gumbel noise, one per action; the action is argmax(log probs + noise): "
                                   "zeros take the most likely action"}
    else:
        action_noise = {"name": NOISE_INPUTS[1], "distribution": "normal", "deterministic": 0.0,
                        "meaning": "standard normal noise; the action is clip(mean + std * noise, -1, 1): zeros take "
                                   "the mean, the actor's most likely action"}
    return {
        "schema_version": SCHEMA_VERSION, "format": format, "file": file, "batch": "dynamic",
        "inputs": [spec.describe() for spec in policy.input_specs],
        "outputs": [spec.describe() for spec in policy.output_specs],
        "state": [{"input": i, "output": o, "initial": 0.0} for i, o in zip(STATE_INPUTS, STATE_OUTPUTS)],
        "noise": [latent_noise, action_noise],
        "deterministic_policy": "all noise inputs zero",
        "action_space": action_space,
        "source": source,
    }


def action_space_of(policy: ActingPolicy, env_space: Any = None) -> dict[str, Any]:
    """The action output's space, and the env's own space where it is known (`env_space`, a gymnasium space)."""
    from gymnasium import spaces
    if policy.discrete:
        space = {"type": "discrete", "n": policy.action_dim}
        if isinstance(env_space, spaces.Discrete) and int(env_space.n) == policy.action_dim:
            space["env_start"] = int(env_space.start)  # the env's action is the index plus this
        return space
    space = {"type": "continuous", "dim": policy.action_dim, "low": -1.0, "high": 1.0}
    if isinstance(env_space, spaces.Box) and env_space.shape == (policy.action_dim,):
        # gymnasium's RescaleAction, which lit_dreamer puts between the policy and the env, maps a to these.
        space["env_low"] = np.asarray(env_space.low, np.float64).tolist()
        space["env_high"] = np.asarray(env_space.high, np.float64).tolist()
        space["to_env"] = "env_low + (action + 1) / 2 * (env_high - env_low)"
    return space


def description_path(graph: str) -> str:
    """The JSON beside a graph: policy.onnx -> policy.onnx.json (an .onnx and a .pt2 of one stem keep theirs)."""
    return graph + ".json"


def write_policy(policy: ActingPolicy, format: str, path: str, action_space: dict, source: dict) -> str:
    """Write the graph to `path` and its description beside it (`path` + .json); returns the JSON's path."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    (export_onnx if format == "onnx" else export_torch)(policy, path)
    meta = description_path(path)
    with open(meta, "w") as f:
        json.dump(describe(policy, format, os.path.basename(path), action_space, source), f, indent=2)
        f.write("\n")
    return meta


# --------------------------------------------------------------------------------------------------
# `python -m lit_dreamer export --ckpt RUN format=onnx|torch [out=PATH]`


@dataclass
class ExportOptions:
    """The `key=value` options of `python -m lit_dreamer export` (parsed by lit_dreamer.options)."""

    format: str = checked("onnx", one_of(FORMATS, "ONNX for onnxruntime, or a torch.export program"),
                          shown="|".join(FORMATS))
    """onnx (one .onnx file for onnxruntime, weights inside) or torch (a torch.export program, .pt2)."""
    out: str | None = None
    """Where to write the graph (None: policy.onnx or policy.pt2 in the current folder); its description goes
    beside it, the same name with .json added (policy.onnx.json)."""


def env_action_space(cfg) -> Any:
    """The action space of the run's (first) env as the env itself declares it, before lit_dreamer rescales it;
    None where the env cannot be made here (the JSON then gives the policy's space alone)."""
    from lit_dreamer.config import task_names
    from lit_dreamer.envs import resolve_env_id
    try:
        import gymnasium as gym
        env = gym.make(resolve_env_id(task_names(cfg)[0]).gym_id)
    except Exception:  # noqa: BLE001 - an env that is not installed here only costs the env's bounds
        return None
    try:
        return env.action_space
    finally:
        env.close()


def saved_action_space(info, cfg) -> Any:
    """The env's own action space as the checkpoint (a CheckpointInfo) saved it (lit_dreamer.envs.described), so
    that the env need not be installed here; for a checkpoint saved before checkpoints carried it, the env's."""
    from lit_dreamer.envs.described import space_from_data
    return space_from_data(info.spaces["action"]) if info.spaces is not None else env_action_space(cfg)


def check_exporter(format: str) -> None:
    """Refuse before any work when the ONNX exporter's packages are missing (torch.export is part of torch)."""
    import importlib.util
    missing = [name for name in ("onnx", "onnxscript") if format == "onnx" and importlib.util.find_spec(name) is None]
    if missing:
        from lit_dreamer.config import ConfigError
        raise ConfigError(f"format=onnx needs {' and '.join(missing)} (torch's ONNX exporter): pip install "
                          f"{' '.join(missing)} (pinned in requirements.txt), or export format=torch")


def export_checkpoint(ckpt_path: str, options: ExportOptions) -> dict[str, str]:
    """Export a checkpoint's policy; returns {"graph": path, "json": path}."""
    from lit_dreamer.evaluation import module_of
    from lit_dreamer.resume import read_checkpoint
    check_exporter(options.format)
    info = read_checkpoint(ckpt_path, mmap=False)
    module, cfg, _ = module_of(info)
    module = module.to("cpu")
    policy = acting_policy(module)
    path = options.out or "policy" + FORMATS[options.format]
    source = {"checkpoint": os.path.abspath(ckpt_path), "env_id": ",".join(cfg.env.tasks) or cfg.env.id,
              "env_obs": cfg.env.obs, "image_size": cfg.env.image_size, "action_repeat": cfg.env.action_repeat}
    meta = write_policy(policy, options.format, path, action_space_of(policy, saved_action_space(info, cfg)), source)
    return {"graph": path, "json": meta}
