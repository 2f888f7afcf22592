"""Videos: agent episodes, open-loop world-model predictions (images) and prediction plots (vectors)."""

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # before anything imports mujoco

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from lit_dreamer.config import load_config
from lit_dreamer.module import DreamerModule
from lit_dreamer.train import fit, probe_env
from lit_dreamer.video import open_loop, open_loop_frames, record_episode, write_gif


def gif_info(path):
    """(total duration in ms, size): GIF writers merge identical consecutive frames into one longer frame,
    so the time a video covers, not its frame count, says whether every frame is in it."""
    with Image.open(path) as image:
        total = 0
        for index in range(image.n_frames):
            image.seek(index)
            total += image.info["duration"]
        return total, image.size


def test_episode_video_has_one_frame_per_step_plus_the_first(tmp_path):
    cfg = load_config(["debug"])
    info = probe_env(cfg)
    torch.manual_seed(0)
    module = DreamerModule(info.obs_spec, info.action_dim, info.discrete, cfg.agent())
    frames, total = record_episode(module, "CartPole-v1", seed=4)
    # CartPole pays 1 per step: the episode had `total` steps, so total + 1 frames.
    assert frames.shape[0] == int(total) + 1 and frames.dtype == np.uint8 and frames.shape[-1] == 3
    path = write_gif(frames, str(tmp_path / "episode.gif"), fps=20)
    assert gif_info(path) == (frames.shape[0] * 50, (frames.shape[2], frames.shape[1]))


def test_open_loop_shapes_and_frames_for_images():
    cfg = load_config(["debug"], ["env.id=dmc/cartpole-balance", "env.obs=pixels"])
    info = probe_env(cfg)
    module = DreamerModule(info.obs_spec, info.action_dim, info.discrete, cfg.agent())
    B, T = 3, 8
    batch = {"image": torch.randint(0, 256, (B, T, 64, 64, 3), dtype=torch.uint8),
             "action": torch.rand(B, T, info.action_dim) * 2 - 1, "reward": torch.rand(B, T),
             "is_first": torch.zeros(B, T, dtype=torch.bool)}
    result = open_loop(module, batch, context=4)
    truth, pred = result["keys"]["image"]
    assert truth.shape == pred.shape == (B, T, 64, 64, 3)
    frames = open_loop_frames(result, "image")
    # One frame per time step; rows: truth, prediction, difference; one column per sequence (+ borders).
    assert frames.shape == (T, 3 * 64 + 4, B * (64 + 4), 3)
    assert (frames[0, 0, 0] == [0, 255, 0]).all() and (frames[-1, 0, 0] == [255, 0, 0]).all()
    np.testing.assert_allclose(frames[0, 2:66, 2:66] / 255.0, truth[0, 0].numpy(), atol=1 / 255 + 1e-6)


def test_video_callback_writes_mlflow_artifacts_during_fit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    summary = fit(load_config(["debug"], ["run.video_every=50", f"run.dir={tmp_path}/run",
                                          f"logger.tracking_uri={uri}"]))
    client = mlflow.MlflowClient(uri)
    names = sorted(os.path.basename(a.path) for a in client.list_artifacts(summary["mlflow_run_id"], "videos"))
    # Due at 50 and 100 env steps; the prefill ends at 60, so the first comes at 61.
    assert names == ["episode-000000061.gif", "episode-000000100.gif", "openloop-000000061.png",
                     "openloop-000000100.png"]
    duration, size = gif_info(tmp_path / "run" / "videos" / "episode-000000100.gif")
    # CartPole's render size; an episode lasts at least 9 steps (10 frames of 50 ms at 20 fps).
    assert duration >= 10 * 50 and size == (600, 400)


def test_video_upload_failures_are_reported_and_training_goes_on(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)

    original = mlflow.MlflowClient.log_artifact

    def fail_for_videos(self, run_id, local_path, artifact_path=None):
        if artifact_path == "videos":
            raise OSError("artifact store unreachable")
        return original(self, run_id, local_path, artifact_path)

    monkeypatch.setattr(mlflow.MlflowClient, "log_artifact", fail_for_videos)
    cfg = load_config(["debug"], ["run.video_every=50", f"run.dir={tmp_path}/run",
                                  f"logger.tracking_uri=sqlite:///{tmp_path}/mlflow.db"])
    summary = fit(cfg)
    assert summary["env_steps"] == cfg.run.steps  # the run went to its end
    # The videos are still on disk, and each lost upload is reported like other MLflow failures.
    assert (tmp_path / "run" / "videos" / "episode-000000100.gif").is_file()
    reported = [r.getMessage() for r in caplog.records if "MLflow log_artifact failed" in r.getMessage()]
    assert reported and "artifact store unreachable" in reported[0]


# --------------------------------------------------------------------------------------------------
# Real dm_control pixels: MuJoCo renders upside down and dm_control returns a flipped view (negative
# strides), which torch.as_tensor refuses. Random images and CartPole never have one.

DMC_PIXELS = ["env.id=dmc/cartpole-balance", "env.obs=pixels", "env.image_size=16", "env.time_limit=20"]


def test_dmc_pixel_observations_and_frames_are_contiguous():
    from lit_dreamer.envs import make_env
    env = make_env("dmc/cartpole-balance", obs="pixels", image_size=16, render=True, seed=0)
    try:
        obs, _ = env.reset(seed=0)
        step_obs = env.step(env.action_space.sample())[0]
        frame = env.render()
    finally:
        env.close()
    for array in (obs["image"], step_obs["image"], frame):
        assert array.flags["C_CONTIGUOUS"] and min(array.strides) > 0, array.strides
        assert torch.as_tensor(array).shape == (16, 16, 3)
    assert obs["image"].std() > 5  # a real render, not a blank frame


@pytest.fixture(scope="module")
def dmc_pixel_run(tmp_path_factory):
    """A tiny dm_control pixel run with videos due at 40 and 80 env steps (episodes cut at 20 steps)."""
    root = tmp_path_factory.mktemp("dmc_pixels")
    cwd = os.getcwd()
    os.chdir(root)
    torch.set_num_threads(1)
    uri = f"sqlite:///{root}/mlflow.db"
    try:
        summary = fit(load_config(["debug"], [*DMC_PIXELS, "run.steps=80", "run.prefill=30", "run.video_every=40",
                                              f"run.dir={root}/run", f"logger.tracking_uri={uri}"]))
    finally:
        os.chdir(cwd)
    return root, uri, summary


def test_video_callback_on_dmc_pixels_writes_episodes_and_open_loop_videos(dmc_pixel_run):
    root, uri, summary = dmc_pixel_run
    assert summary["env_steps"] == 80
    names = sorted(os.path.basename(a.path)
                   for a in mlflow.MlflowClient(uri).list_artifacts(summary["mlflow_run_id"], "videos"))
    assert names == ["episode-000000040.gif", "episode-000000080.gif", "openloop-image-000000040.gif",
                     "openloop-image-000000080.gif"]
    # The episode: 20 steps (the time limit) + the first frame, at the render size, 50 ms each.
    assert gif_info(root / "run" / "videos" / "episode-000000080.gif") == (21 * 50, (16, 16))
    # Open loop: one frame per step of the batch length (8) at 5 fps; rows truth, prediction, difference
    # (16 px + 4 border each way), one column per replayed sequence (debug batch size 4).
    assert gif_info(root / "run" / "videos" / "openloop-image-000000080.gif") == (8 * 200, (4 * 20, 3 * 16 + 4))


def test_eval_command_writes_a_video_of_a_dmc_pixel_checkpoint(dmc_pixel_run, tmp_path, monkeypatch, capsys):
    from lit_dreamer.__main__ import main
    root, uri, _ = dmc_pixel_run
    monkeypatch.chdir(root)
    video = tmp_path / "eval.gif"
    assert main(["eval", "--ckpt", str(root / "run"), "episodes=1", f"video={video}"]) == 0
    assert "dmc/cartpole-balance: 1 episodes" in capsys.readouterr().out
    assert gif_info(video) == (21 * 50, (16, 16))


# --------------------------------------------------------------------------------------------------
# Several tasks: one episode per task, acted for that task; one open loop (the world model is shared)

POINT_GOALS = ["lit_dreamer/PointGoal-0-v0", "lit_dreamer/PointGoal-1-v0"]


class StubReplay:
    """Replayed sequences of both tasks for the open loop (what the callback reads of the replay)."""

    def sample(self, batch_size, length):
        g = np.random.default_rng(0)
        first = np.zeros((batch_size, length), bool)
        first[:, 0] = True
        return {"vector": g.standard_normal((batch_size, length, 4)).astype(np.float32),
                "action": g.uniform(-1, 1, (batch_size, length, 2)).astype(np.float32),
                "reward": g.standard_normal((batch_size, length)).astype(np.float32), "is_first": first,
                "task": np.repeat(np.arange(batch_size) % 2, length).reshape(batch_size, length)}


def recorded_by_the_built_callback(tmp_path, monkeypatch, env_override):
    """Build the run as `fit` does, call its VideoCallback once at 50 env steps; returns the files written,
    (env id, task) of each record_episode call and the task of every action the policy took."""
    from types import SimpleNamespace

    import lit_dreamer.callbacks.video as video_module
    from lit_dreamer.callbacks import VideoCallback
    from lit_dreamer.train import build
    cfg = load_config(["debug"], [env_override, "run.video_every=50", "logger.backend=none", f"run.dir={tmp_path}/run"])
    module, _, callbacks, _ = build(cfg)
    [callback] = [c for c in callbacks if isinstance(c, VideoCallback)]
    callback.max_episode_steps = 5  # a few steps show the task reached the policy
    episodes, acted = [], []
    original_act = module.act

    def act(obs, is_first, carry, mode="mode", task=None):
        acted.append(int(task.item()))
        return original_act(obs, is_first, carry, mode=mode, task=task)

    def spy_record_episode(pl_module, env_id, **kwargs):
        episodes.append((env_id, kwargs.get("task", 0)))  # 0: record_episode's default
        acted.append("new episode")
        return record_episode(pl_module, env_id, **kwargs)

    monkeypatch.setattr(module, "act", act)
    monkeypatch.setattr(video_module, "record_episode", spy_record_episode)
    trainer = SimpleNamespace(datamodule=SimpleNamespace(replay=StubReplay(), batch_size=4, batch_length=8), logger=None)
    paths = callback.record(trainer, module, 50)
    return sorted(os.path.basename(p) for p in paths), episodes, acted


def test_video_callback_records_one_episode_per_task_acted_for_that_task(tmp_path, monkeypatch):
    names, episodes, acted = recorded_by_the_built_callback(tmp_path, monkeypatch, f"env.tasks=[{','.join(POINT_GOALS)}]")
    # The task segment is the one of the eval/<task>/return metrics (task_metric_name).
    assert names == ["episode-lit_dreamer_PointGoal-0-v0-000000050.gif",
                     "episode-lit_dreamer_PointGoal-1-v0-000000050.gif", "openloop-000000050.png"]
    assert episodes == [(POINT_GOALS[0], 0), (POINT_GOALS[1], 1)]
    # Every action of task k's episode was the policy's for task k.
    assert acted == ["new episode", *[0] * 5, "new episode", *[1] * 5]
    # The first frame and one per step, 50 ms each, at PointGoal's render size.
    assert gif_info(tmp_path / "run" / "videos" / "episode-lit_dreamer_PointGoal-1-v0-000000050.gif") == (6 * 50, (64, 64))


def test_video_callback_of_one_task_keeps_its_file_names(tmp_path, monkeypatch):
    names, episodes, _ = recorded_by_the_built_callback(tmp_path, monkeypatch, f"env.id={POINT_GOALS[1]}")
    assert names == ["episode-000000050.gif", "openloop-000000050.png"]
    assert episodes == [(POINT_GOALS[1], 0)]
