"""End-to-end system tests: the real CLI, Lightning Trainer, environments, checkpoints and MLflow (SQLite).

Everything is debug-sized (configs/debug.yaml: B=4, T=8, tiny networks) and runs tens of env steps.
CLI tests run `python -m lit_dreamer fit -c debug ...` in a subprocess with cwd=tmp_path; the others
call `lit_dreamer.train.fit` or `lit_dreamer.__main__.main` in-process (cwd also moved to tmp_path, so
MLflow artifacts never land in the checkout).

With debug's train_ratio 32 and B*T = 32 there is one gradient step per env step after prefill, so a
run with run.steps=S and run.prefill=P makes S - P training steps.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")  # before anything imports mujoco

import mlflow
import numpy as np
import pytest
import torch
import yaml

from lit_dreamer.replay import Replay

TESTS = Path(__file__).resolve().parent
EXPERIMENT = "lit_dreamer"


# --------------------------------------------------------------------------------------------------
# Helpers


def subprocess_env() -> dict[str, str]:
    # One intra-op thread: with torch's default of one thread per core on a busy 2-core machine the
    # threads spin against each other and a step can take 10x longer.
    # The repository root on the path: test envs and reward functions are named as `tests.<module>:...`.
    path = os.pathsep.join(p for p in (str(TESTS.parent), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, MUJOCO_GL="egl", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=path)


def run_overrides(root: Path, *overrides: str) -> list[str]:
    """The debug run's overrides: run dir and MLflow database inside root, then the test's own."""
    return [f"run.dir={root / 'run'}", f"logger.tracking_uri={tracking_uri(root)}", *overrides]


def run_args(root: Path, *overrides: str) -> list[str]:
    return ["-c", "debug", *run_overrides(root, *overrides)]


def tracking_uri(root: Path) -> str:
    return f"sqlite:///{root / 'mlflow.db'}"


def cli(root: Path, *args: str, timeout: float = 240, script: list[str] | None = None
        ) -> subprocess.CompletedProcess:
    command = [sys.executable, *(script or ["-m", "lit_dreamer"]), *args]
    return subprocess.run(command, cwd=root, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def fit_cli(root: Path, *overrides: str, **kwargs) -> subprocess.CompletedProcess:
    return cli(root, "fit", *run_args(root, *overrides), **kwargs)


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"


def client_for(root: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=tracking_uri(root))


def all_runs(root: Path) -> list:
    """Every MLflow run in root/mlflow.db (none if the database was never created)."""
    if not (root / "mlflow.db").exists():
        return []
    client = client_for(root)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments) if experiments else []


def only_run(root: Path):
    runs = all_runs(root)
    assert len(runs) == 1, f"expected exactly one MLflow run, found {[r.info.run_id for r in runs]}"
    return runs[0]


def history(root: Path, run_id: str, key: str) -> list:
    """A metric's history in logging order."""
    return sorted(client_for(root).get_metric_history(run_id, key), key=lambda m: (m.timestamp, m.step))


def load_ckpt(path: Path | str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def collector_state(ckpt: dict) -> dict:
    states = [v for k, v in ckpt["callbacks"].items() if "EnvCollector" in k]
    assert len(states) == 1, list(ckpt["callbacks"])
    return states[0]


def laprop_steps(ckpt: dict) -> list[int]:
    """The largest per-parameter step counter of each of the three optimizers."""
    optimizers = ckpt["optimizer_states"]
    assert len(optimizers) == 3, "world model, actor, critic"
    steps = []
    for opt in optimizers:
        assert opt["state"], "optimizer state is empty"
        steps.append(max(int(s["step"]) for s in opt["state"].values()))
    return steps


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """In-process runs: cwd in tmp_path (MLflow puts artifacts under ./mlruns) and one torch thread."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MUJOCO_GL", "egl")
    monkeypatch.delenv("LIT_DREAMER_RUN_NAME", raising=False)  # fit() sets it for DDP ranks; restored after
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)


def fit_in_process(root: Path, *overrides: str) -> dict:
    from lit_dreamer.config import load_config
    from lit_dreamer.train import fit
    summary = fit(load_config(["debug"], run_overrides(root, *overrides)))
    # The name handed to DDP ranks through the environment goes with the run: a later run in this
    # process (or a rank it starts) must not take it.
    assert "LIT_DREAMER_RUN_NAME" not in os.environ
    return summary


# --------------------------------------------------------------------------------------------------
# 1. CLI end to end on CartPole (shared by the resume and mismatch tests)

CARTPOLE_STEPS, CARTPOLE_PREFILL = 60, 20


@pytest.fixture(scope="module")
def cartpole_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cartpole")
    # Every training step logged: the tests below read per-step histories.
    proc = fit_cli(root, f"run.steps={CARTPOLE_STEPS}", f"run.prefill={CARTPOLE_PREFILL}", "run.log_every=1")
    return root, proc


@pytest.mark.timeout(300)
def test_cli_cartpole_end_to_end(cartpole_run):
    root, proc = cartpole_run
    assert proc.returncode == 0, explain(proc)
    run = only_run(root)
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"

    # Parameters: the flattened resolved config.
    params = run.data.params
    assert params["env.id"] == "CartPole-v1"
    assert float(params["run.train_ratio"]) == 32.0  # from configs/debug.yaml
    assert params["model.size"] == "size1m"
    assert int(params["run.steps"]) == CARTPOLE_STEPS and int(params["model.deter"]) == 64

    for key in ("train/env_steps", "loss/dyn", "loss/policy", "train/return", "train/skipped_steps"):
        assert key in run.data.metrics, f"{key} missing from {sorted(run.data.metrics)}"

    # The x-axis is env steps: each train/env_steps point sits at step == its value, one per
    # training step (train ratio 1 per env step), from just after prefill to the end.
    env_steps = history(root, run_id, "train/env_steps")
    assert all(m.step == int(m.value) for m in env_steps), [(m.step, m.value) for m in env_steps]
    values = [int(m.value) for m in env_steps]
    assert values == list(range(CARTPOLE_PREFILL + 1, CARTPOLE_STEPS + 1))
    # Losses are logged on the same axis and are finite.
    dyn = history(root, run_id, "loss/dyn")
    assert [m.step for m in dyn] == values
    assert all(math.isfinite(m.value) and m.value >= 0 for m in dyn)
    assert all(math.isfinite(m.value) for m in history(root, run_id, "loss/policy"))
    # CartPole gives +1 per step and random episodes last ~10-40 steps: some ended, with such returns.
    returns = history(root, run_id, "train/return")
    assert returns and all(1.0 <= m.value <= 500.0 for m in returns)
    # The prefill's episodes are logged at its end (CARTPOLE_PREFILL env steps), the others after it.
    assert all(CARTPOLE_PREFILL <= m.step <= CARTPOLE_STEPS for m in returns)
    assert run.data.metrics["train/skipped_steps"] == 0

    # The resolved config as an artifact, and the last model checkpoint (logger.log_checkpoints=last), not the replay.
    assert [a.path for a in client_for(root).list_artifacts(run_id)] == ["checkpoints", "config.yaml"]
    logged = [a.path for a in client_for(root).list_artifacts(run_id, "checkpoints/last")]
    assert logged == ["checkpoints/last/model.ckpt"]
    local = client_for(root).download_artifacts(run_id, "config.yaml", str(root))
    with open(local) as f:
        config = yaml.safe_load(f)
    assert config["env"]["id"] == "CartPole-v1" and config["run"]["steps"] == CARTPOLE_STEPS
    assert config["model"]["deter"] == 64 and config["run"]["batch_length"] == 8

    # The printed summary.
    assert "lit_dreamer run summary" in proc.stdout
    assert f"env steps {CARTPOLE_STEPS}" in proc.stdout
    assert f"train steps {CARTPOLE_STEPS - CARTPOLE_PREFILL}" in proc.stdout
    assert run_id in proc.stdout
    assert (root / "run" / "mlflow_run_id").read_text().strip() == run_id

    # The checkpoint: model + replay, consistent with each other and with the run.
    last = root / "run" / "checkpoints" / "last"
    assert (last / "model.ckpt").is_file() and (last / "replay-rank0" / "meta.json").is_file()
    assert os.path.realpath(last) == str(root / "run" / "checkpoints" / f"step-{CARTPOLE_STEPS:012d}")
    assert os.path.realpath(last / "model.ckpt") in proc.stdout
    ckpt = load_ckpt(last / "model.ckpt")
    assert collector_state(ckpt)["env_steps"] == CARTPOLE_STEPS
    assert int(ckpt["state_dict"]["train_steps"]) == CARTPOLE_STEPS - CARTPOLE_PREFILL
    assert laprop_steps(ckpt) == [CARTPOLE_STEPS - CARTPOLE_PREFILL] * 3
    assert len(Replay.load(str(last / "replay-rank0"))) == CARTPOLE_STEPS


# --------------------------------------------------------------------------------------------------
# 2. dm_control from pixels through the CNN


@pytest.mark.timeout(300)
def test_cli_dmc_pixels_end_to_end(tmp_path):
    proc = fit_cli(tmp_path, "env.id=dmc/cartpole-balance", "env.obs=pixels", "run.steps=40", "run.prefill=20",
                   "run.log_every=1")
    assert proc.returncode == 0, explain(proc)
    run = only_run(tmp_path)
    assert run.data.params["env.id"] == "dmc/cartpole-balance" and run.data.params["env.obs"] == "pixels"
    assert int(run.data.params["env.image_size"]) == 64
    metrics = run.data.metrics
    assert metrics["train/env_steps"] == 40 and metrics["train/skipped_steps"] == 0
    # The image is the only observation: reconstructed by the CNN decoder, no vector decoder.
    assert "loss/rec/image" in metrics and not any(k.startswith("loss/rec/") and k != "loss/rec/image"
                                                   for k in metrics), sorted(metrics)
    for key in ("loss/rec/image", "loss/dyn", "loss/policy", "loss/value"):
        values = [m.value for m in history(tmp_path, run.info.run_id, key)]
        assert len(values) == 20 and all(math.isfinite(v) for v in values), (key, values)

    last = tmp_path / "run" / "checkpoints" / "last"
    ckpt = load_ckpt(last / "model.ckpt")
    assert ckpt["hyper_parameters"]["obs_spec"] == {"image": [[64, 64, 3], "uint8"]}
    assert ckpt["hyper_parameters"]["discrete"] is False and ckpt["hyper_parameters"]["action_dim"] == 1
    # The replay holds real renders (not blank frames).
    replay = Replay.load(str(last / "replay-rank0"))
    assert len(replay) == 40
    images = replay._data["image"][:40]
    assert images.shape[-3:] == (64, 64, 3) and images.dtype == np.uint8
    assert images.std() > 5 and len(np.unique(images)) > 10


# --------------------------------------------------------------------------------------------------
# 3. Resume: env steps, MLflow run, replay and optimizer state continue


@pytest.mark.timeout(300)
def test_resume_continues_steps_replay_optimizer_and_mlflow_run(cartpole_run, tmp_path):
    source, proc_a = cartpole_run
    assert proc_a.returncode == 0, explain(proc_a)
    # Work on a copy of run A (its run dir and MLflow database) so the shared fixture stays intact.
    shutil.copytree(source / "run", tmp_path / "run", symlinks=True)
    shutil.copy(source / "mlflow.db", tmp_path / "mlflow.db")
    n, total = CARTPOLE_STEPS, CARTPOLE_STEPS + 30
    run_a = only_run(tmp_path)

    last_a = tmp_path / "run" / "checkpoints" / "last"
    ckpt_a = load_ckpt(last_a / "model.ckpt")
    steps_a = laprop_steps(ckpt_a)
    replay_a = Replay.load(str(last_a / "replay-rank0"))
    assert len(replay_a) == collector_state(ckpt_a)["env_steps"] == n
    # Every episode the collector counted ended on a recorded step: the counts must agree exactly.
    episodes_a = json.loads((last_a / "collector-rank0.json").read_text())["episodes"]
    assert episodes_a == int(replay_a._data["is_last"][:n].sum()) > 0

    proc = fit_cli(tmp_path, f"run.steps={total}", f"run.prefill={CARTPOLE_PREFILL}", "run.log_every=1",
                   "ckpt_path=last")
    assert proc.returncode == 0, explain(proc)

    # Same MLflow run, and its env-step axis continues from N instead of restarting.
    run = only_run(tmp_path)
    assert run.info.run_id == run_a.info.run_id and run.info.status == "FINISHED"
    env_steps = history(tmp_path, run.info.run_id, "train/env_steps")
    values = [int(m.value) for m in env_steps]
    assert values == list(range(CARTPOLE_PREFILL + 1, total + 1)), values
    assert all(m.step == int(m.value) for m in env_steps)

    # The new checkpoint: counters continued, the replay restored (A's steps first, then B's).
    last_b = tmp_path / "run" / "checkpoints" / "last"
    assert os.path.realpath(last_b).endswith(f"step-{total:012d}")
    ckpt_b = load_ckpt(last_b / "model.ckpt")
    assert collector_state(ckpt_b)["env_steps"] == total
    trained = total - CARTPOLE_PREFILL
    assert int(ckpt_b["state_dict"]["train_steps"]) == trained
    steps_b = laprop_steps(ckpt_b)
    assert all(b > a for a, b in zip(steps_a, steps_b)), (steps_a, steps_b)
    assert steps_b == [trained] * 3  # not restarted at 0: A's 40 steps + B's 30
    replay_b = Replay.load(str(last_b / "replay-rank0"))
    assert len(replay_b) == total
    for key in ("vector", "action", "reward", "is_first"):
        np.testing.assert_array_equal(replay_b._data[key][:n], replay_a._data[key][:n], err_msg=key)
    assert f"env steps {total}" in proc.stdout
    # This rank's episode counter continued from the saved one rather than restarting at 0.
    episodes_b = json.loads((last_b / "collector-rank0.json").read_text())["episodes"]
    assert episodes_b == int(replay_b._data["is_last"][:total].sum())


def test_checkpoint_started_in_a_new_run_dir_branches_into_a_new_mlflow_run(cartpole_run, in_tmp):
    source, proc_a = cartpole_run
    assert proc_a.returncode == 0, explain(proc_a)
    shutil.copy(source / "mlflow.db", in_tmp / "mlflow.db")  # the same database as run A
    run_a = only_run(in_tmp)
    ckpt = os.path.realpath(source / "run" / "checkpoints" / "last" / "model.ckpt")
    total = CARTPOLE_STEPS + 10
    summary = fit_in_process(in_tmp, f"run.steps={total}", f"run.prefill={CARTPOLE_PREFILL}", "run.log_every=1",
                             f"ckpt_path={ckpt}")

    runs = {r.info.run_id: r for r in all_runs(in_tmp)}
    assert set(runs) == {run_a.info.run_id, summary["mlflow_run_id"]}, "run A continued instead of a new run"
    branch = runs[summary["mlflow_run_id"]]
    assert branch.data.tags["resumed_from"] == ckpt
    assert branch.data.params["run.steps"] == str(total) and "git_commit" in branch.data.tags
    assert (in_tmp / "run" / "mlflow_run_id").read_text() == branch.info.run_id
    # The branch continues A's env-step count; A's own history is untouched.
    values = [int(m.value) for m in history(in_tmp, branch.info.run_id, "train/env_steps")]
    assert values == list(range(CARTPOLE_STEPS + 1, total + 1)), values
    assert max(int(m.value) for m in history(in_tmp, run_a.info.run_id, "train/env_steps")) == CARTPOLE_STEPS


# --------------------------------------------------------------------------------------------------
# 4. DDP on CPU, two processes


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("launcher", ["lightning", "torchrun"])
def test_ddp_two_cpu_ranks_stay_in_sync_and_collect_their_own_data(tmp_path, launcher, monkeypatch):
    probe = tmp_path / "probe"
    probe.mkdir()
    # A name left in the environment by an earlier run must not reach either launcher's ranks.
    monkeypatch.setenv("LIT_DREAMER_RUN_NAME", "stale-name-of-an-earlier-run")
    # No run.dir: the default runs/<run name> must be one folder for both ranks. Lightning's launcher
    # starts rank 1 seconds after rank 0; torchrun starts both ranks itself.
    script = [str(TESTS / "ddp_probe.py"), str(probe)]
    if launcher == "torchrun":
        script = ["-m", "torch.distributed.run", "--nproc-per-node=2", *script]
    proc = cli(tmp_path, "fit", "-c", "debug", f"logger.tracking_uri={tracking_uri(tmp_path)}", "run.steps=40",
               "run.prefill=20", "trainer.devices=2", "trainer.strategy=ddp", "trainer.accelerator=cpu",
               script=script, timeout=360)
    assert proc.returncode == 0, explain(proc)
    run_dirs = list((tmp_path / "runs").iterdir())
    assert len(run_dirs) == 1, run_dirs
    run_dir = run_dirs[0]
    reports = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, report in enumerate(reports):
        assert report["rank"] == rank and report["world_size"] == 2
        # run.steps and run.prefill count over all ranks: 20 env steps each, 10 after prefill.
        assert report["env_steps"] == 20 and report["replay_len"] == 20
        assert report["train_steps"] == 10 and report["skipped_steps"] == 0
        assert report["params"] != report["initial_params"], "training did not change the parameters"
    assert reports[0]["initial_params"] == reports[1]["initial_params"]
    assert reports[0]["params"] == reports[1]["params"], "parameters differ between ranks"

    # Each rank saved its own replay shard, with its own experience.
    last = run_dir / "checkpoints" / "last"
    shards = [Replay.load(str(last / f"replay-rank{r}")) for r in (0, 1)]
    assert [len(s) for s in shards] == [20, 20]
    assert not np.array_equal(shards[0]._data["vector"][:20], shards[1]._data["vector"][:20])
    assert collector_state(load_ckpt(last / "model.ckpt"))["env_steps"] == 20  # per rank

    # One MLflow run (rank 0's), with env steps counted over both ranks.
    run = only_run(tmp_path)
    assert run.data.metrics["train/env_steps"] == 40
    assert run.info.run_name == run_dir.name
    assert (run_dir / "mlflow_run_id").read_text().strip() == run.info.run_id


def test_torchrun_without_a_rendezvous_id_needs_a_run_name_or_dir(monkeypatch):
    from lit_dreamer.config import ConfigError, load_config
    from lit_dreamer.train import default_run_name

    cfg = load_config(["debug"])
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "3f2a9c1e-0000-4000-8000-000000000000")
    expected = f"{cfg.env.id.replace('/', '-')}-seed0-torchrun-3f2a9c1e"
    assert default_run_name(cfg) == default_run_name(cfg) == expected
    # torchrun's multi-node default id "none" is shared by every job: no basis for a name.
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    with pytest.raises(ConfigError, match="logger.run_name=NAME or run.dir=DIR"):
        default_run_name(cfg)
    cfg.run.dir = "some/dir"  # every rank writes there; the MLflow run name is rank 0's alone
    assert "-torchrun-" not in default_run_name(cfg)


# --------------------------------------------------------------------------------------------------
# 5. bf16 mixed precision on CPU


@pytest.mark.timeout(300)
def test_bf16_mixed_on_cpu_trains_with_finite_losses(in_tmp):
    summary = fit_in_process(in_tmp, "trainer.precision=bf16-mixed", "run.steps=40", "run.prefill=20",
                             "run.log_every=1")
    assert summary["train_steps"] == 20 and summary["env_steps"] == 40
    run = only_run(in_tmp)
    assert run.data.params["trainer.precision"] == "bf16-mixed"
    loss_keys = [k for k in run.data.metrics if k.startswith("loss/")]
    assert {"loss/dyn", "loss/rep", "loss/rew", "loss/con", "loss/policy", "loss/value"} <= set(loss_keys)
    for key in loss_keys:
        values = [m.value for m in history(in_tmp, run.info.run_id, key)]
        assert len(values) == 20 and all(math.isfinite(v) for v in values), (key, values)
    skipped = [m.value for m in history(in_tmp, run.info.run_id, "train/skipped_steps")]
    assert len(skipped) == 20 and set(skipped) == {0.0}
    assert [m.value for m in history(in_tmp, run.info.run_id, "train/nonfinite_actions")][-1] == 0


@pytest.mark.timeout(300)
def test_several_async_envs_fill_separate_streams(in_tmp):
    """env.num_envs=3 in subprocesses: each vector step adds 3 env steps, one per replay stream."""
    summary = fit_in_process(in_tmp, "env.num_envs=3", "env.asynchronous=true", "run.steps=60", "run.prefill=30")
    assert summary["env_steps"] == 60
    from lit_dreamer.replay import Replay
    replay = Replay.load(os.path.join(summary["checkpoint"].rsplit(os.sep, 1)[0], "replay-rank0"))
    assert len(replay) == 60
    streams = replay._data["vector"][:20]  # (rows, 3 envs, 4)
    # Different seeds: the three CartPole streams differ from the first observation on.
    assert not np.allclose(streams[:, 0], streams[:, 1]) and not np.allclose(streams[:, 1], streams[:, 2])
    assert replay._data["is_first"][0].all()


# --------------------------------------------------------------------------------------------------
# 6. Train ratio: gradient steps per env step after prefill = train_ratio / (B * T)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("train_ratio, after_prefill", [(8, 40), (64, 15)])  # 0.25 and 2 per env step
def test_train_ratio_sets_gradient_steps_per_env_step(in_tmp, train_ratio, after_prefill):
    prefill = 20  # above debug's batch_length + 1, so exactly this many random steps come first
    per_env_step = train_ratio / (4 * 8)
    summary = fit_in_process(in_tmp, f"run.train_ratio={train_ratio}", f"run.prefill={prefill}",
                             f"run.steps={prefill + after_prefill}", "run.log_every=1")
    env_after_prefill = summary["env_steps"] - prefill
    assert env_after_prefill == after_prefill
    assert abs(summary["train_steps"] - per_env_step * env_after_prefill) <= 1, summary
    assert summary["train_steps"] >= 10
    # And at every logged point along the run, not just at the end.
    run = only_run(in_tmp)
    points = history(in_tmp, run.info.run_id, "train/train_steps")
    assert len(points) == summary["train_steps"]
    for m in points:
        assert abs(m.value - per_env_step * (m.step - prefill)) <= 1, (m.step, m.value)
    assert history(in_tmp, run.info.run_id, "train/skipped_steps")[-1].value == 0


# --------------------------------------------------------------------------------------------------
# 7. Bad input fails fast, naming the problem and the valid choices


BAD_INPUTS = [
    (["run.stpes=5"], ["unknown config key 'run.stpes'", "run.steps"]),
    (["env.id=CartPol-v1"], ["CartPol-v1", "CartPole-v1"]),
    (["model.size=size3m"], ["size3m", "size1m, size12m, size25m, size50m, size100m, size200m, size400m"]),
    (["run.steps=abc"], ["run.steps", "abc", "Integer"]),
    (["trainer.devics=2"], ["devics", "trainer.devices"]),
    (["ckpt_path=last"], ["ckpt_path=last", "no complete checkpoint"]),
    (["run.keep_checkpoints=-1"], ["run.keep_checkpoints must be >= 0", "0 keeps every checkpoint"]),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("overrides, expected", BAD_INPUTS, ids=[b[0][0] for b in BAD_INPUTS])
def test_bad_input_fails_fast_with_a_helpful_message(in_tmp, capsys, overrides, expected):
    from lit_dreamer.__main__ import main
    code = main(["fit", *run_args(in_tmp, "run.steps=40", *overrides)])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    for text in expected:
        assert text in err, f"{text!r} not in {err!r}"
    assert err.startswith("error: ") and "Traceback" not in err
    assert all_runs(in_tmp) == [] and not (in_tmp / "run" / "checkpoints").exists()


@pytest.mark.timeout(120)
def test_bad_input_exit_code_of_the_real_cli(tmp_path):
    proc = fit_cli(tmp_path, "run.stpes=5")
    assert proc.returncode == 2, explain(proc)
    assert "run.steps" in proc.stderr and "Traceback" not in proc.stderr and proc.stdout == ""
    assert all_runs(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# 8. --help lists the keys with their defaults


@pytest.mark.timeout(120)
def test_fit_help_lists_keys_with_defaults(tmp_path):
    proc = cli(tmp_path, "fit", "--help")
    assert proc.returncode == 0, explain(proc)
    lines = proc.stdout.splitlines()
    for line in ("  run.train_ratio = 512.0", "  model.size = 'size1m'", "  env.id = 'CartPole-v1'",
                 "  run.steps = 2000", "  trainer.precision = '32-true'"):
        assert line in lines, f"{line!r} not in --help"
    assert any("gradient steps per env step" in line for line in lines)  # the key's doc follows it


# --------------------------------------------------------------------------------------------------
# 9. A checkpoint from another config is refused


@pytest.mark.timeout(300)
def test_checkpoint_for_other_spaces_is_refused_by_the_cli(cartpole_run, tmp_path):
    source, proc_a = cartpole_run
    assert proc_a.returncode == 0, explain(proc_a)
    ckpt = os.path.realpath(source / "run" / "checkpoints" / "last" / "model.ckpt")
    proc = fit_cli(tmp_path, "env.id=Pendulum-v1", f"ckpt_path={ckpt}")
    assert proc.returncode == 2, explain(proc)
    # CartPole: 4-dim observation, 2 discrete actions; Pendulum: 3-dim observation, 1 continuous action.
    assert "obs_spec" in proc.stderr and "[4]" in proc.stderr and "[3]" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert all_runs(tmp_path) == []


@pytest.mark.timeout(120)
def test_checkpoint_for_another_model_is_refused(cartpole_run, in_tmp, capsys):
    from lit_dreamer.__main__ import main
    source, proc_a = cartpole_run
    assert proc_a.returncode == 0, explain(proc_a)
    ckpt = os.path.realpath(source / "run" / "checkpoints" / "last" / "model.ckpt")
    code = main(["fit", *run_args(in_tmp, "model.deter=32", f"ckpt_path={ckpt}")])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert "model.deter: checkpoint 64 vs requested 32" in err, err
    assert all_runs(in_tmp) == []
