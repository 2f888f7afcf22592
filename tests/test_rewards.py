"""Rewards from a function or a language model (issue 23): parsing, the judge against a stub server, the
wrappers' golden values, the BabyAI describer, config checks, and a CLI fit whose API key must leak nowhere."""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from lit_dreamer.config import ConfigError, load_config
from lit_dreamer.rewards import (JudgedRewards, LanguageReward, LLMConfig, LLMJudge, RewardConfig, describe_view,
                                 parse_answer)
from lit_dreamer.rewards.llm import MalformedAnswer
from lit_dreamer.rewards.settings import DEFAULT_PROMPT
from tests.llm_stub import StubLLM, babyai_rule
from tests.reward_helpers import Instructed

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


@pytest.fixture
def stub():
    servers = []

    def start(**kwargs) -> StubLLM:
        servers.append(StubLLM(**kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def judge_for(server: StubLLM, **settings) -> LLMJudge:
    # A fresh judge per test (not shared_judge): its cache and counters start empty.
    return LLMJudge(LLMConfig(url=server.url, model="stub", **settings), backoff_s=0.01)


# --------------------------------------------------------------------------------------------------
# Parsing


@pytest.mark.parametrize("text, value", [("yes", 1.0), (" No. ", 0.0), ("YES\n", 1.0), ("0.75", 0.75), ("-2", -2.0),
                                         ("1e-1", 0.1)])
def test_answers_that_parse(text, value):
    assert parse_answer(text) == value


@pytest.mark.parametrize("text", ["yes, because it reached the ball", "maybe", "", "nan", "inf", "1/2", "yes yes"])
def test_answers_that_are_malformed(text):
    with pytest.raises(MalformedAnswer):
        parse_answer(text)


# --------------------------------------------------------------------------------------------------
# The judge against the stub server


def test_judge_follows_the_rule_and_sends_the_request_openai_style(stub, monkeypatch):
    server = stub()
    monkeypatch.delenv("LIT_DREAMER_LLM_API_KEY", raising=False)
    judge = judge_for(server)
    assert judge.score("go to the green ball", "You see a green ball 1 step forward.") == 1.0
    assert judge.score("go to the green ball", "You see a red key 2 steps forward.") == 0.0
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["body"]["model"] == "stub" and request["body"]["messages"][0]["role"] == "user"
    assert "go to the green ball" in request["body"]["messages"][0]["content"]
    assert request["authorization"] is None  # no key variable: no header (a local server needs none)


def test_the_key_goes_in_the_header_from_the_named_variable(stub, monkeypatch):
    server = stub()
    monkeypatch.setenv("MY_KEY_VARIABLE", "sk-test-1234")
    judge_for(server, api_key_env="MY_KEY_VARIABLE").score("go to the red ball", "You see a red ball.")
    assert server.requests[0]["authorization"] == "Bearer sk-test-1234"


def test_a_cached_pair_is_not_asked_again(stub):
    server = stub()
    judge = judge_for(server)
    first = judge.score_many([("go to the red ball", "You see a red ball."), ("go to the red ball", "You see a red ball.")])
    second = judge.score("go to the red ball", "You see a red ball.")
    assert first == [1.0, 1.0] and second == 1.0
    assert len(server.requests) == 1
    # a repeat within one batch and a later repeat: both answered without a request
    assert judge.stats() == {"reward/llm_calls": 1.0, "reward/llm_failures": 0.0, "reward/llm_cache_hits": 2.0}


def test_a_slow_answer_times_out_is_retried_and_falls_back(stub):
    server = stub(mode="slow")
    judge = judge_for(server, timeout=0.2, retries=1, fallback=-1.0)
    assert judge.score("go to the red ball", "You see a red ball.") == -1.0
    assert len(server.requests) == 2  # the first try and one retry
    assert judge.stats()["reward/llm_failures"] == 1.0


def test_5xx_answers_are_retried_until_one_succeeds(stub):
    server = stub(mode="error500", fail_first=2)
    judge = judge_for(server, retries=2)
    assert judge.score("go to the red ball", "You see a red ball.") == 1.0
    assert len(server.requests) == 3
    assert judge.stats()["reward/llm_failures"] == 0.0


def test_5xx_answers_past_the_retries_fall_back(stub):
    server = stub(mode="error500")
    judge = judge_for(server, retries=2, fallback=0.25)
    assert judge.score("go to the red ball", "You see a red ball.") == 0.25
    assert len(server.requests) == 3


@pytest.mark.parametrize("mode", ["malformed", "not_json", "unauthorized"])
def test_answers_that_cannot_be_used_are_not_retried_and_fall_back(stub, mode):
    server = stub(mode=mode)
    judge = judge_for(server, retries=3, fallback=-1.0)
    assert judge.score("go to the red ball", "You see a red ball.") == -1.0
    assert len(server.requests) == 1
    assert judge.stats()["reward/llm_failures"] == 1.0


def test_a_refused_connection_falls_back_after_the_retries(stub):
    server = stub()
    url = server.url
    server.close()  # nothing listens there any more
    judge = LLMJudge(LLMConfig(url=url, model="stub", retries=1, fallback=-1.0), backoff_s=0.01)
    assert judge.score("go to the red ball", "You see a red ball.") == -1.0
    assert judge.stats()["reward/llm_calls"] == 2.0 and judge.stats()["reward/llm_failures"] == 1.0


def test_failures_are_warned_about_once_and_never_cached(stub, caplog):
    server = stub(mode="malformed")
    judge = judge_for(server)
    with caplog.at_level(logging.WARNING, logger="lit_dreamer.rewards.llm"):
        for _ in range(3):
            judge.score("go to the red ball", "You see a red ball.")
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    assert len(server.requests) == 3 and judge.stats()["reward/llm_failures"] == 3.0


@pytest.mark.parametrize("limit", [1, 3])
def test_no_more_than_max_concurrency_requests_are_in_flight(stub, limit):
    server = stub(hold=0.5)  # long enough for every allowed request to start while the first is held
    judge = judge_for(server, max_concurrency=limit)
    queries = [("go to the red ball", f"You see a red ball {k} steps forward.") for k in range(6)]
    assert judge.score_many(queries) == [1.0] * 6
    assert len(server.requests) == 6
    assert server.max_in_flight == limit  # reached (they overlap) and never passed


# --------------------------------------------------------------------------------------------------
# The wrappers: golden rewards


def rewards_of_one_episode(env: gym.Env) -> list[float]:
    env.reset(seed=0)
    rewards, done = [], False
    while not done:
        _, reward, terminated, truncated, _ = env.step(0)
        rewards.append(reward)
        done = terminated or truncated
    return rewards


@pytest.mark.parametrize("mix, when, expected", [
    ("replace", "step", [0.5, 0.5, 0.5]),     # the function's 0.5 per step
    ("add", "step", [1.5, 1.5, 1.5]),         # env's 1 + 0.5
    ("replace", "episode", [0.0, 0.0, 3.0]),  # episode_length() once, on the last step
    ("add", "episode", [1.0, 1.0, 4.0]),
])
def test_fn_rewards_per_step_and_per_episode(mix, when, expected):
    fn = "tests.reward_helpers:half" if when == "step" else "tests.reward_helpers:episode_length"
    env = LanguageReward(Instructed(), RewardConfig(source="fn", fn=fn, mix=mix, when=when))
    assert rewards_of_one_episode(env) == expected


def test_fn_gets_the_instruction_from_the_mission():
    env = LanguageReward(Instructed(mission="go to the blue key"), RewardConfig(source="fn", fn="tests.reward_helpers:half"))
    assert rewards_of_one_episode(env) == [-9.0, -9.0, -9.0]


def llm_vector_env(server: StubLLM, num_envs: int, seen: str = "a red ball", **reward) -> JudgedRewards:
    config = RewardConfig(source="llm", llm=LLMConfig(url=server.url, model="stub", **reward.pop("llm", {})), **reward)
    envs = gym.vector.SyncVectorEnv([lambda: LanguageReward(Instructed(seen=seen), config) for _ in range(num_envs)],
                                    autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    return JudgedRewards(envs, LLMJudge(config.llm, backoff_s=0.01))


def vector_episode_rewards(envs: JudgedRewards) -> np.ndarray:
    envs.reset(seed=0)
    return np.stack([envs.step(np.zeros(envs.num_envs, np.int64))[1] for _ in range(3)])


@pytest.mark.parametrize("mix, seen, last", [("replace", "a red ball", 1.0), ("replace", "a blue box", 0.0),
                                             ("add", "a red ball", 2.0), ("add", "a blue box", 1.0)])
def test_llm_rewards_replace_or_add_on_the_last_step(stub, mix, seen, last):
    server = stub()
    envs = llm_vector_env(server, 2, seen=seen, mix=mix, when="episode")
    before = 1.0 if mix == "add" else 0.0
    np.testing.assert_array_equal(vector_episode_rewards(envs), [[before] * 2, [before] * 2, [last] * 2])
    assert len(server.requests) == 1 and envs.judge.stats()["reward/llm_cache_hits"] == 1.0  # 2 alike episodes


def test_a_second_identical_episode_sends_no_request(stub):
    server = stub()
    envs = llm_vector_env(server, 1, when="episode")
    vector_episode_rewards(envs)
    envs.step(np.zeros(1, np.int64))  # the autoreset step
    second = np.stack([envs.step(np.zeros(1, np.int64))[1] for _ in range(3)])
    np.testing.assert_array_equal(second[:, 0], [0.0, 0.0, 1.0])
    assert len(server.requests) == 1 and envs.judge.stats()["reward/llm_cache_hits"] == 1.0


def test_the_episode_ends_of_several_envs_overlap_within_the_limit(stub):
    server = stub(hold=0.5)  # long enough for every allowed request to start while the first is held
    envs = llm_vector_env(server, 4, when="episode", llm={"max_concurrency": 2})
    for k, env in enumerate(envs.env.envs):
        env.unwrapped.seen = f"a red ball number {k}"  # four distinct descriptions, four requests
    rewards = vector_episode_rewards(envs)
    assert rewards[-1].tolist() == [1.0] * 4
    assert len(server.requests) == 4 and server.max_in_flight == 2


# --------------------------------------------------------------------------------------------------
# The BabyAI describer


def random_episode(env: gym.Env, seed: int) -> tuple[dict, float, dict]:
    """One episode of random actions from reset(seed): the last step's observation, reward and info."""
    env.reset(seed=seed)
    done = False
    while not done:
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        done = terminated or truncated
    return obs, reward, info


def babyai_with(objects: dict[tuple[int, int], object], carrying=None):
    """A BabyAI room emptied, the agent at (3, 3) facing east (+x), the given objects placed by grid position."""
    env = gym.make("BabyAI-GoToLocal-v0").unwrapped
    env.reset(seed=0)
    for x in range(1, env.width - 1):
        for y in range(1, env.height - 1):
            env.grid.set(x, y, None)
    env.agent_pos, env.agent_dir, env.carrying = np.array([3, 3]), 0, carrying
    for (x, y), obj in objects.items():
        env.grid.set(x, y, obj)
    return env.gen_obs()


def test_the_describer_places_objects_relative_to_the_agent():
    from minigrid.core.world_object import Ball, Box, Key
    # Facing east: forward is +x, left is -y (north), right is +y.
    obs = babyai_with({(5, 2): Ball("blue"), (4, 3): Box("red")}, carrying=Key("yellow"))
    assert describe_view(obs["image"]) == ("You carry a yellow key. You see a red box 1 step forward. "
                                           "You see a blue ball 2 steps forward and 1 step left.")


def test_the_describer_names_door_states_and_an_empty_view():
    from minigrid.core.world_object import Door
    assert describe_view(babyai_with({})["image"]) == "You see no objects."
    obs = babyai_with({(3, 5): Door("green", is_open=False, is_locked=True)})
    assert describe_view(obs["image"]) == "You see a locked green door 2 steps right."


def test_a_babyai_episode_end_is_described_for_the_judge(stub):
    server = stub()
    config = RewardConfig(source="llm", when="episode", llm=LLMConfig(url=server.url, model="stub"))
    env = LanguageReward(gym.make("BabyAI-GoToObj-v0"), config)
    obs, _, info = random_episode(env, seed=1)
    instruction, description = info["reward/query"]
    assert instruction == obs["mission"] and description == describe_view(obs["image"])


def test_babyai_with_pixel_observations_still_gets_its_mission_and_description():
    from gymnasium.wrappers import AddRenderObservation
    config = RewardConfig(source="llm", when="episode", llm=LLMConfig(url="http://127.0.0.1:9/v1", model="stub"))
    env = LanguageReward(AddRenderObservation(gym.make("BabyAI-GoToObj-v0", render_mode="rgb_array"),
                                              render_only=True), config)
    _, _, info = random_episode(env, seed=1)
    base = env.unwrapped
    assert info["reward/query"] == (base.mission, describe_view(base.gen_obs()["image"]))
    assert base.mission.startswith("go to")


# --------------------------------------------------------------------------------------------------
# The stub's strict BabyAI rule (the language-model reward benchmark's judge)


def strict(instruction: str, description: str) -> str:
    return babyai_rule(DEFAULT_PROMPT.format(instruction=instruction, description=description))


@pytest.mark.parametrize("instruction, description, answer", [
    ("go to the red ball", "You see a red ball 1 step forward. You see a blue key 2 steps forward.", "yes"),
    ("go to the red ball", "You see a red ball 1 step forward and 1 step left.", "no"),
    ("go to the red ball", "You see a red box 1 step forward. You see a red ball 2 steps forward.", "no"),
    ("go to a ball", "You see a grey ball 1 step forward.", "yes"),
    ("go to the green door", "You see a locked green door 1 step forward.", "yes"),
    ("pick up a purple object", "You carry a purple box. You see a red key 1 step forward.", "yes"),
    ("pick up the red key", "You carry a red ball. You see a red key 1 step forward.", "no"),
    ("pick up a key", "You see a red key 1 step forward.", "no"),
])
def test_the_strict_rule_on_golden_descriptions(instruction, description, answer):
    assert strict(instruction, description) == answer


@pytest.mark.parametrize("env_id", ["BabyAI-GoToLocal-v0", "BabyAI-PickupDist-v0"])
def test_the_strict_rule_agrees_with_babyai_success_on_random_episodes(env_id):
    """The judge the benchmark trains on says "yes" exactly when the env pays its success reward."""
    import minigrid  # noqa: F401 - registers the BabyAI ids
    # mix=add: the wrapper passes the env's reward on (the judge's part is added later, by the vector wrapper)
    config = RewardConfig(source="llm", when="episode", mix="add",
                          llm=LLMConfig(url="http://127.0.0.1:9/v1", model="stub"))
    env = LanguageReward(gym.make(env_id), config)
    env.action_space.seed(0)
    outcomes = []
    for episode in range(150):
        _, reward, info = random_episode(env, seed=episode)
        outcomes.append((reward > 0, strict(*info["reward/query"]) == "yes"))
    successes = sum(success for success, _ in outcomes)
    assert 5 <= successes <= 145  # both outcomes occur, so agreement means something
    assert all(success == judged for success, judged in outcomes)


# --------------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("overrides, message", [
    (["reward.source=llms"], "reward.source must be one of"),
    (["reward.source=fn"], "needs reward.fn"),
    (["reward.source=fn", "reward.fn=no_colon"], "must be module:callable"),
    (["reward.source=llm"], "needs reward.llm.model"),
    (["reward.source=llm", "reward.llm.model=m", "reward.llm.prompt=Did it? {instruction}"], "must use {description}"),
    (["reward.source=llm", "reward.llm.model=m", "reward.llm.max_concurrency=0"], "max_concurrency >= 1"),
    (["reward.llm.api_key=sk-1"], "unknown config key"),  # the key itself is never a setting
])
def test_bad_reward_settings_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config([], overrides)


def test_an_unimportable_fn_fails_before_training():
    from lit_dreamer.train import probe_env
    cfg = load_config(["debug"], ["reward.source=fn", "reward.fn=tests.reward_helpers:missing"])
    with pytest.raises(ConfigError, match="has no attribute 'missing'"):
        probe_env(cfg)


# --------------------------------------------------------------------------------------------------
# A CLI fit judged by the stub: the counters reach MLflow, the key reaches only the server


@pytest.mark.parametrize("env_overrides, prompt_has", [
    (["env.id=CartPole-v1", "reward.describe=tests.reward_helpers:cartpole_length"], "The pole stayed up for"),
    (["env.id=babyai/GoToObj", "env.time_limit=10"], "Instruction: go to the"),  # the built-in describer
], ids=["cartpole", "babyai"])
def test_a_fit_on_llm_rewards_logs_the_counts_and_leaks_no_key(stub, tmp_path, env_overrides, prompt_has):
    server = stub()
    key = "sk-lit-dreamer-test-5f3a9c1e"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", LIT_DREAMER_LLM_API_KEY=key,
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "lit_dreamer", "fit", "-c", "debug", f"run.dir={tmp_path / 'run'}",
               f"logger.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "run.steps=80", "run.prefill=40",
               "reward.source=llm", "reward.when=episode", f"reward.llm.url={server.url}", "reward.llm.model=stub",
               *env_overrides]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert server.requests and all(r["authorization"] == f"Bearer {key}" for r in server.requests)
    assert all(prompt_has in r["body"]["messages"][0]["content"] for r in server.requests)
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        metrics = dict(db.execute("select key, max(value) from metrics where key like 'reward/%' group by key"))
    # Every request of the run, prefill included, is counted (no retries: the stub always answers).
    assert metrics["reward/llm_calls"] == len(server.requests) and metrics["reward/llm_failures"] == 0
    assert "reward/llm_cache_hits" in metrics
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert any(path.suffix == ".ckpt" for path in files) and (tmp_path / "mlflow.db") in files
    leaks = [str(path) for path in files if key.encode() in path.read_bytes()]
    assert not leaks, f"the API key is in {leaks}"
    assert key not in proc.stdout + proc.stderr


def test_a_fit_on_fn_rewards_trains_on_them_and_evaluates_on_the_env_reward(in_tmp):
    """source=fn on CartPole: every replayed reward is the function's value for the observation it came with;
    evaluation keeps the env's own return (CartPole's 1 per step, so the return is the episode length)."""
    from lit_dreamer.replay import Replay
    from lit_dreamer.train import fit
    summary = fit(load_config(["debug"], [f"run.dir={in_tmp / 'run'}", "logger.backend=none", "run.steps=60",
                                          "run.prefill=30", "run.eval_every=60", "run.eval_episodes=2",
                                          "reward.source=fn", "reward.fn=tests.reward_helpers:upright"]))
    replay = Replay.load(os.path.join(os.path.dirname(summary["checkpoint"]), "replay-rank0"))
    data = {key: replay._data[key][:len(replay)][:, 0] for key in ("vector", "reward", "is_first")}
    later = ~data["is_first"]
    assert later.sum() > 40
    np.testing.assert_allclose(data["reward"][later], 1.0 - np.abs(data["vector"][later, 2]), rtol=1e-6)
    assert not np.allclose(data["reward"][later], 1.0)  # not CartPole's own reward
    assert summary["eval"]["return"] == summary["eval"]["length"]  # CartPole's 1 per step, not the function's


def test_an_env_without_a_description_names_reward_describe():
    config = RewardConfig(source="llm", when="episode", llm=LLMConfig(url="http://127.0.0.1:9/v1", model="stub"))
    env = LanguageReward(gym.make("CartPole-v1"), config)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="reward.describe=module:callable"):
        for _ in range(500):
            env.step(0)


def test_reward_stats_go_on_from_the_checkpointed_totals(stub):
    from lit_dreamer.callbacks.reward_stats import RewardStats
    server = stub()
    first = judge_for(server)
    first.score("go to the red ball", "You see a red ball.")  # before the fit: not this run's
    stats = RewardStats(first)
    stats.setup(None, None, "fit")
    first.score_many([("go to the red ball", "a"), ("go to the red ball", "a"), ("go to the red ball", "b")])
    saved = stats.state_dict()
    assert saved["totals"] == {"reward/llm_calls": 2.0, "reward/llm_failures": 0.0, "reward/llm_cache_hits": 1.0}
    resumed = RewardStats(judge_for(server))  # a new process: a fresh judge
    resumed.load_state_dict(saved)
    resumed.setup(None, None, "fit")
    resumed.judge.score("go to the red ball", "c")
    assert resumed.totals()["reward/llm_calls"] == 3.0
