"""Multi-task runs against single-task runs of the same tasks, at equal per-task env steps (issue 22, result 1).

    python scripts/multitask_curves.py --multi RUN [RUN ...] --single RUN [RUN ...] [--tracking-uri URI]
        [--out multitask_curves.png] [--csv CSV] [--at STEPS] [--target 0.9] [--label-multi L] [--label-single L]
    python scripts/multitask_curves.py --multi-csv FILE [FILE ...] --single-csv TASK=FILE [TASK=FILE ...] [...]

RUN is a run id, a unique id prefix or a unique run name, in any experiment of the MLflow store (default:
$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db). The --multi runs are the seeds of one multi-task config: they
log the param env.tasks (K tasks) and eval/<task>/return, where <task> is config.task_metric_name of the env id,
against env steps over all K tasks; every task runs env.num_envs envs, so a task's own env steps are the
MLflow step / K. Each --single run trains one task (its env.id param, or an env.tasks of one) and logs
eval/return against its env steps, which are that task's env steps.

Runs can also come from curves exported by scripts/export_results.py (docs/results/*.csv, each run_id of a file
one run; for runs whose MLflow stores are gone, or lie in several): --multi-csv files hold multi-task runs'
eval/<task>/return at env steps over all tasks (their tasks are the metrics' <task> segments, in sorted order);
--single-csv TASK=FILE holds single-task runs of TASK (an env id or its metric segment) with eval/return. Either
kind may come from either source; a single-task run's task matches a multi-task one by id or by metric segment.

Per task, both kinds are compared at one per-task env step: --at if given, else the last step that every run of
the task (both kinds) has logged, so that no run is extrapolated (the table says which kind ended first). Each
run's return there is interpolated linearly between its logged evals (compare's interpolation); over the seeds
of a kind the table gives the IQM (rliable's, as compare), mean and count, then
  diff  = IQM multi - IQM single, and
  ratio = (IQM multi - B) / (IQM single - B), with B = --baseline (default 0), e.g. a random policy's return:
          the share of the single-task run's gain over B that the multi-task run makes. Only meaningful when
          the single-task IQM is above B (returns can be negative, e.g. PointGoal's lie in about [-7, 7] and a
          random policy gets about -2): n/a otherwise, and then read diff.
`meets` is ratio >= --target (the issue's 90%). The row `all tasks` is over the tasks that have single-task runs:
the IQM (and mean) over all (task, seed) values of a kind pooled, their diff and the ratio of the two pooled
IQMs, plus the mean of the per-task ratios (over the tasks where a ratio is defined); the JSON's
every_task_meets_target is true or false when every such task has a ratio, else null. A task without a
single-task run is shown with its multi-task curves only and marked in the table.

Writes a PNG with one panel per task (each kind's seeds thin, their mean thick, a 95% bootstrap band, a dotted
line at the compared step; x: per-task env steps), a CSV with one row per logged eval (task, kind, run,
per_task_env_steps, return), prints the table and, last, one JSON line with it.
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import math
import os
import re
import sys
from typing import NamedTuple, Sequence

import numpy as np

from lit_dreamer.compare import (IQM_DEFINITION, CompareError, draw_groups, group_curve, interpolate_to_grid, iqm,
                                 metric_arrays, new_figure, open_client, plural)
from lit_dreamer.config import ConfigError, default_tracking_uri, task_metric_name

MULTI, SINGLE = "multi", "single"
CSV_COLUMNS = ("task", "kind", "run", "per_task_env_steps", "return")


class Curve(NamedTuple):
    """One run's eval return of one task against that task's own env steps.

    (A NamedTuple, not a dataclass: tests load this script without registering it in sys.modules, which
    a dataclass with string annotations needs.)
    """

    task: str
    kind: str
    run_id: str
    run_name: str
    steps: np.ndarray
    """Per-task env steps, increasing."""
    values: np.ndarray


# --------------------------------------------------------------------------------------------------
# Runs from MLflow


def all_runs(client) -> list:
    """Every active run of every experiment of the store."""
    ids = [e.experiment_id for e in client.search_experiments()]
    runs, token = [], None
    while ids:
        page = client.search_runs(ids, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    return runs


def resolve_run(runs: list, wanted: str):
    """The run whose id is wanted, else the one run whose id starts with it or whose name is it."""
    exact = [r for r in runs if r.info.run_id == wanted]
    matches = exact or [r for r in runs if r.info.run_id.startswith(wanted) or r.info.run_name == wanted]
    if len(matches) == 1:
        return matches[0]
    if matches:
        found = ", ".join(f"{r.info.run_id[:8]} ({r.info.run_name})" for r in matches)
        raise CompareError(f"run {wanted!r} matches {len(matches)} runs: {found}; give a longer id prefix")
    names = ", ".join(sorted({r.info.run_name or "-" for r in runs})[:12]) or "none"
    raise CompareError(f"no run has the id, id prefix or name {wanted!r} in the store; run names there: {names} "
                       "(set --tracking-uri to the store the runs went to)")


def run_tasks(run) -> list[str]:
    """The run's task table: its env.tasks param (Python list text), else [its env.id param]."""
    params = run.data.params
    text = params.get("env.tasks", "[]")
    try:
        tasks = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise CompareError(f"run {run.info.run_id[:8]}: env.tasks param {text!r} is not a list") from None
    if tasks:
        return [str(t) for t in tasks]
    if "env.id" in params:
        return [params["env.id"]]
    raise CompareError(f"run {run.info.run_id[:8]} ({run.info.run_name}) logs neither env.tasks nor env.id: "
                       "was it trained by `fit`?")


def task_metric(tasks: Sequence[str], task: str) -> str:
    """The eval return key of one task of a run with these tasks (a one-task run logs eval/return only)."""
    return f"eval/{task_metric_name(task)}/return" if len(tasks) > 1 else "eval/return"


def multi_curves(client, runs: list) -> tuple[list[str], list[Curve]]:
    """The multi-task runs' common task list and each (run, task) curve, its steps divided by K."""
    tasks = run_tasks(runs[0])
    for run in runs:
        other = run_tasks(run)
        if len(other) < 2:
            raise CompareError(f"--multi run {run.info.run_id[:8]} ({run.info.run_name}) trains one task "
                               f"({other[0]}): pass it to --single")
        if other != tasks:
            raise CompareError(f"--multi runs must share one task list: {runs[0].info.run_id[:8]} has {tasks}, "
                               f"{run.info.run_id[:8]} has {other}")
    curves = []
    for run in runs:
        for task in tasks:
            steps, values = metric_arrays(client, run, task_metric(tasks, task))
            curves.append(Curve(task, MULTI, run.info.run_id, run.info.run_name, steps / len(tasks), values))
    return tasks, curves


def single_curves(client, runs: list, tasks: Sequence[str]) -> list[Curve]:
    """Each single-task run's eval/return curve; its task must be one of the multi-task runs' tasks."""
    curves = []
    for run in runs:
        own = run_tasks(run)
        if len(own) != 1:
            raise CompareError(f"--single run {run.info.run_id[:8]} ({run.info.run_name}) trains {len(own)} tasks: "
                               "pass it to --multi")
        task = matching_task(own[0], tasks)
        if task is None:
            raise CompareError(f"--single run {run.info.run_id[:8]} ({run.info.run_name}) trains {own[0]}, which is "
                               f"not a task of the --multi runs: {', '.join(tasks)}")
        steps, values = metric_arrays(client, run, "eval/return")
        curves.append(Curve(task, SINGLE, run.info.run_id, run.info.run_name, steps, values))
    return curves


def matching_task(task: str, tasks: Sequence[str]) -> str | None:
    """The entry of the multi-task runs' tasks that is this task: the same id, or the same metric segment (the
    tasks of runs read from exported CSVs are segments)."""
    return next((t for t in tasks if t == task or task_metric_name(t) == task_metric_name(task)), None)


# --------------------------------------------------------------------------------------------------
# Runs from exported CSVs (scripts/export_results.py)

EVAL_TASK_METRIC = re.compile(r"^eval/([^/]+)/return$")


def csv_runs(path: str) -> dict[str, tuple[str, dict[str, list[tuple[float, float]]]]]:
    """An exported CSV: run_id -> (run_name, metric -> [(env_steps, value)] in step order)."""
    runs: dict[str, tuple[str, dict[str, list[tuple[float, float]]]]] = {}
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = {"run_name", "run_id", "metric", "env_steps", "value"} - set(reader.fieldnames or ())
            if missing:
                raise CompareError(f"{path} is not a CSV of scripts/export_results.py: no column "
                                   f"{', '.join(sorted(missing))}")
            for row in reader:
                _, metrics = runs.setdefault(row["run_id"], (row["run_name"], {}))
                metrics.setdefault(row["metric"], []).append((float(row["env_steps"]), float(row["value"])))
    except FileNotFoundError:
        raise CompareError(f"no such CSV file: {path}") from None
    return {run_id: (name, {m: sorted(points) for m, points in metrics.items()})
            for run_id, (name, metrics) in runs.items()}


def as_curve(task: str, kind: str, run_id: str, name: str, points: list[tuple[float, float]], k: int = 1) -> Curve:
    steps, values = (np.array(column, dtype=float) for column in zip(*points))
    return Curve(task, kind, run_id, name, steps / k, values)


def multi_csv_curves(paths: Sequence[str]) -> tuple[list[str], list[Curve]]:
    """The exported multi-task runs' common task list (metric segments, sorted) and each (run, task) curve."""
    tasks, curves = None, []
    for path in paths:
        for run_id, (name, metrics) in csv_runs(path).items():
            own = sorted(m.group(1) for m in map(EVAL_TASK_METRIC.match, metrics) if m)
            if len(own) < 2:
                raise CompareError(f"{path}: run {run_id[:8]} ({name}) has eval/<task>/return for "
                                   f"{len(own)} task(s): export a multi-task run's per-task evals, or pass it to "
                                   "--single-csv")
            if tasks is not None and own != tasks:
                raise CompareError(f"--multi-csv runs must share one task list: {tasks} against {own} of "
                                   f"{run_id[:8]} in {path}")
            tasks = own
            curves.extend(as_curve(task, MULTI, run_id, name, metrics[f"eval/{task}/return"], len(own))
                          for task in own)
    return tasks or [], curves


def single_csv_curves(specs: Sequence[str], tasks: Sequence[str]) -> list[Curve]:
    """TASK=FILE: every run of the exported FILE is a single-task run of TASK, its eval/return."""
    curves = []
    for spec in specs:
        given, sep, path = spec.partition("=")
        if not sep or not given or not path:
            raise CompareError(f"--single-csv takes TASK=FILE (e.g. dmc/cartpole-balance=balance.csv), got {spec!r}")
        task = matching_task(given, tasks)
        if task is None:
            raise CompareError(f"--single-csv {spec}: {given} is not a task of the multi-task runs: "
                               f"{', '.join(tasks)}")
        for run_id, (name, metrics) in csv_runs(path).items():
            if "eval/return" not in metrics:
                raise CompareError(f"{path}: run {run_id[:8]} ({name}) has no eval/return")
            curves.append(as_curve(task, SINGLE, run_id, name, metrics["eval/return"]))
    return curves


def load_curves(uri: str, multi: Sequence[str], single: Sequence[str], multi_csv: Sequence[str] = (),
                single_csv: Sequence[str] = ()) -> tuple[list[str], list[Curve]]:
    """The multi-task task list and the curves of every named run (each named once), from the MLflow store
    and the exported CSVs."""
    if bool(multi) == bool(multi_csv):
        raise CompareError("name the multi-task runs with --multi (MLflow) or --multi-csv (exported), one of them")
    tasks, curves = multi_csv_curves(multi_csv) if multi_csv else ([], [])
    if multi or single:
        client = open_client(uri)
        runs = all_runs(client)
        named = list(multi) + list(single)
        resolved = [resolve_run(runs, wanted) for wanted in named]
        ids = [r.info.run_id for r in resolved]
        for index, run_id in enumerate(ids):
            if run_id in ids[:index]:
                raise CompareError(f"run {named[index]!r} is {run_id[:8]}, named already as "
                                   f"{named[ids.index(run_id)]!r}")
        if multi:
            tasks, curves = multi_curves(client, resolved[:len(multi)])
        curves += single_curves(client, resolved[len(multi):], tasks)
    curves += single_csv_curves(single_csv, tasks)
    # A multi-task run has one curve per task; a run named twice has two of one task, or curves of both kinds.
    pairs = [(c.run_id, c.task) for c in curves]
    kinds: dict[str, set[str]] = {}
    for curve in curves:
        kinds.setdefault(curve.run_id, set()).add(curve.kind)
    twice = next((c for c in curves if pairs.count((c.run_id, c.task)) > 1 or len(kinds[c.run_id]) > 1), None)
    if twice is not None:
        raise CompareError(f"run {twice.run_id[:8]} ({twice.run_name}) is named twice")
    return tasks, curves


# --------------------------------------------------------------------------------------------------
# Statistics (compare's interpolation and IQM)


def value_at(curve: Curve, step: float) -> float:
    """The run's return at a per-task step, linear between its evals; NaN outside its logged range."""
    return float(interpolate_to_grid(curve.steps, curve.values, np.array([step]))[0])


def compared_step(curves: Sequence[Curve], at: float | None) -> tuple[float, str]:
    """--at, else the last per-task step every run reaches; and which kind ended there first (or both)."""
    if at is not None:
        return at, "--at"
    last = {kind: min(c.steps[-1] for c in curves if c.kind == kind) for kind in (MULTI, SINGLE)
            if any(c.kind == kind for c in curves)}
    kind = min(last, key=last.get)
    return last[kind], "both" if len(set(last.values())) == 1 and len(last) > 1 else kind


def kind_stats(values: Sequence[float]) -> dict:
    """IQM, mean and count of the values that are there (NaN: a run not covering the step)."""
    present = [v for v in values if not math.isnan(v)]
    if not present:
        return {"iqm": None, "mean": None, "n": 0, "values": []}
    return {"iqm": float(iqm(present)), "mean": float(np.mean(present)), "n": len(present), "values": present}


def compare_values(multi: dict, single: dict, target: float, baseline: float = 0.0) -> dict:
    """diff and ratio of the IQMs over `baseline` (ratio only where the single-task IQM is above it) and the
    target check."""
    if multi["iqm"] is None or single["iqm"] is None:
        return {"diff": None, "ratio": None, "meets_target": None}
    gain = single["iqm"] - baseline
    ratio = (multi["iqm"] - baseline) / gain if gain > 0 else None
    return {"diff": multi["iqm"] - single["iqm"], "ratio": ratio,
            "meets_target": None if ratio is None else ratio >= target}


def task_row(task: str, curves: Sequence[Curve], at: float | None, target: float, baseline: float = 0.0) -> dict:
    """One task's comparison at its compared step (curves: this task's, with at least one logged point)."""
    step, limited_by = compared_step(curves, at)
    stats = {kind: kind_stats([value_at(c, step) for c in curves if c.kind == kind]) for kind in (MULTI, SINGLE)}
    has_single = any(c.kind == SINGLE for c in curves)
    row = {"task": task, "per_task_env_steps": step, "step_from": limited_by, "has_single": has_single,
           MULTI: stats[MULTI], SINGLE: stats[SINGLE] if has_single else None}
    return row | compare_values(stats[MULTI], stats[SINGLE], target, baseline)


def overall_row(rows: Sequence[dict], target: float, baseline: float = 0.0) -> dict:
    """Pooled (task, seed) values of the tasks with both kinds, and the mean of the per-task ratios."""
    both = [r for r in rows if r["has_single"] and r[MULTI]["n"] and r[SINGLE]["n"]]
    pooled = {kind: kind_stats([v for r in both for v in r[kind]["values"]]) for kind in (MULTI, SINGLE)}
    ratios = [r["ratio"] for r in both if r["ratio"] is not None]
    defined = [r["meets_target"] for r in both if r["meets_target"] is not None]
    return {"tasks": len(both), MULTI: pooled[MULTI], SINGLE: pooled[SINGLE],
            **compare_values(pooled[MULTI], pooled[SINGLE], target, baseline),
            "mean_task_ratio": float(np.mean(ratios)) if ratios else None, "tasks_with_ratio": len(ratios),
            "every_task_meets_target": all(defined) if defined and len(defined) == len(both) else None}


def comparison(tasks: Sequence[str], curves: Sequence[Curve], at: float | None, target: float,
               baseline: float = 0.0) -> dict:
    """Per-task rows (tasks with any logged eval) and the all-tasks row."""
    rows = []
    for task in tasks:
        logged = [c for c in curves if c.task == task and c.steps.size]
        if any(c.kind == MULTI for c in logged):
            rows.append(task_row(task, logged, at, target, baseline))
    return {"per_task": rows, "overall": overall_row(rows, target, baseline), "baseline": baseline}


# --------------------------------------------------------------------------------------------------
# Output


def write_csv(path: str, curves: Sequence[Curve]) -> None:
    """One row per logged eval of each run and task."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for c in curves:
            for step, value in zip(c.steps, c.values):
                writer.writerow([c.task, c.kind, c.run_id, int(step) if float(step).is_integer() else float(step),
                                 float(value)])


def plot_tasks(tasks: Sequence[str], curves: Sequence[Curve], result: dict, labels: dict[str, str], columns: int = 2):
    """One panel per task: each kind's runs (thin), mean (thick) and 95% band; a dotted line at the compared step."""
    rows_by_task = {r["task"]: r for r in result["per_task"]}
    rows, columns = math.ceil(len(tasks) / columns), min(columns, len(tasks))
    figure = new_figure(5.5 * columns, 3.8 * rows)
    colors = {labels[MULTI]: "C0", labels[SINGLE]: "C1"}
    for index, task in enumerate(tasks):
        axes = figure.add_subplot(rows, columns, index + 1)
        groups = []
        for kind in (MULTI, SINGLE):
            runs = [(c.steps, c.values) for c in curves if c.task == task and c.kind == kind and c.steps.size]
            if runs:
                groups.append(group_curve(labels[kind], runs))
        if groups:
            draw_groups(axes, groups, colors)
        title = task if any(c.task == task and c.kind == SINGLE for c in curves) else f"{task} (no single-task run)"
        if task in rows_by_task:
            axes.axvline(rows_by_task[task]["per_task_env_steps"], color="gray", linestyle=":", linewidth=1)
        axes.set(xlabel="env steps of this task", ylabel="eval return", title=title)
    figure.suptitle("multi-task vs single-task at equal per-task env steps: mean over seeds, 95% bootstrap CI")
    return figure


def number(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def table_line(name: str, step: str, row: dict, note: str) -> list[str]:
    multi, single = row[MULTI], row[SINGLE] or {"iqm": None, "mean": None, "n": 0}
    ratio = number(row["ratio"]) if row["ratio"] is not None else ("n/a" if row["diff"] is not None else "-")
    return [name, step, number(multi["iqm"]), number(multi["mean"]), str(multi["n"]), number(single["iqm"]),
            number(single["mean"]), str(single["n"]), number(row["diff"]), ratio, note]


def task_note(row: dict, target: float) -> str:
    if not row["has_single"]:
        return "NO SINGLE-TASK RUN (multi only)"
    if row["ratio"] is None and row["diff"] is not None:
        return "ratio n/a: single IQM <= baseline"
    verdict = "" if row["meets_target"] is None else (" meets" if row["meets_target"] else " BELOW") + f" {target:g}"
    ends = {"--at": "at --at", "both": "both kinds end there"}
    step = ends.get(row["step_from"], f"{row['step_from']} runs end first")
    return step + ("," if verdict else "") + verdict


def format_table(result: dict, target: float) -> str:
    """Aligned rows: per task, then all tasks; the text columns left-aligned, numbers right-aligned."""
    header = ["task", "per-task step", "multi IQM", "mean", "n", "single IQM", "mean", "n", "diff", "ratio", "note"]
    lines = [table_line(r["task"], f"{r['per_task_env_steps']:,.0f}", r, task_note(r, target))
             for r in result["per_task"]]
    total = result["overall"]
    mean_ratio = number(total["mean_task_ratio"])
    lines.append(table_line(f"all tasks ({total['tasks']})", "", total | {"has_single": True},
                            f"mean of per-task ratios {mean_ratio} over {plural(total['tasks_with_ratio'], 'task')}"))
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]
    text = [i in (0, len(header) - 1) for i in range(len(header))]

    def render(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if left else c.rjust(w) for c, w, left in zip(cells, widths, text)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([render(header), rule, *map(render, lines[:-1]), rule, render(lines[-1])])


def run_ids(curves: Sequence[Curve], kind: str, task: str | None = None) -> list[str]:
    """The ids of the runs of a kind (of one task, if given), in the order they were named."""
    return list(dict.fromkeys(c.run_id for c in curves if c.kind == kind and task in (None, c.task)))


EXPLANATION = ("diff = multi IQM - single IQM; ratio = (multi IQM - baseline) / (single IQM - baseline), only "
               "meaningful where the single-task IQM is above the baseline (n/a otherwise: read diff). all tasks: IQM over the pooled (task, seed) values of the "
               "tasks with both kinds, ratio of those two IQMs.")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--multi", nargs="+", default=[], help="multi-task runs (ids, id prefixes or names)")
    parser.add_argument("--single", nargs="*", default=[], help="single-task runs, any of the multi-task tasks")
    parser.add_argument("--multi-csv", nargs="+", default=[], help="exported CSVs of multi-task runs")
    parser.add_argument("--single-csv", nargs="*", default=[], help="TASK=FILE: an exported CSV of single-task runs "
                        "of TASK")
    parser.add_argument("--tracking-uri", default=default_tracking_uri(), help="MLflow tracking URI")
    parser.add_argument("--out", default="multitask_curves.png", help="PNG, one panel per task")
    parser.add_argument("--csv", default=None, help="CSV of every logged eval (default: --out with .csv)")
    parser.add_argument("--at", type=float, default=None, help="per-task env step to compare at (default: the "
                        "last step every run of the task reaches)")
    parser.add_argument("--target", type=float, default=0.9, help="ratio a task must reach (issue 22: 0.9)")
    parser.add_argument("--baseline", type=float, default=0.0, help="return the ratio counts gains from, e.g. a "
                        "random policy's (default 0: the plain ratio of the IQMs)")
    parser.add_argument("--label-multi", default="multi-task")
    parser.add_argument("--label-single", default="single-task")
    args = parser.parse_args(argv)
    try:
        tasks, curves = load_curves(args.tracking_uri, args.multi, args.single, args.multi_csv, args.single_csv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = comparison(tasks, curves, args.at, args.target, args.baseline)
    csv_path = args.csv or os.path.splitext(args.out)[0] + ".csv"
    for path in (args.out, csv_path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_csv(csv_path, curves)
    labels = {MULTI: args.label_multi, SINGLE: args.label_single}
    plot_tasks(tasks, curves, result, labels).savefig(args.out, dpi=100)
    print(format_table(result, args.target))
    print(f"\n{EXPLANATION}\n{IQM_DEFINITION}")
    missing = [f"{c.run_id[:8]} {c.task}" for c in curves if not c.steps.size]
    if missing:
        print(f"no eval logged (left out): {', '.join(missing)}")
    print(f"{len(tasks)} tasks -> {args.out}, {csv_path}")
    print(json.dumps({"tasks": tasks, "multi": run_ids(curves, MULTI),
                      "single": {t: run_ids(curves, SINGLE, t) for t in tasks},
                      "target": args.target, **result, "png": args.out, "csv": csv_path}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
