"""`compare`: golden values for the statistics, and the command on a fake MLflow store with known curves.

The store (built once per module through the real MlflowClient) holds, in experiment lit_dreamer:
  CartPole-v1 seeds 0-2: eval/return = (seed+1) * step/1000 at steps 0, 2000, ..., 10000; wall (seed+1)*100 s
  Pendulum-v1 seeds 0-2: eval/return = 100 - (seed+1) * step/1000; seed 2 stops at 8000; wall 200 s
  no-env: no env.id param, one eval/return point (7 at step 500), never terminated (still "running")
  an eval run (tagged lit_dreamer.kind=eval) of CartPole-v1 with eval/return 999, left out unless kinds= asks
and in experiment "other" a run with only train/return and one with only eval/return. train/env_steps = step wherever eval/return is logged.
"""

import os
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from numpy.testing import assert_allclose

from lit_dreamer.__main__ import main
from lit_dreamer.compare import (CompareOptions, bootstrap_ci, format_duration, format_table,
                                 group_curve, history_arrays, interpolate_to_grid, iqm, load_runs, plot_comparison,
                                 short_commit, source_commit, step_grid)

T0 = 1_700_000_000_000  # ms
COMMIT_A = "0123456789abcdef" * 2 + "01234567"
COMMIT_B = "fedcba98" + "7" * 32 + "+dirty"


# --------------------------------------------------------------------------------------------------
# Statistics


@pytest.mark.parametrize("values, expected", [
    # rliable's IQM is scipy.stats.trim_mean(x, 0.25): drop floor(n/4) values at each end, plain mean of the rest.
    ([4.0, 1.0, 3.0, 2.0], 2.5),                      # n=4: drop 1 each end, mean of 2, 3
    # Uneven gaps, so that weighting the edge values in part (the old definition) would give another number.
    ([0, 1, 2, 10, 1000], 13 / 3),                    # n=5: drop 1 each end, (1 + 2 + 10) / 3
    ([20, 1, 3, 100, 2, 10], 8.75),                   # n=6: drop 1 each end, (2 + 3 + 10 + 20) / 4
    ([70, 10, 4, 3, 2, 1, -50], 4.0),                 # n=7: drop 1 each end, (1 + 2 + 3 + 4 + 10) / 5
    ([1, 2, 3, 4, 5, 6, 7, 100], 4.5),                # n=8: drop 2 each end, (3 + 4 + 5 + 6) / 4
    ([1.0, 2.0, 10.0], 13 / 3),                       # n=3: nothing dropped
    ([3.0, 5.0], 4.0),
    ([7.0], 7.0),
])
def test_iqm_golden_values(values, expected):
    assert iqm(values) == pytest.approx(expected)
    scipy_stats = pytest.importorskip("scipy.stats")
    assert iqm(values) == pytest.approx(scipy_stats.trim_mean(values, 0.25))  # rliable's aggregate_iqm


def test_iqm_along_an_axis_and_empty():
    assert_allclose(iqm(np.array([[4, 1, 3, 2], [10, 10, 0, 0]]), axis=-1), [2.5, 5.0])
    assert_allclose(iqm(np.array([[4, 10], [1, 10], [3, 0], [2, 0]]), axis=0), [2.5, 5.0])
    assert np.isnan(iqm([]))


def test_bootstrap_ci_equal_values_give_a_zero_width_interval():
    assert bootstrap_ci([2.5] * 5) == (2.5, 2.5)
    assert bootstrap_ci([2.5] * 5, statistic=iqm) == (2.5, 2.5)
    assert bootstrap_ci([4.0]) == (4.0, 4.0)


def test_bootstrap_ci_hand_computed_two_values():
    # Resampled means of [0, 1] are 0, 0.5, 1 with probability 1/4, 1/2, 1/4: the 2.5% and 97.5% points
    # fall inside the first and last quarter.
    assert bootstrap_ci([0.0, 1.0]) == (0.0, 1.0)
    assert bootstrap_ci([0.0, 1.0], confidence=0.4) == (0.5, 0.5)


def test_bootstrap_ci_covers_a_known_mean_and_is_reproducible():
    rng = np.random.default_rng(123)
    samples = rng.normal(5.0, 2.0, size=(200, 20))
    intervals = np.array([bootstrap_ci(s) for s in samples])
    coverage = np.mean((intervals[:, 0] <= 5.0) & (5.0 <= intervals[:, 1]))
    assert 0.88 <= coverage <= 0.99, coverage  # nominal 0.95; the percentile bootstrap runs a bit short at n=20
    assert np.all(intervals[:, 0] <= samples.mean(axis=1)) and np.all(samples.mean(axis=1) <= intervals[:, 1])
    assert bootstrap_ci(samples[0], seed=7) == bootstrap_ci(samples[0], seed=7) != bootstrap_ci(samples[0], seed=8)
    assert np.isnan(bootstrap_ci([])).all()


def test_interpolate_to_grid_is_linear_inside_and_nan_outside():
    out = interpolate_to_grid([0, 10, 20], [0, 1, 4], [-5, 0, 5, 15, 20, 25])
    assert_allclose(out, [np.nan, 0, 0.5, 2.5, 4, np.nan])
    assert np.isnan(interpolate_to_grid([], [], [0, 1])).all()
    with pytest.raises(AssertionError, match="steps must increase"):
        interpolate_to_grid([0, 10, 5], [1, 2, 3], [0])


def test_history_arrays_sorts_and_keeps_the_newer_value_of_a_repeated_step():
    steps, values = history_arrays([(20, 3, 2.0), (0, 1, 0.0), (10, 2, 1.0), (10, 9, 1.5)])  # (step, time, value)
    assert_allclose(steps, [0, 10, 20]) and assert_allclose(values, [0, 1.5, 2.0])


def test_step_grid_spans_the_group_and_hits_regular_steps():
    assert_allclose(step_grid([np.array([0, 2000, 4000]), np.array([0, 2000, 4000, 6000])]), [0, 2000, 4000, 6000])
    assert len(step_grid([np.arange(1000.0)], max_points=200)) == 200
    assert_allclose(step_grid([np.array([100.0]), np.array([300.0])]), [100, 300])
    assert_allclose(step_grid([np.array([100.0])]), [100])


def test_group_curve_of_ramps():
    steps = np.arange(0, 10_001, 2000.0)
    runs = [(steps, (seed + 1) * steps / 1000) for seed in range(3)] + [(steps[:-1], 4 * steps[:-1] / 1000)]
    group = group_curve("g", runs)
    assert_allclose(group.grid, steps)
    assert_allclose(group.mean[:-1], (1 + 2 + 3 + 4) / 4 * steps[:-1] / 1000)
    assert group.mean[-1] == pytest.approx(20.0)  # the fourth run stops at 8000: left out at 10000
    assert np.isnan(group.curves[3, -1]) and sorted(group.final_values) == [10, 20, 30]
    assert group.final_iqm == pytest.approx((10 + 20 + 30) / 3)  # n=3: rliable's IQM drops nothing
    assert group.low[0] == group.high[0] == 0.0  # every run starts at 0
    assert np.all(group.low <= group.mean) and np.all(group.mean <= group.high)
    assert group.final_iqm_ci[0] <= group.final_iqm <= group.final_iqm_ci[1]


# --------------------------------------------------------------------------------------------------
# Table formatting


def test_format_table_aligns_text_left_and_numbers_right():
    text = format_table(("run", "id", "group", "final"), [[["a", "1234", "g", "1.50"], ["long-name", "ab", "g", "10.00"]],
                                                         [["mean of 2", "", "g", "5.75"]]])
    assert text == ("run        id    group  final\n"
                    "---------  ----  -----  -----\n"
                    "a          1234  g       1.50\n"
                    "long-name  ab    g      10.00\n"
                    "---------  ----  -----  -----\n"
                    "mean of 2        g       5.75")


def test_value_formats():
    assert format_duration(3725.4) == "1:02:05" and format_duration(59.6) == "0:01:00" and format_duration(None) == "-"
    assert short_commit(COMMIT_A) == "01234567" and short_commit(COMMIT_B) == "fedcba98+dirty"
    assert short_commit("unknown") == "unknown" and short_commit("-") == "-"


# --------------------------------------------------------------------------------------------------
# A fake MLflow store


def log_run(client, experiment_id, name, params, curve, start, end=None, tags=None, metric="eval/return"):
    run = client.create_run(experiment_id, start_time=start, tags=tags or {}, run_name=name)
    metrics = []
    for i, (step, value) in enumerate(curve):
        metrics += [Metric(metric, value, start + 1000 * (i + 1), step),
                    Metric("train/env_steps", step, start + 1000 * (i + 1), step)]
    client.log_batch(run.info.run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()])
    if end is not None:
        client.set_terminated(run.info.run_id, end_time=end)
    return run.info.run_id


def new_store(root, *experiments: str) -> tuple[str, MlflowClient, list[str]]:
    """A fresh sqlite MLflow store in folder `root` with the named experiments: (uri, client, their ids)."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    return uri, client, [client.create_experiment(name, artifact_location=str(root / "artifacts")) for name in experiments]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    uri, client, (main_id, other_id) = new_store(root, "lit_dreamer", "other")
    ids = {}
    for seed in range(3):
        steps = range(0, 10_001, 2000)
        ids["A", seed] = log_run(client, main_id, f"CartPole-v1-seed{seed}", {"env.id": "CartPole-v1", "run.seed": seed},
                                 [(s, (seed + 1) * s / 1000) for s in steps], start=T0,
                                 end=T0 + (seed + 1) * 100_000, tags={"mlflow.source.git.commit": COMMIT_A})
        steps = range(0, 10_001 if seed < 2 else 8001, 2000)
        ids["B", seed] = log_run(client, main_id, f"Pendulum-v1-seed{seed}", {"env.id": "Pendulum-v1", "run.seed": seed},
                                 [(s, 100 - (seed + 1) * s / 1000) for s in steps], start=T0, end=T0 + 200_000,
                                 tags={"git_commit": COMMIT_B} if seed == 0 else {})
    # Never terminated: its wall time runs to its last train/env_steps, logged 1 s after the start.
    ids["C"] = log_run(client, main_id, "no-env", {"run.seed": 0}, [(500, 7.0)], start=T0)
    # An `eval --ckpt` run, tagged as such: it logs eval/return too, but is no training run.
    ids["V"] = log_run(client, main_id, "eval-CartPole-v1-seed0", {"env.id": "CartPole-v1"}, [(0, 999.0)], start=T0,
                       end=T0 + 1000, tags={"lit_dreamer.kind": "eval"})
    log_run(client, other_id, "elsewhere", {}, [(0, 1.0)], start=T0, end=T0 + 1000, metric="train/return")
    ids["E"] = log_run(client, other_id, "not-trained", {}, [(0, 2.0)], start=T0, end=T0 + 1000)
    return {"uri": uri, "ids": ids, "root": root}


def parse_table(text: str) -> dict[str, list[dict]]:
    """Rows of the printed table by their first column, cut at the column spans of the rule line."""
    lines = text.splitlines()
    rule = next(i for i, line in enumerate(lines) if line.startswith("---"))
    spans = [m.span() for m in re.finditer(r"-+", lines[rule])]
    spans[-1] = (spans[-1][0], None)
    cut = lambda line: [line[a:b].strip() for a, b in spans]  # noqa: E731
    header = cut(lines[rule - 1].ljust(len(lines[rule])))
    rows: dict[str, list[dict]] = {}
    for line in lines[rule + 1:]:
        if not line or line.startswith("---"):
            if not line:
                break
            continue
        row = dict(zip(header, cut(line.ljust(len(lines[rule])))))
        rows.setdefault(row["run"], []).append(row)
    return rows


def run_compare(capsys, *args) -> tuple[int, str, str]:
    code = main(["compare", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_table_numbers_match_the_known_curves(store, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_compare(capsys, f"tracking_uri={store['uri']}")
    assert code == 0, err
    rows = parse_table(out)
    a1, b0, b2 = rows["CartPole-v1-seed1"][0], rows["Pendulum-v1-seed0"][0], rows["Pendulum-v1-seed2"][0]
    assert (a1["final"], a1["best"], a1["env steps"], a1["wall"], a1["steps/s"]) == ("20.00", "20.00", "10,000", "0:03:20", "50.0")
    assert (a1["group"], a1["commit"], a1["id"]) == ("CartPole-v1", "01234567", store["ids"]["A", 1][:8])
    assert (b0["final"], b0["best"], b0["commit"]) == ("90.00", "100.00", "fedcba98+dirty")
    assert (b2["final"], b2["env steps"], b2["steps/s"], b2["commit"]) == ("76.00", "8,000", "40.0", "-")
    no_env = rows["no-env"][0]
    assert (no_env["group"], no_env["final"], no_env["wall"], no_env["steps/s"]) == ("-", "7.00", "0:00:01", "500.0")
    means = {row["group"]: row for row in rows["mean of 3"]}
    assert (means["CartPole-v1"]["final"], means["CartPole-v1"]["best"]) == ("20.00", "20.00")
    assert means["CartPole-v1"]["steps/s"] == f"{(100 + 50 + 100 / 3) / 3:.1f}"
    assert means["CartPole-v1"]["wall"] == "0:03:20"
    assert (means["Pendulum-v1"]["final"], means["Pendulum-v1"]["best"]) == (f"{(90 + 80 + 76) / 3:.2f}", "100.00")
    assert means["Pendulum-v1"]["env steps"] == f"{28_000 / 3:,.0f}"
    assert rows["mean of 1"][0]["group"] == "-"
    assert "eval/return of 7 runs in 3 groups -> compare.png" in out
    assert "left out: 1 eval run (kinds=train; add kinds=train,eval to include them)" in out
    assert "eval-CartPole-v1-seed0" not in rows
    iqms = {row["group"]: row for row in rows["IQM of 3"]}
    assert (iqms["CartPole-v1"]["final"], iqms["Pendulum-v1"]["final"]) == ("20.00", f"{(90 + 80 + 76) / 3:.2f}")
    assert "IQM: rliable's 25% trimmed mean (scipy.stats.trim_mean(x, 0.25))" in out
    png = tmp_path / "compare.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    import matplotlib.image
    assert matplotlib.image.imread(png).shape == (450, 1200, 4)  # 12 x 4.5 inches at 100 dpi


def test_plot_has_a_mean_and_run_curves_per_group_and_an_iqm_per_group(store):
    runs = load_runs(CompareOptions(tracking_uri=store["uri"]))
    groups = [group_curve(name, [(r.steps, r.values) for r in runs if r.group == name])
              for name in ("CartPole-v1", "Pendulum-v1", "-")]
    figure = plot_comparison(groups, "eval/return")
    curves_axes, iqm_axes = figure.axes
    assert len(curves_axes.get_lines()) == (3 + 1) + (3 + 1) + (1 + 1)
    labelled = [line for line in curves_axes.get_lines() if not line.get_label().startswith("_")]
    assert [line.get_label() for line in labelled] == ["CartPole-v1 (n=3)", "Pendulum-v1 (n=3)", "- (n=1)"]
    assert [t.get_text() for t in curves_axes.get_legend().get_texts()] == [line.get_label() for line in labelled]
    assert_allclose(labelled[0].get_ydata(), 2 * np.arange(0, 10_001, 2000) / 1000)  # mean of slopes 1, 2, 3
    assert len(curves_axes.collections) == 3  # one CI band per group
    assert (curves_axes.get_xlabel(), curves_axes.get_ylabel()) == ("env steps", "eval/return")
    assert len(iqm_axes.containers) == 3  # one error bar per group
    assert [t.get_text() for t in iqm_axes.get_yticklabels()] == [
        "CartPole-v1\nn=3 at 10,000", "Pendulum-v1\nn=2 at 10,000", "-\nn=1 at 500"]
    assert groups[1].final_iqm == pytest.approx(85.0)  # Pendulum seed 2 ends at 8000, before the last grid step
    assert_allclose(np.asarray(iqm_axes.containers[0].lines[0].get_xdata(), dtype=float), [20.0])


def test_eval_runs_only_when_asked(store, tmp_path, capsys):
    code, out, err = run_compare(capsys, f"tracking_uri={store['uri']}", "kinds=eval", f"out={tmp_path / 'e.png'}")
    assert code == 0, err
    rows = parse_table(out)
    assert set(rows) == {"eval-CartPole-v1-seed0", "mean of 1", "IQM of 1"} and "left out: 7 train runs" in out
    code, out, err = run_compare(capsys, f"tracking_uri={store['uri']}", "kinds=train,eval", f"out={tmp_path / 'e.png'}")
    assert code == 0, err
    assert parse_table(out)["mean of 4"][0]["final"] == f"{(10 + 20 + 30 + 999) / 4:.2f}" and "left out" not in out
    code, out, err = run_compare(capsys, f"tracking_uri={store['uri']}", "kinds=evaluation")
    assert code == 2 and "kinds='evaluation': use a comma-separated list of train, eval" in err


def test_select_runs_and_group_by_another_param(store, tmp_path, capsys):
    a0, b1 = store["ids"]["A", 0][:8], store["ids"]["B", 1]
    code, out, err = run_compare(capsys, f"tracking_uri={store['uri']}", f"runs={a0},{b1}", "group_by=run.seed",
                                 f"out={tmp_path / 'sub' / 'two.png'}")
    assert code == 0, err
    rows = parse_table(out)
    assert set(rows) == {"CartPole-v1-seed0", "Pendulum-v1-seed1", "mean of 1", "IQM of 1"}
    assert {row["group"]: row["final"] for row in rows["mean of 1"]} == {"0": "10.00", "1": "80.00"}
    assert (tmp_path / "sub" / "two.png").stat().st_size > 10_000


@pytest.mark.parametrize("args, message", [
    (["experiment=nope"], "no experiment 'nope'; experiments: Default, lit_dreamer, other (compare reads MLflow only"),
    (["metric=eval/nope"], "no run has the metric 'eval/nope'; metrics: eval/return, train/env_steps"),
    (["experiment=other", "metric=eval/nope"], "metrics: eval/return, train/env_steps, train/return"),
    (["runs=zzzz"], "run id 'zzzz' matches no run"),
    (["experimnt=lit_dreamer"], "did you mean experiment="),
])
def test_what_does_not_exist_exits_2_naming_what_does(store, tmp_path, capsys, args, message):
    code, out, err = run_compare(capsys, f"tracking_uri={store['uri']}", f"out={tmp_path / 'x.png'}", *args)
    assert code == 2 and message in err, err
    assert not (tmp_path / "x.png").exists()


def test_runs_without_the_metric_are_listed_not_plotted(store, tmp_path, capsys):
    code, out, err = run_compare(capsys, f"tracking_uri={store['uri']}", "experiment=other", "metric=train/return",
                                 f"out={tmp_path / 'other.png'}")
    assert code == 0, err
    rows = parse_table(out)
    assert (rows["elsewhere"][0]["final"], rows["not-trained"][0]["final"], rows["not-trained"][0]["best"]) == ("1.00", "-", "-")
    assert rows["mean of 2"][0]["final"] == "1.00"  # the mean over the runs that have the metric
    assert f"train/return of 1 run in 1 group -> {tmp_path / 'other.png'} (1 run without train/return: " \
           f"{store['ids']['E'][:8]})" in out


def test_commit_prefers_mlflows_tag_unless_fits_tag_only_adds_dirty():
    def run(tags, params=None):
        return SimpleNamespace(data=SimpleNamespace(tags=tags, params=params or {}))
    assert source_commit(run({"mlflow.source.git.commit": "abc", "git_commit": "abc+dirty"})) == "abc+dirty"
    assert source_commit(run({"mlflow.source.git.commit": "abc", "git_commit": "def"})) == "abc"
    assert source_commit(run({"git_commit": "unknown"})) == "unknown"
    assert source_commit(run({}, {"git_commit": "def"})) == "def"
    assert source_commit(run({})) == "-"


def test_a_missing_database_is_not_created(tmp_path, capsys):
    code, _, err = run_compare(capsys, f"tracking_uri=sqlite:///{tmp_path / 'none.db'}")
    assert code == 2 and "no MLflow database at" in err and not (tmp_path / "none.db").exists()
    assert "compare reads MLflow only: runs trained with logger.backend=tensorboard, csv or none" in err


def test_compare_from_the_command_line(store, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lit_dreamer", "compare", f"tracking_uri={store['uri']}",
                           "metric=eval/return"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert parse_table(proc.stdout)["Pendulum-v1-seed1"][0]["final"] == "80.00"
    assert (tmp_path / "compare.png").stat().st_size > 20_000


# --------------------------------------------------------------------------------------------------
# fit records the commit of the code


def test_git_commit_of_the_checkout_and_outside_git(tmp_path):
    from lit_dreamer.train import git_commit
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", git_commit()) or git_commit() == "unknown"
    assert git_commit(str(tmp_path)) == "unknown"


@pytest.mark.timeout(120)
def test_fit_tags_the_run_with_the_git_commit(tmp_path, monkeypatch):
    import torch

    from lit_dreamer.config import load_config
    from lit_dreamer.train import fit, git_commit
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LIT_DREAMER_RUN_NAME", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        summary = fit(load_config(["debug"], [f"run.dir={tmp_path / 'run'}", f"logger.tracking_uri={uri}",
                                              "run.steps=24", "run.prefill=16"]))
    finally:
        torch.set_num_threads(threads)
    run = MlflowClient(tracking_uri=uri).get_run(summary["mlflow_run_id"])
    assert run.data.tags["git_commit"] == git_commit()
    assert run.data.tags["lit_dreamer.kind"] == "train"  # compare leaves out runs of kind eval
