"""Command line: `python -m lit_dreamer fit|bench|config [-c FILE ...] [key=value ...]`."""

from __future__ import annotations

import argparse
import sys

from lit_dreamer.config import ConfigError, help_text, load_config, to_yaml
from lit_dreamer.module import NonFiniteTrainingError


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lit_dreamer", description="DreamerV3 on PyTorch Lightning.")
    commands = parser.add_subparsers(dest="command", required=True)
    fit = commands.add_parser("fit", help="train an agent", description="Train DreamerV3.", epilog=help_text(),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    fit.add_argument("-c", "--config", action="append", default=[], metavar="FILE",
                     help="YAML overlay, a path or a name in configs/ (repeatable, applied in order)")
    fit.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, applied last")
    bench = commands.add_parser("bench", help="time training steps and the collector",
                                description="Time real training steps (random data of the env's shapes) and the "
                                "collector; the last line is JSON. Extra keys: bench.steps, bench.warmup, "
                                "bench.collector_steps.")
    bench.add_argument("-c", "--config", action="append", default=[], metavar="FILE")
    bench.add_argument("overrides", nargs="*", metavar="key=value")
    config = commands.add_parser("config", help="print the resolved config as YAML",
                                 description="Print the config that fit would run with.")
    config.add_argument("-c", "--config", action="append", default=[], metavar="FILE")
    config.add_argument("overrides", nargs="*", metavar="key=value")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        bench_overrides = [o for o in args.overrides if o.startswith("bench.")]
        cfg = load_config(args.config, [o for o in args.overrides if not o.startswith("bench.")])
        if args.command == "bench":
            from lit_dreamer.bench import main as bench_main
            bench_main(cfg, bench_options(bench_overrides))
        elif args.command == "config":
            print(to_yaml(cfg), end="")
        elif args.command == "fit":
            from lit_dreamer.train import fit
            summary = fit(cfg)
            if summary["rank"] == 0:
                print_summary(summary)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteTrainingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def bench_options(overrides: list[str]):
    from lit_dreamer.bench import BenchConfig
    options = BenchConfig()
    for item in overrides:
        key, _, value = item.partition("=")
        name = key[len("bench."):]
        if not hasattr(options, name) or not value.isdigit():
            raise ConfigError(f"bad benchmark option {item!r}: use bench.steps=N, bench.warmup=N (N >= 1) "
                              "or bench.collector_steps=N")
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
    print(f"MLflow run {summary['mlflow_run_id']} at {summary['tracking_uri']}")
    print(f"checkpoint {summary['checkpoint']}")


if __name__ == "__main__":
    sys.exit(main())
