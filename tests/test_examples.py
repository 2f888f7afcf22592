"""The custom-environment example in docs/custom_envs.md works as written, through the real CLI."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np

REPO = Path(__file__).resolve().parent.parent


def load_script(name: str):
    """A script under scripts/ as a module, for calling its functions (or its main) in this process."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), REPO / "scripts" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_embed_the_example_file_verbatim():
    page = (REPO / "docs" / "custom_envs.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    assert (REPO / "examples" / "point_env.py").read_text() in blocks


def test_custom_dict_observation_env_trains_through_the_cli(tmp_path):
    shutil.copy(REPO / "examples" / "point_env.py", tmp_path / "point_env.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "lit_dreamer", "fit", "-c", "debug", "env.id=point_env:PointDict-v0",
                           f"run.dir={tmp_path}/run", f"logger.tracking_uri=sqlite:///{tmp_path}/mlflow.db"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("lit_dreamer").experiment_id])
    # All three observation keys are reconstructed: the image by the CNN, the vectors by the MLP.
    assert {"loss/rec/image", "loss/rec/position", "loss/rec/goal"} <= set(run.data.metrics)


def test_multidevice_script_trains_with_two_cpu_processes(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "train_multidevice.py"), "--devices", "2",
                           "--accelerator", "cpu", "--precision", "bf16-mixed", "--steps", "100", "--debug",
                           "--dir", str(tmp_path / "run"), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 100 env steps over 2 ranks: 40 random prefill steps, then 1 training step per env step per rank.
    assert "env steps 100, train steps 30" in proc.stdout
    assert (tmp_path / "run" / "checkpoints" / "last" / "replay-rank1").is_dir()
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("lit_dreamer").experiment_id])
    assert "eval/return" in run.data.metrics and "loss/dyn" in run.data.metrics


def test_seed_sweep_script_trains_each_seed_and_compares_them(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "seed_sweep.py"), "--seeds", "2", "-c", "debug",
                           "--metric", "train/return", "--out", "sweep.png", "--", "run.steps=80"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("lit_dreamer").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["sweep-seed0", "sweep-seed1"]
    assert sorted(r.data.params["run.seed"] for r in runs) == ["0", "1"]
    # The comparison table lists both runs and their group mean, and the figure was written.
    assert "sweep-seed0" in proc.stdout and "sweep-seed1" in proc.stdout and "mean of 2" in proc.stdout
    assert (tmp_path / "sweep.png").stat().st_size > 10_000


def test_world_model_diagnostic_scripts_read_a_checkpoint_and_its_replay(tmp_path, capsys, monkeypatch):
    import json

    import numpy as np
    import torch

    from lit_dreamer.replay import Replay

    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "lit_dreamer", "fit", "-c", "debug", "run.steps=120",
                           f"run.dir={tmp_path}/run", f"logger.tracking_uri=sqlite:///{tmp_path}/mlflow.db"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = os.path.realpath(tmp_path / "run" / "checkpoints" / "last")
    replay = Replay.load(os.path.join(folder, "replay-rank0"))
    terminals = int(replay._data["is_terminal"][:len(replay)].sum())
    assert terminals > 0, "120 random-ish CartPole steps end several episodes"
    ckpt = os.path.join(folder, "model.ckpt")

    def script(name: str, *args: str) -> str:
        """The script's main with these arguments, in this process (a subprocess would start torch again)."""
        monkeypatch.setattr(sys, "argv", [name, ckpt, *args])
        monkeypatch.syspath_prepend(str(REPO / "scripts"))  # as when run as a script: they import each other
        capsys.readouterr()
        threads = torch.get_num_threads()
        try:
            load_script(name).main()
        finally:
            torch.set_num_threads(threads)  # diagnose_critic pins one thread for the process
        return capsys.readouterr().out

    report = json.loads(script("diagnose_world_model.py"))
    assert report["steps"] == len(replay) == 120 and report["terminal_steps"] == terminals
    cont = report["cont"]
    assert 0 <= cont["p_continue_at_terminal"] <= 1 and 0 <= cont["terminal_recall"] <= 1
    assert len(report["rec_rmse"]["all"]) == 4 and all(np.isfinite(report["rec_rmse"]["terminal"]))
    # A rollout of k steps needs k steps of the same episode before the terminal: fewer as k grows.
    counts = [report["open_loop"][k]["n"] for k in ("1", "2", "3") if k in report["open_loop"]]
    assert counts and counts[0] <= terminals and counts == sorted(counts, reverse=True)

    lines = [json.loads(line) for line in script("world_model_headroom.py", "--steps", "4", "--every", "2").splitlines()]
    assert [line["step"] for line in lines] == [0, 2, 4]
    for line in lines[1:]:
        assert set(line["losses"]) == {"rec/vector", "rew", "con", "dyn", "rep"}
        assert all(np.isfinite(v) for v in line["losses"].values())

    critic = json.loads(script("diagnose_critic.py", "--episodes", "2", "--window", "5"))
    assert critic["gamma"] == 1 - 1 / 333
    for behaviour in ("policy", "random"):
        assert len(critic[behaviour]["episodes"]) == 2
        for ep in critic[behaviour]["episodes"]:
            # CartPole episodes end by termination: every step is reported once, in windows of 5.
            assert ep["length"] >= 1 and len(ep["windows"]) == -(-ep["length"] // 5)
            assert [w["from_step"] for w in ep["windows"]] == list(range(0, ep["length"], 5))
            assert ep["windows"][0]["real_return"] > 0 and np.isfinite(ep["windows"][0]["value"])
        corr = critic[behaviour]["correlation"]
        assert corr is None or -1 <= corr <= 1

    # critic_lag: a variant with the critic's learning rate at 0 must leave the value where it was, while
    # the checkpoint's own settings move it; every variant's target is the same frozen policy's value.
    out = [json.loads(line) for line in script("critic_lag.py", "--steps", "4", "--every", "2", "--long", "20",
                                               "--batches", "2", "--probe-starts", "16",
                                               "--variant", "frozen:critic_lr=0").splitlines()]
    rows = [r for r in out if "summary" not in r]
    summaries = {r["summary"]["variant"]: r["summary"] for r in out if "summary" in r}
    assert [(r["variant"], r["step"]) for r in rows] == [(v, s) for v in ("base", "frozen") for s in (0, 2, 4)]
    frozen = [r["value"] for r in rows if r["variant"] == "frozen"]
    assert frozen[0] == frozen[1] == frozen[2]
    assert [r["value"] for r in rows if r["variant"] == "base"][-1] != frozen[0]
    assert summaries["frozen"]["settings"] == {"critic_lr": 0.0}
    assert summaries["base"]["target"] == summaries["frozen"]["target"] and np.isfinite(summaries["base"]["target"])
    load_script("critic_lag.py").report([json.dumps(r) for r in out], str(tmp_path / "lag.csv"), str(tmp_path / "lag.png"), "probe")
    lines = (tmp_path / "lag.csv").read_text().splitlines()
    assert lines[0].startswith("variant,step,value,target") and len(lines) == 1 + len(rows)
    assert (tmp_path / "lag.png").stat().st_size > 10_000


def test_discounted_returns_of_the_critic_diagnostic():
    module = load_script("diagnose_critic.py")
    # By hand: G2 = 4, G1 = 2 + 0.5 * 4 = 4, G0 = 1 + 0.5 * 4 = 3.
    assert module.discounted_returns(np.array([1.0, 2.0, 4.0]), 0.5).tolist() == [3.0, 4.0, 4.0]
    assert module.correlation([1, 2, 3], [2, 4, 6]) == 1.0 and module.correlation([1, 2, 3], [3, 2, 1]) == -1.0
    assert module.correlation([1, 1, 1], [1, 2, 3]) is None and module.correlation([1], [2]) is None


def test_export_results_writes_points_and_bin_means(tmp_path, monkeypatch):
    import csv

    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    run = client.create_run(client.create_experiment("x"), run_name="r", tags={})
    client.log_param(run.info.run_id, "run.seed", "3")
    for step in range(1, 11):  # ac/advantage = step at steps 1..10; one eval point
        client.log_metric(run.info.run_id, "ac/advantage", float(step), step=step)
    client.log_metric(run.info.run_id, "eval/return", 7.5, step=10, timestamp=1000)
    # A resumed run logs step 10 again, later: only the newer value is exported.
    client.log_metric(run.info.run_id, "eval/return", 9.0, step=10, timestamp=2000)

    def export(*args: str) -> list[dict]:
        monkeypatch.setattr(sys, "argv", ["export_results.py", str(tmp_path / "o.csv"), run.info.run_id,
                                          "--tracking-uri", uri, *args])
        load_script("export_results.py").main()
        with open(tmp_path / "o.csv") as f:
            return list(csv.DictReader(f))

    rows = export()  # default metrics: train/return (none logged) and eval/return
    assert [(r["metric"], r["env_steps"], float(r["value"]), r["seed"]) for r in rows] == [("eval/return", "10", 9.0, "3")]
    rows = export("--metrics", "ac/advantage", "--bin", "4")
    # Bins (0, 4], (4, 8], (8, 12]: means of 1..4, 5..8, 9..10.
    assert [(int(r["env_steps"]), float(r["value"])) for r in rows] == [(4, 2.5), (8, 6.5), (12, 9.5)]


def test_bench_ab_script_times_two_commits_and_cleans_up(tmp_path):
    import json

    def worktrees() -> str:
        return subprocess.run(["git", "-C", str(REPO), "worktree", "list"], capture_output=True, text=True,
                              check=True).stdout

    def bench_ab(*revs: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO / "scripts" / "bench_ab.py"), *revs, "--repeats", "1",
                               "--threads", "1", "--", "-c", "debug", "bench.steps=1", "bench.warmup=1",
                               "bench.collector_steps=5"],
                              cwd=tmp_path, env=dict(os.environ), capture_output=True, text=True, timeout=300)

    before = worktrees()
    proc = bench_ab("HEAD", "HEAD")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    seconds = result["seconds_per_train_step"]
    assert len(seconds["before"]) == len(seconds["after"]) == 1 and min(seconds["before"] + seconds["after"]) > 0
    assert result["bench_args"][:2] == ["-c", "debug"]
    assert worktrees() == before and not list(tmp_path.iterdir())

    proc = bench_ab("HEAD", "no-such-revision")
    assert proc.returncode != 0 and "cannot check out after revision 'no-such-revision'" in proc.stderr
    assert worktrees() == before
