"""model.one_hot_decoder=categorical: the vector keys an env declares one-hot are decoded with one softmax per
group (lit_dreamer.distributions.OneHotGroups) instead of DreamerV3's symlog squared error."""

import math
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from torch.testing import assert_close

from lit_dreamer.acting import Policy
from lit_dreamer.agent_config import AgentConfig, ModelConfig
from lit_dreamer.config import ConfigError, load_config
from lit_dreamer.distributions import OneHotGroups, SymlogMSE, group_table
from lit_dreamer.envs import DictObservation, make_env
from lit_dreamer.envs.adapters import ONE_HOT_METADATA_KEY
from lit_dreamer.module import DreamerModule
from lit_dreamer.train import env_info
from lit_dreamer.world_model import WorldModel
from tests.test_text_fit import script_module

LN2 = math.log(2.0)


# OneHotGroups: golden values

def two_groups() -> OneHotGroups:
    """Groups of widths 3 and 2: logits [0, 0, ln 2 | 1, 2]."""
    return OneHotGroups(torch.tensor([[0.0, 0.0, LN2, 1.0, 2.0]]), (3, 2))


def test_group_table_lays_out_each_groups_indices_padded_to_the_widest():
    index, valid = group_table((3, 1, 2))
    assert index.tolist() == [[0, 1, 2], [3, 0, 0], [4, 5, 0]]
    assert valid.tolist() == [[True, True, True], [True, False, False], [True, True, False]]


def test_one_hot_groups_loss_is_the_summed_cross_entropy_of_each_group():
    # Group 1: softmax(0, 0, ln 2) = (1/4, 1/4, 1/2); group 2: softmax(1, 2) = (1/(1+e), e/(1+e)).
    # Target (0, 0, 1 | 0, 1): -ln(1/2) - ln(e/(1+e)) = ln 2 + ln(1 + 1/e) = 1.00641...
    out = two_groups()
    target = torch.tensor([[0.0, 0.0, 1.0, 0.0, 1.0]])
    assert_close(out.loss(target), torch.tensor([LN2 + math.log(1 + math.exp(-1))]))
    assert_close(out.loss(torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.0]])),
                 torch.tensor([math.log(4.0) + math.log(1 + math.e)]))


def test_one_hot_groups_mean_mode_and_entropy():
    out = two_groups()
    p = 1 / (1 + math.e)
    assert_close(out.mean(), torch.tensor([[0.25, 0.25, 0.5, p, 1 - p]]))
    assert out.mode().tolist() == [[0.0, 0.0, 1.0, 0.0, 1.0]]
    entropy = (2 * 0.25 * math.log(4.0) + 0.5 * LN2) - (p * math.log(p) + (1 - p) * math.log(1 - p))
    assert_close(out.entropy(), torch.tensor([entropy]))


def test_one_hot_groups_samples_are_one_hot_per_group_at_the_softmax_frequencies():
    torch.manual_seed(0)
    out = OneHotGroups(torch.tensor([0.0, 0.0, LN2, 1.0, 2.0]).expand(20000, 5), (3, 2))
    draws = out.sample()
    assert draws[:, :3].sum(-1).eq(1).all() and draws[:, 3:].sum(-1).eq(1).all()
    assert_close(draws.mean(0), out.mean()[0], atol=0.015, rtol=0.0)


def test_one_hot_groups_gradient_is_probability_minus_target():
    logits = torch.tensor([[0.0, 0.0, LN2, 1.0, 2.0]], requires_grad=True)
    target = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0]])
    OneHotGroups(logits, (3, 2)).loss(target).sum().backward()
    p = 1 / (1 + math.e)
    assert_close(logits.grad, torch.tensor([[0.25, -0.75, 0.5, p - 1, 1 - p]]))


# What envs declare

class Fixed(gym.Env):
    action_space = spaces.Discrete(2)

    def __init__(self, observation_space):
        self.observation_space = observation_space

    def reset(self, *, seed=None, options=None):
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 0.0, False, False, {}


def test_discrete_and_multidiscrete_keys_are_declared_one_hot_and_multibinary_is_not():
    env = DictObservation(Fixed(spaces.Dict({
        "cue": spaces.Discrete(3, start=1), "cell": spaces.MultiDiscrete([2, 3]), "flags": spaces.MultiBinary(4),
        "pos": spaces.Box(-1, 1, (2,), np.float32)})))
    assert env.metadata[ONE_HOT_METADATA_KEY] == {"cue": [3], "cell": [2, 3]}


def test_minigrid_declares_every_cell_of_its_grid_and_the_direction():
    info = env_info(make_env("babyai/GoToLocal", seed=0))
    assert info.one_hot["direction"] == [4]
    assert info.one_hot["grid"] == [11, 6, 3] * 49
    assert "mission" not in info.one_hot


# The world model and what rebuilds it

SPEC = {"cue": ((3,), "float32"), "pos": ((2,), "float32")}


def tiny_model(**overrides) -> ModelConfig:
    return ModelConfig(size="size1m", **overrides)


def test_categorical_decodes_declared_keys_with_a_softmax_and_the_rest_as_before():
    wm = WorldModel(SPEC, 2, tiny_model(one_hot_decoder="categorical"), one_hot={"cue": [3]})
    outs = wm.decode(torch.zeros(2, 3, wm.rssm.feat_dim))
    assert isinstance(outs["cue"], OneHotGroups) and isinstance(outs["pos"], SymlogMSE)
    mse = WorldModel(SPEC, 2, tiny_model(), one_hot={"cue": [3]})  # the default: DreamerV3's squared error
    assert all(isinstance(out, SymlogMSE) for out in mse.decode(torch.zeros(2, 3, mse.rssm.feat_dim)).values())


def test_groups_that_do_not_add_up_to_the_key_are_named():
    with pytest.raises(ValueError, match=r"'cue' is declared one-hot with groups \[2, 2\].*width 3"):
        WorldModel(SPEC, 2, tiny_model(one_hot_decoder="categorical"), one_hot={"cue": [2, 2]})


def test_the_categorical_loss_trains_and_a_policy_rebuilds_it_from_the_checkpoint(tmp_path):
    cfg = AgentConfig(model=tiny_model(one_hot_decoder="categorical"))
    module = DreamerModule(SPEC, 2, True, cfg, one_hot={"cue": [3]})
    B, T = 2, 4
    cue = torch.nn.functional.one_hot(torch.randint(0, 3, (B, T)), 3).float()
    batch = {"cue": cue, "pos": torch.randn(B, T, 2), "action": torch.nn.functional.one_hot(
        torch.randint(0, 2, (B, T)), 2).float(), "reward": torch.zeros(B, T), "is_first": torch.zeros(B, T),
        "is_terminal": torch.zeros(B, T)}
    batch["is_first"][:, 0] = 1
    losses, _, _ = module.world_model.loss(batch)
    loss = losses["rec/cue"].mean()
    loss.backward()
    # A cross-entropy: at least ln(1) = 0 and near ln 3 per step from an untrained decoder.
    assert 0.5 < float(loss.detach()) < 2.0
    assert module.world_model.vector_decoder[-1].weight.grad[:3].abs().sum() > 0  # the cue's logits
    assert module.hparams["one_hot"] == {"cue": [3]}
    policy = Policy(dict(module.hparams))
    assert policy.world_model.one_hot == {"cue": (3,)}
    policy.load_state_dict({k: v for k, v in module.state_dict().items() if k.startswith(("world_model.",
                                                                                          "actor_critic."))})


def test_an_unknown_one_hot_decoder_is_a_config_error_naming_the_choices():
    with pytest.raises(ConfigError, match="unknown model.one_hot_decoder 'softmax'; choose one of mse, categorical"):
        load_config([], ["model.one_hot_decoder=softmax"])


def test_a_tiny_babyai_fit_with_the_categorical_decoder_through_the_cli(tmp_path, monkeypatch, capsys):
    import csv

    from lit_dreamer.__main__ import main
    from lit_dreamer.checkpoint_files import find_checkpoint
    from lit_dreamer.evaluation import load_module
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    code = main(["fit", "-c", "debug", "env.id=babyai/GoToObj", "model.one_hot_decoder=categorical",
                 f"run.dir={tmp_path}/run", "logger.backend=csv", "logger.log_checkpoints=none", "run.eval_every=0"])
    assert code == 0
    checkpoint = find_checkpoint(str(tmp_path / "run"))
    module, _ = load_module(checkpoint)
    assert module.world_model.one_hot == {"grid": (11, 6, 3) * 49, "direction": (4,)}
    with open(tmp_path / "run" / "csv" / "metrics.csv") as f:
        grid_losses = [float(row["loss/rec/grid"]) for row in csv.DictReader(f) if row.get("loss/rec/grid")]
    # 147 cross-entropies, in nats: a uniform decoder pays ln 11 + ln 6 + ln 3 = 5.08 per cell, 249 for the 49
    # cells; a freshly initialized one is not quite uniform, and 60 train steps hardly move it.
    uniform = 49 * math.log(11 * 6 * 3)
    assert grid_losses and all(0.5 * uniform < loss < 2 * uniform for loss in grid_losses)

    # scripts/diagnose_grid.py on the run's checkpoint and replay: every cell of every replayed step is counted.
    from lit_dreamer.replay import Replay
    from tests.test_text_fit import script_report
    replay = Replay.load(str(Path(checkpoint).parent / "replay-rank0"))
    report = script_report(script_module(monkeypatch, "diagnose_grid.py"), ["diagnose_grid.py", checkpoint],
                           capsys, monkeypatch)
    assert report["steps"] == len(replay)
    assert sum(block["cells"] for block in report["by_type"].values()) == 49 * len(replay)
    assert {"wall", "empty"} <= set(report["by_type"]) and report["objects"]["cells"] > 0
    for block in [*report["by_type"].values(), report["objects"], report["front"], report["carried"]]:
        assert block["cells"] == 0 or 0.0 <= block["type_accuracy"] <= 1.0
    # `facing`: every replayed step where the agent carries nothing and faces a key, ball or box, on one side.
    from minigrid.core.constants import OBJECT_TO_IDX
    diagnose = script_module(monkeypatch, "diagnose_grid.py")
    grids = torch.as_tensor(replay._data["grid"][:len(replay) // replay.num_envs]).flatten(0, 1).float()
    types, _ = diagnose.cells(grids, (11, 6, 3))
    faced = ((types[:, diagnose.CARRIED] == OBJECT_TO_IDX["empty"])
             & sum(types[:, diagnose.FRONT] == OBJECT_TO_IDX[kind] for kind in ("key", "ball", "box")).bool())
    assert report["facing"]["named"]["steps"] + report["facing"]["other"]["steps"] == int(faced.sum())
    for side in report["facing"].values():
        if side["steps"]:
            assert 0.0 <= side["p_pickup"] <= 1.0 and side["p_pickup_quartiles"] == sorted(side["p_pickup_quartiles"])
            assert 0.0 <= side["picked_up"] <= 1.0
    # scripts/probe_pickups.py: one row per terminal step of the replay, the true cell the replay's own.
    probe = script_module(monkeypatch, "probe_pickups.py")
    rows = probe.terminal_rows(module, replay)
    filled = len(replay) // replay.num_envs
    terminal = torch.as_tensor(replay._data["is_terminal"][:filled]).bool()
    assert int(terminal.sum()) > 0, "no episode ended in the tiny run: the probe's rows go unchecked"
    carried = torch.as_tensor(replay._data["grid"][:filled]).float().reshape(filled, replay.num_envs, 49, 20)
    reward = torch.as_tensor(replay._data["reward"][:filled])
    by_env = [int(terminal[:, env].sum()) for env in range(replay.num_envs)]
    torch.testing.assert_close(rows["true_cell"], torch.cat([carried[terminal[:, env], env, diagnose.CARRIED]
                                                             for env in range(replay.num_envs)]))
    torch.testing.assert_close(rows["right"], torch.cat([(reward[terminal[:, env], env] > 0).float()
                                                         for env in range(replay.num_envs)]))
    n, wm = sum(by_env), module.world_model
    assert rows["deter"].shape == (n, wm.rssm.deter_dim) and rows["decoded_grid"].shape == (n, 49 * 20)
    assert rows["probs"].shape == rows["sample"].shape and torch.allclose(
        rows["probs"].reshape(n, wm.rssm.stoch_dim, -1).sum(-1), torch.ones(n, wm.rssm.stoch_dim))
    assert rows["instruction"].shape[0] == n and rows["instruction"].shape[1] > 0  # the mission's encoding


def test_the_grid_diagnostic_reads_each_cells_type_and_colour_and_finds_the_cell_in_front(monkeypatch):
    diagnose = script_module(monkeypatch, "diagnose_grid.py")
    from minigrid.core.constants import COLOR_TO_IDX, OBJECT_TO_IDX
    env, seen, rng = make_env("babyai/GoToLocal", seed=0), set(), np.random.default_rng(0)
    observation, _ = env.reset(seed=0)
    for step in range(300):  # turning and walking at random, as the replay's early policy does
        types, colours = diagnose.cells(torch.as_tensor(observation["grid"])[None], (11, 6, 3))
        inner = env.unwrapped
        cell = inner.grid.get(*inner.front_pos)  # what minigrid itself says stands in front of the agent
        expected = ("empty", "red") if cell is None else (cell.type, cell.color)
        assert (int(types[0, diagnose.FRONT]), int(colours[0, diagnose.FRONT])) == (
            OBJECT_TO_IDX[expected[0]], COLOR_TO_IDX[expected[1]]), f"step {step}"
        seen.add(expected[0])
        observation, _, terminated, truncated, _ = env.step(int(rng.integers(3)))  # left, right, forward
        if terminated or truncated:
            observation, _ = env.reset()
    assert seen & {"key", "ball", "box"}, f"no object in front of the agent in 300 steps: {seen}"
    # Golden values: a cell of widths (2, 3, 1) holding entries (1, 2, 0), decoded or one-hot alike.
    decoded = torch.tensor([[0.1, 0.9, 0.2, 0.3, 0.5, 1.0]])
    assert [t.tolist() for t in diagnose.cells(decoded, (2, 3, 1))] == [[[1]], [[2]]]


def test_the_grid_diagnostic_finds_what_the_agent_carries_in_its_own_cell(monkeypatch):
    diagnose = script_module(monkeypatch, "diagnose_grid.py")
    from minigrid.core.constants import COLOR_TO_IDX, OBJECT_TO_IDX
    env, carried, rng = make_env("babyai/GoToLocal", seed=0), set(), np.random.default_rng(1)
    observation, _ = env.reset(seed=0)
    for step in range(600):  # left, right, forward, pick up, drop: GoToLocal does not end at a pickup
        types, colours = diagnose.cells(torch.as_tensor(observation["grid"])[None], (11, 6, 3))
        held = env.unwrapped.carrying  # what minigrid itself says the agent carries
        expected = ((OBJECT_TO_IDX["empty"], None) if held is None
                    else (OBJECT_TO_IDX[held.type], COLOR_TO_IDX[held.color]))
        assert int(types[0, diagnose.CARRIED]) == expected[0], f"step {step}"
        if held is not None:
            assert int(colours[0, diagnose.CARRIED]) == expected[1], f"step {step}"
            carried.add(held.type)
        observation, _, terminated, truncated, _ = env.step(int(rng.integers(5)))
        if terminated or truncated:
            observation, _ = env.reset()
    assert carried, "the agent carried nothing in 600 random steps"


def test_the_grid_diagnostic_names_the_object_a_pickup_level_pays_for(monkeypatch):
    # The `facing` block's rule against BabyAI's own verifier: in PickupDist a pickup succeeds exactly when the
    # object in front is the one the instruction names (any other ends the episode unpaid).
    diagnose = script_module(monkeypatch, "diagnose_grid.py")
    from minigrid.core.actions import Actions
    from minigrid.core.constants import COLOR_TO_IDX
    from lit_dreamer.envs.text import tokenize
    assert diagnose.PICKUP == int(Actions.pickup)
    env, rng, outcomes = make_env("babyai/PickupDistDebug", seed=0), np.random.default_rng(2), []
    observation, _ = env.reset(seed=0)
    while len(outcomes) < 60:
        inner = env.unwrapped
        cell = inner.grid.get(*inner.front_pos)
        facing = cell is not None and cell.type in diagnose.PICKABLE
        action = int(Actions.pickup) if facing and rng.random() < 0.5 else int(rng.integers(3))
        named = facing and diagnose.names_object(tokenize(inner.mission), cell.type, cell.color, list(COLOR_TO_IDX))
        observation, reward, terminated, truncated, _ = env.step(action)
        if action == int(Actions.pickup):
            outcomes.append((named, reward > 0))
            assert terminated and named == (reward > 0), f"{inner.mission!r}, picked up a {cell.color} {cell.type}"
        if terminated or truncated:
            observation, _ = env.reset()
    assert {named for named, _ in outcomes} == {True, False}, "the random pickups met only one kind of object"
    # Golden values of the real return: an episode that ends (paid 1 at step 2), then one cut at the
    # stream's end; gamma 0.5; each step stores the reward of the action that led to it.
    returns = diagnose.stream_returns(torch.tensor([0.0, 0.0, 1.0, 0.0, 2.0, 4.0]), torch.tensor([1, 0, 0, 1, 0, 0]),
                                      0.5)
    assert returns.tolist() == [0.5, 1.0, 0.0, 4.0, 4.0, 0.0]
    # Golden values: colour and kind words both count; "object" names any kind.
    colours = list(COLOR_TO_IDX)
    assert diagnose.names_object(["pick", "up", "a", "ball"], "ball", "red", colours)
    assert not diagnose.names_object(["pick", "up", "the", "green", "ball"], "ball", "red", colours)
    assert diagnose.names_object(["pick", "up", "a", "purple", "object"], "key", "purple", colours)
    assert not diagnose.names_object(["pick", "up", "the", "red", "key"], "box", "red", colours)
