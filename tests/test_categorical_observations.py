"""Discrete, MultiDiscrete and MultiBinary observation entries (issue 23): one-hot / 0-1 float32 vectors,
and `success` in an env's final info logged as train/success and eval/success."""

import gymnasium as gym
import mlflow
import numpy as np
import pytest
import torch
from gymnasium import spaces

from lit_dreamer.config import load_config
from lit_dreamer.envs import DictObservation, make_env, space_spec
from lit_dreamer.train import fit

CATEGORICAL = spaces.Dict({
    "cue": spaces.Discrete(3, start=1),
    "cell": spaces.MultiDiscrete([2, 3], start=[-1, 0]),
    "flags": spaces.MultiBinary(4),
    "level": spaces.Box(0, 9, (), np.int64),
})


class FixedEnv(gym.Env):
    """Observes what the test gives, step after step."""

    action_space = spaces.Discrete(2)

    def __init__(self, observation_space: spaces.Space, observations: list):
        self.observation_space, self.observations, self.t = observation_space, observations, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self.observations[0], {}

    def step(self, action):
        self.t += 1
        return self.observations[self.t], 0.0, False, False, {}


def test_categorical_entries_become_float32_vectors_of_their_width():
    env = DictObservation(FixedEnv(CATEGORICAL, []))
    assert {key: (space.shape, space.dtype) for key, space in env.observation_space.spaces.items()} == {
        "cue": ((3,), np.float32), "cell": ((5,), np.float32), "flags": ((4,), np.float32),
        "level": ((1,), np.float32)}
    assert space_spec(env)["cell"] == ((5,), np.dtype(np.float32))


def test_one_hot_golden_values_with_start_offsets():
    observations = [
        {"cue": 1, "cell": np.array([-1, 2]), "flags": np.array([1, 0, 0, 1], np.int8), "level": np.int64(7)},
        {"cue": 3, "cell": np.array([0, 0]), "flags": np.array([0, 0, 0, 0], np.int8), "level": np.int64(0)},
    ]
    env = DictObservation(FixedEnv(CATEGORICAL, observations))
    first, _ = env.reset()
    second, *_ = env.step(0)
    # Discrete(3, start=1): value v sits at index v - 1. MultiDiscrete([2, 3], start=[-1, 0]): one-hot of
    # width 2 at v0 + 1, then one of width 3 at v1.
    np.testing.assert_array_equal(first["cue"], np.array([1, 0, 0], np.float32))
    np.testing.assert_array_equal(second["cue"], np.array([0, 0, 1], np.float32))
    np.testing.assert_array_equal(first["cell"], np.array([1, 0, 0, 0, 1], np.float32))
    np.testing.assert_array_equal(second["cell"], np.array([0, 1, 1, 0, 0], np.float32))
    np.testing.assert_array_equal(first["flags"], np.array([1, 0, 0, 1], np.float32))
    np.testing.assert_array_equal(second["flags"], np.zeros(4, np.float32))
    assert all(value.dtype == np.float32 and value.flags.c_contiguous for value in (*first.values(), *second.values()))


def test_a_top_level_discrete_observation_is_one_hot():
    env = DictObservation(FixedEnv(spaces.Discrete(5, start=10), [12]))
    observation, _ = env.reset()
    assert env.observation_space["observation"].shape == (5,)
    np.testing.assert_array_equal(observation["observation"], np.array([0, 0, 1, 0, 0], np.float32))


def test_a_value_outside_its_discrete_space_is_named():
    env = DictObservation(FixedEnv(spaces.Dict({"cue": spaces.Discrete(3)}), [{"cue": 3}]))
    with pytest.raises(ValueError, match=r"3 is not in its space Discrete\(3\)"):
        env.reset()


@pytest.mark.parametrize("space, named", [
    (spaces.MultiDiscrete([[2, 3], [4, 5]]), r"'board' is a MultiDiscrete space of shape \(2, 2\)"),
    (spaces.MultiBinary([2, 2]), r"'board' is a MultiBinary space of shape \(2, 2\)"),
])
def test_categorical_spaces_of_rank_two_are_refused_by_name(space, named):
    with pytest.raises(ValueError, match=named):
        DictObservation(FixedEnv(spaces.Dict({"board": space}), []))


# --------------------------------------------------------------------------------------------------
# A tiny fit on an env with categorical entries that reports success in its final info


class CueEnv(gym.Env):
    """`length` steps; each pays 1 when the action names the cue (Discrete(3, start=1) -> action cue - 1).
    The last step's info says success: the episode paid something."""

    observation_space = spaces.Dict({"cue": spaces.Discrete(3, start=1), "clock": spaces.MultiDiscrete([8]),
                                     "flags": spaces.MultiBinary(2)})
    action_space = spaces.Discrete(3)

    def __init__(self, length: int = 4):
        self.length = length

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.paid = 0, 0.0
        return self.observe(), {}

    def observe(self):
        self.cue = int(self.np_random.integers(1, 4))
        return {"cue": self.cue, "clock": np.array([self.t]), "flags": np.array([self.t % 2, 1], np.int8)}

    def step(self, action):
        reward = float(int(action) == self.cue - 1)
        self.paid += reward
        self.t += 1
        done = self.t == self.length
        info = {"success": self.paid > 0} if done else {}
        return self.observe(), reward, done, False, info


CUE, CUE_LONG = "LitDreamerTest/Cue-v0", "LitDreamerTest/CueLong-v0"
gym.register(CUE, entry_point=CueEnv)
gym.register(CUE_LONG, entry_point=CueEnv, kwargs={"length": 6})


def test_make_env_one_hots_the_cue_env():
    env = make_env(CUE, seed=0)
    observation, _ = env.reset(seed=0)
    assert observation["cue"].shape == (3,) and observation["cue"].sum() == 1
    np.testing.assert_array_equal(observation["clock"], np.eye(8, dtype=np.float32)[0])


def test_dict_with_discrete_keys_trains_and_logs_success_per_task(tmp_path, monkeypatch, capsys):
    from lit_dreamer.__main__ import main
    from lit_dreamer.config import task_metric_name
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = [f"env.tasks=[{CUE},{CUE_LONG}]", "run.steps=240", "run.eval_every=200", "run.eval_episodes=4",
                 f"run.dir={tmp_path}/run", f"logger.tracking_uri={uri}"]
    summary = fit(load_config(["debug"], overrides))
    assert summary["env_steps"] == 240 and summary["train_steps"] > 0
    client = mlflow.MlflowClient(uri)
    run = client.get_run(summary["mlflow_run_id"])
    names = [task_metric_name(task) for task in (CUE, CUE_LONG)]
    for kind in ("train", "eval"):
        per_task = [run.data.metrics[f"{kind}/{name}/success"] for name in names]
        assert all(0.0 <= value <= 1.0 for value in per_task)
        # Every task ran as many eval episodes: eval/success is the mean of the tasks' rates (train: of their means).
        assert run.data.metrics[f"{kind}/success"] == pytest.approx(np.mean(per_task))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/success")] == [200, 240]
    assert summary["eval"]["success"] == run.data.metrics["eval/success"]
    # The eval command: eval/success is the fraction of its episodes that paid something (CueEnv's success).
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(tmp_path / "run"), "episodes=3"]) == 0
    assert "success rate" in capsys.readouterr().out
    [eval_run] = client.search_runs([client.get_experiment_by_name("lit_dreamer").experiment_id],
                                    filter_string="tags.`lit_dreamer.kind` = 'eval'")
    returns = [m.value for m in client.get_metric_history(eval_run.info.run_id, "eval/episode_return")]
    assert len(returns) == 6  # 3 per task, CUE's first
    assert eval_run.data.metrics["eval/success"] == pytest.approx(np.mean([r > 0 for r in returns]))
    for name, task_returns in zip(names, (returns[:3], returns[3:])):
        assert eval_run.data.metrics[f"eval/{name}/success"] == pytest.approx(np.mean([r > 0 for r in task_returns]))


def test_success_rate_only_for_envs_that_report_success():
    from lit_dreamer.evaluation import EpisodeStats
    assert "success" not in EpisodeStats([1.0, 0.0], [3, 4]).summary()
    reported = EpisodeStats([1.0, 0.0, 0.5], [3, 4, 5], [True, False, True])
    assert reported.summary()["success"] == pytest.approx(2 / 3)
    # Pooled over tasks: the successes of the tasks that report them.
    pooled = EpisodeStats.pooled([reported, EpisodeStats([2.0], [1])])
    assert pooled.successes == [True, False, True] and len(pooled.returns) == 4


def test_eval_csv_gets_a_success_column_and_an_older_file_keeps_its_header(tmp_path):
    import csv

    from lit_dreamer.evaluation import EpisodeStats, EvalOptions, write_eval_csv
    result = {"checkpoint": "model.ckpt", "env": "babyai/GoToLocal",
              "summary": EpisodeStats([0.9, 0.0], [12, 64], [True, False]).summary()}
    new = tmp_path / "new.csv"
    write_eval_csv(str(new), result, EvalOptions())
    with open(new) as f:
        [row] = list(csv.DictReader(f))
    assert row["success"] == "0.5" and row["return"] == "0.45"
    assert row["instructions"] == "train" and row["text"] == "own"  # which episodes, and whose text the policy read
    old_header = "time,checkpoint,env,mode,seed,episodes,return,return_std,return_min,return_max,length"
    old = tmp_path / "old.csv"
    old.write_text(old_header + "\n")
    write_eval_csv(str(old), result, EvalOptions())
    with open(old) as f:
        header, row = list(csv.reader(f))
    assert ",".join(header) == old_header and len(row) == len(header)  # the rows stay aligned with the header
