"""Watch the agent and its world model: episode videos, open-loop predictions, prediction plots.

Videos are animated GIFs (Pillow, no extra dependency); MLflow shows them as artifacts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from lit_dreamer.conditioning import with_vector
from lit_dreamer.envs import action_kind, env_action, make_env
from lit_dreamer.rssm import State


def write_gif(frames: np.ndarray, path: str, fps: int = 20) -> str:
    """frames (T, H, W, 3) uint8 -> an animated GIF at `path`.

    GIF frame times are whole centiseconds: fps 20 (5 cs) or 5 (20 cs) play exactly.
    """
    assert frames.ndim == 4 and frames.shape[-1] == 3 and frames.dtype == np.uint8, frames.shape
    images = [Image.fromarray(frame) for frame in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=max(1, 1000 // fps), loop=0,
                   optimize=False, disposal=1)
    return path


@torch.no_grad()
def record_episode(module, env_id: str, *, mode: str = "mode", seed: int = 0, max_steps: int = 1000,
                   task: int = 0, **env_kwargs: Any) -> tuple[np.ndarray, float]:
    """Frames of one episode acted by `module` (env.render() frames) for task number `task`, and its return."""
    env = make_env(env_id, render=True, **env_kwargs)
    try:
        obs, _ = env.reset(seed=seed)
        carry = module.initial_carry(1)
        is_first = torch.ones(1, dtype=torch.bool, device=module.device)
        frames, total = [env.render()], 0.0
        discrete = action_kind(env) == "discrete"
        for _ in range(max_steps):
            tensors = {k: torch.as_tensor(np.asarray(v)[None], device=module.device) for k, v in obs.items()}
            action, carry, _ = module.act(tensors, is_first, carry, mode=mode, task=torch.tensor([task]))
            action = action[0].float().cpu().numpy()
            obs, reward, terminated, truncated, _ = env.step(env_action(action, discrete))
            total += float(reward)
            frames.append(env.render())
            is_first = torch.zeros(1, dtype=torch.bool, device=module.device)
            if terminated or truncated:
                break
    finally:
        env.close()
    return np.stack([to_rgb(f) for f in frames]), total


def to_rgb(frame: np.ndarray) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.ndim == 2:
        frame = frame[..., None]
    if frame.shape[-1] == 1:
        frame = np.repeat(frame, 3, -1)
    return frame[..., :3].astype(np.uint8)


@torch.no_grad()
def open_loop(module, batch: dict[str, Tensor], context: int) -> dict[str, Any]:
    """Observe the first `context` steps of each sequence, then imagine the rest with the replayed actions.

    Returns per decoded key the truth and the predictions (observed part: posterior reconstructions;
    rest: open-loop predictions from the prior), and the true and predicted rewards, all (B, T, ...).
    """
    wm = module.world_model
    B, T = batch["is_first"].shape
    assert 0 < context < T, f"context {context} must be within the sequence length T={T}"
    embed = wm.encode({k: batch[k][:, :context] for k in wm.decoded_keys})
    post, _ = wm.rssm.observe(embed, batch["action"][:, :context], batch["is_first"][:, :context])
    state = State(post.deter[:, -1], post.stoch[:, -1])
    deters, stochs = [], []
    for t in range(context, T):
        state = wm.rssm.imagine_step(state, batch["action"][:, t])
        deters.append(state.deter), stochs.append(state.stoch)
    feat = torch.cat([post.feat(), State(torch.stack(deters, 1), torch.stack(stochs, 1)).feat()], 1)
    # Text keys: the predicted token ids, comparable with the true ones (their mean would be (..., L, V) probabilities).
    predictions = {k: dist.mode() if k in wm.text_keys else dist.mean() for k, dist in wm.decode(feat).items()}
    task = batch["task"].long() if "task" in batch and module.cond.active else None  # the reward head's, not the model's
    # The instruction's embedding (model.text_condition) of every step, as the reward head reads it in training.
    reward = wm.reward(with_vector(feat, wm.condition_vector(batch)), task).mean()
    result = {"context": context, "keys": {}, "reward": (batch["reward"], reward)}
    for key, pred in predictions.items():
        truth = wm.target(key, batch).float()
        result["keys"][key] = (truth, pred)
    return result


def open_loop_frames(result: dict[str, Any], key: str) -> np.ndarray:
    """(T, H, B*W, 3) uint8 frames: per sequence a column of truth, prediction and their difference.

    A green border marks observed steps, a red one the open-loop (imagined) steps.
    """
    truth, pred = (x.clamp(0, 1).cpu().numpy() for x in result["keys"][key])
    error = (pred - truth + 1.0) / 2.0
    columns = np.concatenate([truth, pred, error], 2)  # (B, T, 3H, W, C)
    frames = (columns * 255).astype(np.uint8)
    frames = np.pad(frames, ((0, 0), (0, 0), (2, 2), (2, 2), (0, 0)))
    B, T = frames.shape[:2]
    border = np.where(np.arange(T) < result["context"], 1, 0)  # green (1) while observing, red (0) after
    for t in range(T):
        color = [0, 255, 0] if border[t] else [255, 0, 0]
        frames[:, t, :2], frames[:, t, -2:], frames[:, t, :, :2], frames[:, t, :, -2:] = color, color, color, color
    frames = np.concatenate(list(frames), 2)  # (T, 3H+4, B*(W+4), C)
    return np.stack([to_rgb(f) for f in frames])


def open_loop_plot(result: dict[str, Any], path: str, sequence: int = 0, max_dims: int = 4) -> str:
    """PNG of predicted vs real reward and vector observations of one sequence (for vector-only envs)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    panels = [("reward", *result["reward"])] + [
        (f"{k}[{d}]", truth[..., d], pred[..., d]) for k, (truth, pred) in result["keys"].items() if truth.ndim == 3
        for d in range(min(max_dims, truth.shape[-1]))]
    figure = Figure(figsize=(8, 1.8 * len(panels)))
    FigureCanvasAgg(figure)
    for index, (name, truth, pred) in enumerate(panels):
        axis = figure.add_subplot(len(panels), 1, index + 1)
        axis.plot(truth[sequence].cpu().numpy(), label="real", color="black")
        axis.plot(pred[sequence].cpu().numpy(), label="predicted", color="tab:blue")
        axis.axvline(result["context"] - 0.5, color="tab:red", linestyle="--")
        axis.set_ylabel(name)
        if index == 0:
            axis.legend(loc="upper right")
            axis.set_title("observed | open-loop prediction")
    figure.tight_layout()
    figure.savefig(path)
    return path
