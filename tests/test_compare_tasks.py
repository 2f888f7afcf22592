"""`compare metric=eval/*/return`: per-task metrics of multi-task runs, one table section and panel per task.

The store (built once per module through the real MlflowClient) holds, in experiment lit_dreamer, runs that
log eval/<task>/return for two tasks (and eval/return, their mean) at steps 0, 1000, 2000, 3000:
  conditioning=embedding, seeds 0-4 and conditioning=heads, seeds 0-1: random returns (fixed numpy seed);
  one-task: a run of one task (param multitask.conditioning absent) that logs eval/return only.
"""

import matplotlib.image
import numpy as np
import pytest
from mlflow.entities import Metric

import lit_dreamer.compare as compare
from lit_dreamer.compare import run_group
from lit_dreamer.config import task_metric_name
from tests.test_compare import T0, log_run, new_store, parse_table, run_compare

TASKS = ["lit_dreamer/PointGoal-0-v0", "lit_dreamer/PointGoal-1-v0"]
KEYS = [f"eval/{task_metric_name(t)}/return" for t in TASKS]  # eval/lit_dreamer_PointGoal-0-v0/return, ...
STEPS = [0, 1000, 2000, 3000]
SEEDS = {"embedding": 5, "heads": 2}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    uri, client, (experiment,) = new_store(root, "lit_dreamer")
    rng = np.random.default_rng(0)
    returns, ids = {}, {}
    for group, seeds in SEEDS.items():
        for seed in range(seeds):
            name = f"{group}-seed{seed}"
            curves = rng.uniform(0, 100, size=(len(KEYS), len(STEPS))).round(2)
            ids[name] = log_run(client, experiment, name, {"multitask.conditioning": group, "run.seed": seed},
                                list(zip(STEPS, curves.mean(axis=0))), start=T0, end=T0 + 60_000)
            client.log_batch(ids[name], metrics=[Metric(key, value, T0 + 1000 * (i + 1), step)
                                                 for key, curve in zip(KEYS, curves)
                                                 for i, (step, value) in enumerate(zip(STEPS, curve))])
            returns[name] = dict(zip(KEYS, curves))
    ids["one-task"] = log_run(client, experiment, "one-task", {"run.seed": 0}, [(0, 5.0), (1000, 6.0)], start=T0,
                              end=T0 + 60_000)
    return {"uri": uri, "returns": returns, "ids": ids}


def table_blocks(out: str) -> dict[str, dict[str, list[dict]]]:
    """The printed tables by their title line (a metric key; 'runs' for the untitled last one)."""
    blocks = {}
    for block in out.split("\n\n"):
        lines = block.splitlines()
        if len(lines) > 2 and lines[2].startswith("---"):  # title, header, rule
            blocks[lines[0]] = parse_table("\n".join(lines[1:]))
        elif len(lines) > 1 and lines[1].startswith("---"):
            blocks["runs"] = parse_table(block)
    return blocks


def test_a_pattern_gives_each_task_its_section_with_the_logged_numbers(store, tmp_path, capsys):
    out_png = tmp_path / "tasks.png"
    code, out, err = run_compare(capsys, f"tracking_uri={store['uri']}", "metric=eval/*/return",
                                 "group_by=multitask.conditioning", f"out={out_png}")
    assert code == 0, err
    blocks = table_blocks(out)
    assert set(blocks) == {*KEYS, "runs"}  # eval/return (one segment fewer) is not matched
    for key in KEYS:
        rows = blocks[key]
        for name, curves in store["returns"].items():
            assert rows[name][0]["final"] == f"{curves[key][-1]:.2f}"
            assert rows[name][0]["best"] == f"{curves[key].max():.2f}"
        assert rows["one-task"][0]["final"] == "-"  # a one-task run has no per-task metric
        finals = np.array([store["returns"][f"embedding-seed{s}"][key][-1] for s in range(5)])
        means = {row["group"]: row for row in rows["mean of 5"]}
        iqms = {row["group"]: row for row in rows["IQM of 5"]}
        assert means["embedding"]["final"] == f"{finals.mean():.2f}"
        assert iqms["embedding"]["final"] == f"{np.sort(finals)[1:-1].mean():.2f}"  # n=5: drop one at each end
        assert means["embedding"]["final"] != iqms["embedding"]["final"]  # the data tell the two apart
        heads = [store["returns"][f"heads-seed{s}"][key][-1] for s in range(2)]
        assert {row["group"]: row["final"] for row in rows["mean of 2"]} == {"heads": f"{np.mean(heads):.2f}"}
        assert "env steps" not in rows["embedding-seed0"][0]  # run-level columns come once, below
    runs = blocks["runs"]
    assert runs["heads-seed1"][0]["env steps"] == "3,000" and runs["one-task"][0]["env steps"] == "1,000"
    assert f"eval/*/return: 2 metrics, one panel each -> {out_png}" in out
    assert f"{KEYS[1]}: 2 groups (1 run without {KEYS[1]}: {store['ids']['one-task'][:8]})" in out
    assert matplotlib.image.imread(out_png).shape == (380, 1000, 4)  # two 5 x 3.8 inch panels side by side


def test_main_returns_and_plots_one_panel_per_task(store, tmp_path, capsys):
    options = compare.CompareOptions(tracking_uri=store["uri"], metric="eval/*/return",
                                     group_by="multitask.conditioning", out=str(tmp_path / "t.png"))
    curves = compare.main(options)
    capsys.readouterr()
    assert list(curves) == KEYS
    for key in KEYS:
        embedding = next(g for g in curves[key] if g.name == "embedding")
        logged = np.array([store["returns"][f"embedding-seed{s}"][key] for s in range(5)])
        np.testing.assert_allclose(embedding.mean, logged.mean(axis=0))  # the steps are on the grid
    figure = compare.plot_metrics(curves, "eval/*/return")
    assert len(figure.axes) == len(KEYS)
    assert [a.get_title() for a in figure.axes] == [task_metric_name(t) for t in TASKS]
    for axes in figure.axes:
        labelled = [line for line in axes.get_lines() if not line.get_label().startswith("_")]
        assert [line.get_label() for line in labelled] == ["embedding (n=5)", "heads (n=2)"]
        assert [line.get_color() for line in labelled] == ["C0", "C1"]  # a group keeps its color in every panel
        assert len(axes.collections) == 2  # one bootstrap band per group
        assert len(axes.get_lines()) == (5 + 1) + (2 + 1)


def test_a_pattern_that_matches_one_key_is_that_metric(store, tmp_path, capsys):
    code, plain, err = run_compare(capsys, f"tracking_uri={store['uri']}", f"metric={KEYS[0]}",
                                   f"out={tmp_path / 'a.png'}")
    assert code == 0, err
    code, matched, err = run_compare(capsys, f"tracking_uri={store['uri']}", "metric=eval/*0-v0/return",
                                     f"out={tmp_path / 'a.png'}")
    assert code == 0, err
    assert matched == plain and f"{KEYS[0]} of 7 runs in 1 group" in plain


def test_a_pattern_that_matches_nothing_names_the_metrics_there_are(store, tmp_path, capsys):
    code, _, err = run_compare(capsys, f"tracking_uri={store['uri']}", "metric=eval/*/success",
                               f"out={tmp_path / 'x.png'}")
    assert code == 2 and not (tmp_path / "x.png").exists()
    assert ("no metric matches the pattern 'eval/*/success' (* matches any characters, / included); metrics "
            f"starting with 'eval/': {KEYS[0]}, {KEYS[1]}, eval/return") in err, err
    code, _, err = run_compare(capsys, f"tracking_uri={store['uri']}", "metric=evl/*", f"out={tmp_path / 'x.png'}")
    assert code == 2 and f"metrics: {KEYS[0]}, {KEYS[1]}, eval/return, train/env_steps" in err, err


def test_listed_shortens_a_long_list():
    keys = [f"train/loss/{i}" for i in range(15)]
    assert compare.listed(keys) == ", ".join(keys[:12]) + ", ... (3 more)"
    assert compare.listed(keys[:2]) == "train/loss/0, train/loss/1" and compare.listed([]) == "none"


@pytest.mark.parametrize("pattern, key, title", [
    ("eval/*/return", "eval/lit_dreamer_PointGoal-0-v0/return", "lit_dreamer_PointGoal-0-v0"),
    ("train/*", "train/return", "return"),
    ("eval/*return", "eval/return", "eval/return"),  # * matched nothing: the key itself
    ("eval/[ab]*/return", "eval/a1/return", "a1"),
])
def test_panel_title_is_what_the_wildcards_matched(pattern, key, title):
    assert compare.panel_title(pattern, key) == title


def test_grouped_by_env_id_a_multi_task_run_falls_in_the_group_of_its_task_list():
    tasks = "['lit_dreamer/PointGoal-0-v0', 'lit_dreamer/PointGoal-1-v0']"
    assert run_group({"env.id": "CartPole-v1", "env.tasks": "[]"}, "env.id") == "CartPole-v1"
    assert run_group({"env.tasks": tasks}, "env.id") == tasks  # multi-task runs log no env.id
    assert run_group({"env.tasks": tasks, "run.seed": "3"}, "run.seed") == "3"
    assert run_group({"env.tasks": tasks}, "run.seed") == "-"
