"""scripts/multitask_curves.py: multi-task against single-task runs at equal per-task env steps, on a fake store.

The store (built once per module through the real MlflowClient) holds
  in experiment lit_dreamer: a 2-task multi-task config, seeds 0-1 (run names mt-seed0, mt-seed1), logging
    env.tasks and eval/<task>/return (MULTI below) at total env steps 0, 2000, 4000 (per task: 0, 1000, 2000);
  in experiment single: single-task runs (env.id) logging eval/return (SINGLE below) at 0, 1000, 2000,
    3 seeds of task 0 and 2 of task 1, whose returns are negative (so its ratio is not defined).
"""

import csv
import json

import matplotlib.image
import numpy as np
import pytest
from mlflow.entities import Metric

from lit_dreamer.config import task_metric_name
from tests.test_compare import T0, log_run, new_store
from tests.test_examples import REPO, load_script

TASKS = ["lit_dreamer/PointGoal-0-v0", "lit_dreamer/PointGoal-1-v0"]
MULTI_STEPS = [0, 2000, 4000]
SINGLE_STEPS = [0, 1000, 2000]
MULTI = {  # seed -> per task, the returns at MULTI_STEPS
    0: [[0.0, 2.0, 5.0], [-1.0, 1.0, 3.0]],
    1: [[0.0, 3.0, 6.0], [-2.0, 0.0, 4.5]],
}
SINGLE = {  # task index -> per seed, the returns at SINGLE_STEPS
    0: [[0.0, 4.0, 6.0], [0.0, 2.0, 7.0], [1.0, 3.0, 8.0]],
    1: [[-3.0, -2.0, -1.0], [-3.0, -1.0, -0.5]],
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    uri, client, (multi_experiment, single_experiment) = new_store(root, "lit_dreamer", "single")
    ids = {"multi": [], "single": {0: [], 1: []}}
    for seed, per_task in MULTI.items():
        mean = np.mean(per_task, axis=0)  # eval/return: the mean over tasks, as the eval callback logs it
        run_id = log_run(client, multi_experiment, f"mt-seed{seed}", {"env.tasks": str(TASKS), "run.seed": seed},
                         list(zip(MULTI_STEPS, mean)), start=T0, end=T0 + 60_000)
        client.log_batch(run_id, metrics=[Metric(f"eval/{task_metric_name(task)}/return", value, T0 + i, step)
                                          for task, curve in zip(TASKS, per_task)
                                          for i, (step, value) in enumerate(zip(MULTI_STEPS, curve))])
        ids["multi"].append(run_id)
    for k, seeds in SINGLE.items():
        for seed, curve in enumerate(seeds):
            ids["single"][k].append(log_run(client, single_experiment, f"single{k}-seed{seed}",
                                            {"env.id": TASKS[k], "run.seed": seed}, list(zip(SINGLE_STEPS, curve)),
                                            start=T0, end=T0 + 60_000))
    return {"uri": uri, "ids": ids}


@pytest.fixture
def script(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    return load_script("multitask_curves.py")


def run_script(script, capsys, store, tmp_path, *args):
    """main's exit code, printed lines and (on success) the final JSON line."""
    code = script.main(["--tracking-uri", store["uri"], "--out", str(tmp_path / "mt.png"), *args])
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    return code, lines, json.loads(lines[-1]) if code == 0 else None, captured.err


def trimmed(values) -> float:
    """rliable's IQM by hand: drop floor(n/4) values at each end of the sorted values, average the rest."""
    ordered, cut = np.sort(values), len(values) // 4
    return float(ordered[cut:len(values) - cut].mean())


def all_singles(store) -> list[str]:
    return [run_id[:10] for k in (0, 1) for run_id in store["ids"]["single"][k]]  # id prefixes


def test_table_at_the_last_common_per_task_step(script, store, tmp_path, capsys):
    code, lines, result, err = run_script(script, capsys, store, tmp_path, "--multi", "mt-seed0", "mt-seed1",
                                          "--single", *all_singles(store))
    assert code == 0, err
    assert result["tasks"] == TASKS and result["multi"] == store["ids"]["multi"]
    rows = {r["task"]: r for r in result["per_task"]}
    for k, task in enumerate(TASKS):
        row = rows[task]
        # Total step 4000 of 2 tasks is per-task step 2000, where the single-task runs end too.
        assert row["per_task_env_steps"] == 2000 == SINGLE_STEPS[-1] == MULTI_STEPS[-1] / len(TASKS)
        multi = np.array([MULTI[s][k][-1] for s in MULTI])
        single = np.array([curve[-1] for curve in SINGLE[k]])
        assert row["multi"]["n"] == 2 and row["single"]["n"] == len(single)
        assert row["step_from"] == "both"
        assert row["multi"]["iqm"] == pytest.approx(trimmed(multi))
        assert row["multi"]["mean"] == pytest.approx(multi.mean())
        assert row["single"]["iqm"] == pytest.approx(trimmed(single))
        assert row["single"]["mean"] == pytest.approx(single.mean())
        assert row["diff"] == pytest.approx(trimmed(multi) - trimmed(single))
    assert rows[TASKS[0]]["ratio"] == pytest.approx(trimmed([5.0, 6.0]) / trimmed([6.0, 7.0, 8.0]))
    assert rows[TASKS[0]]["meets_target"] is False  # 5.5 / 7 < 0.9
    assert rows[TASKS[1]]["ratio"] is None and rows[TASKS[1]]["meets_target"] is None  # single IQM < 0
    # All tasks: the IQM over the pooled (task, seed) values; with 4 and 5 values it differs from the mean.
    multi_all = [MULTI[s][k][-1] for k in (0, 1) for s in MULTI]
    single_all = [curve[-1] for k in (0, 1) for curve in SINGLE[k]]
    overall = result["overall"]
    assert overall["multi"]["iqm"] == pytest.approx(trimmed(multi_all)) != pytest.approx(np.mean(multi_all))
    assert overall["single"]["iqm"] == pytest.approx(trimmed(single_all)) != pytest.approx(np.mean(single_all))
    assert overall["ratio"] == pytest.approx(trimmed(multi_all) / trimmed(single_all))
    assert overall["mean_task_ratio"] == pytest.approx(rows[TASKS[0]]["ratio"]) and overall["tasks_with_ratio"] == 1
    assert overall["every_task_meets_target"] is None  # task 1 has no ratio
    table = "\n".join(lines)
    assert "both kinds end there, BELOW 0.9" in next(line for line in lines if line.startswith(TASKS[0]))
    assert "ratio n/a: single IQM <= baseline" in table
    assert "only meaningful where the single-task IQM is above the baseline" in table
    assert f"{trimmed(multi_all):.2f}" in next(line for line in lines if line.startswith("all tasks (2)"))


def test_baseline_makes_the_ratio_the_share_of_the_single_task_gain_over_it(script, store, tmp_path, capsys):
    """With --baseline B (e.g. a random policy's return) the ratio is (multi - B) / (single - B): defined for
    task 1, whose single-task returns are negative but above B."""
    code, _, result, err = run_script(script, capsys, store, tmp_path, "--multi", "mt-seed0", "mt-seed1",
                                      "--single", *all_singles(store), "--baseline", "-20")
    assert code == 0, err
    assert result["baseline"] == -20.0
    for k, row in enumerate(result["per_task"]):
        multi = trimmed([MULTI[s][k][-1] for s in MULTI])
        single = trimmed([curve[-1] for curve in SINGLE[k]])
        assert single > -20.0 and row["ratio"] == pytest.approx((multi + 20.0) / (single + 20.0))
        assert row["diff"] == pytest.approx(multi - single)  # the difference does not depend on B
    assert result["overall"]["tasks_with_ratio"] == 2


def test_at_interpolates_each_run_between_its_evals(script, store, tmp_path, capsys):
    code, _, result, err = run_script(script, capsys, store, tmp_path, "--multi", "mt-seed0", "mt-seed1",
                                      "--single", *all_singles(store), "--at", "1500")
    assert code == 0, err
    row = result["per_task"][0]
    # Per-task step 1500 is total step 3000, halfway between the multi-task evals at 2000 and 4000.
    multi = [(MULTI[s][0][1] + MULTI[s][0][2]) / 2 for s in MULTI]
    single = [(curve[1] + curve[2]) / 2 for curve in SINGLE[0]]
    assert row["per_task_env_steps"] == 1500 and row["step_from"] == "--at"
    assert row["multi"]["values"] == pytest.approx(multi) and row["single"]["values"] == pytest.approx(single)


def test_csv_has_every_logged_eval_at_per_task_steps(script, store, tmp_path, capsys):
    code, _, result, err = run_script(script, capsys, store, tmp_path, "--multi", "mt-seed0", "mt-seed1",
                                      "--single", *all_singles(store), "--csv", str(tmp_path / "rows.csv"))
    assert code == 0, err
    with open(tmp_path / "rows.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["task", "kind", "run", "per_task_env_steps", "return"]
    expected = {(task, "multi", store["ids"]["multi"][s], str(step // 2), float(value))
                for s in MULTI for task, curve in zip(TASKS, MULTI[s]) for step, value in zip(MULTI_STEPS, curve)}
    expected |= {(TASKS[k], "single", store["ids"]["single"][k][seed], str(step), float(value))
                 for k in SINGLE for seed, curve in enumerate(SINGLE[k]) for step, value in zip(SINGLE_STEPS, curve)}
    got = [(r["task"], r["kind"], r["run"], r["per_task_env_steps"], float(r["return"])) for r in rows]
    assert len(got) == len(expected) == 2 * 2 * 3 + 5 * 3 and set(got) == expected
    assert result["csv"] == str(tmp_path / "rows.csv")


def test_one_panel_per_task_with_each_kinds_runs_and_mean(script, store, tmp_path, capsys):
    code, _, _, err = run_script(script, capsys, store, tmp_path, "--multi", "mt-seed0", "mt-seed1",
                                 "--single", *all_singles(store), "--label-multi", "MT", "--label-single", "ST")
    assert code == 0, err
    assert matplotlib.image.imread(tmp_path / "mt.png").shape == (380, 1100, 4)  # two 5.5 x 3.8 inch panels
    tasks, curves = script.load_curves(store["uri"], ["mt-seed0", "mt-seed1"], all_singles(store))
    result = script.comparison(tasks, curves, None, 0.9)
    figure = script.plot_tasks(tasks, curves, result, {"multi": "MT", "single": "ST"})
    assert [axes.get_title() for axes in figure.axes] == TASKS
    for k, axes in enumerate(figure.axes):
        labelled = [line.get_label() for line in axes.get_lines() if not line.get_label().startswith("_")]
        assert labelled == ["MT (n=2)", f"ST (n={len(SINGLE[k])})"]
        # Each run thin, each kind's mean, and the dotted line at the compared step.
        assert len(axes.get_lines()) == (2 + 1) + (len(SINGLE[k]) + 1) + 1
        assert max(line.get_xdata()[-1] for line in axes.get_lines()[:3]) == 2000  # per-task steps on x


def test_a_task_without_single_task_runs_is_shown_and_marked(script, store, tmp_path, capsys):
    singles = [run_id[:10] for run_id in store["ids"]["single"][0]]
    code, lines, result, err = run_script(script, capsys, store, tmp_path, "--multi", "mt-seed0", "mt-seed1",
                                          "--single", *singles)
    assert code == 0, err
    row = {r["task"]: r for r in result["per_task"]}[TASKS[1]]
    assert not row["has_single"] and row["single"] is None and row["ratio"] is None and row["diff"] is None
    assert row["multi"]["mean"] == pytest.approx(np.mean([MULTI[s][1][-1] for s in MULTI]))
    assert "NO SINGLE-TASK RUN (multi only)" in next(line for line in lines if line.startswith(TASKS[1]))
    assert result["overall"]["tasks"] == 1 and result["overall"]["every_task_meets_target"] is False
    tasks, curves = script.load_curves(store["uri"], ["mt-seed0", "mt-seed1"], singles)
    figure = script.plot_tasks(tasks, curves, script.comparison(tasks, curves, None, 0.9),
                               {"multi": "m", "single": "s"})
    assert [axes.get_title() for axes in figure.axes] == [TASKS[0], f"{TASKS[1]} (no single-task run)"]
    assert len(figure.axes[1].get_lines()) == (2 + 1) + 1  # multi runs, mean, compared step


@pytest.mark.parametrize("args, message", [
    (["--multi", "nope"], "no run has the id, id prefix or name 'nope'"),
    (["--multi", "mt-seed0", "--single", "mt-seed1"], "trains 2 tasks: pass it to --multi"),
    (["--multi", "single0-seed0"], "trains one task (lit_dreamer/PointGoal-0-v0): pass it to --single"),
    (["--multi", "mt-seed0", "mt-seed0"], "named already as 'mt-seed0'"),
])
def test_bad_runs_exit_2_naming_the_problem(script, store, tmp_path, capsys, args, message):
    code, _, _, err = run_script(script, capsys, store, tmp_path, *args)
    assert code == 2 and err.startswith("error: ") and message in err
    assert not (tmp_path / "mt.png").exists()


def test_the_compared_step_is_where_the_first_kind_ends(script):
    def curve(kind: str, steps: list[float]):
        return script.Curve("task", kind, kind, kind, np.array(steps, dtype=float), np.arange(len(steps), dtype=float))

    ended = [curve("multi", [0, 500, 1000]), curve("multi", [0, 2000]), curve("single", [0, 1500, 3000])]
    assert script.compared_step(ended, None) == (1000, "multi")
    assert script.compared_step([curve("multi", [0, 4000]), curve("single", [0, 3000])], None) == (3000, "single")
    assert script.compared_step([curve("multi", [0, 4000])], None) == (4000, "multi")  # no single-task run
    assert script.compared_step([curve("multi", [0, 4000])], 100.0) == (100.0, "--at")


def exported(store, tmp_path, name: str, run_ids: list[str], metrics: list[str]) -> str:
    """The runs exported by scripts/export_results.py, as docs/results/ keeps them."""
    export = load_script("export_results.py").export
    path = str(tmp_path / name)
    export(path, run_ids, store["uri"], metrics)
    return path


def test_exported_csvs_give_the_table_of_the_store(script, store, tmp_path, capsys):
    """Runs read back from export_results' CSVs (stores gone or several) compare exactly as from MLflow."""
    singles = store["ids"]["single"]
    _, _, from_store, err = run_script(script, capsys, store, tmp_path, "--multi", "mt-seed0", "mt-seed1",
                                       "--single", *all_singles(store))
    multi_csv = exported(store, tmp_path, "multi.csv", store["ids"]["multi"],
                         [f"eval/{task_metric_name(task)}/return" for task in TASKS] + ["eval/return"])
    single_csvs = [f"{TASKS[k]}=" + exported(store, tmp_path, f"single{k}.csv", singles[k], ["eval/return"])
                   for k in (0, 1)]
    code, _, from_csv, err = run_script(script, capsys, {"uri": "sqlite:///nowhere.db"}, tmp_path,
                                        "--multi-csv", multi_csv, "--single-csv", *single_csvs)
    assert code == 0, err
    # The exported runs' tasks are the metrics' segments; every figure is the store's.
    assert from_csv["tasks"] == [task_metric_name(task) for task in TASKS]
    for row_csv, row_store in zip(from_csv["per_task"], from_store["per_task"]):
        assert row_csv["task"] == task_metric_name(row_store["task"])
        assert unordered(row_csv) | {"task": ""} == unordered(row_store) | {"task": ""}  # a CSV lists runs by id
    assert unordered(from_csv["overall"]) == unordered(from_store["overall"])
    # Kinds from both sources: the multi-task runs from the store, task 1's single-task runs from a CSV.
    code, _, mixed, err = run_script(script, capsys, store, tmp_path, "--multi", "mt-seed0", "mt-seed1",
                                     "--single", *[run_id[:10] for run_id in singles[0]],
                                     "--single-csv", "lit_dreamer_PointGoal-1-v0=" + single_csvs[1].split("=", 1)[1])
    assert code == 0, err
    assert [unordered(row) for row in mixed["per_task"]] == [unordered(row) for row in from_store["per_task"]]


def unordered(row: dict) -> dict:
    """A table row with each kind's values sorted: the same runs, whatever order they were read in."""
    return row | {kind: row[kind] | {"values": sorted(row[kind]["values"])} for kind in ("multi", "single")
                  if row.get(kind)}


def test_bad_csv_inputs_exit_2_naming_the_problem(script, store, tmp_path, capsys):
    single0 = exported(store, tmp_path, "single0.csv", store["ids"]["single"][0], ["eval/return"])
    multi = exported(store, tmp_path, "multi.csv", store["ids"]["multi"],
                     [f"eval/{task_metric_name(task)}/return" for task in TASKS])
    for args, message in [
        (["--multi-csv", single0], "has eval/<task>/return for 0 task(s)"),
        (["--multi-csv", multi, "--single-csv", single0], "--single-csv takes TASK=FILE"),
        (["--multi-csv", multi, "--single-csv", f"dmc/walker-walk={single0}"], "dmc/walker-walk is not a task"),
        (["--multi-csv", multi, "--single-csv", f"{TASKS[0]}={tmp_path}/none.csv"], "no such CSV file"),
        (["--multi-csv", multi, "--multi", "mt-seed0"], "one of them"),
        (["--multi-csv", multi, "--single-csv", f"{TASKS[0]}={single0}", f"{TASKS[0]}={single0}"], "named twice"),
        (["--single", "single0-seed0"], "one of them"),
    ]:
        code, _, _, err = run_script(script, capsys, store, tmp_path, *args)
        assert code == 2 and message in err, (args, err)
