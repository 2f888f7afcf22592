"""Contracts of lit_dreamer.envs on real gymnasium, dm_control and Atari envs."""

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # before anything imports mujoco

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces

from lit_dreamer.envs import (
    DictObservation,
    action_dim,
    action_kind,
    frames_per_step,
    make_env,
    make_vector_env,
    space_spec,
)

FLAGS = {"reward": ((), np.float32), "is_first": ((), np.bool_), "is_last": ((), np.bool_),
         "is_terminal": ((), np.bool_), "task": ((), np.int64)}


def expected_spec(observations: dict, action_width: int) -> dict:
    spec = {key: (shape, np.dtype(dtype)) for key, (shape, dtype) in observations.items()}
    spec["action"] = ((action_width,), np.dtype(np.float32))
    spec.update({key: (shape, np.dtype(dtype)) for key, (shape, dtype) in FLAGS.items()})
    return spec


def check_observation(env: gym.Env, observation: dict) -> None:
    assert set(observation) == set(env.observation_space.spaces)
    for key, space in env.observation_space.spaces.items():
        assert observation[key].shape == space.shape, key
        assert observation[key].dtype == space.dtype, key


class ToyEnv(gym.Env):
    """A do-nothing env whose spaces the test chooses."""

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Space | None = None):
        self.observation_space = observation_space
        self.action_space = action_space or spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 0.0, False, False, {}


def test_cartpole_is_discrete_with_a_vector_observation():
    env = make_env("CartPole-v1", seed=0)
    assert env.action_space == spaces.Discrete(2)
    assert action_kind(env) == "discrete" and action_dim(env) == 2
    observation, _ = env.reset()
    check_observation(env, observation)
    assert observation["vector"].shape == (4,) and observation["vector"].dtype == np.float32
    observation, reward, terminated, truncated, _ = env.step(1)
    check_observation(env, observation)
    assert reward == 1.0
    assert space_spec(env) == expected_spec({"vector": ((4,), np.float32)}, 2)
    assert frames_per_step(env) == 1


def test_pendulum_actions_are_rescaled_to_the_env_bounds():
    env = make_env("Pendulum-v1", seed=0)
    assert env.action_space == spaces.Box(-1.0, 1.0, (1,), np.float32)
    assert action_kind(env) == "continuous" and action_dim(env) == 1
    env.reset()
    env.step(np.array([1.0], np.float32))
    assert env.unwrapped.last_u == pytest.approx(2.0)
    env.step(np.array([-1.0], np.float32))
    assert env.unwrapped.last_u == pytest.approx(-2.0)
    env.step(np.array([0.5], np.float32))
    assert env.unwrapped.last_u == pytest.approx(1.0)
    assert space_spec(env) == expected_spec({"vector": ((3,), np.float32)}, 1)


def test_dmc_proprio_gives_a_dict_of_vectors_and_ends_by_truncation():
    env = make_env("dmc/cartpole-balance", action_repeat=2, seed=0)
    assert env.action_space == spaces.Box(-1.0, 1.0, (1,), np.float32)
    spec = expected_spec({"position": ((3,), np.float32), "velocity": ((2,), np.float32)}, 1)
    assert space_spec(env) == spec
    assert frames_per_step(env) == 2
    observation, _ = env.reset()
    check_observation(env, observation)
    steps, terminated, truncated = 0, False, False
    while not (terminated or truncated):
        observation, _, terminated, truncated, _ = env.step(np.zeros(1, np.float32))
        steps += 1
    check_observation(env, observation)
    # 1000 control steps of the suite at action repeat 2; the time limit is no true end of the MDP.
    assert steps == 500 and truncated and not terminated


def test_seed_makes_resets_reproducible():
    first, second, other = (make_env("dmc/cartpole-swingup", seed=seed) for seed in (0, 0, 1))
    position = [env.reset()[0]["position"] for env in (first, second, other)]
    np.testing.assert_array_equal(position[0], position[1])
    assert not np.array_equal(position[0], position[2])


def test_dmc_native_id_and_render_flag():
    env = make_env("dm_control/cartpole-balance-v0", render=True, image_size=32, seed=0)
    assert set(env.observation_space.spaces) == {"position", "velocity"}
    frame = env.render()
    assert frame.shape == (32, 32, 3) and frame.dtype == np.uint8


def test_dmc_pixels_gives_a_rendered_uint8_image():
    env = make_env("dmc/cartpole-balance", obs="pixels", seed=0)
    assert space_spec(env) == expected_spec({"image": ((64, 64, 3), np.uint8)}, 1)
    observation, _ = env.reset()
    assert observation["image"].shape == (64, 64, 3) and observation["image"].dtype == np.uint8
    assert observation["image"].std() > 1.0, "the frame should show the scene, not a constant colour"
    next_observation, *_ = env.step(np.ones(1, np.float32))
    check_observation(env, next_observation)


def test_gymnasium_env_with_pixels_renders_and_resizes():
    env = make_env("CartPole-v1", obs="pixels", image_size=48, seed=0)
    observation, _ = env.reset()
    assert observation["image"].shape == (48, 48, 3) and observation["image"].dtype == np.uint8
    assert observation["image"].std() > 1.0


def test_atari_pong_follows_the_atari_100k_protocol():
    env = make_env("atari/pong", seed=0)
    assert env.action_space == spaces.Discrete(6)
    assert space_spec(env) == expected_spec({"image": ((64, 64, 3), np.uint8)}, 6)
    assert frames_per_step(env) == 4
    unwrapped = env.unwrapped
    assert unwrapped._frameskip == 1 and unwrapped.ale.getFloat("repeat_action_probability") == 0.0
    assert unwrapped.ale.getInt("max_num_frames_per_episode") == 108_000
    observation, _ = env.reset()
    check_observation(env, observation)
    frame = unwrapped.ale.getEpisodeFrameNumber()
    env.step(0)
    assert unwrapped.ale.getEpisodeFrameNumber() - frame == 4
    with pytest.raises(ValueError, match="frame skip of 4"):
        make_env("atari/pong", action_repeat=2)


def test_action_repeat_sums_rewards():
    env = make_env("CartPole-v1", action_repeat=2, seed=0)
    env.reset()
    _, reward, terminated, truncated, _ = env.step(0)
    assert reward == 2.0 and not (terminated or truncated)
    assert frames_per_step(env) == 2


def test_time_limit_truncates_without_terminating():
    env = make_env("CartPole-v1", time_limit=5, seed=0)
    env.reset()
    for step in range(1, 6):
        _, _, terminated, truncated, _ = env.step(step % 2)
        assert not terminated
        assert truncated == (step == 5)


@pytest.mark.parametrize(
    ("env_id", "suggestion"),
    [("CartPol-v1", "CartPole-v1"), ("dmc/walker-wlk", "dmc/walker-walk"), ("atari/pongg", "atari/pong")],
)
def test_unknown_id_names_it_and_suggests_a_close_one(env_id, suggestion):
    with pytest.raises(ValueError) as error:
        make_env(env_id)
    assert repr(env_id) in str(error.value) and suggestion in str(error.value)


def test_unknown_obs_mode_lists_the_modes():
    with pytest.raises(ValueError, match="proprio, pixels"):
        make_env("CartPole-v1", obs="state")


@pytest.mark.parametrize(
    ("observation_space", "named"),
    [
        (spaces.Dict({"ok": spaces.Box(-1, 1, (3,)), "grid": spaces.Box(-1, 1, (3, 4))}), r"'grid'.*\(3, 4\).*float32"),
        (spaces.Box(0.0, 1.0, (8, 8, 3), np.float32), r"'image'.*\(8, 8, 3\).*float32.*uint8"),
        (spaces.Box(0, 255, (8, 8, 4), np.uint8), r"'image'.*\(8, 8, 4\)"),
        (spaces.Box(0, 255, (8, 8), np.uint8), r"'vector'.*\(8, 8\)"),
        (spaces.Tuple([spaces.Discrete(2)]), r"'observation'.*Tuple"),
        (spaces.Dict({"note": spaces.Text(5)}), r"'note'.*Text"),
    ],
)
def test_bad_observation_space_names_the_key(observation_space, named):
    with pytest.raises(ValueError, match=named):
        DictObservation(ToyEnv(observation_space))


def test_bad_observation_space_through_make_env():
    gym.register(
        "LitDreamerTest/RankTwo-v0",
        entry_point=lambda: ToyEnv(spaces.Dict({"board": spaces.Box(-1, 1, (2, 2))})),
    )
    try:
        with pytest.raises(ValueError, match=r"'board'.*\(2, 2\)"):
            make_env("LitDreamerTest/RankTwo-v0")
    finally:
        gym.registry.pop("LitDreamerTest/RankTwo-v0")


def test_nested_dicts_and_scalars_are_flattened():
    observation_space = spaces.Dict(
        {
            "body": spaces.Dict({"height": spaces.Box(-1, 1, (), np.float64), "joints": spaces.Box(0, 9, (2,), np.int64)}),
            "camera": spaces.Box(0, 255, (8, 8, 3), np.uint8),
        }
    )
    env = DictObservation(ToyEnv(observation_space))
    assert {key: (space.shape, space.dtype) for key, space in env.observation_space.spaces.items()} == {
        "body/height": ((1,), np.float32),
        "body/joints": ((2,), np.float32),
        "camera": ((8, 8, 3), np.uint8),
    }
    observation, _ = env.reset(seed=0)
    check_observation(env, observation)


@pytest.mark.parametrize(
    "action_space", [spaces.MultiDiscrete([2, 3]), spaces.Tuple([spaces.Discrete(2)]), spaces.MultiBinary(3)]
)
def test_unsupported_action_space_is_named(action_space):
    gym.register("LitDreamerTest/BadAction-v0", entry_point=lambda: ToyEnv(spaces.Box(-1, 1, (2,)), action_space))
    try:
        with pytest.raises(ValueError, match=type(action_space).__name__):
            make_env("LitDreamerTest/BadAction-v0")
    finally:
        gym.registry.pop("LitDreamerTest/BadAction-v0")


def test_pixels_needs_an_env_that_renders():
    gym.register("LitDreamerTest/NoRender-v0", entry_point=lambda **_: ToyEnv(spaces.Box(-1, 1, (2,))))
    try:
        with pytest.raises(ValueError, match="rgb_array"):
            make_env("LitDreamerTest/NoRender-v0", obs="pixels")
    finally:
        gym.registry.pop("LitDreamerTest/NoRender-v0")


@pytest.mark.parametrize("asynchronous", [False, True])
def test_vector_env_autoresets_on_the_next_step(asynchronous):
    envs = make_vector_env("CartPole-v1", 2, seed=3, asynchronous=asynchronous, time_limit=3)
    try:
        assert space_spec(envs) == expected_spec({"vector": ((4,), np.float32)}, 2)
        assert frames_per_step(envs) == 1
        observation, _ = envs.reset()
        assert observation["vector"].shape == (2, 4)
        assert not np.allclose(observation["vector"][0], observation["vector"][1]), "seeds differ per env"
        for step in range(1, 4):
            _, reward, terminated, truncated, _ = envs.step(np.array([0, 1]))
            np.testing.assert_array_equal(reward, [1.0, 1.0])
            np.testing.assert_array_equal(truncated, [step == 3] * 2)
            assert not terminated.any()
        # The step after an episode end resets that env: its first observation, reward 0, no end flags.
        observation, reward, terminated, truncated, _ = envs.step(np.array([0, 1]))
        np.testing.assert_array_equal(reward, [0.0, 0.0])
        assert not (terminated.any() or truncated.any())
        assert np.all(np.abs(observation["vector"]) <= 0.05), "CartPole starts within +-0.05"
    finally:
        envs.close()


def test_vector_env_seeding_is_reproducible():
    first = make_vector_env("CartPole-v1", 2, seed=7)
    second = make_vector_env("CartPole-v1", 2, seed=7)
    np.testing.assert_array_equal(first.reset()[0]["vector"], second.reset()[0]["vector"])


@pytest.mark.parametrize("asynchronous", [False, True])
def test_vector_env_reports_frames_per_step(asynchronous):
    envs = make_vector_env("CartPole-v1", 2, seed=0, asynchronous=asynchronous, action_repeat=3)
    try:
        assert frames_per_step(envs) == 3
        envs.reset()
        np.testing.assert_array_equal(envs.step(np.array([0, 1]))[1], [3.0, 3.0])
    finally:
        envs.close()
