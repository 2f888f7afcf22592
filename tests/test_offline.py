"""Offline training (issue 24): `fit offline.replay=PATH offline.steps=N` learns from a saved replay, read-only,
with no env; `convert-episodes` writes .npz episodes as such a replay; run.train_ratio may change on resume."""

from __future__ import annotations

import hashlib
import os
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest

from lit_dreamer.config import ConfigError, load_config
from lit_dreamer.replay import Replay
from lit_dreamer.train import fit
from tests.test_system import cli, client_for, explain, fit_cli, fit_in_process, history, in_tmp, only_run

__all__ = ["in_tmp"]  # a fixture, imported for the tests below

SOURCE_STEPS, SOURCE_PREFILL = 160, 120
OFFLINE_STEPS = 100
# A learning rate that moves the debug model within a hundred steps (the default 4e-5 with a 1000-step
# warmup would barely move it), so that the fall of the loss is far outside its step-to-step noise.
FAST = ("optim.lr=1e-3", "optim.warmup=0")
WORLD_MODEL_LOSSES = ("loss/rec/vector", "loss/rew", "loss/con", "loss/dyn", "loss/rep")

# Runs the real CLI with gymnasium unable to make any env: an offline run without env.id must not try.
NO_ENV_SCRIPT = textwrap.dedent("""
    import sys
    import gymnasium

    def refuse(*args, **kwargs):
        raise AssertionError(f"an env was made in an offline run: {args}")

    gymnasium.make = gymnasium.make_vec = refuse
    from lit_dreamer.__main__ import main
    sys.exit(main(sys.argv[1:]))
""")


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under folder (through the `last` link), by relative path."""
    hashes = {}
    for directory, _, names in os.walk(folder, followlinks=True):
        for name in names:
            path = Path(directory) / name
            hashes[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


@pytest.fixture(scope="module")
def source_run(tmp_path_factory) -> Path:
    """A tiny online debug run: its run folder is the offline runs' source."""
    root = tmp_path_factory.mktemp("source")
    proc = fit_cli(root, f"run.steps={SOURCE_STEPS}", f"run.prefill={SOURCE_PREFILL}")
    assert proc.returncode == 0, explain(proc)
    return root / "run"


@pytest.fixture(scope="module")
def offline_run(source_run, tmp_path_factory):
    """An offline run from source_run through the real CLI, with envs made impossible; the source's file hashes
    before it."""
    root = tmp_path_factory.mktemp("offline")
    before = file_hashes(source_run)
    script = root / "no_env.py"
    script.write_text(NO_ENV_SCRIPT)
    # Every gradient step logged (run.log_every=1): the tests read per-step histories.
    proc = fit_cli(root, f"offline.replay={source_run}", f"offline.steps={OFFLINE_STEPS}", *FAST,
                   "run.checkpoint_every=60", "run.log_every=1", script=[str(script)], timeout=400)
    return root, proc, before


@pytest.mark.timeout(600)
def test_offline_fit_takes_no_env_step_and_its_world_model_loss_falls(offline_run, source_run):
    root, proc, _ = offline_run
    assert proc.returncode == 0, explain(proc)
    assert f"offline: {OFFLINE_STEPS} gradient steps from the replay" in proc.stdout
    run = only_run(root)
    # The step-* folder `last` pointed to when the run started: `last` itself moves on if the source run goes on.
    assert run.data.tags["offline_replay"] == os.path.realpath(source_run / "checkpoints" / "last" / "replay-rank0")
    assert run.data.params["offline.replay"] == str(source_run) and run.data.params["env.id"] == "None"
    logged = set(run.data.metrics)
    assert not {"train/env_steps", "train/return", "eval/return"} & logged, sorted(logged)
    # The step axis of every metric is gradient steps: train/train_steps = its step, 1..N.
    steps = history(root, run.info.run_id, "train/train_steps")
    assert [(m.step, int(m.value)) for m in steps] == [(n, n) for n in range(1, OFFLINE_STEPS + 1)]
    total = np.sum([[m.value for m in history(root, run.info.run_id, key)] for key in WORLD_MODEL_LOSSES], axis=0)
    first, last = total[:10].mean(), total[-10:].mean()
    assert last < 0.7 * first, (first, last)  # seen: about 0.45 of the first (8.5 -> 3.8)


@pytest.mark.timeout(600)
def test_the_source_replay_is_never_written(offline_run, source_run):
    _, proc, before = offline_run
    assert proc.returncode == 0, explain(proc)
    assert file_hashes(source_run) == before


@pytest.mark.timeout(600)
def test_a_fresh_agent_leaves_the_source_latents_behind_and_writes_its_own(offline_run, source_run):
    root, proc, _ = offline_run
    assert proc.returncode == 0, explain(proc)
    source = Replay.load(str(source_run / "checkpoints" / "last" / "replay-rank0"))
    assert source._has_context.any()  # the online run stored its model's latents
    copy = Replay.load(str(root / "run" / "checkpoints" / "last" / "replay-rank0"))
    np.testing.assert_array_equal(copy._data["vector"][:len(copy)], source._data["vector"][:len(source)])
    # Every slot with context holds this run's latent, written after it replayed the step: none was copied.
    written = copy._has_context[:len(copy), 0]
    assert written.any()
    same = (copy._context["deter"][:len(copy), 0] == source._context["deter"][:len(copy), 0]).all(-1)
    assert not (same & written).any()


@pytest.mark.timeout(600)
def test_an_offline_run_resumes_with_ckpt_path_last(offline_run):
    root, proc, _ = offline_run
    assert proc.returncode == 0, explain(proc)
    first = only_run(root)
    # The resume trains on the run's own copy of the replay: the source is not read again (here: is gone).
    resumed = cli(root, "fit", "--resume", str(root / "run"), f"offline.steps={OFFLINE_STEPS + 10}",
                  f"offline.replay={root / 'gone'}", timeout=300)
    assert resumed.returncode == 0, explain(resumed)
    assert f"offline: {OFFLINE_STEPS + 10} gradient steps" in resumed.stdout
    run = only_run(root)  # the same MLflow run goes on
    assert run.info.run_id == first.info.run_id
    steps = [m.step for m in history(root, run.info.run_id, "train/train_steps")]
    assert steps[-10:] == list(range(OFFLINE_STEPS + 1, OFFLINE_STEPS + 11))


@pytest.mark.timeout(300)
def test_an_offline_checkpoint_is_evaluated_in_the_env_it_is_given(offline_run, capsys):
    # After the resume test: this adds an eval run to the offline run's MLflow store.
    from lit_dreamer.__main__ import main
    root, proc, _ = offline_run
    assert proc.returncode == 0, explain(proc)
    assert main(["eval", "--ckpt", str(root / "run"), "episodes=1"]) == 2
    assert "was trained offline without an env; name the env to evaluate it in with env.id=ID" in capsys.readouterr().err
    assert main(["eval", "--ckpt", str(root / "run"), "episodes=1", "env.id=CartPole-v1"]) == 0
    assert "per episode:" in capsys.readouterr().out


def test_an_offline_run_installs_no_env_collector(source_run, in_tmp):
    from lit_dreamer.callbacks import EnvCollector
    from lit_dreamer.callbacks.offline import OfflineReplay
    from lit_dreamer.train import build
    cfg = load_config(["debug"], [f"run.dir={in_tmp / 'run'}", f"offline.replay={source_run}"])
    module, _, callbacks, info = build(cfg)
    assert not [c for c in callbacks if isinstance(c, EnvCollector)]
    assert [c.total_steps for c in callbacks if isinstance(c, OfflineReplay)] == [cfg.offline.steps]
    assert module.discrete and module.action_dim == 2 and list(module.obs_spec) == ["vector"] == list(info.obs_spec)


@pytest.mark.timeout(300)
def test_an_env_with_other_spaces_is_refused_naming_both(source_run, in_tmp):
    cfg = load_config(["debug"], [f"run.dir={in_tmp / 'run'}", "logger.backend=none",
                                  f"offline.replay={source_run}", "env.id=Pendulum-v1"])
    with pytest.raises(ConfigError) as caught:
        fit(cfg)
    message = str(caught.value)
    assert "Pendulum-v1" in message and f"offline.replay={source_run}" in message
    assert "vector: replay float32[4] vs env float32[3]" in message
    assert "action kind: replay discrete vs env continuous" in message
    assert not (in_tmp / "run").exists()  # refused before anything was written


@pytest.mark.timeout(300)
def test_an_env_named_for_evaluation_evaluates_in_gradient_steps(source_run, in_tmp):
    summary = fit_in_process(in_tmp, f"offline.replay={source_run}", "offline.steps=6", "env.id=CartPole-v1",
                             "run.eval_every=3", "run.eval_episodes=1")
    assert summary["env_steps"] == 0 and summary["train_steps"] == 6
    run = only_run(in_tmp)
    assert [m.step for m in history(in_tmp, run.info.run_id, "eval/return")] == [3, 6]


@pytest.mark.parametrize("where", ["run.dir", "replay.directory"])
def test_a_source_the_run_would_write_is_refused(source_run, in_tmp, where):
    inside = str(source_run / "checkpoints") if where == "run.dir" else str(source_run)
    cfg = load_config(["debug"], [f"run.dir={in_tmp / 'run'}", "logger.backend=none",
                                  f"offline.replay={source_run}", f"{where}={inside}"])
    with pytest.raises(ConfigError, match=f"lies inside this run's {where}"):
        fit(cfg)


def test_a_replay_shorter_than_a_sequence_is_refused_before_training(source_run, in_tmp):
    cfg = load_config(["debug"], [f"run.dir={in_tmp / 'run'}", "logger.backend=none",
                                  f"offline.replay={source_run}", "run.batch_length=500"])
    with pytest.raises(ConfigError, match=f"holds {SOURCE_STEPS} steps per env stream, fewer than one sequence"):
        fit(cfg)
    assert not (in_tmp / "run").exists()


def test_the_live_replay_directory_of_a_run_is_refused(in_tmp):
    live = in_tmp / "live"
    Replay({"vector": ((4,), np.float32)}, replay_settings(str(live)), num_envs=1)  # writes the memmaps there
    cfg = load_config(["debug"], [f"offline.replay={live}", "logger.backend=none"])
    with pytest.raises(ConfigError, match="is the live storage of a run's replay"):
        fit(cfg)


def replay_settings(directory: str):
    from lit_dreamer.sampling import ReplayConfig
    return ReplayConfig(capacity=100, directory=directory)


def test_an_online_checkpoint_is_not_continued_offline(source_run, in_tmp):
    cfg = load_config(["debug"], [f"run.dir={in_tmp / 'run'}", "logger.backend=none",
                                  f"offline.replay={source_run}", f"ckpt_path={source_run}"])
    with pytest.raises(ConfigError, match="init.ckpt=.*init.parts=world_model,actor,critic"):
        fit(cfg)


def test_an_offline_run_names_an_env_only_when_asked():
    assert load_config([], ["offline.replay=somewhere"]).env.id is None
    assert load_config(["cartpole"], ["offline.replay=somewhere"]).env.id == "CartPole-v1"
    assert load_config([], ["offline.replay=somewhere", "env.id=Pendulum-v1"]).env.id == "Pendulum-v1"
    assert load_config([]).env.id == "CartPole-v1"
    with pytest.raises(ConfigError, match="env.id=null .* only for an offline run"):
        load_config([], ["env.id=null"])
    with pytest.raises(ConfigError, match="offline.steps must be a positive"):
        load_config([], ["offline.replay=somewhere", "offline.steps=0"])


# --------------------------------------------------------------------------------------------------
# convert-episodes


def cartpole_episodes(folder: Path, count: int = 6) -> list[dict[str, np.ndarray]]:
    """Random-policy CartPole episodes in the documented .npz format."""
    import gymnasium as gym
    folder.mkdir()
    env, episodes = gym.make("CartPole-v1"), []
    for index in range(count):
        obs, _ = env.reset(seed=index)
        observations, actions, rewards = [obs], [], []
        terminated = truncated = False
        while not (terminated or truncated):
            action = int(env.action_space.sample())
            obs, reward, terminated, truncated, _ = env.step(action)
            observations.append(obs), actions.append(action), rewards.append(reward)
        episode = {"vector": np.array(observations), "action": np.array(actions), "reward": np.array(rewards),
                   "terminated": np.array(terminated)}
        np.savez(folder / f"episode-{index:03d}.npz", **episode)
        episodes.append(episode)
    return episodes


@pytest.mark.timeout(300)
def test_converted_episodes_round_trip_into_an_offline_fit(in_tmp):
    episodes = cartpole_episodes(in_tmp / "episodes")
    proc = cli(in_tmp, "convert-episodes", str(in_tmp / "episodes"), f"out={in_tmp / 'replay'}")
    assert proc.returncode == 0, explain(proc)
    replay = Replay.load(str(in_tmp / "replay"))
    stored = {key: array[:len(replay), 0] for key, array in replay.storage.items()}
    assert len(replay) == sum(len(e["vector"]) for e in episodes)
    np.testing.assert_array_equal(stored["vector"], np.concatenate([e["vector"] for e in episodes]))
    # Each step stores the action that led to it and the reward that came with it; zeros at an episode's start.
    np.testing.assert_array_equal(stored["action"].argmax(-1), np.concatenate([[0, *e["action"]] for e in episodes]))
    np.testing.assert_array_equal(stored["action"].sum(-1), np.concatenate([[0, *[1] * len(e["action"])]
                                                                            for e in episodes]))
    np.testing.assert_array_equal(stored["reward"], np.concatenate([[0, *e["reward"]] for e in episodes]))
    starts = np.cumsum([0] + [len(e["vector"]) for e in episodes])[:-1]
    assert list(np.flatnonzero(stored["is_first"])) == list(starts)
    assert list(np.flatnonzero(stored["is_last"])) == list(starts[1:] - 1) + [len(replay) - 1]
    ends = np.flatnonzero(stored["is_last"])
    assert list(stored["is_terminal"][ends]) == [bool(e["terminated"]) for e in episodes]
    assert stored["is_terminal"].sum() == sum(bool(e["terminated"]) for e in episodes)

    summary = fit_in_process(in_tmp, f"offline.replay={in_tmp / 'replay'}", "offline.steps=4", "env.id=CartPole-v1",
                             "run.eval_every=4", "run.eval_episodes=1")
    assert summary["train_steps"] == 4 and summary["env_steps"] == 0 and summary["eval"] is not None


def write_episode(folder: Path, name: str, **arrays) -> None:
    folder.mkdir(exist_ok=True)
    base = {"vector": np.zeros((5, 3), np.float32), "action": np.zeros(4, np.int64), "reward": np.zeros(4)}
    np.savez(folder / name, **{k: v for k, v in {**base, **arrays}.items() if v is not None})


@pytest.mark.parametrize("arrays, message", [
    ({"reward": None}, "no `reward` array"),
    ({"action": np.zeros(5, np.int64)}, r"`action` has shape \(5,\), but T=5 observations need T-1=4"),
    ({"vector": np.zeros((5, 3)), "image": np.zeros((4, 8, 8, 3), np.uint8)}, "need one length T >= 2"),
    ({"is_first": np.zeros(5, bool)}, "array `is_first` is a name the replay keeps for itself"),
    ({"action": np.full((4, 2), 3.0)}, r"`action` holds values outside \[action_low, action_high\]"),
    ({"terminated": np.array([1, 0])}, "`terminated` must be one bool"),
    ({"vector": np.full((5, 3), np.nan)}, "observation `vector` holds NaN"),
])
def test_a_bad_episode_file_is_named_with_its_array(in_tmp, arrays, message):
    from lit_dreamer.episodes import ConvertOptions, convert_episodes
    write_episode(in_tmp / "episodes", "bad.npz", **arrays)
    with pytest.raises(ConfigError, match=message) as caught:
        convert_episodes(str(in_tmp / "episodes"), ConvertOptions(out=str(in_tmp / "replay")))
    assert str(in_tmp / "episodes" / "bad.npz") in str(caught.value)
    assert not (in_tmp / "replay").exists()


def test_episodes_that_differ_are_named_both(in_tmp):
    from lit_dreamer.episodes import ConvertOptions, convert_episodes
    write_episode(in_tmp / "episodes", "a.npz")
    write_episode(in_tmp / "episodes", "b.npz", vector=np.zeros((5, 2), np.float32))
    with pytest.raises(ConfigError) as caught:
        convert_episodes(str(in_tmp / "episodes"), ConvertOptions(out=str(in_tmp / "replay")))
    message = str(caught.value)
    assert message.startswith(str(in_tmp / "episodes" / "b.npz")) and "array `vector`" in message
    assert "(2,)" in message and "(3,)" in message and str(in_tmp / "episodes" / "a.npz") in message


def test_box_actions_are_rescaled_into_the_agents_range(in_tmp):
    from lit_dreamer.episodes import ConvertOptions, convert_episodes
    write_episode(in_tmp / "episodes", "a.npz", action=np.array([[-2.0], [0.0], [1.0], [2.0]], np.float32))
    convert_episodes(str(in_tmp / "episodes"), ConvertOptions(out=str(in_tmp / "replay"), action_low=-2.0,
                                                              action_high=2.0))
    replay = Replay.load(str(in_tmp / "replay"))
    np.testing.assert_allclose(replay.storage["action"][:5, 0, 0], [0.0, -1.0, 0.0, 0.5, 1.0])
    from lit_dreamer.offline import read_source
    assert not read_source(str(in_tmp / "replay")).discrete


# --------------------------------------------------------------------------------------------------
# run.train_ratio on resume


@pytest.mark.timeout(300)
def test_a_resume_trains_at_the_train_ratio_it_is_given(in_tmp):
    """0.25 gradient steps per env step (ratio 8 at B*T = 32), then resumed at 2 per env step (ratio 64)."""
    prefill, first_steps, more = 20, 60, 20
    first = fit_in_process(in_tmp, "run.train_ratio=8", f"run.prefill={prefill}", f"run.steps={first_steps}",
                           "run.log_every=1")
    assert abs(first["train_steps"] - (first_steps - prefill) / 4) <= 1
    resumed = fit_in_process(in_tmp, "run.train_ratio=64", f"run.prefill={prefill}",
                             f"run.steps={first_steps + more}", "run.log_every=1", "ckpt_path=last")
    assert resumed["env_steps"] == first_steps + more
    added = resumed["train_steps"] - first["train_steps"]
    # The last training step may be owed a fraction of its env steps: the run stops at run.steps instead.
    assert abs(added - 2 * more) <= 1, added  # at the old ratio it would be 5
    # At every logged point after the resume: 2 more gradient steps per env step, from the checkpoint on.
    run = only_run(in_tmp)
    after = [m for m in history(in_tmp, run.info.run_id, "train/train_steps") if m.step > first_steps]
    assert len(after) == added
    for m in after:
        assert abs(m.value - (first["train_steps"] + 2 * (m.step - first_steps))) <= 2, (m.step, m.value)
    assert client_for(in_tmp).get_run(run.info.run_id).info.status == "FINISHED"


@pytest.mark.timeout(300)
def test_the_progress_bar_counts_gradient_steps(source_run, in_tmp, capsys):
    fit_in_process(in_tmp, f"offline.replay={source_run}", "offline.steps=5", "trainer.enable_progress_bar=true")
    lines = [line.strip() for line in re.split(r"[\r\n]", capsys.readouterr().out) if line.startswith("gradient steps")]
    assert lines and "| 5/5 [" in lines[-1] and "train_steps=5" in lines[-1], lines
