"""Task conditioning of the heads that depend on the task: reward, continue, actor, critic (issue 22).

The world model's encoder, RSSM and decoder are shared by all tasks and never see a task. A head that
depends on the task reads it in one of two ways (`multitask.conditioning`):

- `embedding`: a learned vector per task (TD-MPC2 style), rescaled to an L2 norm of at most 1 and
  concatenated to the latent features before the head's trunk;
- `heads`: the trunk is shared and the head's last linear layer is one per task.

Besides the task, the heads can read a vector that comes with each input (`vector_dim` > 0): the
instruction's text embedding with `model.text_condition`. Whoever calls a head appends it to the latent
features (`with_vector`); imagination carries each start's vector through the horizon.

With one task there is nothing to condition on: the heads are built exactly as in the one-task agent
(same parameters, same initialization, same random draws), and a task index given to them is ignored.
Plain `nn.Module`s; nothing here knows about Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_dreamer.nets import MLP, linear, trunc_normal_fan_in_

CONDITIONING_MODES = ("embedding", "heads")


@dataclass(frozen=True)
class Conditioning:
    """How the task-dependent heads read the task: the number of tasks, the mode, the embedding size, and the
    width of a conditioning vector appended to their input features (0: none)."""

    num_tasks: int = 1
    mode: str = "embedding"
    embed_dim: int = 16
    vector_dim: int = 0

    def __post_init__(self):
        if self.mode not in CONDITIONING_MODES:
            raise ValueError(f"multitask.conditioning must be one of {', '.join(CONDITIONING_MODES)}, got {self.mode!r}")
        if self.num_tasks < 1 or self.embed_dim < 1 or self.vector_dim < 0:
            raise ValueError(f"need num_tasks >= 1, multitask.embed_dim >= 1 and vector_dim >= 0, got "
                             f"{self.num_tasks}, {self.embed_dim}, {self.vector_dim}")

    @property
    def active(self) -> bool:
        """Whether the heads depend on the task at all (not with one task)."""
        return self.num_tasks > 1

    @property
    def extra_inputs(self) -> int:
        """Width the task vector adds to a head's trunk input (the conditioning vector is part of the features)."""
        return self.embed_dim if self.active and self.mode == "embedding" else 0


def with_vector(feat: Tensor, vector: Tensor | None) -> Tensor:
    """feat (..., F) with the conditioning vector appended: vector (..., D), or fewer leading dims that
    broadcast over feat's first ones (a start's vector over the imagined steps). No vector: feat itself."""
    if vector is None:
        return feat
    vector = vector.to(feat.dtype)
    vector = vector.reshape((1,) * (feat.dim() - vector.dim()) + vector.shape).expand(*feat.shape[:-1], -1)
    return torch.cat([feat, vector], -1)


class TaskEmbedding(nn.Module):
    """One learned vector per task, rescaled to an L2 norm of at most `max_norm`.

    The cap is applied in the forward pass (differentiably), not by rewriting the table in place as
    nn.Embedding(max_norm=...) does: a frozen or loaded table then stays what it was.
    """

    def __init__(self, num_tasks: int, dim: int, max_norm: float = 1.0):
        super().__init__()
        self.max_norm = max_norm
        # Started at about unit norm: every task's vector is as far from the others as the cap allows.
        self.rows = nn.Parameter(torch.randn(num_tasks, dim) / dim ** 0.5)

    def table(self) -> Tensor:
        """Every task's capped vector, (K, D)."""
        norm = torch.linalg.vector_norm(self.rows, dim=-1, keepdim=True)
        return self.rows * (self.max_norm / norm.clamp_min(self.max_norm))

    def forward(self, task: Tensor) -> Tensor:
        """task (...) int64 -> vectors (..., D)."""
        return self.table()[task]


class TaskLinear(nn.Module):
    """One linear layer per task: row k of `weight` (K, out, in) and `bias` (K, out) serves task k.

    Each input goes through its own task's layer only, so a task's parameters get gradient only from its own
    samples and the layer costs one layer's FLOPs (plus 1/BLOCKS_PER_TASK at most for padding), whatever K.
    The rows are laid out by task in blocks of equal size (`task_blocks`) and multiplied block by block
    (one bmm), with no host-device sync: splitting the rows by task would need the counts on the host.
    A narrow layer (few outputs) instead applies every task's layer to every input and picks the task's
    output (the others', discarded, pass no gradient): K times the layer, but fewer ops than the blocks'
    bookkeeping, which then costs more than the layer (`EVERY_TASK_MAX_EXTRA`).
    """

    # Rows per block: ceil(N / (K * BLOCKS_PER_TASK)). Each task pads at most one block, so the padding costs
    # about 1/BLOCKS_PER_TASK of the layer at most; each block gathers its task's weight: about
    # (BLOCKS_PER_TASK + 1) * K copies of (out, in), whatever N (a weight per row would be N copies).
    BLOCKS_PER_TASK = 16
    # Up to this many extra outputs per input ((K - 1) * out), computing every task's layer is faster than
    # the blocks (CPU, 1 thread, 512 to 8192 rows of 64 units, K = 4: equal time at 16 to 64 outputs; at
    # 255 outputs the blocks take a quarter of the time). The continue head's layer (1 output) and a small
    # action space's actor stay on that path; the 255-bin reward head and critics take the blocks.
    EVERY_TASK_MAX_EXTRA = 64

    def __init__(self, in_dim: int, out_dim: int, num_tasks: int, scale: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_tasks, out_dim, in_dim))
        self.bias = nn.Parameter(torch.zeros(num_tasks, out_dim))
        if scale != 0.0:
            for row in self.weight:  # each task's layer initialized as `nets.linear` would
                trunc_normal_fan_in_(row, in_dim, scale)

    def forward(self, x: Tensor, task: Tensor) -> Tensor:
        """x (..., in), task (...) int64 -> (..., out)."""
        num_tasks, out_dim, in_dim = self.weight.shape
        weight, bias = self.weight.to(x.dtype), self.bias.to(x.dtype)
        if (num_tasks - 1) * out_dim <= self.EVERY_TASK_MAX_EXTRA:
            outs = torch.einsum("...i,koi->...ko", x, weight) + bias  # (..., K, out)
            index = task[..., None, None].expand(*task.shape, 1, out_dim)
            return outs.gather(-2, index).squeeze(-2)
        rows, tasks = x.reshape(-1, in_dim), task.reshape(-1)
        block_size = max(1, -(-len(tasks) // (num_tasks * self.BLOCKS_PER_TASK)))
        slot, block_task = task_blocks(tasks, num_tasks, block_size)
        # Padding rows stay zero; their outputs are never read, so they add nothing to any gradient.
        blocks = rows.new_zeros(len(block_task) * block_size, in_dim).index_copy(0, slot, rows)
        outs = torch.baddbmm(bias[block_task, None], blocks.view(-1, block_size, in_dim),
                             weight[block_task].transpose(1, 2))  # (blocks, block_size, out)
        return outs.view(-1, out_dim)[slot].view(*x.shape[:-1], out_dim)


def task_blocks(task: Tensor, num_tasks: int, block_size: int) -> tuple[Tensor, Tensor]:
    """Lay rows out by task in blocks of `block_size` rows, each block holding one task's rows only.

    task (N,) int64 -> slot (N,): each row's place in the layout (task 0's rows first, in their order, then
    task 1's from the next block, ...), and block_task (B,): each block's task, for a number of blocks B that
    depends on N and K only: ceil(N / block_size) + K - 1, since each task leaves at most one block part
    empty. Blocks past the last task's are padding (task K - 1). Shapes never depend on the values, so
    nothing waits for the device (no bincount().tolist()), and torch.compile sees static shapes.
    """
    one_hot = (task[:, None] == torch.arange(num_tasks, device=task.device)).long()  # (N, K)
    rank = one_hot.cumsum(0).gather(1, task[:, None]).squeeze(1) - 1  # the row's place among its task's rows
    blocks = (one_hot.sum(0) + block_size - 1) // block_size  # per task
    ends = blocks.cumsum(0)
    slot = (ends - blocks)[task] * block_size + rank
    num_blocks = -(-len(task) // block_size) + num_tasks - 1
    block_index = torch.arange(num_blocks, device=task.device)
    block_task = torch.searchsorted(ends, block_index, right=True).clamp(max=num_tasks - 1)
    return slot, block_task


class ConditionedHead(nn.Module):
    """An MLP trunk and an output layer (nets.Head), conditioned on the task as `cond` says.

    One task: exactly nets.Head (the same parameter names `trunk.*`, `out.*`, and the same init).
    `embedding`: the trunk reads [x, task vector] (`embedding.rows` holds the vectors).
    With `cond.vector_dim` > 0, x is the features with the conditioning vector appended (in_dim + vector_dim).
    `heads`: `out` is a TaskLinear with one layer per task.
    """

    def __init__(self, in_dim: int, out_dim: int, units: int, layers: int, out_scale: float = 1.0,
                 bias: bool = False, cond: Conditioning = Conditioning()):
        super().__init__()
        self.cond = cond
        # The caller appends the conditioning vector to x (`with_vector`); the task vector is appended here.
        self.trunk = MLP(in_dim + cond.vector_dim + cond.extra_inputs, units, layers, bias)
        if cond.active and cond.mode == "heads":
            self.out = TaskLinear(self.trunk.out_dim, out_dim, cond.num_tasks, scale=out_scale)
        else:
            self.out = linear(self.trunk.out_dim, out_dim, scale=out_scale)
        if cond.active and cond.mode == "embedding":
            self.embedding = TaskEmbedding(cond.num_tasks, cond.embed_dim)

    def forward(self, x: Tensor, task: Tensor | None = None) -> Tensor:
        """x (..., in), task (...) int64 (required with several tasks, ignored with one) -> (..., out)."""
        if not self.cond.active:
            return self.out(self.trunk(x))
        if task is None:
            raise ValueError("a head conditioned on several tasks needs the task of each input")
        assert task.shape == x.shape[:-1], f"task {tuple(task.shape)} must match the inputs' leading dims {tuple(x.shape[:-1])}"
        if self.cond.mode == "embedding":
            return self.out(self.embedded_trunk(x, task))
        return self.out(self.trunk(x), task)

    def embedded_trunk(self, x: Tensor, task: Tensor) -> Tensor:
        """The trunk on [x, task vector], without building that concatenation.

        The first layer's weight splits into the columns of x and those of the task vector: W [x, e] =
        W_x x + W_e e, where W_e e is computed once per task (K rows) and gathered. Besides the (N, in + D)
        copy this saves the gradient with respect to x, which the concatenation made autograd compute in
        full (a (N, units) x (units, in + D) product) only to keep the task columns' part; the actor and
        critics read detached features, so nothing else needs it. Same function, same parameters.
        """
        if len(self.trunk) == 0:  # no hidden layer: the input is the trunk's output
            return torch.cat([x, self.embedding(task).to(x.dtype)], -1)
        linear_layer, *after_linear = self.trunk[0]  # the first NormAct: Linear, RMSNorm, SiLU
        width = x.shape[-1]
        weight = linear_layer.weight.to(x.dtype)
        per_task = F.linear(self.embedding.table().to(x.dtype), weight[:, width:])  # (K, units)
        bias = None if linear_layer.bias is None else linear_layer.bias.to(x.dtype)
        hidden = F.linear(x, weight[:, :width], bias) + per_task[task]
        for layer in [*after_linear, *list(self.trunk)[1:]]:
            hidden = layer(hidden)
        return hidden


# Where the task-conditioned heads live in a DreamerModule's state dict: their task rows are what an
# adaptation maps by task name (see lit_dreamer.adapt).
CONDITIONED_HEADS = ("world_model.reward_head", "world_model.cont_head", "actor_critic.actor.net",
                     "actor_critic.critic.net", "actor_critic.slow_critic.net")


def task_indexed(name: str, cond: Conditioning) -> bool:
    """Whether state-dict entry `name` of a DreamerModule built with `cond` has one row per task."""
    head = next((h for h in CONDITIONED_HEADS if name.startswith(h + ".")), None)
    if head is None or not cond.active:
        return False
    rest = name[len(head) + 1:]
    return rest == "embedding.rows" or (cond.mode == "heads" and rest in ("out.weight", "out.bias"))
