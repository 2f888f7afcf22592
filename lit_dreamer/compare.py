"""`python -m lit_dreamer compare`: runs from MLflow side by side, as a table and as learning curves.

The runs of an experiment are grouped by a param (default `env.id`). The table has one row per run
(final and best value of the metric, env steps, wall time, throughput, git commit) and one mean row per
group. The figure has the group mean curves with 95% bootstrap bands over runs, and the interquartile
mean (IQM) of each group at its last grid step: the aggregate rliable recommends for a few seeds
(Agarwal et al., *Deep RL at the Edge of the Statistical Precipice*, 2021), computed as rliable does.

The metric may be a pattern (`eval/*/return`: each task of multi-task runs): each metric key it matches
gets its own curve panel and table section.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import os
import re
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np

from lit_dreamer.config import ConfigError, default_tracking_uri
# The statistics live in curve_stats; tests and scripts/export_results.py import them from here too.
from lit_dreamer.curve_stats import (IQM_DEFINITION, GroupCurve, bootstrap_ci, group_curve,  # noqa: F401
                                     history_arrays, interpolate_to_grid, iqm, step_grid)
from lit_dreamer.options import dataclass_help
from lit_dreamer.tracking import KIND_TAG


class CompareError(ConfigError):
    """What was asked for is not in the tracking store; the CLI exits with code 2, as for a config error."""


@dataclass
class CompareOptions:
    """The `key=value` arguments of `python -m lit_dreamer compare`."""

    experiment: str = "lit_dreamer"
    """MLflow experiment name."""
    group_by: str = "env.id"
    """Param whose value groups the runs (runs without it form the group '-')."""
    metric: str = "eval/return"
    """Metric to compare; its MLflow steps are env steps. A pattern with * (e.g. 'eval/*/return', each task of
    multi-task runs) compares every metric it matches: one curve panel and one table section per metric."""
    out: str = "compare.png"
    """PNG with the group learning curves (left panel) and the IQM at the last grid step (right panel); for a
    metric pattern matching several metrics, a grid of curve panels, one per metric."""
    tracking_uri: str = field(default_factory=default_tracking_uri)
    """MLflow tracking URI (default: $MLFLOW_TRACKING_URI when set, else sqlite:///mlflow.db)."""
    runs: str = ""
    """Comma-separated run ids or id prefixes (as in the table's id column); empty: every run of the kinds below."""
    kinds: str = "train"
    """Comma-separated kinds of run to include: train (fit), eval (eval --ckpt), or train,eval. Runs named in
    runs= are included whatever their kind."""


MLFLOW_ONLY = ("compare reads MLflow only: runs trained with logger.backend=tensorboard, csv or none are not in "
               "a tracking store (their metrics are in their run folder)")


def options_help() -> str:
    """compare's --help epilog: what it reads, then its options with their defaults and docstrings."""
    return MLFLOW_ONLY + ".\n\n" + dataclass_help(CompareOptions)


# --------------------------------------------------------------------------------------------------
# Runs from MLflow


@dataclass
class RunSummary:
    """One run as the table and the figure need it."""

    name: str
    run_id: str
    group: str
    steps: np.ndarray
    """Env steps of the metric's history, increasing (empty if the run has not logged the metric)."""
    values: np.ndarray
    env_steps: float | None
    """The last logged train/env_steps."""
    wall_seconds: float | None
    git_commit: str

    @property
    def final(self) -> float | None:
        return float(self.values[-1]) if self.values.size else None

    @property
    def best(self) -> float | None:
        return float(self.values.max()) if self.values.size else None

    @property
    def steps_per_second(self) -> float | None:
        if self.env_steps is None or not self.wall_seconds:
            return None
        return self.env_steps / self.wall_seconds


def open_client(uri: str):
    from mlflow.tracking import MlflowClient
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # its INFO lines on every open are noise here
    if uri.startswith("sqlite:///") and not os.path.isfile(uri[len("sqlite:///"):]):
        # MLflow would create an empty database here; a typo in the path should not leave a file behind.
        raise CompareError(f"no MLflow database at {uri[len('sqlite:///'):]}: run `fit` first, or point "
                           f"tracking_uri= at the database the runs went to; {MLFLOW_ONLY}")
    return MlflowClient(tracking_uri=uri)


def experiment_runs(client, experiment: str) -> list:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise CompareError(f"no experiment {experiment!r}; experiments: {', '.join(names) or 'none'} ({MLFLOW_ONLY})")
    runs, token = [], None
    while True:
        page = client.search_runs([found.experiment_id], max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    if not runs:
        raise CompareError(f"experiment {experiment!r} has no runs")
    return runs


KINDS = ("train", "eval")


def run_kind(run) -> str:
    """train or eval; runs logged before the tag existed were all fit runs (eval tagged itself from the start)."""
    return run.data.tags.get(KIND_TAG, "train")


def parse_kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise CompareError(f"kinds={text!r}: use a comma-separated list of {', '.join(KINDS)} (e.g. kinds=train,eval)")
    return kinds


def select_runs(runs: list, wanted: Sequence[str]) -> list:
    """The runs whose id starts with one of the wanted prefixes; each prefix must match exactly one run."""
    chosen = []
    for prefix in wanted:
        matches = [r for r in runs if r.info.run_id.startswith(prefix)]
        if len(matches) != 1:
            problem = "matches no run" if not matches else f"matches {len(matches)} runs"
            ids = ", ".join(r.info.run_id[:8] for r in (matches or runs))
            raise CompareError(f"run id {prefix!r} {problem} of the experiment; {'they' if matches else 'runs'}: {ids}")
        chosen.append(matches[0])
    return chosen


def source_commit(run) -> str:
    """MLflow's git tag, else fit's git_commit tag or param; fit's tag wins when it only adds '+dirty'."""
    system = run.data.tags.get("mlflow.source.git.commit")
    recorded = run.data.tags.get("git_commit") or run.data.params.get("git_commit")
    if system and recorded != f"{system}+dirty":
        return system
    return recorded or "-"


def metric_history(client, run, key: str) -> list:
    """The run's logged points of the metric key ([] if it has none: no query for a key it never logged)."""
    return client.get_metric_history(run.info.run_id, key) if key in run.data.metrics else []


def metric_arrays(client, run, key: str) -> tuple[np.ndarray, np.ndarray]:
    return history_arrays([(m.step, m.timestamp, m.value) for m in metric_history(client, run, key)])


def run_group(params: dict, group_by: str) -> str:
    """The run's value of the group_by param ('-' without it). Grouping by env.id, a multi-task run (which
    logs no env.id) falls in the group of its task list, so it does not mix with one-task runs."""
    if group_by == "env.id" and "env.id" not in params and params.get("env.tasks", "[]") != "[]":
        return params["env.tasks"]
    return str(params.get(group_by, "-"))


def summarize_run(client, run, metric: str, group_by: str) -> RunSummary:
    steps, values = metric_arrays(client, run, metric)
    env_history = sorted(metric_history(client, run, "train/env_steps"), key=lambda m: (m.step, m.timestamp))
    end_ms = run.info.end_time
    if end_ms is None and env_history:  # still running, or killed: up to its last sign of life
        end_ms = max(m.timestamp for m in env_history)
    return RunSummary(
        name=run.info.run_name or "-", run_id=run.info.run_id, group=run_group(run.data.params, group_by),
        steps=steps, values=values, env_steps=env_history[-1].value if env_history else None,
        wall_seconds=(end_ms - run.info.start_time) / 1000 if end_ms and run.info.start_time else None,
        git_commit=source_commit(run))


def with_metric(summary: RunSummary, client, run, metric: str) -> RunSummary:
    """The same run's summary with another metric's history."""
    steps, values = metric_arrays(client, run, metric)
    return replace(summary, steps=steps, values=values)


def chosen_runs(client, options: CompareOptions, kinds: Sequence[str], notes: list[str] | None) -> list:
    """The experiment's runs of the wanted kinds, or the runs named in options.runs; a note on those left out."""
    runs = experiment_runs(client, options.experiment)
    if options.runs:
        return select_runs(runs, [r.strip() for r in options.runs.split(",") if r.strip()])
    left_out = [r for r in runs if run_kind(r) not in kinds]
    runs = [r for r in runs if run_kind(r) in kinds]
    if left_out and notes is not None:
        counts = {k: sum(run_kind(r) == k for r in left_out) for k in KINDS}
        what = ", ".join(plural(n, f"{k} run") for k, n in counts.items() if n)
        notes.append(f"left out: {what} (kinds={options.kinds}; add kinds=train,eval to include them)")
    if not runs:
        raise CompareError(f"experiment {options.experiment!r} has no runs of kinds={options.kinds}; "
                           f"it has {', '.join(sorted({run_kind(r) for r in left_out}))} runs (set kinds=)")
    return runs


def is_pattern(metric: str) -> bool:
    return any(c in metric for c in "*?[")


def listed(keys: Sequence[str], limit: int = 12) -> str:
    """The first limit keys, comma-separated, and how many more there are."""
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return (", ".join(keys[:limit]) or "none") + more


def matching_metrics(metric: str, runs: list) -> list[str]:
    """The runs' metric keys that metric names: itself, or, for a pattern, the sorted keys it matches.

    Fails naming the metric keys there are: for a pattern, those that start as it does (all if none does).
    """
    keys = sorted(set().union(*(r.data.metrics for r in runs)))
    if not is_pattern(metric):
        if metric not in keys:
            raise CompareError(f"no run has the metric {metric!r}; metrics: {', '.join(keys) or 'none'}")
        return [metric]
    matched = [k for k in keys if fnmatch.fnmatchcase(k, metric)]
    if not matched:
        prefix = re.split(r"[*?[]", metric)[0]
        near = [k for k in keys if k.startswith(prefix)]
        where = f" starting with {prefix!r}" if near and prefix else ""
        raise CompareError(f"no metric matches the pattern {metric!r} (* matches any characters, / included); "
                           f"metrics{where}: {listed(near or keys)}")
    return matched


def load_metrics(options: CompareOptions, notes: list[str] | None = None) -> dict[str, list[RunSummary]]:
    """Each metric that options.metric names -> the chosen runs with its history, sorted by group and name.

    Fails if no run has the metric (or no key matches the pattern). A line about the runs left out for
    their kind is appended to notes.
    """
    kinds = parse_kinds(options.kinds)  # a bad option fails before the store is opened
    client = open_client(options.tracking_uri)
    runs = chosen_runs(client, options, kinds, notes)
    first, *others = matching_metrics(options.metric, runs)
    summaries = [summarize_run(client, r, first, options.group_by) for r in runs]
    by_metric = {first: summaries}
    for metric in others:  # the same runs, each with this metric's history
        by_metric[metric] = [with_metric(s, client, r, metric) for s, r in zip(summaries, runs)]
    return {metric: sorted(found, key=table_order) for metric, found in by_metric.items()}


def table_order(run: RunSummary) -> tuple[bool, str, str]:
    return run.group == "-", run.group, run.name  # runs without the param last


def load_runs(options: CompareOptions, notes: list[str] | None = None) -> list[RunSummary]:
    """The runs with the history of options.metric (of the first key, for a pattern): see load_metrics."""
    return next(iter(load_metrics(options, notes).values()))


def by_group(runs: Sequence[RunSummary]) -> dict[str, list[RunSummary]]:
    """The runs by group, groups in the order of their first run."""
    groups: dict[str, list[RunSummary]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    return groups


# --------------------------------------------------------------------------------------------------
# Table


TABLE_HEADER = ("run", "id", "group", "final", "best", "env steps", "wall", "steps/s", "commit")
NUMBER_COLUMNS = {"final", "best", "env steps", "wall", "steps/s"}  # right-aligned; text left-aligned


def format_value(x: float | None) -> str:
    if x is None or np.isnan(x):
        return "-"
    return f"{x:.2f}" if abs(x) >= 1 or x == 0 else f"{x:.3g}"


def format_count(x: float | None) -> str:
    return "-" if x is None or np.isnan(x) else f"{x:,.0f}"


def format_duration(seconds: float | None) -> str:
    if seconds is None or np.isnan(seconds):
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def format_rate(x: float | None) -> str:
    return "-" if x is None or np.isnan(x) else f"{x:.1f}"


def short_commit(commit: str) -> str:
    head, plus, suffix = commit.partition("+")
    return head[:8] + plus + suffix if all(c in "0123456789abcdef" for c in head) else commit


def run_row(run: RunSummary) -> list[str]:
    return [run.name, run.run_id[:8], run.group, format_value(run.final), format_value(run.best),
            format_count(run.env_steps), format_duration(run.wall_seconds), format_rate(run.steps_per_second),
            short_commit(run.git_commit)]


def mean_of(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def group_row(name: str, runs: Sequence[RunSummary]) -> list[str]:
    """The mean over the group's runs of each number (over the runs that have it)."""
    return [f"mean of {len(runs)}", "", name, format_value(mean_of([r.final for r in runs])),
            format_value(mean_of([r.best for r in runs])), format_count(mean_of([r.env_steps for r in runs])),
            format_duration(mean_of([r.wall_seconds for r in runs])),
            format_rate(mean_of([r.steps_per_second for r in runs])), ""]


def format_table(header: Sequence[str], sections: Sequence[Sequence[Sequence[str]]]) -> str:
    """Aligned columns (numbers to the right, see NUMBER_COLUMNS); a rule under the header and between sections."""
    rows = [header, *(row for section in sections for row in section)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = [c.rjust(w) if name in NUMBER_COLUMNS else c.ljust(w) for c, w, name in zip(row, widths, header)]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    parts = [line(header)]
    for section in sections:
        parts += [rule, *(line(row) for row in section)]
    return "\n".join(parts)


def iqm_of(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(iqm(present)) if present else None


def group_iqm_row(name: str, runs: Sequence[RunSummary]) -> list[str]:
    """The IQM (rliable's, see iqm) over the group's runs of their final and best values."""
    return [f"IQM of {len(runs)}", "", name, format_value(iqm_of([r.final for r in runs])),
            format_value(iqm_of([r.best for r in runs])), "", "", "", ""]


def table_sections(runs: Sequence[RunSummary]) -> list[list[list[str]]]:
    """One row per run, then a mean row and an IQM row per group (all TABLE_HEADER's columns)."""
    group_rows = [row for g, rs in by_group(runs).items() for row in (group_row(g, rs), group_iqm_row(g, rs))]
    return [[run_row(r) for r in runs], group_rows]


def comparison_table(runs: Sequence[RunSummary]) -> str:
    """The table of one metric: its sections, then what the IQM is."""
    return format_table(TABLE_HEADER, table_sections(runs)) + f"\n\n{IQM_DEFINITION}"


METRIC_COLUMNS = ("run", "id", "group", "final", "best")
RUN_COLUMNS = ("run", "id", "group", "env steps", "wall", "steps/s", "commit")


def only_columns(names: Sequence[str], sections: Sequence[Sequence[Sequence[str]]]) -> list[list[list[str]]]:
    """The sections' rows (of TABLE_HEADER's columns) cut to the named columns."""
    index = [TABLE_HEADER.index(name) for name in names]
    return [[[row[i] for i in index] for row in section] for section in sections]


def metrics_table(by_metric: dict[str, Sequence[RunSummary]]) -> str:
    """One section per metric (final, best, group mean and IQM), then the runs' steps, time and commit once."""
    blocks = [f"{metric}\n" + format_table(METRIC_COLUMNS, only_columns(METRIC_COLUMNS, table_sections(runs)))
              for metric, runs in by_metric.items()]
    runs = next(iter(by_metric.values()))  # the same runs in each: only their metric's history differs
    run_sections = [[run_row(r) for r in runs], [group_row(g, rs) for g, rs in by_group(runs).items()]]
    blocks.append(format_table(RUN_COLUMNS, only_columns(RUN_COLUMNS, run_sections)))
    return "\n\n".join(blocks) + f"\n\n{IQM_DEFINITION}"


# --------------------------------------------------------------------------------------------------
# Figure


def new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)  # no pyplot: no global figure state, no display needed
    return figure


def draw_groups(axes, groups: Sequence[GroupCurve], colors: dict[str, str]) -> None:
    """Each group's runs (thin), mean (thick, labelled with its run count) and 95% CI band, in its color."""
    for group in groups:
        color = colors[group.name]
        for curve in group.curves:
            axes.plot(group.grid, curve, color=color, alpha=0.3, linewidth=0.8)
        axes.plot(group.grid, group.mean, color=color, linewidth=2, marker="o" if group.grid.size == 1 else None,
                  label=f"{group.name} (n={len(group.curves)})")
        axes.fill_between(group.grid, group.low, group.high, color=color, alpha=0.2, linewidth=0)
    axes.legend(loc="best", fontsize="small")
    axes.grid(alpha=0.3)


def group_colors(names: Sequence[str]) -> dict[str, str]:
    return {name: f"C{index % 10}" for index, name in enumerate(names)}


def plot_comparison(groups: Sequence[GroupCurve], metric: str):
    """Left: each group's runs (thin), mean (thick, labelled) and 95% CI band; right: IQM with 95% CI."""
    figure = new_figure(12, 4.5)
    curves_axes, iqm_axes = figure.subplots(1, 2, width_ratios=[2.2, 1])
    draw_groups(curves_axes, groups, group_colors([g.name for g in groups]))
    curves_axes.set(xlabel="env steps", ylabel=metric, title=f"{metric}: mean over runs, 95% bootstrap CI")
    for index, group in enumerate(groups):
        low, high = group.final_iqm_ci
        iqm_axes.errorbar(group.final_iqm, index, xerr=[[group.final_iqm - low], [high - group.final_iqm]],
                          fmt="o", color=f"C{index % 10}", capsize=4)
    iqm_axes.set_yticks(range(len(groups)), labels=[
        f"{g.name}\nn={len(g.final_values)} at {g.grid[-1]:,.0f}" for g in groups])
    iqm_axes.set_ylim(-0.5, len(groups) - 0.5)
    iqm_axes.invert_yaxis()
    iqm_axes.set(xlabel=metric, title="IQM at the last step (95% CI)\nrliable's: 25% trimmed mean")
    iqm_axes.grid(axis="x", alpha=0.3)
    return figure


def panel_title(pattern: str, metric: str) -> str:
    """The part of the metric key the pattern's wildcards matched (the task in eval/*/return), else the key."""
    prefix, suffix = re.split(r"[*?[]", pattern)[0], re.split(r"[*?\]]", pattern)[-1]
    middle = metric[len(prefix):len(metric) - len(suffix)]
    return middle if middle and metric.startswith(prefix) and metric.endswith(suffix) else metric


def plot_metrics(curves: dict[str, Sequence[GroupCurve]], pattern: str, columns: int = 3):
    """One curves panel per metric (as plot_comparison's left one), in a grid; a group keeps its color throughout."""
    rows, columns = math.ceil(len(curves) / columns), min(columns, len(curves))
    figure = new_figure(5 * columns, 3.8 * rows)
    colors = group_colors(list(dict.fromkeys(g.name for groups in curves.values() for g in groups)))
    for index, (metric, groups) in enumerate(curves.items()):
        axes = figure.add_subplot(rows, columns, index + 1)
        draw_groups(axes, groups, colors)
        axes.set(xlabel="env steps", ylabel=metric, title=panel_title(pattern, metric))
    figure.suptitle(f"{pattern}: mean over runs, 95% bootstrap CI")
    return figure


# --------------------------------------------------------------------------------------------------
# Command


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def metric_groups(runs: Sequence[RunSummary]) -> list[GroupCurve]:
    """The group curves of the runs that have the metric (groups with none are left out)."""
    return [group_curve(name, [(r.steps, r.values) for r in members if r.steps.size])
            for name, members in by_group(runs).items() if any(r.steps.size for r in members)]


def without_note(metric: str, runs: Sequence[RunSummary]) -> str:
    missing = [r.run_id[:8] for r in runs if not r.steps.size]
    return f" ({plural(len(missing), 'run')} without {metric}: {', '.join(missing)})" if missing else ""


def report_metric(metric: str, runs: Sequence[RunSummary], groups: Sequence[GroupCurve], out: str) -> None:
    """One metric: its table, the curves and IQM figure, and what was plotted."""
    print(comparison_table(runs))
    plot_comparison(groups, metric).savefig(out, dpi=100)
    count = sum(bool(r.steps.size) for r in runs)
    print(f"\n{metric} of {plural(count, 'run')} in {plural(len(groups), 'group')} -> {out}"
          f"{without_note(metric, runs)}")


def report_metrics(pattern: str, by_metric: dict[str, Sequence[RunSummary]],
                   curves: dict[str, Sequence[GroupCurve]], out: str) -> None:
    """Several metrics: a table section and a curves panel each, and what was plotted."""
    print(metrics_table(by_metric))
    plot_metrics(curves, pattern).savefig(out, dpi=100)
    print(f"\n{pattern}: {plural(len(curves), 'metric')}, one panel each -> {out}")
    for metric, runs in by_metric.items():
        print(f"{metric}: {plural(len(curves[metric]), 'group')}{without_note(metric, runs)}")


def main(options: CompareOptions) -> dict[str, list[GroupCurve]]:
    """Print the table, write the figure; returns the plotted groups of each metric (one unless a pattern)."""
    notes: list[str] = []
    by_metric = load_metrics(options, notes)
    curves = {metric: metric_groups(runs) for metric, runs in by_metric.items()}
    os.makedirs(os.path.dirname(os.path.abspath(options.out)), exist_ok=True)
    if len(by_metric) == 1:
        (metric, runs), = by_metric.items()
        report_metric(metric, runs, curves[metric], options.out)
    else:
        report_metrics(options.metric, by_metric, curves, options.out)
    for line in notes:
        print(line)
    return curves
