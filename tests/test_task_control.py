"""scripts/task_control.py: the cross matrix of a multi-task checkpoint and the zeroed-task control (issue 22).

The script's logic needs no trained agent: each test saves a freshly built two-task DreamerModule the way a
run's checkpoints carry it (hyperparameters, state dict, the run record with config and task table).
"""

import csv
import json
import sys

import pytest
import torch

from lit_dreamer.config import ConfigError, load_config, task_names
from lit_dreamer.evaluation import load_module, task_episodes
from lit_dreamer.module import DreamerModule
from lit_dreamer.resume import run_record
from lit_dreamer.train import probe_env
from tests.test_examples import REPO, load_script

POINT = "lit_dreamer/PointGoal-{}-v0"
EPISODES, SEED = 2, 7


def save_checkpoint(folder, overrides: list[str]) -> str:
    """A fresh module of the debug config saved at folder/run/checkpoints/step-000000/model.ckpt."""
    cfg = load_config(["debug"], overrides)
    info, tasks = probe_env(cfg), task_names(cfg)
    torch.manual_seed(0)
    module = DreamerModule(info.obs_spec, info.action_dim, info.discrete, cfg.agent(), num_tasks=len(tasks),
                           task_names=tasks)
    checkpoint = {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}
    run_record(cfg).on_save_checkpoint(None, module, checkpoint)  # no trainer: no MLflow run id
    path = folder / "run" / "checkpoints" / "step-000000" / "model.ckpt"
    path.parent.mkdir(parents=True)
    torch.save(checkpoint, path)
    return str(path)


def two_tasks(mode: str) -> list[str]:
    return [f"env.tasks=[{POINT.format(0)},{POINT.format(1)}]", f"multitask.conditioning={mode}"]


@pytest.fixture
def script(monkeypatch, capsys):
    """Run the script's main with these arguments in this process; (printed lines, the final JSON line)."""
    def run(*args: str):
        monkeypatch.setattr(sys, "argv", ["task_control.py", *args])
        monkeypatch.syspath_prepend(str(REPO / "scripts"))
        threads = torch.get_num_threads()
        try:
            load_script("task_control.py").main()
        finally:
            torch.set_num_threads(threads)  # main pins one thread for the process
        lines = capsys.readouterr().out.splitlines()
        return lines, json.loads(lines[-1])
    return run


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_embedding_checkpoint_gets_its_cross_matrix_and_zeroed_control(tmp_path, script):
    ckpt = save_checkpoint(tmp_path, two_tasks("embedding"))
    lines, result = script(ckpt, "--episodes", str(EPISODES), "--seed", str(SEED))
    tasks = [POINT.format(0), POINT.format(1)]
    assert result["tasks"] == tasks and result["conditioning"] == "embedding"
    assert len(result["matrix"]) == 2 and all(len(row) == 2 for row in result["matrix"])
    # A cell is real episodes: task 1's env with the policy acting for task 0, as the eval code plays it.
    module, cfg = load_module(ckpt)
    torch.manual_seed(SEED)
    direct = task_episodes(module, tasks[1], EPISODES, seed=SEED, index=1, mode="mode", policy=0,
                           **cfg.env.make_kwargs())
    assert result["matrix"][1][0] == direct.summary()["return"]
    assert result["matrix_std"][1][0] == direct.summary()["return_std"]
    for k, task in enumerate(tasks):
        row = result["per_task"][task]
        assert row["own"] == result["matrix"][k][k] and row["off"] == result["matrix"][k][1 - k]
        assert row["task_average"] == pytest.approx(sum(result["matrix"][k]) / 2)
        assert row["zeroed"] == result["zeroed"][k]
        assert row["zeroed_within_average"] == (row["zeroed"] <= row["task_average"] + row["tolerance"])
    assert result["summary"]["mean_zeroed"] == pytest.approx(sum(result["zeroed"]) / 2)
    # The CSV sits in the run folder: per task one row per policy of the table and one zeroed.
    assert result["csv"] == str(tmp_path / "run" / "task_control.csv")
    rows = read_csv(result["csv"])
    assert list(rows[0]) == ["task", "policy", "episodes", "return", "return_std"]
    assert [(r["task"], r["policy"]) for r in rows] == [(t, p) for t in tasks for p in (*tasks, "zeroed")]
    assert all(int(r["episodes"]) == EPISODES for r in rows)
    assert float(rows[2]["return"]) == pytest.approx(result["zeroed"][0])
    assert any("zeroed <= task average + 1 SE on every task" in line for line in lines)


def test_zeroing_the_task_input_zeroes_only_a_copy_of_the_actors_task_vectors(tmp_path):
    control = load_script("task_control.py")
    module, _ = load_module(save_checkpoint(tmp_path, two_tasks("embedding")))
    before = {name: value.clone() for name, value in module.state_dict().items()}
    zeroed = control.zeroed_task_input(module)
    for name, value in module.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} of the original module changed"
    feat = torch.randn(4, module.world_model.rssm.feat_dim)
    task = torch.tensor([0, 1, 0, 1])
    actor = module.actor_critic.actor
    # What an actor given a zero task vector computes, built from the original's trunk and output layer.
    by_hand = actor.net.out(actor.net.trunk(torch.cat([feat, torch.zeros(4, module.cond.embed_dim)], -1)))
    with torch.no_grad():
        assert torch.allclose(zeroed.actor_critic.actor(feat, task), by_hand)
        assert not torch.allclose(actor(feat, task), by_hand)
    # Only the actor reads zeros: the critics and the reward head keep their task vectors.
    changed = [n for n, v in zeroed.state_dict().items() if not torch.equal(v, before[n])]
    assert changed == ["actor_critic.actor.net.embedding.rows"]


def test_heads_checkpoint_reports_the_zeroed_control_as_not_applicable(tmp_path, script):
    ckpt = save_checkpoint(tmp_path, two_tasks("heads"))
    out = tmp_path / "control.csv"
    lines, result = script(str(tmp_path / "run" / "checkpoints" / "step-000000"), "--episodes", "1",
                           "--out", str(out))
    assert result["zeroed"] is None and result["summary"]["mean_zeroed"] is None
    assert result["summary"]["zeroed_within_average"] is None
    assert len(result["matrix"]) == 2 and all(len(row) == 2 for row in result["matrix"])
    assert result["checkpoint"] == ckpt and result["csv"] == str(out)
    assert any("not applicable" in line for line in lines)
    assert [r["policy"] for r in read_csv(str(out))] == [POINT.format(0), POINT.format(1)] * 2


def test_a_one_task_checkpoint_is_refused(tmp_path):
    control = load_script("task_control.py")
    ckpt = save_checkpoint(tmp_path, [f"env.id={POINT.format(0)}"])
    with pytest.raises(ConfigError, match="needs a multi-task checkpoint"):
        control.task_control(ckpt, episodes=1)
