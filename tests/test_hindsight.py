"""Hindsight relabelling (reward.hindsight): the batch swap, the replay writes, the BabyAI labeller, a tiny fit."""

from __future__ import annotations

import csv

import gymnasium as gym
import numpy as np
import pytest

from lit_dreamer.config import ConfigError, load_config
from lit_dreamer.envs import make_env
from lit_dreamer.envs.minigrid import minigrid_vocabulary
from lit_dreamer.envs.text import Vocabulary
from lit_dreamer.relabel import REWARD_KEY, VALID_KEY, hindsight_spec, relabel_batch
from lit_dreamer.replay import Replay
from lit_dreamer.rewards import RewardConfig
from lit_dreamer.rewards.hindsight import HindsightLabel
from lit_dreamer.sampling import ReplayConfig
from tests.reward_helpers import Instructed

# --------------------------------------------------------------------------------------------------
# The swap in a batch


def labelled_batch() -> dict[str, np.ndarray]:
    """3 sequences of 4 steps: the first holds a labelled episode from step 2 on, the second none, the third
    is labelled throughout. Mission tokens (2 per step) are 1s, labels 7s; rewards 0.1 * step, labels 0.9."""
    valid = np.array([[0, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]], bool)
    return {"mission": np.ones((3, 4, 2), np.int64), "hindsight_mission": np.where(valid[..., None], 7, 0),
            "reward": np.tile(np.float32([0.0, 0.1, 0.2, 0.3]), (3, 1)),
            REWARD_KEY: np.where(valid, np.float32(0.9), np.float32(0)), VALID_KEY: valid,
            "index": np.arange(12).reshape(3, 4), "context_valid": np.ones(3, bool)}


def test_every_labelled_sequence_is_swapped_at_its_labelled_steps_with_fraction_one():
    out = relabel_batch(labelled_batch(), np.random.default_rng(0), 1.0)
    assert sorted(out) == ["context_valid", "index", "mission", "reward"]  # the label keys are dropped
    assert out["mission"][0, :, 0].tolist() == [1, 1, 7, 7] and (out["mission"][1] == 1).all()
    assert (out["mission"][2] == 7).all()
    np.testing.assert_allclose(out["reward"], [[0, 0.1, 0.9, 0.9], [0, 0.1, 0.2, 0.3], [0.9] * 4])
    assert out["context_valid"].tolist() == [False, True, False]  # the stored latent read the own instruction
    assert out["index"][0].tolist() == [-1] * 4 and out["index"][1].tolist() == [4, 5, 6, 7]


def test_no_sequence_is_swapped_with_fraction_zero():
    batch = labelled_batch()
    out = relabel_batch(batch, np.random.default_rng(0), 0.0)
    for key in ("mission", "reward", "index", "context_valid"):
        np.testing.assert_array_equal(out[key], batch[key])
    assert VALID_KEY not in out


def test_the_fraction_is_the_share_of_labelled_sequences_swapped():
    valid = np.zeros((20_000, 2), bool)
    valid[::2, 1] = True  # every other sequence holds a label
    batch = {"mission": np.zeros((20_000, 2, 1), np.int64), "hindsight_mission": np.ones((20_000, 2, 1), np.int64),
             "reward": np.zeros((20_000, 2), np.float32), REWARD_KEY: np.ones((20_000, 2), np.float32),
             VALID_KEY: valid}
    out = relabel_batch(batch, np.random.default_rng(1), 0.3)
    swapped = out["mission"][:, 1, 0] == 1
    assert not swapped[1::2].any()
    assert 0.28 < swapped[::2].mean() < 0.32  # 10,000 labelled: 0.3 +- 4.6 standard deviations


# --------------------------------------------------------------------------------------------------
# The replay


def small_replay(capacity: int = 12) -> Replay:
    spec = {"mission": ((2,), np.int64), "reward": ((), np.float32)}
    spec.update(hindsight_spec(spec, ["mission"]))
    return Replay(spec, ReplayConfig(capacity=capacity), num_envs=2)


def add_steps(replay: Replay, count: int) -> None:
    for step in range(count):
        replay.add({"mission": np.full((2, 2), step), "reward": np.zeros(2, np.float32),
                    "hindsight_mission": np.zeros((2, 2), np.int64), REWARD_KEY: np.zeros(2, np.float32),
                    VALID_KEY: np.zeros(2, bool)})


def test_write_recent_labels_the_last_steps_of_one_stream_only():
    replay = small_replay()
    add_steps(replay, 5)
    replay.write_recent(1, 3, {"hindsight_mission": np.array([7, 8]), REWARD_KEY: np.float32([0, 0, 0.5]),
                               VALID_KEY: True})
    data = replay.storage
    assert data[VALID_KEY][:5, 1].tolist() == [False, False, True, True, True]
    assert not data[VALID_KEY][:, 0].any()
    assert data["hindsight_mission"][2:5, 1].tolist() == [[7, 8]] * 3
    assert data[REWARD_KEY][:5, 1].tolist() == [0, 0, 0, 0, 0.5]


def test_write_recent_of_an_episode_longer_than_the_ring_labels_the_stored_tail():
    replay = small_replay(capacity=8)  # 4 rows per stream
    add_steps(replay, 6)
    replay.write_recent(0, 6, {REWARD_KEY: np.float32([1, 2, 3, 4, 5, 6]), VALID_KEY: True})
    rows = replay.rows_since(0)  # the 4 stored rows, oldest first
    assert replay.storage[REWARD_KEY][rows, 0].tolist() == [3, 4, 5, 6]
    assert replay.storage[VALID_KEY][rows, 0].all()


def test_update_context_skips_the_slots_of_swapped_sequences():
    replay = small_replay()
    add_steps(replay, 4)
    index = np.array([[0, 2, 4], [-1, -1, -1]])
    replay.update_context(index, {"deter": np.ones((2, 3, 1), np.float32)})
    assert replay._has_context[:3, 0].tolist() == [True, True, True] and not replay._has_context[:, 1].any()
    with pytest.raises(ValueError, match="never returned"):
        replay.update_context(np.array([[-2]]), {"deter": np.ones((1, 1, 1), np.float32)})


# --------------------------------------------------------------------------------------------------
# The BabyAI labeller on the real env


def random_episodes(env: gym.Env, count: int):
    """(info of the last step, reward, terminated, last action, env) of `count` random-action episodes."""
    for episode in range(count):
        env.reset(seed=episode)
        done = False
        while not done:
            action = env.action_space.sample()
            _, reward, terminated, truncated, info = env.step(action)
            done = terminated or truncated
        yield info, reward, terminated, action


def test_the_babyai_labeller_names_the_wrongly_picked_object_and_pays_the_envs_success_reward():
    env = make_env("babyai/PickupDistDebug", reward=RewardConfig(hindsight="babyai"), seed=0)
    env.action_space.seed(0)
    vocabulary = Vocabulary(minigrid_vocabulary(), 40, grow=False)
    base = env.unwrapped
    labelled = successes = 0
    forms = set()
    for info, reward, terminated, action in random_episodes(env, 200):
        if reward > 0:
            successes += 1
            assert "hindsight_mission" not in info  # the episode did what it was told
        if "hindsight_mission" not in info:
            continue
        labelled += 1
        assert terminated and action == base.actions.pickup and reward == 0
        words = vocabulary.decode(info["hindsight_mission"]).split()
        article, named = words[2], words[3:]
        carried = base.carrying
        assert named[-1] in (carried.type, "object") and named[0] in (carried.color, carried.type)
        kind = None if named[-1] == "object" else carried.type
        color = carried.color if len(named) == 2 else None
        forms.add((kind is None, color is None))
        matches = 1 + sum(cell is not None and (kind is None or cell.type == kind)
                          and (color is None or cell.color == color) for cell in base.grid.grid)
        assert article == ("the" if matches == 1 else "a")
        assert words != base.mission.split()
        assert info[REWARD_KEY] == pytest.approx(1 - 0.9 * base.step_count / base.max_steps)
    assert labelled >= 30 and successes >= 5  # both kinds of pickup happen in 200 random episodes
    assert forms == {(True, False), (False, True), (False, False)}  # by colour, by kind, by both


def test_hindsight_needs_an_instruction_and_the_builtin_needs_babyai():
    with pytest.raises(ValueError, match="no mission or instruction observation"):
        HindsightLabel(gym.make("CartPole-v1"), "babyai")
    with pytest.raises(ValueError, match="needs a babyai/ or minigrid/ env"):
        HindsightLabel(Instructed(), "babyai")


def test_a_labeller_of_ones_own_is_asked_at_each_episode_end():
    env = HindsightLabel(Instructed(mission="go to the red ball"), "tests.reward_helpers:blue_ball")
    env.reset(seed=0)
    infos = [env.step(0)[-1] for _ in range(3)]
    assert "hindsight_mission" not in infos[0] and "hindsight_mission" not in infos[1]
    assert infos[2]["hindsight_mission"] == "go to the blue ball" and infos[2][REWARD_KEY] == 3.0


def test_a_label_holding_a_held_out_phrase_is_dropped():
    env = make_env("babyai/PickupDistDebug", reward=RewardConfig(hindsight="babyai"), seed=0,
                   held_out=["blue"])
    env.action_space.seed(0)
    vocabulary = Vocabulary(minigrid_vocabulary(), 40, grow=False)
    labels = [vocabulary.decode(info["hindsight_mission"]) for info, *_ in random_episodes(env, 150)
              if "hindsight_mission" in info]
    assert len(labels) >= 20 and not any("blue" in label.split() for label in labels)
    without = make_env("babyai/PickupDistDebug", reward=RewardConfig(hindsight="babyai"), seed=0)
    without.action_space.seed(0)  # the same phrase does come up without the filter
    assert any("blue" in vocabulary.decode(info["hindsight_mission"]).split()
               for info, *_ in random_episodes(without, 150) if "hindsight_mission" in info)


@pytest.mark.parametrize("overrides, message", [
    (["reward.hindsight=babyai", "reward.source=fn", "reward.fn=tests.reward_helpers:half"], "reward.source=env"),
    (["reward.hindsight=babyai", "replay.device=auto"], "set replay.device=cpu"),
    (["reward.hindsight=nocolon"], "must be module:callable"),
    (["reward.hindsight_fraction=1.5"], "within \\[0, 1\\]"),
])
def test_bad_hindsight_settings_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config([], overrides)


# --------------------------------------------------------------------------------------------------
# A tiny fit


def test_a_tiny_fit_writes_labels_over_whole_episodes_and_counts_them(tmp_path, monkeypatch):
    import torch

    from lit_dreamer.__main__ import main
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    code = main(["fit", "-c", "debug", "env.id=babyai/PickupDistDebug", "reward.hindsight=babyai", "run.steps=500",
                 "run.prefill=400", f"run.dir={tmp_path}/run", "logger.backend=csv", "run.checkpoint_every=500"])
    assert code == 0
    with open(tmp_path / "run" / "csv" / "metrics.csv") as f:
        counts = [float(row["train/hindsight_episodes"]) for row in csv.DictReader(f)
                  if row.get("train/hindsight_episodes")]
    replay = Replay.load(str(tmp_path / "run" / "checkpoints" / "last" / "replay-rank0"))
    data, rows = replay.storage, replay.rows_since(0)
    valid, first, last = (data[key][rows, 0] for key in (VALID_KEY, "is_first", "is_last"))
    episode = np.cumsum(first)  # the episode number of each step
    labelled = sorted(set(episode[valid].tolist()))
    assert counts and counts[-1] == len(labelled) >= 3
    for number in labelled:
        steps = np.flatnonzero(episode == number)
        assert valid[steps].all() and last[steps[-1]]  # the whole episode, which ended
        label_rewards = data[REWARD_KEY][rows[steps], 0]
        assert (label_rewards[:-1] == 0).all() and label_rewards[-1] > 0
        assert data["reward"][rows[steps[-1]], 0] == 0  # a wrong pickup: the env paid nothing


def test_reward_sampling_also_draws_around_steps_rewarded_under_a_label():
    spec = {"mission": ((2,), np.int64), "reward": ((), np.float32)}
    spec.update(hindsight_spec(spec, ["mission"]))
    replay = Replay(spec, ReplayConfig(capacity=400, sampling="reward", reward_fraction=1.0), num_envs=1)
    add_steps_one = {"mission": np.zeros((1, 2), np.int64), "reward": np.zeros(1, np.float32),
                     "hindsight_mission": np.zeros((1, 2), np.int64), REWARD_KEY: np.zeros(1, np.float32),
                     VALID_KEY: np.zeros(1, bool)}
    for _ in range(400):
        replay.add(add_steps_one)
    replay.write_recent(0, 200, {REWARD_KEY: np.float32([0] * 199 + [1]), VALID_KEY: True})  # row 399
    batch = replay.sample(64, 4)  # fraction 0: nothing swapped, but every sequence holds the labelled step
    assert (batch["index"] >= 396).all()
