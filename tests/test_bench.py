"""The benchmark command: real training steps and collector, one JSON line with the agreed fields."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(300)
def test_bench_prints_json_with_timings_flops_and_params(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "lit_dreamer", "bench", "-c", "debug", "bench.steps=2",
                           "bench.warmup=1", "bench.collector_steps=20", "bench.profile_steps=1", "model.units=24"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["train_steps_per_s"] > 0 and result["env_steps_per_s"] > 0
    assert result["seconds_per_train_step"] == pytest.approx(1 / result["train_steps_per_s"])
    # One thread: the step's CPU time is at most its wall time (and the most of it on an idle machine).
    assert 0 < result["cpu_seconds_per_train_step"] <= result["seconds_per_train_step"] * 1.05
    for phase in ("replay_sampling", "world_model", "imagination", "actor_critic", "backward", "optimizer",
                  "collector_per_env_step"):
        assert result["phases_seconds"][phase] > 0, phase
    # The phases are parts of one step: together they cannot exceed it by much (collector excluded).
    inside = sum(v for k, v in result["phases_seconds"].items() if k not in ("replay_sampling", "collector_per_env_step"))
    assert inside <= result["seconds_per_train_step"] * 1.05
    assert result["flops_per_step"] > 1e6
    assert result["achieved_gflops"] == pytest.approx(result["flops_per_step"] / result["seconds_per_train_step"] / 1e9)
    assert result["config"]["model"]["units"] == 24 and result["config"]["batch"] == 4
    assert result["config"]["precision"] == "32-true" and result["config"]["threads"] == 1
    assert result["config"]["device"] == "cpu"  # the trainer's device (the module is back on the CPU after fit)
    assert set(result["params"]) == {"world_model", "actor", "critic"} and all(result["params"].values())
    # bench.profile_steps: a per-op table of one more step, heaviest first, matrix products among the ops.
    profile = result["profile"]
    times = [row["self_ms_per_step"] for row in profile]
    assert len(profile) >= 10 and times == sorted(times, reverse=True) and times[0] > 0
    assert {"aten::mm", "aten::bmm", "aten::addmm"} & {row["op"] for row in result["profile"]}
    assert f"calls  {profile[0]['op']}" in proc.stdout


def test_bench_rejects_unknown_options(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lit_dreamer", "bench", "-c", "debug", "bench.stepz=2"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "bench.steps=N" in proc.stderr


@pytest.mark.timeout(300)
def test_bench_with_several_tasks_times_the_conditioned_agent_on_task_balanced_batches(monkeypatch):
    """With env.tasks the bench's agent has one head per task and every batch holds each task equally,
    as in training, so the time per step of K tasks compares with one task's at the same batch."""
    torch = pytest.importorskip("torch")
    from lit_dreamer.bench import BenchConfig, bench
    from lit_dreamer.config import load_config
    from lit_dreamer.module import DreamerModule

    seen = []
    train_step = DreamerModule.training_step

    def recording_step(self, batch, *args, **kwargs):
        seen.append(torch.bincount(batch["task"][:, 0].cpu(), minlength=2).tolist())
        return train_step(self, batch, *args, **kwargs)

    monkeypatch.setattr(DreamerModule, "training_step", recording_step)
    tasks = "env.tasks=[lit_dreamer/PointGoal-0-v0,lit_dreamer/PointGoal-1-v0]"
    options = BenchConfig(steps=1, warmup=1, collector_steps=4)
    one = bench(load_config(["debug"], ["env.id=lit_dreamer/PointGoal-0-v0", "multitask.conditioning=heads"]), options)
    seen.clear()
    two = bench(load_config(["debug"], [tasks, "multitask.conditioning=heads"]), options)
    assert two["config"]["env"] == "lit_dreamer/PointGoal-0-v0,lit_dreamer/PointGoal-1-v0"
    assert seen and all(counts == [2, 2] for counts in seen)  # debug's batch of 4: two sequences per task
    # One output layer per task (heads mode): the second task's layers are parameters a one-task agent lacks.
    assert two["params"]["actor"] > one["params"]["actor"]
    assert two["params"]["world_model"] > one["params"]["world_model"]  # the reward and continue heads' layers
    assert two["env_steps_per_s"] > 0


def test_random_token_ids_stay_inside_the_vocabulary():
    """bench fills its replay with random steps: a text key's token ids must index the model's word embedding."""
    import numpy as np

    from lit_dreamer.bench import random_step
    spec = {"mission": ((6,), np.int64), "vector": ((3,), np.float32), "task": ((), np.int64)}
    step = random_step(spec, 500, np.random.default_rng(0), 2, True, text_vocab=7)
    assert step["mission"].dtype == np.int64 and step["mission"].shape == (500, 6)
    assert step["mission"].min() == 0 and step["mission"].max() == 6  # every id of the vocabulary, none beyond
    assert step["task"].tolist() == list(range(500))


@pytest.mark.timeout(300)
def test_bench_runs_on_an_env_with_a_text_observation():
    from lit_dreamer.bench import BenchConfig, bench
    from lit_dreamer.config import load_config
    result = bench(load_config(["debug"], ["env.id=tests.text_envs:lit_dreamer_tests/TextChoice-v0",
                                           "model.text_vocab=16"]), BenchConfig(steps=1, warmup=1, collector_steps=4))
    assert result["seconds_per_train_step"] > 0 and result["params"]["world_model"] > 0


def test_sync_check_names_a_sync_by_its_innermost_frames_and_the_project_code_above_them(monkeypatch):
    """scripts/sync_check.py groups CUDA syncs by site: torch's own frames and the project's installed copies are
    left out, the two innermost other frames (here Lightning's) come first, then the project's frames."""
    import traceback

    monkeypatch.syspath_prepend(os.path.join(REPO, "scripts"))
    import sync_check

    frame = traceback.FrameSummary
    stack = [frame("/repo/lit_dreamer/__main__.py", 105, "main"), frame("/repo/lit_dreamer/bench.py", 145, "bench"),
             frame("/venv/site-packages/lightning/pytorch/trainer/trainer.py", 10, "fit"),
             frame("/repo/callbacks/stop.py", 7, "on_train_batch_end"),
             frame("/venv/site-packages/lit_dreamer/other.py", 3, "installed_copy"),
             frame("/venv/site-packages/lightning/pytorch/callbacks/progress.py", 15, "on_batch"),
             frame("/venv/site-packages/lightning/pytorch/core/module.py", 30, "log"),
             frame("/venv/site-packages/torch/_tensor.py", 5, "item")]
    # Lightning's own callbacks/ folder is Lightning's, not the project's callbacks/.
    assert sync_check.site(stack) == (
        "lightning/pytorch/core/module.py:30:log <- lightning/pytorch/callbacks/progress.py:15:on_batch <- "
        "callbacks/stop.py:7:on_train_batch_end <- lit_dreamer/bench.py:145:bench <- lit_dreamer/__main__.py:105:main")
