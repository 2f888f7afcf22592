"""Damaged, missing and leftover checkpoint files; the checkpoint cadence and the disk-space pre-check.

One tiny run makes two complete checkpoints (step-41 and step-45); each damage test breaks a copy of
it and resumes: the CLI must stop with `error:` (exit 2), name the file, say the checkpoint is
damaged, point to the older complete step-41, and write nothing.
"""

import errno
import logging
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lit_dreamer.config import load_config
from lit_dreamer.replay import Replay
from lit_dreamer.train import fit

LAST, OLDER = "step-000000000045", "step-000000000041"


def config(root, *overrides):
    return load_config(["debug"], [f"run.dir={root}/run", f"logger.tracking_uri=sqlite:///{root}/mlflow.db",
                                   *overrides])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished run with checkpoints at 41 and 45 env steps (the newest two of four saves)."""
    root = tmp_path_factory.mktemp("finished")
    cwd, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(root)
    torch.set_num_threads(1)
    try:
        fit(config(root, "run.steps=45", "run.prefill=20", "run.checkpoint_every=10", "logger.run_name=finished"))
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    return root


@pytest.fixture
def run_copy(finished_run, in_tmp):
    """A copy of the finished run with its MLflow store, so that a resume finds its MLflow run."""
    shutil.copytree(finished_run / "run", in_tmp / "run", symlinks=True)
    shutil.copy(finished_run / "mlflow.db", in_tmp / "mlflow.db")
    return in_tmp / "run"


def files_of(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def contents_of(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def object_array(path):
    np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)


def data_file(snapshot, name="reward"):
    return next(snapshot.glob(f"data-*-{name}.npy"))


DAMAGES = {
    "missing meta.json": (lambda d: (d / "replay-rank0" / "meta.json").unlink(), "replay-rank0/meta.json", "missing"),
    "truncated meta.json": (lambda d: truncate(d / "replay-rank0" / "meta.json"), "replay-rank0/meta.json",
                            "cannot be read"),
    "missing shard": (lambda d: data_file(d / "replay-rank0").unlink(), "-reward.npy", "is missing"),
    "truncated shard": (lambda d: truncate(data_file(d / "replay-rank0", "vector")), "-vector.npy", "truncated"),
    "object-dtype shard": (lambda d: object_array(data_file(d / "replay-rank0")), "-reward.npy", "object"),
    "missing replay folder": (lambda d: shutil.rmtree(d / "replay-rank0"), "replay-rank0", "missing"),
    "missing collector state": (lambda d: (d / "collector-rank0.json").unlink(), "collector-rank0.json",
                                "counters and RNG would silently start from zero"),
    "zeroed model.ckpt": (lambda d: (d / "model.ckpt").write_bytes(bytes((d / "model.ckpt").stat().st_size)),
                          "model.ckpt", "empty or corrupt"),
    "empty model.ckpt": (lambda d: (d / "model.ckpt").write_bytes(b""), "model.ckpt", "empty or corrupt"),
    "truncated model.ckpt": (lambda d: truncate(d / "model.ckpt"), "model.ckpt", "empty or corrupt"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_checkpoint_is_refused_naming_the_file_and_the_older_complete_one(run_copy, in_tmp, capsys,
                                                                                     damage):
    from lit_dreamer.__main__ import main
    apply, file, problem = DAMAGES[damage]
    apply(run_copy / "checkpoints" / LAST)
    before = contents_of(in_tmp)
    code = main(["fit", "-c", "debug", f"run.dir={run_copy}", f"logger.tracking_uri=sqlite:///{in_tmp}/mlflow.db",
                 "run.steps=60", "run.prefill=20", "ckpt_path=last"])
    err = capsys.readouterr().err
    assert code == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: ") and file in line and problem in line, line
    assert f"checkpoint {run_copy / 'checkpoints' / LAST} is damaged" in line
    assert f"ckpt_path={run_copy / 'checkpoints' / OLDER / 'model.ckpt'}" in line  # a hint, not a fallback
    assert contents_of(in_tmp) == before  # nothing written: no checkpoint, no MLflow run or status change


def test_a_damaged_checkpoint_with_no_older_complete_one_says_so(run_copy, capsys):
    from lit_dreamer.checkpoint_files import damaged
    (run_copy / "checkpoints" / OLDER / "collector-rank0.json").unlink()
    message = str(damaged(str(run_copy / "checkpoints" / LAST / "model.ckpt"), "is empty or corrupt (0 bytes)"))
    assert f"no older complete checkpoint is in {run_copy / 'checkpoints'}" in message


@pytest.mark.parametrize("damage", ["zeroed model.ckpt", "empty model.ckpt"])
def test_eval_on_an_empty_or_corrupt_checkpoint_says_so(run_copy, in_tmp, capsys, damage):
    from lit_dreamer.__main__ import main
    DAMAGES[damage][0](run_copy / "checkpoints" / LAST)
    path = run_copy / "checkpoints" / LAST / "model.ckpt"
    code = main(["eval", "--ckpt", str(path), f"tracking_uri=sqlite:///{in_tmp}/mlflow.db"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and f"{path} is empty or corrupt" in err and OLDER in err


def test_the_collector_refuses_a_checkpoint_without_its_state_file(run_copy):
    """Without the fit-level check (a script's own Trainer), the collector still never resets its counters."""
    from lit_dreamer.callbacks.env_collector import EnvCollector
    (run_copy / "checkpoints" / LAST / "collector-rank0.json").unlink()
    collector = EnvCollector("CartPole-v1")
    trainer = SimpleNamespace(ckpt_path=str(run_copy / "checkpoints" / LAST / "model.ckpt"),
                              datamodule=SimpleNamespace(load_replay=lambda path: None))
    with pytest.raises(FileNotFoundError, match="collector-rank0.json"):
        collector.restore_replay(trainer)


def test_the_checkpoint_callback_checks_its_rank_s_files_when_lightning_restores(run_copy):
    from lit_dreamer.callbacks.checkpoint import DreamerCheckpoint
    from lit_dreamer.config import ConfigError
    truncate(data_file(run_copy / "checkpoints" / LAST / "replay-rank0", "action"))
    trainer = SimpleNamespace(ckpt_path=str(run_copy / "checkpoints" / LAST / "model.ckpt"), global_rank=0)
    with pytest.raises(ConfigError, match=r"-action\.npy is truncated"):
        DreamerCheckpoint(str(run_copy / "checkpoints")).on_load_checkpoint(trainer, None, {})


def test_replay_load_names_a_damaged_file(run_copy):
    from lit_dreamer.replay import ReplaySnapshotError
    snapshot = run_copy / "checkpoints" / LAST / "replay-rank0"
    object_array(data_file(snapshot))
    with pytest.raises(ReplaySnapshotError, match=r"-reward\.npy holds Python objects"):
        Replay.load(str(snapshot))


def test_leftovers_of_killed_saves_are_removed_at_start(run_copy):
    from lit_dreamer.callbacks.checkpoint import DreamerCheckpoint
    checkpoints = run_copy / "checkpoints"
    complete = files_of(checkpoints)
    step = checkpoints / LAST
    shutil.copytree(step / "replay-rank0", step / "replay-rank0.tmp-999999")
    (step / "model.ckpt.tmp").write_bytes(b"partial")
    (step / "collector-rank0.json.tmp-999999").write_text("{")
    os.symlink(LAST, checkpoints / ".last-999999")
    callback = DreamerCheckpoint(str(checkpoints))
    callback.setup(SimpleNamespace(local_rank=0), None, "fit")
    assert files_of(checkpoints) == complete
    assert os.path.realpath(checkpoints / "last") == str(step)


def test_checkpoint_every_0_saves_only_at_the_end_and_a_small_disk_is_enough(in_tmp, monkeypatch, caplog):
    import lit_dreamer.callbacks.checkpoint as checkpoint
    monkeypatch.setattr(checkpoint, "free_bytes", lambda path: 8 << 20)  # 8 MiB free
    summary = fit(config(in_tmp, "run.steps=45", "run.prefill=20", "run.checkpoint_every=0"))
    folders = sorted(p.name for p in (in_tmp / "run" / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert folders == [LAST]  # no periodic save; the one at the end fits on the small disk
    assert summary["checkpoint"] == os.path.realpath(in_tmp / "run" / "checkpoints" / LAST / "model.ckpt")
    size = sum(p.stat().st_size for p in (in_tmp / "run" / "checkpoints" / LAST).rglob("*") if p.is_file())
    assert size < 1 << 20
    assert not [r for r in caplog.records if r.name == "lit_dreamer.callbacks.checkpoint" and r.levelno >= logging.WARNING]


def test_the_size_estimate_bounds_the_files_a_save_writes(finished_run):
    from lit_dreamer.callbacks.checkpoint import model_checkpoint_nbytes
    from lit_dreamer.evaluation import load_module
    step = finished_run / "run" / "checkpoints" / LAST
    module, _ = load_module(str(step / "model.ckpt"))
    optimizers = module.configure_optimizers()  # not stepped yet: their moments are estimated
    actual = (step / "model.ckpt").stat().st_size
    assert actual <= model_checkpoint_nbytes(module, optimizers) <= 1.2 * actual + (128 << 10)
    replay = Replay.load(str(step / "replay-rank0"))
    on_disk = sum(p.stat().st_size for p in (step / "replay-rank0").iterdir())
    assert on_disk <= replay.snapshot_nbytes <= on_disk + 4096 * len(list((step / "replay-rank0").iterdir())) + (64 << 10)


def test_the_pre_check_refuses_a_disk_too_small_for_the_estimate(finished_run):
    from lit_dreamer.callbacks.checkpoint import DreamerCheckpoint, model_checkpoint_nbytes
    from lit_dreamer.evaluation import load_module
    import lit_dreamer.callbacks.checkpoint as checkpoint
    step = finished_run / "run" / "checkpoints" / LAST
    module, _ = load_module(str(step / "model.ckpt"))
    replay = Replay.load(str(step / "replay-rank0"))
    trainer = SimpleNamespace(datamodule=SimpleNamespace(replay=replay), is_global_zero=True,
                              lightning_module=module, optimizers=module.configure_optimizers())
    callback = DreamerCheckpoint(str(finished_run / "run" / "checkpoints"))
    need = callback.needed_bytes(trainer)
    assert need >= replay.snapshot_nbytes + model_checkpoint_nbytes(module, trainer.optimizers)
    original = checkpoint.free_bytes
    try:
        checkpoint.free_bytes = lambda path: need + 1
        assert callback.enough_space(trainer)
        checkpoint.free_bytes = lambda path: need - 1
        assert not callback.enough_space(trainer)
    finally:
        checkpoint.free_bytes = original


def test_a_full_disk_warns_once_then_counts(in_tmp, monkeypatch, caplog):
    def full(self, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Replay, "save", full)
    with caplog.at_level(logging.WARNING, logger="lit_dreamer.callbacks.checkpoint"):
        summary = fit(config(in_tmp, "run.steps=45", "run.prefill=20", "run.checkpoint_every=5"))
    assert summary["env_steps"] == 45 and summary["checkpoint"] is None
    # Saves at 21, 26, 31, 36, 41 and at the end (45) all failed: one warning, then the count at the end.
    warnings = [r.getMessage() for r in caplog.records if r.name == "lit_dreamer.callbacks.checkpoint"]
    assert len(warnings) == 2, warnings
    assert "No space left on device" in warnings[0] and "the last 6 checkpoint saves failed" in warnings[1]
