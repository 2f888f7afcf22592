"""Resume, branch, and nothing-to-do starts, through the real CLI on debug-sized runs (see test_system.py).

The three documented forms: `fit --resume RUN_DIR`, `fit ckpt_path=last run.dir=RUN_DIR`, and
`fit ckpt_path=PATH run.dir=NEW` (a branch). A checkpoint carries its run config and MLflow run id.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.test_system import (all_runs, cli, collector_state, explain, fit_cli, fit_in_process, history,
                               in_tmp, load_ckpt, only_run, run_args, tracking_uri)

__all__ = ["in_tmp"]  # a fixture, imported for the tests below

STEPS, PREFILL = 40, 20


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run that reached run.steps, made by the real CLI; tests work on copies of it."""
    root = tmp_path_factory.mktemp("finished")
    proc = fit_cli(root, f"run.steps={STEPS}", f"run.prefill={PREFILL}")
    assert proc.returncode == 0, explain(proc)
    return root


def copy_run(source: Path, target: Path) -> None:
    shutil.copytree(source / "run", target / "run", symlinks=True)
    shutil.copy(source / "mlflow.db", target / "mlflow.db")


def step_folders(root: Path) -> list[str]:
    return sorted(n for n in os.listdir(root / "run" / "checkpoints") if n.startswith("step-"))


def state_of(root: Path) -> tuple:
    """Step folders, checkpoint counters and the MLflow run's status and last logged env step."""
    ckpt = load_ckpt(root / "run" / "checkpoints" / "last" / "model.ckpt")
    run = only_run(root)
    steps = [m.value for m in history(root, run.info.run_id, "train/env_steps")]
    return (step_folders(root), collector_state(ckpt)["env_steps"], int(ckpt["state_dict"]["train_steps"]),
            run.info.status, len(steps), max(steps))


# --------------------------------------------------------------------------------------------------
# Item 1: a finished or over-budget checkpoint does nothing, says so, exits 0


@pytest.mark.timeout(400)
def test_relaunching_a_finished_run_does_nothing(finished_run, tmp_path):
    copy_run(finished_run, tmp_path)
    before = state_of(tmp_path)
    assert before[:3] == ([f"step-{STEPS:012d}"], STEPS, STEPS - PREFILL)
    for overrides in ([f"run.steps={STEPS}", "ckpt_path=last"], [f"run.steps={STEPS}", "ckpt_path=last"],
                      [f"run.steps={STEPS - 10}", "ckpt_path=last"]):
        proc = fit_cli(tmp_path, f"run.prefill={PREFILL}", *overrides)
        assert proc.returncode == 0, explain(proc)
        assert "nothing to do: " in proc.stdout and f"already holds {STEPS} env steps" in proc.stdout, explain(proc)
        assert state_of(tmp_path) == before  # no step-* folder, no counter, no MLflow point or status change


@pytest.mark.timeout(300)
def test_a_finished_two_env_run_logs_no_training_step_on_relaunch(in_tmp):
    # Every training step logged (run.log_every=1): a relaunch that trained even one step would add a point.
    overrides = ("env.num_envs=2", f"run.steps={STEPS}", f"run.prefill={PREFILL}", "run.log_every=1")
    first = fit_in_process(in_tmp, *overrides)
    run_id = first["mlflow_run_id"]
    losses = len(history(in_tmp, run_id, "loss/dyn"))
    again = fit_in_process(in_tmp, *overrides, "ckpt_path=last")
    assert again["nothing_to_do"] and again["train_steps"] == first["train_steps"]
    assert len(history(in_tmp, run_id, "loss/dyn")) == losses  # no training step the checkpoint does not hold
    ckpt = load_ckpt(in_tmp / "run" / "checkpoints" / "last" / "model.ckpt")
    assert int(ckpt["state_dict"]["train_steps"]) == first["train_steps"]


# --------------------------------------------------------------------------------------------------
# Item 2: the three forms, and a used run.dir refused


@pytest.mark.timeout(300)
def test_resume_from_the_run_folder_restores_its_config(finished_run, tmp_path):
    copy_run(finished_run, tmp_path)
    run_a = only_run(tmp_path)
    # No -c debug: the debug model and batch shape come from the checkpoint. (The copy logs to its own
    # copy of the MLflow database.)
    proc = cli(tmp_path, "fit", "--resume", "run", f"run.steps={STEPS + 10}",
               f"logger.tracking_uri={tracking_uri(tmp_path)}")
    assert proc.returncode == 0, explain(proc)
    listed = proc.stdout.split("config changes against the checkpoint's:\n")[1].split("\n")
    changes = [line.strip() for line in listed[:3] if line.startswith("  ")]
    # The changes, listed, and nothing else.
    assert changes == [f"logger.tracking_uri: {tracking_uri(finished_run)!r} -> {tracking_uri(tmp_path)!r}",
                       f"run.steps: {STEPS} -> {STEPS + 10}"], proc.stdout
    run = only_run(tmp_path)
    assert run.info.run_id == run_a.info.run_id and run.info.status == "FINISHED"
    assert step_folders(tmp_path)[-1] == f"step-{STEPS + 10:012d}"
    ckpt = load_ckpt(tmp_path / "run" / "checkpoints" / "last" / "model.ckpt")
    assert int(ckpt["state_dict"]["train_steps"]) == STEPS + 10 - PREFILL
    assert ckpt["lit_dreamer"]["config"]["run"]["steps"] == STEPS + 10  # the config it ran with
    assert ckpt["lit_dreamer"]["mlflow_run_id"] == run.info.run_id


def test_resume_refuses_a_model_change_and_a_run_dir_override(finished_run, in_tmp, capsys):
    from lit_dreamer.__main__ import main
    copy_run(finished_run, in_tmp)
    uri = f"logger.tracking_uri={tracking_uri(in_tmp)}"
    assert main(["fit", "--resume", "run", "model.deter=32", f"run.steps={STEPS + 10}", uri]) == 2
    assert "model.deter: checkpoint 64 vs requested 32" in capsys.readouterr().err
    assert main(["fit", "--resume", "run", "run.dir=elsewhere"]) == 2
    assert "ckpt_path=run run.dir=NEW_DIR" in capsys.readouterr().err
    assert main(["fit", "--resume", "nothing_here"]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert step_folders(in_tmp) == [f"step-{STEPS:012d}"] and not os.path.exists("elsewhere")


def test_a_run_dir_holding_checkpoints_is_not_reused_without_resuming(finished_run, in_tmp, capsys):
    from lit_dreamer.__main__ import main
    copy_run(finished_run, in_tmp)
    other = shutil.copytree(in_tmp / "run", in_tmp / "other", symlinks=True)
    for extra in ([], [f"ckpt_path={other}"]):  # a new run, or a branch of another run, into the used folder
        assert main(["fit", *run_args(in_tmp, f"run.steps={STEPS + 10}", *extra)]) == 2
        err = capsys.readouterr().err
        assert "already holds the checkpoints of a run" in err and "--resume" in err and "another run.dir" in err
    assert step_folders(in_tmp) == [f"step-{STEPS:012d}"] and len(all_runs(in_tmp)) == 1


@pytest.mark.timeout(300)
def test_a_run_folder_or_a_copied_model_ckpt_is_a_branch(finished_run, tmp_path):
    shutil.copy(finished_run / "mlflow.db", tmp_path / "mlflow.db")
    run_a = only_run(tmp_path)
    step = shutil.copytree(finished_run / "run" / "checkpoints" / "last", tmp_path / "copied")
    copied = step / "model.ckpt"
    for source, folder in ((finished_run / "run", "b1"), (copied, "b2")):
        proc = cli(tmp_path, "fit", "-c", "debug", f"ckpt_path={source}", f"run.dir={folder}",
                   f"logger.tracking_uri={tracking_uri(tmp_path)}", f"run.steps={STEPS + 2}", f"run.prefill={PREFILL}")
        assert proc.returncode == 0, explain(proc)
        assert "branching into a new run from" in proc.stdout
        ckpt = load_ckpt(tmp_path / folder / "checkpoints" / "last" / "model.ckpt")
        assert collector_state(ckpt)["env_steps"] == STEPS + 2
    runs = all_runs(tmp_path)
    assert len(runs) == 3 and sum(r.info.run_id == run_a.info.run_id for r in runs) == 1
    assert sorted(r.data.tags.get("resumed_from", "") for r in runs)[1:] == sorted(
        [os.path.realpath(finished_run / "run" / "checkpoints" / "last" / "model.ckpt"), str(copied)])


# --------------------------------------------------------------------------------------------------
# Item 3: a dangling `last` points to the newest complete step-*


def copy_with_a_dangling_last(finished_run, root):
    """A copy of the finished run whose `last` points to a save killed before its model.ckpt."""
    copy_run(finished_run, root)
    checkpoints = root / "run" / "checkpoints"
    (checkpoints / "last").unlink()
    (checkpoints / "step-000000000099").mkdir()
    (checkpoints / "last").symlink_to("step-000000000099")
    return checkpoints


def test_a_dangling_last_names_the_newest_complete_checkpoint(finished_run, in_tmp, capsys):
    from lit_dreamer.__main__ import main
    checkpoints = copy_with_a_dangling_last(finished_run, in_tmp)
    complete = checkpoints / f"step-{STEPS:012d}" / "model.ckpt"
    for args in (run_args(in_tmp, "ckpt_path=last"), run_args(in_tmp, f"ckpt_path={in_tmp / 'run'}"),
                 ["--resume", str(in_tmp / "run")]):
        assert main(["fit", *args]) == 2
        err = capsys.readouterr().err
        assert "holds no complete checkpoint" in err and f"ckpt_path={complete}" in err, err
    assert main(["eval", "--ckpt", str(in_tmp / "run")]) == 2
    assert f"ckpt_path={complete}" in capsys.readouterr().err


def test_a_dangling_last_never_points_to_a_damaged_checkpoint(finished_run, in_tmp, capsys):
    from lit_dreamer.__main__ import main
    checkpoints = copy_with_a_dangling_last(finished_run, in_tmp)
    (checkpoints / f"step-{STEPS:012d}" / "collector-rank0.json").unlink()  # the only other one is damaged
    assert main(["fit", *run_args(in_tmp, "ckpt_path=last")]) == 2
    err = capsys.readouterr().err
    assert "holds no complete checkpoint" in err and "ckpt_path=" not in err.split("holds no complete checkpoint")[1], err


# --------------------------------------------------------------------------------------------------
# Item 4: eval of a copied model.ckpt reads the config and run id the checkpoint carries


@pytest.mark.timeout(300)
def test_eval_of_a_copied_checkpoint_ignores_the_folders_around_it(finished_run, tmp_path):
    shutil.copy(finished_run / "mlflow.db", tmp_path / "mlflow.db")
    run_a = only_run(tmp_path)
    # Three folders up from the copy: an unrelated run's config (another env) and MLflow run id.
    decoy = tmp_path / "decoy"
    (decoy / "a" / "b").mkdir(parents=True)
    (decoy / "config.yaml").write_text("env:\n  id: Pendulum-v1\n")
    (decoy / "mlflow_run_id").write_text("0123456789abcdef")
    copied = decoy / "a" / "b" / "model.ckpt"
    shutil.copy(finished_run / "run" / "checkpoints" / "last" / "model.ckpt", copied)
    proc = cli(tmp_path, "eval", "--ckpt", str(copied), "episodes=2", f"tracking_uri={tracking_uri(tmp_path)}")
    assert proc.returncode == 0, explain(proc)
    assert "CartPole-v1: 2 episodes" in proc.stdout
    eval_run = next(r for r in all_runs(tmp_path) if r.data.tags.get("lit_dreamer.kind") == "eval")
    assert eval_run.data.tags["mlflow.parentRunId"] == run_a.info.run_id


def test_an_older_checkpoint_uses_its_run_folder_only_where_it_really_sits(finished_run, in_tmp, capsys):
    from lit_dreamer.evaluation import load_checkpoint
    from lit_dreamer.resume import RECORD_KEY
    copy_run(finished_run, in_tmp)
    last = in_tmp / "run" / "checkpoints" / "last" / "model.ckpt"
    ckpt = load_ckpt(last)
    del ckpt[RECORD_KEY]  # as checkpoints were written before they carried their config
    torch.save(ckpt, last)
    _, cfg, run_id = load_checkpoint(str(last))
    assert cfg.env.id == "CartPole-v1" and run_id == only_run(in_tmp).info.run_id
    (in_tmp / "x" / "y").mkdir(parents=True)
    shutil.copy(last, in_tmp / "x" / "y" / "model.ckpt")
    shutil.copy(in_tmp / "run" / "config.yaml", in_tmp / "config.yaml")  # three folders up: not its run
    from lit_dreamer.__main__ import main
    assert main(["eval", "--ckpt", str(in_tmp / "x" / "y" / "model.ckpt")]) == 2
    assert "carries no config" in capsys.readouterr().err


def test_a_bare_model_ckpt_cannot_be_trained_from(finished_run, in_tmp, capsys):
    from lit_dreamer.__main__ import main
    copied = in_tmp / "model.ckpt"
    shutil.copy(finished_run / "run" / "checkpoints" / "last" / "model.ckpt", copied)
    assert main(["fit", *run_args(in_tmp, f"ckpt_path={copied}", f"run.steps={STEPS + 10}")]) == 2
    assert "has no replay beside it" in capsys.readouterr().err and all_runs(in_tmp) == []
