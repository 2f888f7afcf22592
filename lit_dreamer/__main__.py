"""Command line: `python -m lit_dreamer fit|eval|export|register|bench|config|compare ...` (see --help of each)."""

from __future__ import annotations

import argparse
import signal
import sys

from lit_dreamer.quiet import quiet_startup

quiet_startup()  # before the imports below load MLflow, Lightning and (later) pygame

from lit_dreamer.bench import BenchConfig  # noqa: E402
from lit_dreamer.compare import CompareOptions, options_help  # noqa: E402
from lit_dreamer.config import ConfigError, EnvConfig, help_text, load_config, to_annotated_yaml  # noqa: E402
from lit_dreamer.envs.faults import NonFiniteEnvError  # noqa: E402
from lit_dreamer.evaluation import EvalOptions  # noqa: E402
from lit_dreamer.export import ExportOptions  # noqa: E402
from lit_dreamer.module import NonFiniteTrainingError  # noqa: E402
from lit_dreamer.options import dataclass_help, option_values, parse_options  # noqa: E402
from lit_dreamer.registry import RegisterOptions  # noqa: E402


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
                                "collector; the last line is JSON. Config keys as for fit, plus bench.* options.",
                                epilog=bench_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("-c", "--config", action="append", default=[], metavar="FILE")
    bench.add_argument("overrides", nargs="*", metavar="key=value")
    evaluate = commands.add_parser("eval", help="evaluate a checkpoint",
                                   description="Run episodes of a checkpoint's env with its policy, print a table "
                                   "and log an eval run to MLflow under the training run.",
                                   epilog=eval_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluate.add_argument("--ckpt", required=True, help="a model.ckpt, or a run folder (its checkpoints/last)")
    evaluate.add_argument("overrides", nargs="*", metavar="key=value")
    export = commands.add_parser("export", help="export a checkpoint's policy to ONNX or torch.export",
                                 description="Write the acting policy (encoder, one RSSM step, actor) as one graph "
                                 "with its recurrent state and sampling noise as inputs, and a JSON beside it that "
                                 "names them; running it needs no Lightning.",
                                 epilog=dataclass_help(ExportOptions),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    export.add_argument("--ckpt", required=True, help="a model.ckpt, or a run folder (its checkpoints/last)")
    export.add_argument("overrides", nargs="*", metavar="key=value")
    register = commands.add_parser("register", help="register a checkpoint's policy in the MLflow model registry",
                                   description="Log a checkpoint's policy as an MLflow pyfunc model with its signature "
                                   "and register it as NAME (a new version each time): models:/NAME/VERSION.",
                                   epilog=dataclass_help(RegisterOptions),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    register.add_argument("--ckpt", required=True, help="a model.ckpt, or a run folder (its checkpoints/last)")
    register.add_argument("options", nargs="*", metavar="key=value")
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
    convert = commands.add_parser("convert-episodes", help="convert .npz episode files into a replay for offline fit",
                                  description="Write a folder of .npz episode files (one per episode) as a replay "
                                  "snapshot that `fit offline.replay=PATH` trains from.",
                                  epilog=convert_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    convert.add_argument("source", metavar="SRC_DIR", help="the folder of .npz episode files")
    convert.add_argument("options", nargs="*", metavar="key=value")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "eval":
            return run_eval(args)
        if args.command == "export":
            return run_export(args)
        if args.command == "register":
            return run_register(args)
        if args.command == "compare":
            from lit_dreamer.compare import main as compare_main
            compare_main(parse_options(CompareOptions, args.options, command="compare"))
            return 0
        if args.command == "convert-episodes":
            return run_convert(args)
        bench_overrides = [o for o in args.overrides if o.startswith("bench.")]
        if getattr(args, "resume", None):
            from lit_dreamer.resume import resume_config
            cfg = resume_config(args.resume, args.config, args.overrides)
        else:
            cfg = load_config(args.config, [o for o in args.overrides if not o.startswith("bench.")])
        if args.command == "bench":
            from lit_dreamer.bench import main as bench_main
            bench_main(cfg, parse_options(BenchConfig, bench_overrides, command="bench", prefix="bench."))
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


def eval_help() -> str:
    return dataclass_help(EvalOptions, notes=["env.<key>=VALUE", "    A key of the checkpoint's env config "
                                            "(e.g. env.time_limit=1000); see `fit --help` for the env keys."])


def bench_help() -> str:
    return dataclass_help(BenchConfig, prefix="bench.")


def convert_help() -> str:
    from lit_dreamer.episodes import ConvertOptions, __doc__ as episode_format
    return dataclass_help(ConvertOptions) + "\n\n" + episode_format.split("\n\n", 1)[1]


def run_convert(args: argparse.Namespace) -> int:
    from lit_dreamer.episodes import ConvertOptions, convert_episodes
    summary = convert_episodes(args.source, parse_options(ConvertOptions, args.options, command="convert-episodes"))
    print(f"wrote {summary['steps']} steps of {summary['episodes']} episodes to {summary['out']} "
          f"(actions: {summary['action']}; observations: "
          f"{', '.join(f'{k} {v}' for k, v in summary['observations'].items())})")
    print(f"train from it: python -m lit_dreamer fit offline.replay={summary['out']} offline.steps=N")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from lit_dreamer.evaluation import evaluate_checkpoint, format_table
    options = parse_options(EvalOptions, args.overrides, command="eval", passthrough=["env."])
    # The checkpoint's env config takes env.<key> overrides, typed and checked against EnvConfig's fields.
    env_overrides = option_values(EnvConfig, [o for o in args.overrides if o.startswith("env.")], command="eval",
                                  prefix="env.")
    from lit_dreamer.resume import find_checkpoint
    result = evaluate_checkpoint(find_checkpoint(args.ckpt), options, env_overrides)
    print(format_table(result))
    print(f"per episode: {', '.join(f'{r:.1f}' for r in result['returns'])}")
    if "video" in result:
        print(f"video of one episode (return {result['video_return']:.1f}): {result['video']}")
    for task, path in result.get("videos", {}).items():
        print(f"video of one episode of {task} (return {result['video_returns'][task]:.1f}): {path}")
    if "mlflow_run_id" in result:
        print(f"MLflow eval run {result['mlflow_run_id']}")
    else:
        print(f"table appended to {result['csv']} (the run's logger.backend is not mlflow)")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from lit_dreamer.export import export_checkpoint
    from lit_dreamer.resume import find_checkpoint
    options = parse_options(ExportOptions, args.overrides, command="export")
    written = export_checkpoint(find_checkpoint(args.ckpt), options)
    print(f"policy written to {written['graph']}, its inputs and outputs to {written['json']}")
    return 0


def run_register(args: argparse.Namespace) -> int:
    from lit_dreamer.registry import register_checkpoint
    from lit_dreamer.resume import find_checkpoint
    options = parse_options(RegisterOptions, args.options, command="register")
    result = register_checkpoint(find_checkpoint(args.ckpt), options)
    print(f"registered {result['uri']} (MLflow run {result['run_id']} at {result['tracking_uri']})")
    return 0


def print_summary(summary: dict) -> None:
    print("\n=== lit_dreamer run summary ===")
    where = " on rank 0" if summary["world_size"] > 1 else ""
    offline = summary.get("offline_replay")
    if offline:
        print(f"offline: {summary['train_steps']} gradient steps from the replay {offline}, "
              f"{summary['seconds']:.0f} s")
    else:
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
    if summary.get("registered"):
        print(f"registered {summary['registered']['uri']}")
    if summary["stopped_by"]:
        print(f"stopped by {summary['stopped_by']} before {'offline.steps' if offline else 'run.steps'}; continue with "
              f"`fit --resume {summary['run_dir']}`")


if __name__ == "__main__":
    sys.exit(main())
