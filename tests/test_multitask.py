"""Many tasks, one world model: the data path (issue 22, part 1).

The task table and its config errors, task-balanced replay batches on the host and on the device path,
the task index through replay snapshots and checkpoints, the PointGoal family, a one-task run that
samples and steps exactly as before, and a two-task fit through the CLI that logs per-task metrics.
"""

import os
import re
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import torch

from lit_dreamer.compare import run_group
from lit_dreamer.config import ConfigError, load_config, task_metric_name, task_names
from lit_dreamer.data import DeviceReplay, ReplayDataModule
from lit_dreamer.envs import make_env, make_task_vector_env, make_vector_env
from lit_dreamer.envs.point_goals import GOALS, progress_reward
from lit_dreamer.evaluation import EvalOptions, evaluate_checkpoint
from lit_dreamer.module import DreamerModule
from lit_dreamer.replay import Replay
from lit_dreamer.resume import CheckpointInfo, check_task_table
from lit_dreamer.sampling import ReplayConfig, task_counts
from lit_dreamer.train import fit, probe_env
from lit_dreamer.world_model import WorldModel

POINT = "lit_dreamer/PointGoal-{}-v0"
TWO_TASKS = f"env.tasks=[{POINT.format(0)},{POINT.format(1)}]"


# --------------------------------------------------------------------------------------------------
# Config


def test_one_task_is_the_table_of_env_id_and_tasks_replace_an_earlier_files_env_id():
    assert task_names(load_config(["debug"], ["env.id=Pendulum-v1"])) == ["Pendulum-v1"]
    # configs/dmc_proprio.yaml names env.id=dmc/walker-walk: the task list given after it replaces it.
    cfg = load_config(["dmc_proprio"], ["env.tasks=[dmc/cartpole-balance,dmc/cartpole-swingup]"])
    assert task_names(cfg) == ["dmc/cartpole-balance", "dmc/cartpole-swingup"]
    assert cfg.env.id == "CartPole-v1"  # the default: the saved config does not name a task it does not train


def test_an_env_id_after_a_files_task_list_trains_that_one_task():
    cfg = load_config(["point_goal"], [f"env.id={POINT.format(2)}"])
    assert task_names(cfg) == [POINT.format(2)] and cfg.env.tasks == []
    assert len(task_names(load_config(["point_goal"]))) == 4


@pytest.mark.parametrize("overrides", [
    ["env.id=Pendulum-v1", TWO_TASKS],   # both on one command line
    [TWO_TASKS, "env.id=Pendulum-v1"],   # in either order
])
def test_env_id_and_env_tasks_together_are_refused_naming_both(overrides):
    with pytest.raises(ConfigError, match=r"env.id .*env.tasks .*are both set.*drop env.id, or add it to env.tasks"):
        load_config(["debug"], overrides)


def test_a_config_built_in_code_with_both_keys_is_refused_too():
    cfg = load_config(["debug"], [TWO_TASKS])
    cfg.env.id = "Pendulum-v1"
    with pytest.raises(ConfigError, match="env.id='Pendulum-v1' and env.tasks=.*are both set"):
        fit(cfg)


def test_a_task_listed_twice_is_refused():
    with pytest.raises(ConfigError, match="lists the task .* twice"):
        load_config(["debug"], [f"env.tasks=[{POINT.format(0)},{POINT.format(0)}]"])


def test_tasks_with_other_spaces_are_refused_naming_both_tasks_and_the_space():
    cfg = load_config(["debug"], [f"env.tasks=[{POINT.format(0)},Pendulum-v1]"])
    with pytest.raises(ConfigError, match=r"tasks 'lit_dreamer/PointGoal-0-v0' and 'Pendulum-v1' have different "
                                          r"observation spaces \(Dict.*\(4,\).* vs Dict.*\(3,\)"):
        probe_env(cfg)
    cfg = load_config(["debug"], ["env.tasks=[CartPole-v1,Acrobot-v1]"])
    with pytest.raises(ConfigError, match="'CartPole-v1' and 'Acrobot-v1' have different observation spaces"):
        probe_env(cfg)


def test_task_metric_names_are_one_segment():
    assert task_metric_name("dmc/cartpole-balance") == "dmc_cartpole-balance"
    assert task_metric_name("point_env:PointDict-v0") == "point_env_PointDict-v0"


# --------------------------------------------------------------------------------------------------
# Replay: task index per step, balanced batches


def test_task_counts_rotate_the_remainder():
    assert [task_counts(5, 2, n).tolist() for n in range(3)] == [[3, 2], [2, 3], [3, 2]]
    # 5 over 3: the two extra sequences go to the next two tasks in turn; over 3 batches each task gets 5.
    assert [task_counts(5, 3, n).tolist() for n in range(3)] == [[2, 2, 1], [2, 1, 2], [1, 2, 2]]
    assert task_counts(6, 3, 7).tolist() == [2, 2, 2]
    assert task_counts(4, 1, 3).tolist() == [4]


def task_replay(num_tasks=2, envs_per_task=2, rows=40, seed=3, **settings):
    """A replay whose streams lie task by task, each step's `task` written as the collector does."""
    num_envs = num_tasks * envs_per_task
    spec = {"obs": ((1,), np.float32), "task": ((), np.int64)}
    replay = Replay(spec, ReplayConfig(capacity=rows * num_envs, **settings), num_envs, seed=seed, num_tasks=num_tasks)
    task = np.repeat(np.arange(num_tasks), envs_per_task)
    for row in range(rows):
        replay.add({"obs": np.full((num_envs, 1), row, np.float32), "task": task})
    return replay


def assert_balanced(batches, num_tasks):
    """Each sequence holds one task; the batches' task counts follow task_counts, batch after batch."""
    for number, task in enumerate(batches):
        task = np.asarray(task)
        assert (task == task[:, :1]).all()  # a sequence never mixes tasks
        counts = np.bincount(task[:, 0], minlength=num_tasks)
        assert counts.tolist() == task_counts(len(task), num_tasks, number).tolist()


def test_replay_batches_are_balanced_and_the_remainder_rotates():
    replay = task_replay()
    batches = [replay.sample(5, 6) for _ in range(4)]
    assert_balanced([batch["task"] for batch in batches], 2)
    assert [np.bincount(b["task"][:, 0]).tolist() for b in batches[:2]] == [[3, 2], [2, 3]]  # the golden case
    # The stored task is the one of the stream the sequence was drawn from.
    streams = batches[0]["index"][:, 0] % replay.num_envs
    assert (batches[0]["task"][:, 0] == streams // 2).all()


def test_device_replay_draws_the_same_balanced_batches():
    host, device = task_replay(), task_replay()
    copy = DeviceReplay(device, torch.device("cpu"))
    host_batches = [host.sample(5, 6) for _ in range(3)]
    device_batches = [copy.sample(5, 6) for _ in range(3)]
    assert_balanced([b["task"] for b in device_batches], 2)
    for a, b in zip(host_batches, device_batches):
        assert b["task"].dtype == torch.int64 and b["task"].shape == (5, 6)
        np.testing.assert_array_equal(a["task"], b["task"].numpy())
        np.testing.assert_array_equal(a["obs"], b["obs"].numpy())


def test_a_batch_carries_task_as_int64_b_by_t():
    datamodule = ReplayDataModule({"obs": ((1,), np.float32), "task": ((), np.int64)}, ReplayConfig(capacity=400),
                                  num_envs=4, batch_size=5, batch_length=6, num_tasks=2)
    datamodule.replay = task_replay(rows=40)
    batch = datamodule.sample_batch()
    assert batch["task"].dtype == torch.int64 and batch["task"].shape == (5, 6)


def test_one_task_replay_draws_what_the_one_task_sampler_always_drew():
    # Before task tables, a batch drew its starts, then its streams uniformly from one generator. A one-task
    # replay must draw exactly that (balanced or not), or one-task runs would train on other batches.
    for balance in (True, False):
        replay = task_replay(num_tasks=1, envs_per_task=3, rows=30, seed=11, task_balance=balance)
        rng = np.random.default_rng(11)
        for _ in range(3):
            batch = replay.sample(4, 5)
            starts, streams = rng.integers(0, 30 - 5 + 1, size=4), rng.integers(0, 3, size=4)
            np.testing.assert_array_equal(batch["index"][:, 0], starts * 3 + streams)


def test_replay_snapshot_round_trips_task_and_the_rotation(tmp_path):
    replay = task_replay()
    replay.sample(5, 6)  # one batch drawn: the next one gives task 1 the extra sequence
    replay.save(str(tmp_path / "snapshot"))
    loaded = Replay.load(str(tmp_path / "snapshot"), ReplayConfig(capacity=replay.capacity))
    assert loaded.num_tasks == 2
    np.testing.assert_array_equal(loaded.storage["task"], replay.storage["task"])
    np.testing.assert_array_equal(loaded.sample(5, 6)["task"], replay.sample(5, 6)["task"])


def test_a_snapshot_from_before_the_task_key_gets_task_zero(tmp_path):
    old = Replay({"obs": ((1,), np.float32)}, ReplayConfig(capacity=40), 2, seed=0)
    for row in range(20):
        old.add({"obs": np.full((2, 1), row, np.float32)})
    old.save(str(tmp_path / "old"))
    datamodule = ReplayDataModule({"obs": ((1,), np.float32), "task": ((), np.int64)}, ReplayConfig(capacity=40),
                                  num_envs=2)
    datamodule.load_replay(str(tmp_path / "old"))
    assert (datamodule.replay.sample(3, 4)["task"] == 0).all()
    datamodule.replay.add({"obs": np.zeros((2, 1), np.float32), "task": np.zeros(2, np.int64)})  # collection goes on


# --------------------------------------------------------------------------------------------------
# Envs


def test_point_goal_tasks_share_dynamics_and_differ_only_by_the_unobserved_goal():
    a, b = make_env(POINT.format(0), seed=5), make_env(POINT.format(3), seed=5)
    obs_a, _ = a.reset(seed=5)
    obs_b, _ = b.reset(seed=5)
    rewards = []
    for step in range(100):
        action = np.array([np.cos(step / 9), 1.0], np.float32)
        (obs_a, ra, _, trunc_a, _), (obs_b, rb, _, _, _) = a.step(action), b.step(action)
        np.testing.assert_array_equal(obs_a["vector"], obs_b["vector"])  # the goal is not observed
        rewards.append((ra, rb))
    assert trunc_a  # 100-step episodes
    assert any(ra != rb for ra, rb in rewards) and all(abs(r) <= 10 * 0.1 * 2 ** 0.5 + 1e-6 for pair in rewards for r in pair)
    assert len(GOALS) == 5  # a fifth task to hold out


def test_point_goal_reward_is_the_progress_toward_its_own_goal():
    env = make_env(POINT.format(2), seed=0)
    obs, _ = env.reset(seed=0)
    goal, total, start = GOALS[2], 0.0, np.linalg.norm(obs["vector"][:2] - GOALS[2])
    for action in ([1.0, 1.0], [-1.0, 0.5], [0.0, -1.0], [1.0, -1.0]):
        before = np.hypot(*(obs["vector"][:2] - goal))
        obs, reward, *_ = env.step(np.array(action, np.float32))
        after = np.hypot(*(obs["vector"][:2] - goal))
        assert reward == pytest.approx(10.0 * (before - after), abs=1e-5)  # PROGRESS_SCALE per unit covered
        total += reward
    # Potential-based: the return is the distance covered over the episode, whatever the path.
    assert total == pytest.approx(10.0 * (start - np.linalg.norm(obs["vector"][:2] - goal)), abs=1e-4)
    assert progress_reward(0.5, 0.25) == 2.5 and progress_reward(0.25, 0.5) == -2.5

    def heading_to(goal, task):
        env = make_env(POINT.format(task), seed=task)
        obs, _ = env.reset(seed=task)
        total = 0.0
        for _ in range(100):
            position, velocity = obs["vector"][:2], obs["vector"][2:]
            obs, reward, *_ = env.step(np.clip(3 * (GOALS[goal] - position) - 3 * velocity, -1, 1))
            total += reward
        return total

    for task in range(5):  # a policy must know its task: heading to a neighbour's goal earns far less
        assert heading_to(task, task) > 5.0 and heading_to((task + 1) % 5, task) < 0.0


def test_one_task_vector_env_steps_as_the_plain_vector_env():
    plain = make_vector_env("Pendulum-v1", 2, seed=4)
    tasks = make_task_vector_env(["Pendulum-v1"], 2, seed=4)
    try:
        np.testing.assert_array_equal(plain.reset(seed=9)[0]["vector"], tasks.reset(seed=9)[0]["vector"])
        for _ in range(5):
            action = np.full((2, 1), 0.3, np.float32)
            (o1, r1, *_), (o2, r2, *_) = plain.step(action), tasks.step(action)
            np.testing.assert_array_equal(o1["vector"], o2["vector"])
            np.testing.assert_array_equal(r1, r2)
    finally:
        plain.close(), tasks.close()


# --------------------------------------------------------------------------------------------------
# Checkpoints


def test_continuing_with_another_task_table_is_refused_naming_both():
    info = CheckpointInfo(path="ckpt", hparams={}, run_config=None, mlflow_run_id=None, env_steps=0, train_steps=0,
                          state_dict={}, tasks=["a", "b"])
    check_task_table(info, ["a", "b"])
    with pytest.raises(ConfigError, match=r"trained on the tasks \['a', 'b'\], but this run has \['b', 'a'\].*"
                                          r"env.tasks=\[a,b\]"):
        check_task_table(info, ["b", "a"])


# --------------------------------------------------------------------------------------------------
# Training: the module gets `task`, the world model does not


def test_two_task_training_batches_carry_task_and_the_world_model_never_sees_it(in_tmp, monkeypatch):
    seen = {"batches": [], "world_model_keys": set()}
    original_step, original_loss = DreamerModule.training_step, WorldModel.loss

    def training_step(self, batch, batch_idx):
        seen["batches"].append(batch["task"].clone())
        return original_step(self, batch, batch_idx)

    def loss(self, batch, *args, **kwargs):
        seen["world_model_keys"] |= set(batch)
        return original_loss(self, batch, *args, **kwargs)

    monkeypatch.setattr(DreamerModule, "training_step", training_step)
    monkeypatch.setattr(WorldModel, "loss", loss)
    cfg = load_config(["debug"], [TWO_TASKS, "run.batch_size=5", "run.steps=80", "run.prefill=40",
                                  "run.train_ratio=20", "logger.backend=none", f"run.dir={in_tmp}/run"])
    summary = fit(cfg)
    assert summary["env_steps"] == 80  # run.steps counts the env steps of both tasks
    # The train ratio is per env step of all tasks: one vector step (2 env steps) replays 2 * 20 = 5 * 8 steps.
    assert summary["train_steps"] == 20
    batches = seen["batches"]
    assert len(batches) == summary["train_steps"] and batches[0].dtype == torch.int64
    assert_balanced([b.numpy() for b in batches], 2)
    assert "task" not in seen["world_model_keys"] and "is_first" in seen["world_model_keys"]


# --------------------------------------------------------------------------------------------------
# End to end through the CLI


def test_two_task_fit_logs_per_task_metrics_and_its_checkpoint_keeps_the_table(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    common = [sys.executable, "-m", "lit_dreamer", "fit", "-c", "debug", f"run.dir={tmp_path}/run",
              f"logger.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]
    # 120 env steps per task: one 100-step episode of each ends, after 30 steps of training.
    proc = subprocess.run([*common, TWO_TASKS, "run.steps=240", "run.prefill=180", "run.eval_every=100000",
                           "run.eval_episodes=1"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("lit_dreamer").experiment_id])
    names = [task_metric_name(POINT.format(k)) for k in (0, 1)]
    for kind in ("train", "eval"):
        per_task = [run.data.metrics[f"{kind}/{name}/return"] for name in names]
        # The last train/return and eval/return are the mean over the tasks of their last values.
        assert run.data.metrics[f"{kind}/return"] == pytest.approx(np.mean(per_task))
    # The params name the task list, not the unused default env.id; compare groups the run by its list.
    assert "env.id" not in run.data.params and run.data.params["env.tasks"] == str([POINT.format(0), POINT.format(1)])
    assert run_group(run.data.params, "env.id") == run.data.params["env.tasks"]
    ckpt = torch.load(f"{tmp_path}/run/checkpoints/last/model.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["lit_dreamer"]["tasks"] == [POINT.format(0), POINT.format(1)]
    # The eval command runs every task of the checkpoint's table.
    result = evaluate_checkpoint(f"{tmp_path}/run/checkpoints/last/model.ckpt",
                                 EvalOptions(episodes=1, video=f"{tmp_path}/episode.gif"))
    assert list(result["tasks"]) == [POINT.format(0), POINT.format(1)] and result["summary"]["episodes"] == 2
    # video=: one episode of each task, named as its metrics, logged with the eval run.
    assert result["videos"] == {task: f"{tmp_path}/episode-{name}.gif" for task, name in zip(result["tasks"], names)}
    assert all(os.path.getsize(path) > 0 for path in result["videos"].values())
    eval_run = client.get_run(result["mlflow_run_id"])
    assert "env.id" not in eval_run.data.params and eval_run.data.params["env.tasks"] == str(list(result["tasks"]))
    logged = sorted(os.path.basename(a.path) for a in client.list_artifacts(result["mlflow_run_id"], "videos"))
    assert logged == sorted(f"episode-{name}.gif" for name in names)
    eval_metrics = eval_run.data.metrics
    assert eval_metrics[f"eval/{names[1]}/return"] == pytest.approx(result["tasks"][POINT.format(1)]["return"])
    # Continuing it with another task table is refused before anything runs (the CLI turns a ConfigError
    # into exit code 2: tests/test_system.py).
    cfg = load_config(["debug"], [f"run.dir={tmp_path}/run", f"logger.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
                                  f"env.tasks=[{POINT.format(0)},{POINT.format(2)}]", "run.steps=400",
                                  "ckpt_path=last"])
    expected = ("was trained on the tasks ['lit_dreamer/PointGoal-0-v0', 'lit_dreamer/PointGoal-1-v0'], but this run "
                "has ['lit_dreamer/PointGoal-0-v0', 'lit_dreamer/PointGoal-2-v0']")
    with pytest.raises(ConfigError, match=re.escape(expected)):
        fit(cfg)
    assert len(client.search_runs([client.get_experiment_by_name("lit_dreamer").experiment_id])) == 2  # + eval run

