"""DreamerModule: the LightningModule that wires world model, actor and critic into one training step."""

from __future__ import annotations

from dataclasses import asdict
from typing import Mapping, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override

from lit_dreamer.acting import Carry, build_parts, initial_carry, policy_step
from lit_dreamer.actor_critic import Imagination
# agent_config_from lives with the configs (the Lightning-free policy of lit_dreamer.acting reads it too); it is
# re-exported here for the callers that always imported it from module.
from lit_dreamer.agent_config import AgentConfig, agent_config_from  # noqa: F401
from lit_dreamer.config import task_metric_name
from lit_dreamer.losses import weight_terminal_steps
from lit_dreamer.optim import LaProp
from lit_dreamer.rssm import State
from lit_dreamer.steps import CONTEXT_PREFIX, SpecLike
from lit_dreamer.timing import PhaseTimer


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive training steps with NaN or infinite losses or gradients."""


class DreamerModule(L.LightningModule):
    """DreamerV3 under manual optimization with three LaProp optimizers (world model, actor, critic).

    obs_spec maps each observation key to (shape, dtype or dtype name); action_dim is the one-hot size
    for discrete actions or the box dimension for continuous ones (in [-1, 1]). num_tasks is the size of the
    run's task table: with more than one, the reward and continue heads, actor and critics are conditioned on
    the task (`multitask` config, lit_dreamer.conditioning); with one the agent is the one-task agent.
    task_names (the env ids of the table, optional) name the per-task metrics; without them, task indices do.
    text_words ({text key: words in id order}, the run's vocabulary) is read by model.text_encoder=minilm, which
    embeds the words of the ids; it is not a hyperparameter (checkpoints keep the vocabulary beside it).
    one_hot ({vector key: group widths}, what the env declares one-hot) is read by model.one_hot_decoder=categorical.
    """

    def __init__(self, obs_spec: SpecLike, action_dim: int, discrete: bool, config: AgentConfig | dict | None = None,
                 compile: bool = False, num_tasks: int = 1, task_names: Sequence[str] | None = None,
                 text_words: Mapping[str, Sequence[str]] | None = None,
                 one_hot: Mapping[str, Sequence[int]] | None = None):
        super().__init__()
        cfg = agent_config_from(config)
        obs_spec = {k: (tuple(int(d) for d in shape), str(np.dtype(dtype))) for k, (shape, dtype) in obs_spec.items()}
        # Plain types only, so checkpoints load with weights_only=True.
        self.save_hyperparameters({"obs_spec": {k: [list(s), d] for k, (s, d) in obs_spec.items()},
                                   "action_dim": action_dim, "discrete": discrete, "config": asdict(cfg),
                                   "compile": compile, "num_tasks": num_tasks,
                                   "one_hot": {k: [int(w) for w in v] for k, v in (one_hot or {}).items()}})
        self.automatic_optimization = False
        self.cfg = cfg
        self.obs_spec, self.action_dim, self.discrete = obs_spec, action_dim, discrete
        # Not a hyperparameter: the checkpoint keeps the task table beside it (lit_dreamer.resume).
        self.task_labels = task_labels(num_tasks, task_names)
        self.world_model, self.actor_critic = build_parts(obs_spec, action_dim, discrete, cfg, num_tasks, text_words,
                                                          one_hot)
        self.cond = self.world_model.cond  # with the width of the text conditioning vector (model.text_condition)
        # Every observation key's loss is rec/<key>; text keys take their own scale (loss_scales.text).
        self.scales = {f"rec/{k}": cfg.loss_scales.text if k in self.world_model.text_keys else cfg.loss_scales.rec
                       for k in self.world_model.decoded_keys}
        self.scales.update({k: v for k, v in asdict(cfg.loss_scales).items() if k not in ("rec", "text", "con_terminal")})
        # Off unless a benchmark switches it on; shared with the actor-critic for its two phases.
        self.timer = PhaseTimer()
        self.actor_critic.timer = self.timer
        self.actor_critic.gather = self.gather_returns
        self.register_buffer("train_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))
        self.consecutive_skips = 0
        # Host mirror of train_steps for per-step readers (progress bar); the buffer stays the
        # checkpointed truth, and the mirror is re-read from it whenever a state dict is loaded.
        self.host_train_steps = 0
        self.register_load_state_dict_post_hook(_mirror_loaded_counters)
        if compile:
            # The imagination rollout (15 steps of actor, sampling, GRU and prior over B*T starts, no
            # gradient) is compiled as one function: fusing its many small elementwise ops is where
            # torch.compile can pay (218 -> 118 ms for the rollout alone at size1m; no gain measured in a
            # whole step, docs/performance.md). The observe loop stays eager: compiling its step with
            # autograd gained nothing measurable here.
            self.actor_critic.rollout = torch.compile(self.actor_critic.rollout, dynamic=False)

    # ----------------------------------------------------------------------------------------------
    # Optimization

    @override
    def configure_optimizers(self):
        o = self.cfg.optim
        kwargs = dict(betas=(o.beta1, o.beta2), eps=o.eps, agc=o.agc, pmin=o.pmin, warmup=o.warmup)
        ac = self.actor_critic
        return [
            LaProp(trainable(self.world_model), lr=o.world_model_lr or o.lr, **kwargs),
            LaProp(trainable(ac.actor), lr=o.actor_lr or o.lr, **kwargs),
            LaProp(trainable(ac.critic), lr=o.critic_lr or o.lr, **kwargs),
        ]

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        B, T = batch["is_first"].shape
        task = self.task_of(batch)  # (B, T); None with one task, whose heads read no task

        # 1. World model: reconstruct, predict rewards and continues, KL between posterior and prior.
        #    Only the reward and continue heads are given the task.
        with self.timer("world_model"):
            wm_losses, post, metrics = self.world_model.loss(without_task(batch), self.replay_context(batch), task)
            wm_losses["con"] = weight_terminal_steps(wm_losses["con"], batch["is_terminal"],
                                                     self.cfg.loss_scales.con_terminal)

        # 2. Imagination: roll out the policy in the prior from every posterior state, each in its task.
        start = post.detach().flatten()
        start_cont = 1.0 - batch["is_terminal"].flatten(0, 1).float()
        start_task = None if task is None else task.flatten(0, 1)
        # The instruction's embedding (model.text_condition) for the actor and critics: read, never trained, by them.
        with torch.no_grad():
            vector = self.world_model.condition_vector(batch)  # (B, T, D) or None
        start_vector = None if vector is None else vector.flatten(0, 1)
        imagination = self.actor_critic.imagine_loss(self.world_model, start, start_cont, start_task, start_vector)
        metrics.update(imagination.metrics)
        metrics.update(self.task_scale_metrics(imagination))

        # 3. Critic on the replayed sequence, bootstrapped from the imagined returns of each step.
        with self.timer("actor_critic"):
            repval = self.actor_critic.replay_value_loss(post.feat(), batch, imagination.returns[:, 0].view(B, T),
                                                         vector)

        losses = {**wm_losses, **imagination.losses, "repval": repval}
        assert losses.keys() == self.scales.keys(), (sorted(losses), sorted(self.scales))
        means = {k: v.float().mean() for k, v in losses.items()}
        total = sum(self.scales[k] * v for k, v in means.items())
        stepped = self.optimize(total, means, imagination, metrics)
        self.log_metrics({**{f"loss/{k}": v for k, v in means.items()}, **metrics})
        # A skipped step's posteriors may hold NaN: they must not become replay context.
        return {"context": self.context_entries(post) if stepped else None}

    def optimize(self, total: Tensor, means: dict[str, Tensor], imagination: Imagination, metrics: dict) -> bool:
        """One backward over the summed loss, then step all three optimizers, or none of them.

        A non-finite loss or gradient skips the update (optimizers, slow critic and normalizer stay
        untouched) and is counted; too many in a row stop training with an error naming the culprit.
        Returns whether the parameters were updated.
        """
        optimizers = self.optimizers()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        with self.timer("backward"):
            self.manual_backward(total)
        norms = {name: grad_norm(part.parameters()) for name, part in self.parts().items()}
        metrics.update({f"grad_norm/{k}": v for k, v in norms.items()})
        # The one host-device sync of the step: the host must know whether to step (docs/performance.md).
        if not self.all_finite([*means.values(), *norms.values()]):
            self.skip_update(means, norms, metrics)
            return False
        self.consecutive_skips = 0
        with self.timer("optimizer"):
            for opt in optimizers:
                opt.step()
            self.actor_critic.commit(imagination)
        self.count_step()
        for name, opt in zip(self.parts(), optimizers):
            # Filled on the device: a host tensor would be copied there by self.log, a blocking copy.
            metrics[f"lr/{name}"] = torch.full((), opt.optimizer.current_lr(), device=self.device)
        return True

    def task_scale_metrics(self, imagination: Imagination) -> dict[str, Tensor]:
        """ac/<task>/return_scale, each task's return scale of this step, with several tasks (ac/return_scale
        is their mean). The task is a segment of its own, as in train/<task>/return: `ac/return_scale/<task>`
        would make ac/return_scale a folder as well as a metric, which MLflow's file store cannot hold."""
        if not self.cond.active:
            return {}
        scale = self.actor_critic.normalizer.scale(imagination.spread)
        return {f"ac/{label}/return_scale": scale[k] for k, label in enumerate(self.task_labels)}

    def task_of(self, batch: dict[str, Tensor]) -> Tensor | None:
        """The batch's task (B, T) int64 when the heads are conditioned on it, else None."""
        if not self.cond.active:
            return None
        if "task" not in batch:
            raise ValueError(f"a batch for a {self.cond.num_tasks}-task agent must carry `task` (B, T)")
        return batch["task"].long()

    def all_finite(self, values: list[Tensor]) -> bool:
        """Whether every value is finite on every rank: one device reduction, then one read on the host."""
        finite = torch.stack([torch.isfinite(v).all() for v in values]).all().float()
        # Every rank must take the same decision (gradients are averaged, losses are not).
        finite = self.trainer.strategy.reduce(finite, reduce_op="min")
        return bool(finite >= 1)

    def skip_update(self, means: dict[str, Tensor], norms: dict[str, Tensor], metrics: dict) -> None:
        """Count a skipped update; raise once too many came in a row. Off the hot path: reads freely."""
        # A non-finite loss or gradient would poison the optimizer moments: skip the update.
        bad = [f"loss/{k}" for k, v in means.items() if not torch.isfinite(v)]
        bad += [f"grad_norm/{k}" for k, v in norms.items() if not torch.isfinite(v)]
        self.skipped_steps += 1
        self.consecutive_skips += 1
        metrics["train/nonfinite_terms"] = torch.tensor(float(len(bad)))
        if self.consecutive_skips >= self.cfg.optim.max_skipped_steps:
            raise NonFiniteTrainingError(
                f"{self.consecutive_skips} training steps in a row had non-finite values in "
                f"{', '.join(bad) or 'another rank'}; stopping. The last good checkpoint is kept; lower the "
                "learning rate or check the environment's observations and rewards for NaN or huge values.")

    def count_step(self) -> None:
        """train_steps += 1 on the device (the checkpointed truth) and in its host mirror."""
        self.train_steps += 1
        self.host_train_steps += 1

    def gather_returns(self, returns: Tensor) -> Tensor:
        """All ranks' returns, so that every rank computes the same percentiles (no-op on one device)."""
        # `_trainer`: the `trainer` property raises on a module used outside a Trainer (scripts, notebooks).
        if self._trainer is None or self.trainer.world_size == 1:
            return returns
        return self.all_gather(returns.detach()).flatten()

    @override
    def on_train_batch_end(self, outputs: dict[str, Tensor], batch: dict[str, Tensor], batch_idx: int) -> None:
        datamodule = self.trainer.datamodule
        context = outputs["context"]
        if self.cfg.behavior.replay_context and context is not None and hasattr(datamodule, "update_context"):
            datamodule.update_context(batch["index"], context)

    def parts(self) -> dict[str, torch.nn.Module]:
        return {"world_model": self.world_model, "actor": self.actor_critic.actor,
                "critic": self.actor_critic.critic}

    def log_metrics(self, metrics: dict[str, Tensor]) -> None:
        metrics = {k: v.detach().float() if torch.is_tensor(v) else float(v) for k, v in metrics.items()}
        # Device tensors: Lightning reads them on the host only when it hands metrics to the logger.
        metrics["train/train_steps"] = self.train_steps.float()
        metrics["train/skipped_steps"] = self.skipped_steps.float()
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    # ----------------------------------------------------------------------------------------------
    # Replay context: start each replayed sequence from the stored posterior of its preceding step.

    def replay_context(self, batch: dict[str, Tensor]) -> State | None:
        if not self.cfg.behavior.replay_context or CONTEXT_PREFIX + "deter" not in batch:
            return None
        valid = batch["context_valid"].float()[:, None]
        deter = batch[CONTEXT_PREFIX + "deter"].to(valid.dtype) * valid
        stoch = F.one_hot(batch[CONTEXT_PREFIX + "stoch"].long(), self.world_model.rssm.classes).to(valid.dtype)
        return State(deter, stoch * valid[..., None])

    def context_entries(self, post: State) -> dict[str, Tensor]:
        """Compact per-step latents for the replay: deter as float16, stoch as class indices."""
        return {"deter": post.deter.detach().to(torch.float16), "stoch": post.stoch.detach().argmax(-1).to(torch.uint8)}

    # ----------------------------------------------------------------------------------------------
    # Acting (used by the environment collector and by evaluation)

    def initial_carry(self, n: int) -> Carry:
        return initial_carry(self.world_model, self.action_dim, n, self.device)

    def act(self, obs: dict[str, Tensor], is_first: Tensor, carry: Carry, mode: str = "sample",
            task: Tensor | None = None) -> tuple[Tensor, Carry, State]:
        """One policy step for N parallel environments (lit_dreamer.acting.policy_step, shared with the
        Lightning-free lit_dreamer.agent).

        obs values (N, ...), is_first (N,) bool. carry = (posterior state, previous action). task (N,) int64:
        the task of each env, needed by an agent of several tasks (ignored with one).
        Returns the action (N, A) (one-hot or in [-1, 1] before clipping), the new carry, and the posterior of
        this step (what the replay stores as context).
        """
        return policy_step(self.world_model, self.actor_critic, self.cond, self.discrete, obs, is_first, carry,
                           mode, task)


def task_labels(num_tasks: int, task_names: Sequence[str] | None) -> list[str]:
    """Each task's metric-name segment: its name as eval/<task>/return has it, else its index."""
    if task_names is None:
        return [str(k) for k in range(num_tasks)]
    assert len(task_names) == num_tasks, f"{len(task_names)} task names for {num_tasks} tasks"
    return [task_metric_name(name) for name in task_names]


def without_task(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The batch as the world model sees it: one world model serves every task, so no task index enters it."""
    return {key: value for key, value in batch.items() if key != "task"}


def trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters an optimizer steps: frozen ones (requires_grad False, `init.freeze`) are left out."""
    return [p for p in module.parameters() if p.requires_grad]


def _mirror_loaded_counters(module: DreamerModule, incompatible_keys) -> None:
    module.host_train_steps = int(module.train_steps)


def grad_norm(params) -> Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
