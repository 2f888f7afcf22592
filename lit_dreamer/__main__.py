"""Command line: `python -m lit_dreamer fit|eval|bench|config|compare ...` (see --help of each)."""

from __future__ import annotations

import argparse
import signal
import sys

from lit_dreamer.quiet import quiet_startup

quiet_startup()  # before the imports below load MLflow, Lightning and (later) pygame

from lit_dreamer.compare import options_help  # noqa: E402
from lit_dreamer.config import ConfigError, help_text, load_config, to_annotated_yaml  # noqa: E402
from lit_dreamer.envs.faults import NonFiniteEnvError  # noqa: E402
from lit_dreamer.module import NonFiniteTrainingError  # noqa: E402


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lit_dreamer", description="DreamerV3 on PyTorch Lightning.")
    commands = parser.add_subparsers(dest="command", required=True)
    fit = commands.add_parser("fit", help="train an agent", description="Train DreamerV3.", epilog=help_text(),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    fit.add_argument("-c", "--config", action="append", default=[], metavar="FILE",
                     help="YAML overlay, a path or a name in configs/ (repeatable, applied in order)")
    fit.add_argument("--resume", metavar="RUN_DIR",
                     help="continue the run in RUN_DIR: the config its checkpoint carries, then -c files, then "
                     "key=value overrides (ckpt_path=last run.dir=RUN_DIR continues it with the command line's "
                     "config instead; ckpt_path=PATH with a new run.dir branches from PATH)")
    fit.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, applied last")
    bench = commands.add_parser("bench", help="time training steps and the collector",
                                description="Time real training steps (random data of the env's shapes) and the "
                                "collector; the last line is JSON. Extra keys: bench.steps, bench.warmup, "
                                "bench.collector_steps, bench.profile_steps (per-op profile of N more steps).")
    bench.add_argument("-c", "--config", action="append", default=[], metavar="FILE")
    bench.add_argument("overrides", nargs="*", metavar="key=value")
    evaluate = commands.add_parser("eval", help="evaluate a checkpoint",
                                   description="Run episodes of a checkpoint's env with its policy, print a table "
                                   "and log an eval run to MLflow under the training run. Keys: episodes=N, "
                                   "mode=mode|sample (the policy's most likely action, the default, or sampled as "
                                   "in training; deterministic|stochastic are deprecated aliases), seed=N, "
                                   "tracking_uri=URI, video=PATH.gif, env.<key>=VALUE.")
    evaluate.add_argument("--ckpt", required=True, help="a model.ckpt, or a run folder (its checkpoints/last)")
    evaluate.add_argument("overrides", nargs="*", metavar="key=value")
    config = commands.add_parser("config", help="print the resolved config as YAML",
                                 description="Print the config that fit would run with; comments give the "
                                 "model dimensions that model.size fills in.")
    config.add_argument("-c", "--config", action="append", default=[], metavar="FILE")
    config.add_argument("overrides", nargs="*", metavar="key=value")
    compare = commands.add_parser("compare", help="compare MLflow runs: a table and learning curves",
                                  description="Print one row per run and a mean row per group, and write a PNG "
                                  "of the group learning curves with 95% bootstrap bands and the IQM at the end.",
                                  epilog=options_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    compare.add_argument("options", nargs="*", metavar="key=value")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "eval":
            return run_eval(args)
        if args.command == "compare":
            from lit_dreamer.compare import main as compare_main, parse_options
            compare_main(parse_options(args.options))
            return 0
        bench_overrides = [o for o in args.overrides if o.startswith("bench.")]
        if getattr(args, "resume", None):
            from lit_dreamer.resume import resume_config
            cfg = resume_config(args.resume, args.config, args.overrides)
        else:
            cfg = load_config(args.config, [o for o in args.overrides if not o.startswith("bench.")])
        if args.command == "bench":
            from lit_dreamer.bench import main as bench_main
            bench_main(cfg, bench_options(bench_overrides))
        elif args.command == "config":
            print(to_annotated_yaml(cfg), end="")
        elif args.command == "fit":
            from lit_dreamer.train import fit
            summary = fit(cfg)
            if summary["rank"] == 0:
                if summary.get("nothing_to_do"):  # a finished checkpoint: nothing ran, nothing changed
                    print(summary["nothing_to_do"])
                else:
                    print_summary(summary)
            if summary["stopped_by"]:  # the shell's code for a process ended by that signal: 130, 143
                return 128 + signal.Signals[summary["stopped_by"]].value
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (NonFiniteTrainingError, NonFiniteEnvError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from lit_dreamer.evaluation import EvalOptions, eval_mode, evaluate_checkpoint, format_table
    options, env_overrides = EvalOptions(), {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        if key.startswith("env."):
            env_overrides[key[4:]] = value
        elif key in ("episodes", "seed"):
            if not value.isdigit() or int(value) < 1 and key == "episodes":
                raise ConfigError(f"{key} must be a positive whole number, got {value!r}")
            setattr(options, key, int(value))
        elif key == "mode":
            options.mode = eval_mode(value)
        elif key in ("tracking_uri", "video"):
            setattr(options, key, value)
        else:
            raise ConfigError(f"unknown eval key {key!r}; use episodes, mode, seed, tracking_uri, video or env.<key>")
    from lit_dreamer.resume import find_checkpoint
    result = evaluate_checkpoint(find_checkpoint(args.ckpt), options, env_overrides)
    print(format_table(result))
    print(f"per episode: {', '.join(f'{r:.1f}' for r in result['returns'])}")
    if "video" in result:
        print(f"video of one episode (return {result['video_return']:.1f}): {result['video']}")
    if "mlflow_run_id" in result:
        print(f"MLflow eval run {result['mlflow_run_id']}")
    else:
        print(f"table appended to {result['csv']} (the run's logger.backend is not mlflow)")
    return 0


def bench_options(overrides: list[str]):
    from lit_dreamer.bench import BenchConfig
    options = BenchConfig()
    for item in overrides:
        key, _, value = item.partition("=")
        name = key[len("bench."):]
        if not hasattr(options, name) or not value.isdigit():
            raise ConfigError(f"bad benchmark option {item!r}: use bench.steps=N, bench.warmup=N (N >= 1), "
                              "bench.collector_steps=N or bench.profile_steps=N")
        setattr(options, name, int(value))
    if options.warmup < 1 or options.steps < 1:
        raise ConfigError("bench.warmup and bench.steps must be at least 1")
    return options


def print_summary(summary: dict) -> None:
    print("\n=== lit_dreamer run summary ===")
    where = " on rank 0" if summary["world_size"] > 1 else ""
    print(f"env steps {summary['env_steps']}, train steps {summary['train_steps']}, "
          f"episodes {summary['episodes']}{where}, {summary['seconds']:.0f} s")
    if summary["episodes"]:
        print(f"best episode return {summary['best_return']:.1f}, last {summary['last_return']:.1f}")
    else:
        print("no episode finished yet")
    if summary["eval"]:
        e = summary["eval"]
        print(f"last evaluation: return {e['return']:.1f} +- {e['return_std']:.1f} over {e['episodes']} episodes")
    print(summary["logs"])
    print(f"checkpoint {summary['checkpoint']}")
    if summary["stopped_by"]:
        print(f"stopped by {summary['stopped_by']} before run.steps; continue with "
              f"`fit --resume {summary['run_dir']}`")


if __name__ == "__main__":
    sys.exit(main())
