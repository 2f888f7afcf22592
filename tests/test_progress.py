"""The training progress bar: env steps out of run.steps, plain numbers, no v_num, no epoch."""

import re
from types import SimpleNamespace


from lit_dreamer.callbacks.progress import EnvStepProgressBar, plain_number
from lit_dreamer.config import load_config
from lit_dreamer.train import fit


def test_numbers_are_plain():
    assert [plain_number(v) for v in (1530.25, 475.0, 95.5, 12.345, 0.0123, -250.6, 12, float("nan"))] == \
        ["1530", "475", "95.5", "12.3", "0.0123", "-251", "12", "nan"]


def test_the_metrics_have_no_v_num_and_no_exponents():
    logger = SimpleNamespace(version="3f2a9c1d")  # what MLflow's run id gives Lightning's v_num
    trainer = SimpleNamespace(loggers=[logger], progress_bar_metrics={"return": 1530.25, "train_steps": 1200.0})
    metrics = EnvStepProgressBar().get_metrics(trainer, None)
    assert metrics == {"return": "1530", "train_steps": "1200"}


def bar_lines(text: str) -> list[str]:
    return [line.strip() for line in re.split(r"[\r\n]", text) if line.startswith("env steps")]


def test_the_bar_counts_env_steps_to_run_steps_and_resumes_without_an_epoch(in_tmp, capsys):
    def run(*overrides):
        cfg = load_config(["debug"], [f"run.dir={in_tmp}/run", f"logger.tracking_uri=sqlite:///{in_tmp}/mlflow.db",
                                      "trainer.enable_progress_bar=true", "run.prefill=60", *overrides])
        fit(cfg)
        return capsys.readouterr().out

    first = run("run.steps=100")
    lines = bar_lines(first)
    # The bar starts after the prefill, at 60 env steps of 100, and ends full; tqdm shows an ETA (<mm:ss).
    assert lines[0].split("|")[2].strip().startswith("60/100 [")
    assert re.search(r"\| 100/100 \[\d\d:\d\d<00:00, ", lines[-1]), lines[-1]
    assert "return=" in lines[-1] and "train_steps=40" in lines[-1]
    resumed = run("run.steps=140", "ckpt_path=last")
    lines = bar_lines(resumed)
    assert lines[0].split("|")[2].strip().startswith("100/140 [")
    assert "| 140/140 [" in lines[-1]
    for text in (first, resumed):
        assert "v_num" not in text and "Epoch" not in text and "e+" not in text


def test_a_run_resumed_from_a_periodic_checkpoint_still_counts_env_steps(in_tmp, capsys):
    """A periodic checkpoint is saved mid-epoch (the epoch never ends), and Lightning skips on_train_epoch_start
    when it resumes from one: the bar must count env steps all the same, not Lightning's batches."""
    import shutil

    def run(*overrides):
        cfg = load_config(["debug"], [f"run.dir={in_tmp}/run", "logger.backend=none", "trainer.enable_progress_bar=true",
                                      "run.prefill=60", "run.checkpoint_every=20", *overrides])
        fit(cfg)
        return capsys.readouterr().out

    run("run.steps=100")
    # What a kill between the last periodic checkpoint and the run's end leaves: the periodic one is the last.
    checkpoints = in_tmp / "run" / "checkpoints"
    *_, periodic, final = sorted(p.name for p in checkpoints.glob("step-*"))
    assert final == "step-000000000100"
    shutil.rmtree(checkpoints / final)
    (checkpoints / "last").unlink()
    (checkpoints / "last").symlink_to(periodic)
    steps = int(periodic.removeprefix("step-"))
    assert 60 < steps < 100
    lines = bar_lines(run("run.steps=120", "ckpt_path=last"))
    assert lines, "no env-steps bar on the resumed run"
    assert lines[0].split("|")[2].strip().startswith(f"{steps}/120 [")
    assert "| 120/120 [" in lines[-1]
