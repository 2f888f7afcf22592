"""BabyAI and MiniGrid envs (issue 23): ids, the one-hot grid and egocentric pixels, success, the mission vocabulary."""

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.wrappers import FilterObservation

from lit_dreamer.envs import DictObservation, make_env, resolve_env_id
from lit_dreamer.envs.minigrid import make_minigrid, minigrid_vocabulary, one_hot_cells
from lit_dreamer.envs.text import VOCABULARY_METADATA_KEY, tokenize


@pytest.mark.parametrize("env_id, gym_id", [
    ("babyai/GoToLocal", "BabyAI-GoToLocal-v0"),
    ("minigrid/Empty-5x5", "MiniGrid-Empty-5x5-v0"),
    ("babyai/GoToObjS6", "BabyAI-GoToObjS6-v1"),  # no v0 registered: the highest version
    ("babyai/GoToObjS6-v1", "BabyAI-GoToObjS6-v1"),
    ("BabyAI-PickupLoc-v0", "BabyAI-PickupLoc-v0"),
    ("MiniGrid-Empty-5x5-v0", "MiniGrid-Empty-5x5-v0"),
])
def test_short_and_native_ids_resolve_to_the_minigrid_family(env_id, gym_id):
    resolved = resolve_env_id(env_id)
    assert (resolved.family, resolved.gym_id) == ("minigrid", gym_id)


@pytest.mark.parametrize("env_id, suggestion", [("babyai/GoToLocl", "babyai/GoToLocal"),
                                                ("minigrid/Empty5x5", "minigrid/Empty-5x5")])
def test_unknown_minigrid_ids_get_suggestions(env_id, suggestion):
    with pytest.raises(ValueError, match="unknown environment id") as error:
        resolve_env_id(env_id)
    assert suggestion in str(error.value)


def test_one_hot_cells_golden_values():
    # Two cells of two channels with widths (3, 2): (2, 0) and (0, 1).
    view = np.array([[[2, 0], [0, 1]]], np.uint8)
    expected = np.array([0, 0, 1, 1, 0,
                         1, 0, 0, 0, 1], np.float32)
    np.testing.assert_array_equal(one_hot_cells(view, (3, 2)), expected)


def test_grid_is_minigrids_symbolic_view_one_hot_over_its_own_tables():
    from minigrid.core.constants import COLOR_TO_IDX, OBJECT_TO_IDX, STATE_TO_IDX
    env = make_minigrid("BabyAI-GoToLocal-v0", obs="proprio", image_size=64, render=False)
    observation, _ = env.reset(seed=3)
    assert env.observation_space["grid"].shape == (980,) and observation["grid"].dtype == np.float32
    assert set(env.observation_space.spaces) == {"grid", "direction", "mission"}
    assert env.observation_space["direction"] == gym.spaces.Discrete(4)
    symbolic = env.unwrapped.gen_obs()["image"]  # the 7x7x3 (object, colour, state) view of the same state
    cells = observation["grid"].reshape(49, 20)
    objects, colours, states = np.split(cells, [len(OBJECT_TO_IDX), len(OBJECT_TO_IDX) + len(COLOR_TO_IDX)], axis=1)
    assert states.shape[1] == len(STATE_TO_IDX) and (cells.sum(1) == 3).all()
    decoded = np.stack([objects.argmax(1), colours.argmax(1), states.argmax(1)], -1).reshape(7, 7, 3)
    np.testing.assert_array_equal(decoded, symbolic)
    assert (decoded[..., 0] == OBJECT_TO_IDX["wall"]).any() and isinstance(observation["mission"], str)


def test_direction_is_one_hot_after_dict_observation():
    env = make_minigrid("MiniGrid-Empty-5x5-v0", obs="proprio", image_size=64, render=False)
    env = DictObservation(FilterObservation(env, ["grid", "direction"]))  # mission: lang-text's tokenizer
    observation, _ = env.reset(seed=0)
    assert env.observation_space["direction"].shape == (4,)
    np.testing.assert_array_equal(observation["direction"], np.eye(4, dtype=np.float32)[env.unwrapped.agent_dir])


def test_pixels_are_the_egocentric_rgb_view_at_image_size():
    env = make_minigrid("BabyAI-GoToLocal-v0", obs="pixels", image_size=32, render=False)
    observation, _ = env.reset(seed=0)
    assert set(observation) == {"image", "direction", "mission"}
    assert observation["image"].shape == (32, 32, 3) and observation["image"].dtype == np.uint8
    assert env.observation_space["image"].shape == (32, 32, 3)
    assert observation["image"].std() > 0  # a rendered view, not a blank frame


def test_success_is_reported_on_the_step_that_reaches_the_goal():
    env = make_minigrid("MiniGrid-Empty-5x5-v0", obs="proprio", image_size=64, render=False)
    env.reset(seed=0)
    forward, right = env.unwrapped.actions.forward, env.unwrapped.actions.right
    # The agent starts at (1, 1) facing east; the goal is at (3, 3).
    steps = [env.step(action) for action in (forward, forward, right, forward, forward)]
    assert [info["success"] for *_, info in steps] == [False, False, False, False, True]
    _, reward, terminated, truncated, _ = steps[-1]
    assert terminated and not truncated and reward == pytest.approx(1 - 0.9 * 5 / env.unwrapped.max_steps)


def test_a_timed_out_episode_is_no_success():
    env = make_minigrid("MiniGrid-Empty-5x5-v0", obs="proprio", image_size=64, render=False)
    env.reset(seed=0)
    env.unwrapped.max_steps = 2
    left = env.unwrapped.actions.left
    (*_, first), (_, reward, terminated, truncated, last) = env.step(left), env.step(left)
    assert truncated and not terminated and reward == 0 and last["success"] is False and first["success"] is False


def test_babyai_missions_use_only_the_declared_vocabulary():
    vocabulary = set(minigrid_vocabulary())
    assert {"red", "grey", "ball", "key", "door", "box", "left", "behind", "then", "after"} <= vocabulary
    seen = set()
    for level in ("GoToLocal", "GoToObj", "PickupLoc", "PutNextLocal", "GoToSeq", "Open"):
        env = make_minigrid(f"BabyAI-{level}-v0", obs="proprio", image_size=64, render=False)
        assert env.metadata[VOCABULARY_METADATA_KEY]["mission"] == sorted(vocabulary)
        for seed in range(400):
            observation, _ = env.reset(seed=seed)
            words = tokenize(observation["mission"])
            assert set(words) <= vocabulary, observation["mission"]
            seen.update(words)
        env.close()
    assert len(seen) >= 0.9 * len(vocabulary)  # the levels exercise most of the grammar, not a corner of it


def test_plain_minigrid_envs_declare_their_own_tokenize():
    env = make_minigrid("MiniGrid-Fetch-5x5-N2-v0", obs="proprio", image_size=64, render=False)
    vocabulary = env.metadata[VOCABULARY_METADATA_KEY]["mission"]
    for seed in range(20):
        observation, _ = env.reset(seed=seed)
        assert set(tokenize(observation["mission"])) <= set(vocabulary), observation["mission"]
    assert {"fetch", "get", "red"} <= set(vocabulary)


def test_make_env_builds_babyai_with_its_vocabulary_in_the_metadata():
    env = make_env("babyai/GoToLocal", seed=0)
    observation, _ = env.reset(seed=0)
    assert observation["grid"].shape == (980,) and observation["direction"].shape == (4,)
    assert observation["mission"].dtype == np.int64 and observation["mission"].shape == (24,)
    assert 1 not in observation["mission"]  # id 1 is out-of-vocabulary: every mission word is declared
    assert env.metadata[VOCABULARY_METADATA_KEY]["mission"] == minigrid_vocabulary()


def test_a_tiny_fit_on_minigrid_through_the_cli(tmp_path, monkeypatch):
    import torch

    from lit_dreamer.__main__ import main
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    code = main(["fit", "-c", "debug", "env.id=minigrid/Empty-5x5", "run.eval_every=100", "run.eval_episodes=2",
                 f"run.dir={tmp_path}/run", "logger.backend=csv"])
    assert code == 0
    import csv
    with open(tmp_path / "run" / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert any(row.get("eval/success") not in (None, "") for row in rows)
