"""Faults during training: non-finite losses are skipped (and stop the run if they persist), NaN actions
never reach an environment."""

import math
import os
import re

import gymnasium as gym
import numpy as np
import pytest
import torch

from lit_dreamer.config import load_config
from lit_dreamer.module import DreamerModule, NonFiniteTrainingError
from lit_dreamer.replay import Replay
from lit_dreamer.train import fit
from lit_dreamer.world_model import WorldModel


def config(root, *overrides):
    return load_config(["debug"], [f"run.dir={root}/run", f"logger.tracking_uri=sqlite:///{root}/mlflow.db",
                                   *overrides])


def poison_reward_loss(monkeypatch, bad_calls):
    """Make the reward loss NaN on the given (1-based) calls of WorldModel.loss."""
    original, calls = WorldModel.loss, {"n": 0}

    def loss(self, batch, *args, **kwargs):
        losses, post, metrics = original(self, batch, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] in bad_calls:
            losses["rew"] = losses["rew"] * float("nan")
        return losses, post, metrics

    monkeypatch.setattr(WorldModel, "loss", loss)


def laprop_steps(module):
    opt = module.optimizers()
    return [max(o.optimizer.state[p]["step"] for p in o.optimizer.state) for o in opt]


def test_nonfinite_steps_are_skipped_and_counted(in_tmp, monkeypatch):
    poison_reward_loss(monkeypatch, bad_calls={5, 6, 7})
    captured = {}
    original_fit = DreamerModule.on_train_end

    def on_train_end(self):
        captured["steps"] = laprop_steps(self)
        captured["spread"] = float(self.actor_critic.normalizer.spread)
        original_fit(self)

    monkeypatch.setattr(DreamerModule, "on_train_end", on_train_end)
    summary = fit(config(in_tmp, "run.steps=40", "run.prefill=20", "run.log_every=1"))  # per-step history below
    # 20 training steps were attempted (1 per env step after prefill); 3 were skipped.
    assert summary["train_steps"] == 17
    # The optimizers only moved on the good steps.
    assert captured["steps"] == [17, 17, 17]
    assert math.isfinite(captured["spread"])
    import mlflow
    client = mlflow.MlflowClient(f"sqlite:///{in_tmp}/mlflow.db")
    skipped = [m.value for m in client.get_metric_history(summary["mlflow_run_id"], "train/skipped_steps")]
    assert skipped[-1] == 3 and skipped[:4] == [0, 0, 0, 0]


def test_persistent_nonfinite_losses_stop_the_run_and_keep_the_last_checkpoint(in_tmp, monkeypatch):
    poison_reward_loss(monkeypatch, bad_calls=set(range(16, 1000)))
    cfg = config(in_tmp, "run.steps=200", "run.prefill=20", "run.checkpoint_every=10", "optim.max_skipped_steps=5")
    with pytest.raises(NonFiniteTrainingError, match=r"5 training steps in a row .* loss/rew"):
        fit(cfg)
    last = os.path.realpath(in_tmp / "run" / "checkpoints" / "last")
    # One training step per env step after the 20 prefill steps; saves at 21 and 31 env steps; steps
    # 16-20 went bad and the run stopped at 40 env steps: the save at 31 (11 good steps) is intact.
    assert last.endswith("step-000000000031")
    ckpt = torch.load(os.path.join(last, "model.ckpt"), weights_only=True)
    assert int(ckpt["state_dict"]["train_steps"]) == 11
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert len(Replay.load(os.path.join(last, "replay-rank0"))) == 31


def test_nan_actions_never_reach_the_environment(in_tmp, monkeypatch):
    original = DreamerModule.act

    def nan_act(self, obs, is_first, carry, *args, **kwargs):
        action, carry, post = original(self, obs, is_first, carry, *args, **kwargs)
        return action * float("nan"), carry, post

    monkeypatch.setattr(DreamerModule, "act", nan_act)
    summary = fit(config(in_tmp, "env.id=Pendulum-v1", "run.steps=40", "run.prefill=20"))
    replay = Replay.load(os.path.join(os.path.dirname(summary["checkpoint"]), "replay-rank0"))
    data = {k: v[:40] for k, v in replay._data.items()}
    assert np.isfinite(data["action"]).all() and np.isfinite(data["vector"]).all()
    assert np.isfinite(data["reward"]).all()
    # Every policy step (after the 20 random prefill steps) was replaced by a random action.
    import mlflow
    client = mlflow.MlflowClient(f"sqlite:///{in_tmp}/mlflow.db")
    counts = client.get_metric_history(summary["mlflow_run_id"], "train/nonfinite_actions")
    assert counts[-1].value == 20


# --------------------------------------------------------------------------------------------------
# Crashing environments

class FaultyCartPole(gym.Wrapper):
    """CartPole that fails on purpose at the environment steps listed in FAULTY_AT (counted per process).

    FAULTY_MODE=raise raises RuntimeError inside step; FAULTY_MODE=exit kills the (sub)process.
    """

    steps = 0

    def __init__(self, render_mode=None):
        super().__init__(gym.make("CartPole-v1", render_mode=render_mode))

    def step(self, action):
        FaultyCartPole.steps += 1
        if FaultyCartPole.steps in {int(x) for x in os.environ.get("FAULTY_AT", "").split(",") if x}:
            if os.environ.get("FAULTY_MODE") == "exit":
                os._exit(3)
            raise RuntimeError(f"simulated crash at step {FaultyCartPole.steps}")
        return super().step(action)


gym.register(id="LitDreamerFaulty-v0", entry_point=FaultyCartPole, max_episode_steps=500)


def test_an_env_that_raises_is_restarted_and_its_episode_cut(in_tmp, monkeypatch):
    FaultyCartPole.steps = 0
    monkeypatch.setenv("FAULTY_AT", "15,45")
    monkeypatch.setenv("FAULTY_MODE", "raise")
    summary = fit(config(in_tmp, "env.id=LitDreamerFaulty-v0", "run.steps=60", "run.prefill=20"))
    assert summary["env_steps"] == 60 and summary["train_steps"] == 40  # training went on
    replay = Replay.load(os.path.join(os.path.dirname(summary["checkpoint"]), "replay-rank0"))
    flags = {k: replay._data[k][:60, 0] for k in ("is_first", "is_last", "is_terminal", "reward")}
    # The crash at env step 15 cut the episode there: the step recorded for it is_last, not terminal,
    # with reward 0, and the next recorded step starts a new episode.
    cut = np.flatnonzero(flags["is_last"] & (flags["reward"] == 0))
    assert len(cut) == 2, flags
    for i in cut:
        assert not flags["is_terminal"][i] and flags["is_first"][i + 1]
    import json
    state = json.loads(open(os.path.join(os.path.dirname(summary["checkpoint"]), "collector-rank0.json")).read())
    assert state["env_restarts"] == 2 and state["cut_episodes"] == 2


@pytest.mark.timeout(300)
def test_a_dead_env_subprocess_is_replaced(in_tmp, monkeypatch):
    FaultyCartPole.steps = 0
    monkeypatch.setenv("FAULTY_AT", "30")
    monkeypatch.setenv("FAULTY_MODE", "exit")
    import lit_dreamer.envs.tasks as tasks  # the collector's vector env holds one make_vector_env per task
    made, make = [], tasks.make_vector_env
    monkeypatch.setattr(tasks, "make_vector_env", lambda *a, **k: made.append(make(*a, **k)) or made[-1])
    summary = fit(config(in_tmp, "env.id=LitDreamerFaulty-v0", "env.num_envs=2", "env.asynchronous=true",
                         "run.steps=80", "run.prefill=20"))
    assert summary["env_steps"] == 80
    # The dead vector env is closed for good: no worker left, and no close retried (and raising) at a
    # later garbage collection.
    assert len(made) == 2
    for envs in made:
        assert envs.unwrapped.closed and not any(p.is_alive() for p in envs.unwrapped.processes)
    replay = Replay.load(os.path.join(os.path.dirname(summary["checkpoint"]), "replay-rank0"))
    is_last, is_first = replay._data["is_last"][:40], replay._data["is_first"][:40]
    # Both streams' episodes end at the same row (the vector env died) and restart on the next.
    both = np.flatnonzero(is_last.all(1) & is_first[np.minimum(np.arange(40) + 1, 39)].all(1))
    assert len(both) >= 1
    import json
    state = json.loads(open(os.path.join(os.path.dirname(summary["checkpoint"]), "collector-rank0.json")).read())
    assert state["env_restarts"] == 2 and state["cut_episodes"] == 2


# --------------------------------------------------------------------------------------------------
# Disk full and MLflow failures do not stop training


def test_a_failed_checkpoint_write_does_not_stop_training(in_tmp, monkeypatch, caplog):
    import errno
    import logging
    original, calls = Replay.save, {"n": 0}

    def save(self, path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, path)

    monkeypatch.setattr(Replay, "save", save)
    with caplog.at_level(logging.WARNING, logger="lit_dreamer.callbacks.checkpoint"):
        summary = fit(config(in_tmp, "run.steps=45", "run.prefill=20", "run.checkpoint_every=10"))
    assert summary["env_steps"] == 45 and summary["train_steps"] == 25
    warnings = [r.getMessage() for r in caplog.records if r.name == "lit_dreamer.callbacks.checkpoint"]
    assert len(warnings) == 2 and "No space left" in warnings[0]
    assert warnings[1] == "checkpoint saved again after 1 failed saves"
    folders = sorted(p.name for p in (in_tmp / "run" / "checkpoints").iterdir() if p.name.startswith("step-"))
    # Saves at 21 (ok), 31 (disk full: no complete checkpoint), 41 and 45 (ok; only the newest two kept).
    assert os.path.realpath(in_tmp / "run" / "checkpoints" / "last").endswith("step-000000000045")
    assert folders[-2:] == ["step-000000000041", "step-000000000045"]
    assert not (in_tmp / "run" / "checkpoints" / "step-000000000031" / "model.ckpt").exists()


def test_keep_checkpoints_sets_how_many_saves_stay(in_tmp, tmp_path_factory):
    fit(config(in_tmp, "run.steps=45", "run.prefill=20", "run.checkpoint_every=10", "run.keep_checkpoints=3"))
    folders = sorted(p.name for p in (in_tmp / "run" / "checkpoints").iterdir() if p.name.startswith("step-"))
    # Saves at 21, 31, 41 and 45: the newest three stay, each complete.
    assert folders == ["step-000000000031", "step-000000000041", "step-000000000045"]
    assert all((in_tmp / "run" / "checkpoints" / f / "model.ckpt").is_file() for f in folders)
    # 0 keeps every save.
    from lit_dreamer.callbacks.checkpoint import DreamerCheckpoint
    root = tmp_path_factory.mktemp("keep_all")
    for step in (10, 20, 30, 40):
        (root / f"step-{step:012d}").mkdir()
    DreamerCheckpoint(str(root), keep=0).prune(keep_folder=str(root / "step-000000000040"))
    assert len(list(root.iterdir())) == 4
    DreamerCheckpoint(str(root), keep=1).prune(keep_folder=str(root / "step-000000000040"))
    assert [p.name for p in root.iterdir()] == ["step-000000000040"]


def test_mlflow_failures_mid_run_do_not_stop_training(in_tmp, monkeypatch, caplog):
    from mlflow.tracking import MlflowClient
    original, calls, raised = MlflowClient.log_batch, {"n": 0}, {"n": 0}

    def log_batch(self, *args, **kwargs):
        calls["n"] += 1
        if 5 <= calls["n"] <= 15:
            raised["n"] += 1
            raise RuntimeError("simulated MLflow outage")
        return original(self, *args, **kwargs)

    def outage(*args, **kwargs):
        raised["n"] += 1
        raise RuntimeError("simulated MLflow outage")

    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
    monkeypatch.setattr(MlflowClient, "set_tag", outage)  # the run's tags and config artifact, at its start
    monkeypatch.setattr(MlflowClient, "log_artifact", outage)
    with caplog.at_level("WARNING", logger="lit_dreamer.tracking"):
        # Every step logged (run.log_every=1), so that the outage's 11 failed batches fall inside the run.
        summary = fit(config(in_tmp, "run.steps=45", "run.prefill=20", "run.log_every=1"))
    assert summary["env_steps"] == 45 and summary["train_steps"] == 25
    assert os.path.exists(summary["checkpoint"])
    import mlflow
    client = mlflow.MlflowClient(f"sqlite:///{in_tmp}/mlflow.db")
    steps = [m.value for m in client.get_metric_history(summary["mlflow_run_id"], "train/env_steps")]
    assert steps[-1] == 45 and len(steps) < 25  # logging resumed after the outage; the outage's points are lost
    # One warning at the first failure, then one count at the end: not a line per failed call.
    warnings = [r.getMessage() for r in caplog.records if r.name == "lit_dreamer.tracking"]
    assert len(warnings) == 2 and raised["n"] >= 13, warnings
    assert warnings[0].startswith("MLflow set_tag failed (RuntimeError: simulated MLflow outage); training goes on")
    # log_artifact: the config at the start and the last checkpoint at the end (logger.log_checkpoints=last).
    assert warnings[1].startswith(f"MLflow: {raised['n']} calls failed in this run (log_artifact 2, ")


@pytest.mark.parametrize("uri, message", [
    ("sqlite:////nonexistent-folder/x/mlflow.db", "does not exist or is not writable"),
    ("http://127.0.0.1:9/", "cannot reach the MLflow tracking server"),
])
def test_unusable_tracking_uri_fails_before_training(in_tmp, capsys, uri, message):
    from lit_dreamer.__main__ import main
    code = main(["fit", "-c", "debug", f"run.dir={in_tmp}/run", f"logger.tracking_uri={uri}"])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (in_tmp / "run" / "checkpoints").exists()


def test_a_checkpoint_that_would_run_code_is_refused(in_tmp, capsys):
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {in_tmp}/pwned",))

    path = in_tmp / "evil.ckpt"
    torch.save({"hyper_parameters": Payload()}, path, pickle_module=pickle)
    from lit_dreamer.__main__ import main
    code = main(["fit", "-c", "debug", f"run.dir={in_tmp}/run", f"logger.tracking_uri=sqlite:///{in_tmp}/m.db",
                 f"ckpt_path={path}"])
    assert code == 2
    assert "cannot be loaded safely" in capsys.readouterr().err
    assert not (in_tmp / "pwned").exists()


def test_an_observation_the_encoder_cannot_take_is_refused_before_training(in_tmp, capsys):
    class GridEnv(gym.Env):
        observation_space = gym.spaces.Box(0, 1, (4, 4), np.float32)
        action_space = gym.spaces.Discrete(2)

        def reset(self, seed=None, options=None):
            return np.zeros((4, 4), np.float32), {}

        def step(self, action):
            return np.zeros((4, 4), np.float32), 0.0, False, False, {}

    gym.register(id="LitDreamerGrid-v0", entry_point=GridEnv)
    from lit_dreamer.__main__ import main
    code = main(["fit", "-c", "debug", "env.id=LitDreamerGrid-v0", f"run.dir={in_tmp}/run",
                 f"logger.tracking_uri=sqlite:///{in_tmp}/m.db"])
    err = capsys.readouterr().err
    assert code == 2 and "env.id='LitDreamerGrid-v0'" in err and "(4, 4)" in err


def test_resuming_into_a_killed_mlflow_run_marks_it_running(in_tmp, monkeypatch):
    import mlflow

    from lit_dreamer.train import make_logger
    uri = f"sqlite:///{in_tmp}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    run = client.create_run(client.create_experiment("lit_dreamer"), run_name="r")
    client.set_terminated(run.info.run_id, status="KILLED")  # what a stopped run leaves behind
    (in_tmp / "run").mkdir()
    (in_tmp / "run" / "mlflow_run_id").write_text(run.info.run_id)
    cfg = config(in_tmp)

    logger, continued = make_logger(cfg, str(in_tmp / "run"), resuming=False)  # a fresh run: a new MLflow run
    assert not continued and logger.run_id != run.info.run_id
    assert client.get_run(run.info.run_id).info.status == "KILLED"

    logger, continued = make_logger(cfg, str(in_tmp / "run"), resuming=True)
    assert continued and logger.run_id == run.info.run_id
    # RUNNING once this process trains in it (its first metric): a resume that fails before keeps KILLED.
    assert client.get_run(run.info.run_id).info.status == "KILLED"
    logger.log_metrics({"train/env_steps": 1.0}, step=1)
    assert client.get_run(run.info.run_id).info.status == "RUNNING"

    # A tracking store that fails here is reported, and the run goes on.
    def outage(*args, **kwargs):
        raise RuntimeError("simulated MLflow outage")

    monkeypatch.setattr(mlflow.MlflowClient, "update_run", outage)
    logger.mark_running()
    assert logger.failure_count == 1


# --------------------------------------------------------------------------------------------------
# NaN or infinite rewards and observations from an environment


class NonFiniteCartPole(gym.Wrapper):
    """CartPole whose every `every`-th step (counted per env, across episodes) puts `value` into `entry`
    ("reward", or "vector" for the observation)."""

    def __init__(self, entry="reward", value=float("nan"), every=7):
        super().__init__(gym.make("CartPole-v1"))
        self.entry, self.value, self.every, self.steps = entry, value, every, 0

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        self.steps += 1
        if self.steps % self.every == 0:
            if self.entry == "reward":
                reward = self.value
            else:
                obs = obs.copy()
                obs[2] = self.value
        return obs, reward, terminated, truncated, info


gym.register(id="LitDreamerNaNReward-v0", entry_point=NonFiniteCartPole, max_episode_steps=500)
gym.register(id="LitDreamerInfObs-v0", entry_point=NonFiniteCartPole, max_episode_steps=500,
             kwargs={"entry": "vector", "value": float("inf")})


def cli_fit(root, *overrides):
    from lit_dreamer.__main__ import main
    return main(["fit", "-c", "debug", f"run.dir={root}/run", f"logger.tracking_uri=sqlite:///{root}/mlflow.db",
                 *overrides])


def test_nonfinite_rewards_cut_their_episode_and_never_reach_the_replay(in_tmp, caplog):
    import json
    code = cli_fit(in_tmp, "env.id=LitDreamerNaNReward-v0", "run.steps=60", "run.prefill=20")
    assert code == 0
    last = in_tmp / "run" / "checkpoints" / "last"
    replay = Replay.load(str(last / "replay-rank0"))
    data = {k: v[:60, 0] for k, v in replay._data.items()}
    assert all(np.isfinite(v).all() for v in data.values() if v.dtype.kind == "f")
    # Row k that is not an episode's first step holds CartPole step number j (counted across episodes):
    # exactly the rows with j % 7 == 0 are the cut ends of their episodes.
    step_number = np.cumsum(~data["is_first"])
    cut = ~data["is_first"] & (step_number % 7 == 0)
    assert cut.sum() >= 5
    assert (data["is_last"] & ~data["is_terminal"] == cut).all()
    rows = np.flatnonzero(cut)
    assert (data["reward"][rows] == 0).all()
    assert (data["vector"][rows] == data["vector"][rows - 1]).all()  # the last finite observation, repeated
    following = rows[rows < 59] + 1
    assert data["is_first"][following].all()
    # Actions line up: zero on every first step, a one-hot action (the one that led here) everywhere else.
    assert (data["action"][data["is_first"]] == 0).all()
    assert (data["action"][~data["is_first"]].sum(-1) == 1).all()
    state = json.loads((last / "collector-rank0.json").read_text())
    # The step the collector holds (not yet recorded) was CartPole step J + 1 unless the last row ended an episode.
    steps_taken = step_number[-1] + (0 if data["is_last"][-1] else 1)
    assert state["nonfinite_env_values"] == steps_taken // 7
    assert state["cut_episodes"] == cut.sum()
    warnings = [r for r in caplog.records if "NaN or infinite" in r.getMessage()]
    assert len(warnings) == 1 and "env 0: reward" in warnings[0].getMessage()
    import mlflow
    client = mlflow.MlflowClient(f"sqlite:///{in_tmp}/mlflow.db")
    run_id = (in_tmp / "run" / "mlflow_run_id").read_text().strip()
    counts = client.get_metric_history(run_id, "train/nonfinite_env_values")
    assert counts[-1].value == state["nonfinite_env_values"]


def test_nonfinite_observations_stop_the_run_in_error_mode(in_tmp, capsys):
    code = cli_fit(in_tmp, "env.id=LitDreamerInfObs-v0", "run.steps=60", "run.prefill=20", "env.nonfinite=error")
    err = capsys.readouterr().err
    assert code == 1
    assert re.search(r"error: the environment returned a NaN or infinite value after \d+ env steps "
                     r"\(rank 0, env 0: observation 'vector'\).*env\.nonfinite=cut", err), err


def test_nonfinite_mode_is_checked():
    from lit_dreamer.config import ConfigError
    with pytest.raises(ConfigError, match="env.nonfinite must be 'cut' .* or 'error' .*got 'skip'"):
        load_config(["debug"], ["env.nonfinite=skip"])


def test_cut_nonfinite_ends_the_episode_and_the_vector_env_resets_it():
    from lit_dreamer.envs import make_vector_env
    envs = make_vector_env("LitDreamerNaNReward-v0", 1, seed=0, cut_nonfinite=True)
    obs, _ = envs.reset(seed=0)
    for step in range(1, 8):  # alternating pushes keep the pole up past step 7
        previous = obs["vector"].copy()
        obs, reward, terminated, truncated, infos = envs.step(np.array([step % 2]))
        assert np.isfinite(reward).all() and np.isfinite(obs["vector"]).all()
        assert not terminated.any() and truncated.any() == (step == 7)
    # Step 7 was NaN: it ends the episode as truncated, with the last finite observation and reward 0.
    assert list(infos["env_nonfinite"]) == ["reward"] and reward[0] == 0
    assert (obs["vector"] == previous).all()
    # The next step starts a new episode (NEXT_STEP autoreset): reward 0, a fresh observation.
    obs, reward, terminated, truncated, infos = envs.step(np.array([0]))
    assert reward[0] == 0 and not truncated.any() and "env_nonfinite" not in infos
    assert np.abs(obs["vector"]).max() <= 0.05
    envs.close()


class NaNAtReset(gym.Wrapper):
    """CartPole whose resets listed in `nan_resets` (1-based, counted per env) return a NaN observation."""

    def __init__(self, nan_resets=(1,)):
        super().__init__(gym.make("CartPole-v1"))
        self.nan_resets, self.resets = set(nan_resets), 0

    def reset(self, **kwargs):
        obs, info = super().reset(**kwargs)
        self.resets += 1
        return (obs * np.nan if self.resets in self.nan_resets else obs), info


gym.register(id="LitDreamerNaNFirstReset-v0", entry_point=NaNAtReset)
# make_env's seeding reset is the first: the collector's own first reset is the second.
gym.register(id="LitDreamerNaNSecondReset-v0", entry_point=NaNAtReset, kwargs={"nan_resets": (2,)})


def test_a_nonfinite_first_observation_is_reset_again_and_reported():
    from lit_dreamer.envs import make_env
    from lit_dreamer.envs.faults import CutNonFinite
    env = CutNonFinite(make_env("LitDreamerNaNFirstReset-v0"))
    obs, info = env.reset(seed=0)
    assert np.isfinite(obs["vector"]).all() and info["env_nonfinite"] == "observation 'vector'"
    obs, info = env.reset()
    assert "env_nonfinite" not in info


def test_the_collector_counts_a_nonfinite_first_observation(in_tmp):
    import json
    summary = fit(config(in_tmp, "env.id=LitDreamerNaNSecondReset-v0", "run.steps=40", "run.prefill=20"))
    assert summary["env_steps"] == 40
    state = json.loads(open(os.path.join(os.path.dirname(summary["checkpoint"]), "collector-rank0.json")).read())
    assert state["nonfinite_env_values"] == 1 and state["cut_episodes"] == 0
    replay = Replay.load(os.path.join(os.path.dirname(summary["checkpoint"]), "replay-rank0"))
    assert np.isfinite(replay._data["vector"][:40]).all()
