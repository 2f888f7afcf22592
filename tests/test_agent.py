"""lit_dreamer.agent: load a trained agent (run folder, copied checkpoint, registry) and act in the env's own spaces;
checkpoints as MLflow artifacts; the registered pyfunc model. Two tiny debug runs are trained once for the module."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch

from lit_dreamer.agent import Agent
from lit_dreamer.config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A CartPole run (log_checkpoints=all, two saves, registered at the end of fit) and a Pendulum run (the
    default log_checkpoints=last), both logging to one temporary SQLite store."""
    from lit_dreamer.train import fit
    root = tmp_path_factory.mktemp("agent")
    uri = f"sqlite:///{root}/mlflow.db"
    cwd, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(root)  # MLflow's artifact folder (mlruns/) goes beside the store
    torch.set_num_threads(1)
    try:
        cartpole = fit(load_config(["debug"], [f"run.dir={root}/cartpole", f"logger.tracking_uri={uri}",
                                               "logger.log_checkpoints=all", "run.checkpoint_every=60", "run.steps=90",
                                               "logger.register_as=cartpole_policy"]))
        pendulum = fit(load_config(["debug"], ["env.id=Pendulum-v1", f"run.dir={root}/pendulum", "run.steps=90",
                                               f"logger.tracking_uri={uri}"]))
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    return SimpleNamespace(root=root, uri=uri, cartpole=cartpole, pendulum=pendulum)


def steps_in_own_env(agent: Agent, env_id: str, steps: int = 5) -> list:
    """Act in gym.make(env_id) (no lit_dreamer wrapper) for a few steps; every action must be in its space."""
    env = gym.make(env_id)
    obs, _ = env.reset(seed=0)
    state, actions = None, []
    for _ in range(steps):
        action, state = agent.act(obs, state)
        assert env.action_space.contains(action), (action, env.action_space)
        obs, *_ = env.step(action)
        actions.append(action)
    env.close()
    return actions


def batch_in_own_vector_env(agent: Agent, env_id: str, n: int = 3) -> np.ndarray:
    envs = gym.make_vec(env_id, num_envs=n)
    obs, _ = envs.reset(seed=0)
    action, state = agent.act(obs)
    assert envs.action_space.contains(action), (action, envs.action_space)
    envs.step(action)
    action, _ = agent.act(envs.step(action)[0], state, mode="sample")
    assert envs.action_space.contains(action)
    envs.close()
    return action


def test_cartpole_agent_from_a_run_folder_acts_with_indices_single_and_batched(runs):
    agent = Agent.load(runs.cartpole["run_dir"])
    actions = steps_in_own_env(agent, "CartPole-v1")
    assert all(type(a) is int for a in actions)
    batch = batch_in_own_vector_env(agent, "CartPole-v1")
    assert batch.shape == (3,) and batch.dtype == np.int64


def test_pendulum_agent_acts_in_env_units_single_and_batched(runs):
    agent = Agent.load(runs.pendulum["run_dir"])
    actions = steps_in_own_env(agent, "Pendulum-v1")
    assert all(a.shape == (1,) and a.dtype == np.float32 for a in actions)
    batch = batch_in_own_vector_env(agent, "Pendulum-v1")
    assert batch.shape == (3, 1) and batch.dtype == np.float32


@pytest.mark.parametrize("name, env_id", [("cartpole", "CartPole-v1"), ("pendulum", "Pendulum-v1")])
def test_agent_mode_actions_equal_the_modules_act_on_the_wrapped_env(runs, name, env_id):
    """Agent on gym.make's observations vs DreamerModule.act on make_env's, both envs seeded alike: the same
    actions (the latent is sampled even in mode "mode": the same seed before each step)."""
    from lit_dreamer.envs import env_action, make_env
    from lit_dreamer.envs.adapters import to_env_action
    from lit_dreamer.evaluation import load_module
    agent = Agent.load(getattr(runs, name)["run_dir"])
    module, _ = load_module(getattr(runs, name)["checkpoint"])
    own, wrapped = gym.make(env_id), make_env(env_id)
    obs, _ = own.reset(seed=3)
    wrapped_obs, _ = wrapped.reset(seed=3)
    state, carry, is_first = None, module.initial_carry(1), torch.ones(1, dtype=torch.bool)
    for step in range(6):
        torch.manual_seed(step)
        action, state = agent.act(obs, state, mode="mode")
        torch.manual_seed(step)
        tensors = {k: torch.as_tensor(v)[None] for k, v in wrapped_obs.items()}
        module_action, carry, _ = module.act(tensors, is_first, carry, mode="mode")
        is_first = torch.zeros(1, dtype=torch.bool)
        expected = to_env_action(env_action(module_action.numpy(), module.discrete), own.action_space)[0]
        np.testing.assert_array_equal(np.asarray(action), expected)
        obs, *_ = own.step(action)
        wrapped_obs, *_ = wrapped.step(env_action(module_action.numpy(), module.discrete)[0])


def test_a_checkpoint_copied_alone_acts_like_its_run_folder(runs, tmp_path):
    copy = tmp_path / "elsewhere" / "model.ckpt"
    copy.parent.mkdir()
    shutil.copy(runs.pendulum["checkpoint"], copy)
    obs = np.array([[0.5, -0.2, 1.0], [1.0, 0.0, -3.0]], np.float32)
    torch.manual_seed(0)
    from_copy, _ = Agent.load(str(copy)).act(obs)
    torch.manual_seed(0)
    from_run, _ = Agent.load(runs.pendulum["run_dir"]).act(obs)
    np.testing.assert_array_equal(from_copy, from_run)


def test_a_dict_in_lit_dreamers_convention_is_taken_as_is(runs):
    agent = Agent.load(runs.cartpole["run_dir"])
    raw = np.array([[0.01, 0.2, -0.03, 0.1], [0.0, -0.5, 0.1, 0.4]], np.float32)
    torch.manual_seed(1)
    from_raw, _ = agent.act(raw)
    torch.manual_seed(1)
    from_dict, _ = agent.act({"vector": raw})
    np.testing.assert_array_equal(from_raw, from_dict)
    with pytest.raises(ValueError, match="neither one of the env's observations"):
        agent.act(np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="state is for 1 envs"):
        agent.act(raw, agent.reset(1))


def test_checkpoints_logged_as_mlflow_artifacts_last_and_all(runs):
    import mlflow
    client = mlflow.MlflowClient(runs.uri)

    def logged(summary):
        folders = [a.path for a in client.list_artifacts(summary["mlflow_run_id"], "checkpoints")]
        return {folder: [a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(summary["mlflow_run_id"], folder)]
                for folder in folders}

    # all: one folder per save (at 61 and 90 env steps), each with the model.ckpt only (no replay)
    assert logged(runs.cartpole) == {"checkpoints/step-000000000061": ["model.ckpt"],
                                     "checkpoints/step-000000000090": ["model.ckpt"]}
    assert logged(runs.pendulum) == {"checkpoints/last": ["model.ckpt"]}  # the default: last, replaced


def test_log_checkpoints_none_logs_no_checkpoint(runs, in_tmp):
    import mlflow

    from lit_dreamer.train import fit
    summary = fit(load_config(["debug"], [f"run.dir={in_tmp}/none", f"logger.tracking_uri={runs.uri}",
                                          "logger.log_checkpoints=none", "run.steps=64", "run.prefill=60"]))
    artifacts = [a.path for a in mlflow.MlflowClient(runs.uri).list_artifacts(summary["mlflow_run_id"])]
    assert artifacts == ["config.yaml"]


def test_model_logging_without_mlflow_is_refused_or_skipped():
    from lit_dreamer.train import checkpoint_artifacts
    with pytest.raises(ConfigError, match="log_checkpoints=all .* needs logger.backend=mlflow"):
        load_config(["debug"], ["logger.backend=csv", "logger.log_checkpoints=all"])
    with pytest.raises(ConfigError, match="register_as=x .* needs logger.backend=mlflow"):
        load_config(["debug"], ["logger.backend=tensorboard", "logger.register_as=x"])
    with pytest.raises(ConfigError, match="log_checkpoints must be one of last, all, none"):
        load_config(["debug"], ["logger.log_checkpoints=every"])
    with pytest.warns(UserWarning, match="log_checkpoints=last logs checkpoints to MLflow"):
        assert checkpoint_artifacts(load_config(["debug"], ["logger.backend=csv"]), None) == []
    assert checkpoint_artifacts(load_config(["debug"], ["logger.backend=none"]), None) == []


def test_registry_round_trip_through_pyfunc_and_agent(runs, monkeypatch):
    """fit logger.register_as registered the CartPole policy; `register` registers the Pendulum one. Both load
    with mlflow.pyfunc.load_model and act; Agent.load takes the models:/ URI."""
    import mlflow

    from lit_dreamer.__main__ import main
    assert runs.cartpole["registered"]["uri"] == "models:/cartpole_policy/1"
    assert main(["register", "--ckpt", runs.pendulum["run_dir"], "name=pendulum_policy",
                 f"tracking_uri={runs.uri}"]) == 0
    monkeypatch.setenv("MLFLOW_TRACKING_URI", runs.uri)
    obs = np.array([[0.01, 0.2, -0.03, 0.1], [0.0, -0.5, 0.1, 0.4]], np.float32)
    torch.manual_seed(2)
    predicted = mlflow.pyfunc.load_model("models:/cartpole_policy/1").predict({"vector": obs})
    torch.manual_seed(2)
    acted, _ = Agent.load("models:/cartpole_policy/1").act(obs)  # stateless predict: a fresh state each call
    np.testing.assert_array_equal(predicted, acted)
    assert set(predicted.tolist()) <= {0, 1}
    pendulum = mlflow.pyfunc.load_model("models:/pendulum_policy/1")
    actions = pendulum.predict({"vector": np.zeros((4, 3), np.float32)}, params={"mode": "sample"})
    assert actions.shape == (4, 1) and np.all(np.abs(actions) <= 2.0)
    run = mlflow.MlflowClient(runs.uri).get_run(runs.pendulum["mlflow_run_id"])
    assert run.info.status == "FINISHED"  # registering into the training run left its status alone


def test_register_needs_mlflow_when_the_run_logged_elsewhere(runs, tmp_path, capsys):
    from lit_dreamer.__main__ import main
    ckpt = torch.load(runs.pendulum["checkpoint"], weights_only=True)
    ckpt["lit_dreamer"]["config"]["logger"]["backend"] = "csv"
    torch.save(ckpt, tmp_path / "model.ckpt")
    assert main(["register", "--ckpt", str(tmp_path / "model.ckpt"), "name=x"]) == 2
    assert "pass tracking_uri=URI" in capsys.readouterr().err


def test_acting_imports_no_lightning(runs):
    """In a fresh process: load from a run folder and from the registry, act; Lightning never imported."""
    script = f"""
import sys, numpy as np
from lit_dreamer.agent import Agent
for source in ({runs.cartpole['run_dir']!r}, "models:/cartpole_policy/1"):
    agent = Agent.load(source, tracking_uri={runs.uri!r})
    action, state = agent.act(np.zeros(4, np.float32))
    action, state = agent.act(np.zeros((2, 4), np.float32), agent.reset(2))
import lit_dreamer
assert lit_dreamer.Agent is Agent
bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning'))
assert not bad, bad
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=runs.root)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_checkpoint_without_saved_spaces_reads_them_from_its_env(runs, tmp_path):
    ckpt = torch.load(runs.pendulum["checkpoint"], weights_only=True)
    del ckpt["lit_dreamer"]["spaces"]
    torch.save(ckpt, tmp_path / "model.ckpt")
    agent = Agent.load(str(tmp_path / "model.ckpt"))
    assert agent.action_space == gym.make("Pendulum-v1").action_space
    ckpt["lit_dreamer"]["tasks"] = ["NoSuchEnv-v0"]
    torch.save(ckpt, tmp_path / "model.ckpt")
    with pytest.raises(ConfigError, match="predates|was saved before checkpoints carried the env's spaces"):
        Agent.load(str(tmp_path / "model.ckpt"))


def test_restart_resets_only_the_envs_whose_episode_ended(runs):
    agent = Agent.load(runs.cartpole["run_dir"])
    obs = np.array([[0.01, 0.2, -0.03, 0.1], [0.0, -0.5, 0.1, 0.4]], np.float32)
    _, state = agent.act(obs)
    state = state.restart([False, True])
    assert state.is_first.tolist() == [False, True]
    torch.manual_seed(4)
    _, restarted = agent.act(obs, state)
    torch.manual_seed(4)
    _, fresh = agent.act(obs)
    # env 1 starts afresh: its new latent is that of a first step; env 0 keeps its memory
    torch.testing.assert_close(restarted.latent.deter[1], fresh.latent.deter[1])
    assert not torch.allclose(restarted.latent.deter[0], fresh.latent.deter[0])


def test_an_agent_of_several_tasks_acts_for_the_task_named(runs):
    from lit_dreamer.acting import Policy
    from lit_dreamer.checkpoint_files import read_checkpoint
    info = read_checkpoint(runs.cartpole["checkpoint"])
    policy = Policy({**info.hparams, "num_tasks": 2}).eval()  # untrained: only the task lookup is checked
    loaded = Agent.load(runs.cartpole["run_dir"])
    agent = Agent(policy, loaded.adapter, loaded.action_space, ["CartPole-v1", "Other-v0"], "two-tasks")
    obs = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="pass task=NAME or task=INDEX"):
        agent.act(obs)
    with pytest.raises(ValueError, match="not one of this agent's tasks"):
        agent.act(obs, task="Missing-v0")
    torch.manual_seed(5)
    by_name, _ = agent.act(obs, task="Other-v0")
    torch.manual_seed(5)
    by_index, _ = agent.act(obs, task=1)
    np.testing.assert_array_equal(by_name, by_index)
