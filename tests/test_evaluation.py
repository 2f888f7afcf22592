"""Evaluation: whole episodes with the policy's mode, and the periodic EvalCallback in a real run."""

import mlflow
import numpy as np
import torch

from lit_dreamer.config import load_config
from lit_dreamer.envs import make_vector_env
from lit_dreamer.evaluation import run_episodes
from lit_dreamer.module import DreamerModule
from lit_dreamer.train import fit, probe_env


def test_run_episodes_counts_each_env_once_until_its_end():
    cfg = load_config(["debug"])
    info = probe_env(cfg)
    torch.manual_seed(0)
    module = DreamerModule(info.obs_spec, info.action_dim, info.discrete, cfg.agent())
    envs = make_vector_env("CartPole-v1", 4, seed=3)
    stats = run_episodes(module, envs, mode="mode", seed=3)
    envs.close()
    assert len(stats.returns) == 4
    # CartPole pays +1 per step, so an episode's return is its length: no step counted twice or lost.
    assert stats.returns == [float(n) for n in stats.lengths]
    assert all(8 <= n <= 500 for n in stats.lengths)
    summary = stats.summary()
    assert summary["return"] == np.mean(stats.returns) and summary["episodes"] == 4


def test_mode_policy_is_deterministic():
    cfg = load_config(["debug"])
    info = probe_env(cfg)
    module = DreamerModule(info.obs_spec, info.action_dim, info.discrete, cfg.agent())
    results = []
    for _ in range(2):
        envs = make_vector_env("CartPole-v1", 3, seed=11)
        # Latent sampling still draws random numbers; a fixed torch seed makes both runs alike.
        torch.manual_seed(5)
        results.append(run_episodes(module, envs, mode="mode", seed=11).returns)
        envs.close()
    assert results[0] == results[1]


def test_eval_callback_logs_eval_return_against_env_steps(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config(["debug"], ["run.eval_every=50", "run.eval_episodes=3", f"run.dir={tmp_path}/run",
                                  f"logger.tracking_uri={uri}"])
    summary = fit(cfg)
    client = mlflow.MlflowClient(uri)
    history = client.get_metric_history(summary["mlflow_run_id"], "eval/return")
    # Prefill ends at 60 env steps (past the first due point, 50), then every 50, then at the end.
    assert [m.step for m in history] == [61, 100, 120]
    assert all(m.value >= 8 for m in history)
    assert summary["eval"]["episodes"] == 3
    assert summary["eval"]["return"] == history[-1].value


def test_eval_command_prints_a_table_and_logs_a_linked_mlflow_run(tmp_path, monkeypatch, capsys):
    from lit_dreamer.__main__ import main
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    summary = fit(load_config(["debug"], [f"run.dir={tmp_path}/run", f"logger.tracking_uri={uri}"]))
    capsys.readouterr()
    video = tmp_path / "episode.gif"
    assert main(["eval", "--ckpt", str(tmp_path / "run"), "episodes=3", "mode=mode", f"video={video}"]) == 0
    out = capsys.readouterr().out
    assert "CartPole-v1: 3 episodes" in out and "mean" in out
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("lit_dreamer").experiment_id],
                              filter_string="tags.`lit_dreamer.kind` = 'eval'")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["mlflow.parentRunId"] == summary["mlflow_run_id"]
    episodes = client.get_metric_history(run.info.run_id, "eval/episode_return")
    assert [m.step for m in episodes] == [0, 1, 2]
    # The mean eval logs is the mean of the per-episode returns it logged, and the table shows it.
    mean = float(np.mean([m.value for m in episodes]))
    assert run.data.metrics["eval/return"] == mean
    assert f"{mean:.2f}" in out
    assert run.data.params["mode"] == "mode" and run.data.params["episodes"] == "3"
    # The video shows one whole episode: (steps + 1) frames of 1/20 s; CartPole pays 1 per step.
    from PIL import Image
    video_return = float(out.split("video of one episode (return ")[1].split(")")[0])
    with Image.open(video) as gif:
        duration = sum(gif.seek(i) or gif.info["duration"] for i in range(gif.n_frames))
    assert duration == (int(video_return) + 1) * 50
    assert [a.path for a in client.list_artifacts(run.info.run_id, "videos")] == ["videos/episode.gif"]


def test_eval_command_rejects_bad_keys(tmp_path, capsys):
    from lit_dreamer.__main__ import main
    assert main(["eval", "--ckpt", str(tmp_path / "nothing.ckpt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", "--ckpt", str(tmp_path), "mode=greedy"]) == 2
    assert "mode must be one of mode, sample" in capsys.readouterr().err


def test_eval_modes_are_the_run_eval_mode_names_with_the_old_names_as_aliases(tmp_path, monkeypatch, capsys):
    import lit_dreamer.evaluation as evaluation
    from lit_dreamer.__main__ import main
    from lit_dreamer.config import ConfigError

    seen = []

    def evaluate_checkpoint(ckpt, options, env_overrides):
        seen.append(options.mode)
        raise ConfigError("stop here")

    monkeypatch.setattr(evaluation, "evaluate_checkpoint", evaluate_checkpoint)
    ckpt = str(tmp_path / "model.ckpt")
    for mode in ("mode", "sample"):
        assert main(["eval", "--ckpt", ckpt, f"mode={mode}"]) == 2
        assert capsys.readouterr().err == "error: stop here\n"
    for old, new in (("deterministic", "mode"), ("stochastic", "sample")):
        assert main(["eval", "--ckpt", ckpt, f"mode={old}"]) == 2
        err = capsys.readouterr().err.splitlines()
        assert err == [f"warning: mode={old} is deprecated and will be removed; use mode={new}", "error: stop here"]
    assert seen == ["mode", "sample", "mode", "sample"]
    assert evaluation.EvalOptions().mode == "mode" and evaluation.EVAL_MODES == ("mode", "sample")
    assert load_config([], ["run.eval_mode=sample"]).run.eval_mode == "sample"


def test_eval_help_names_the_modes(capsys):
    import pytest
    from lit_dreamer.__main__ import main
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "mode=mode|sample" in text and "deterministic|stochastic are deprecated aliases" in text
