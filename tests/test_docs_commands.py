"""The docs stay honest: their command examples parse against the real CLI, their links are live, and
docs/configs.md lists every config key with its current default.

Commands checked: every `python -m lit_dreamer ...` line in a fenced code block of README.md or docs/*.md,
and every inline code span that starts with `python -m lit_dreamer`. A line must name a known subcommand
and known keys: fit, config and bench go through `load_config` (-c names and key=value overrides), bench's
own `bench.*` options, eval's and compare's options through the fields of their option dataclasses.
Placeholders are written in one form, `<NAME>` (capital letters, digits, underscores), which the test
fills with a dummy value; any other `<...>` in a command fails. Nothing is trained.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import shlex
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lit_dreamer.config import ConfigError, load_config, schema_keys

ROOT = Path(__file__).resolve().parent.parent
PLACEHOLDER = re.compile(r"<[A-Z][A-Z0-9_]*>")
DUMMY = "1"  # a valid int, float, string and path, whatever the placeholder stands for
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE_COMMAND = re.compile(r"`(python3? -m lit_dreamer\b[^`]*)`")
CLI = re.compile(r"\bpython3? -m lit_dreamer\b(.*)")
SHELL_END = re.compile(r"\s(?:&&|\|\||\||;)\s|\s#")


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


# --------------------------------------------------------------------------------------------------
# Finding the commands


def commands_in(text: str) -> list[tuple[int, str]]:
    """(line number, arguments after `python -m lit_dreamer`) of every command example in a markdown text."""
    found = []
    for block in FENCE.finditer(text):
        first_line = text.count("\n", 0, block.start()) + 1
        lines = block.group(0).replace("\\\n", " ").split("\n")  # join shell continuation lines
        for offset, line in enumerate(lines):
            match = CLI.search(line)
            if match:
                found.append((first_line + offset, " ".join(SHELL_END.split(match.group(1))[0].split())))
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    for match in INLINE_COMMAND.finditer(prose):
        found.append((prose.count("\n", 0, match.start()) + 1, " ".join(CLI.search(match.group(1)).group(1).split())))
    return found


def all_commands() -> list[tuple[str, str]]:
    return [(f"{path.relative_to(ROOT)}:{line}", args) for path in doc_files()
            for line, args in commands_in(path.read_text())]


# --------------------------------------------------------------------------------------------------
# Checking one command against the CLI


def fill_placeholders(args: str) -> str:
    odd = [p for p in re.findall(r"<[^<>]*>", args) if not PLACEHOLDER.fullmatch(p)]
    assert not odd, f"placeholder {odd[0]!r}: write placeholders as <NAME> (capitals, digits, underscores)"
    return PLACEHOLDER.sub(DUMMY, args)


def check_options(cls: type, items: list[str], command: str) -> None:
    """key=value items must name fields of the dataclass `cls` and fit their types."""
    names = [f.name for f in dataclasses.fields(cls)]
    for item in items:
        key, sep, _ = item.partition("=")
        assert sep and key in names, f"{command}: unknown option {item!r}; known: {', '.join(names)}"
    try:
        OmegaConf.merge(OmegaConf.structured(cls), OmegaConf.from_dotlist(items))
    except OmegaConfBaseException as err:
        raise AssertionError(f"{command}: bad value in {items}: {str(err).splitlines()[0]}") from None


def parse_cli(argv: list[str]):
    """The real argument parser's result, or an AssertionError with its message (help: exit code 0)."""
    from lit_dreamer.__main__ import parse
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
            return parse(argv)
    except SystemExit as exit:
        assert exit.code == 0, f"the CLI refuses {shlex.join(argv)!r}: {stderr.getvalue().strip()}"
        return None


def check_command(args: str) -> None:
    """Parse `python -m lit_dreamer ARGS` as the CLI would, and check its keys; raise AssertionError if not."""
    argv = shlex.split(fill_placeholders(args))
    parsed = parse_cli(argv)
    if parsed is None:  # --help: the parser accepted the subcommand and printed its help
        return
    from lit_dreamer.bench import BenchConfig
    from lit_dreamer.compare import CompareOptions
    from lit_dreamer.evaluation import EvalOptions
    from lit_dreamer.export import ExportOptions
    from lit_dreamer.registry import RegisterOptions
    try:
        if parsed.command in ("fit", "config"):
            load_config(parsed.config, parsed.overrides)
        elif parsed.command == "bench":
            load_config(parsed.config, [o for o in parsed.overrides if not o.startswith("bench.")])
            check_options(BenchConfig, [o[len("bench."):] for o in parsed.overrides if o.startswith("bench.")], "bench")
        elif parsed.command == "eval":
            load_config([], [o for o in parsed.overrides if o.startswith("env.")])
            check_options(EvalOptions, [o for o in parsed.overrides if not o.startswith("env.")], "eval")
        elif parsed.command == "compare":
            check_options(CompareOptions, parsed.options, "compare")
        elif parsed.command == "export":
            check_options(ExportOptions, parsed.overrides, "export")
        elif parsed.command == "convert-episodes":
            from lit_dreamer.episodes import ConvertOptions
            check_options(ConvertOptions, parsed.options, "convert-episodes")
        elif parsed.command == "register":
            check_options(RegisterOptions, parsed.options, "register")
        else:
            raise AssertionError(f"no check written for the subcommand {parsed.command!r}: add one here")
    except ConfigError as err:
        raise AssertionError(f"{parsed.command}: {err}") from None


# --------------------------------------------------------------------------------------------------
# Tests


COMMANDS = all_commands()


def test_the_docs_have_command_examples_to_check():
    readme = [where for where, _ in COMMANDS if where.startswith("README.md:")]
    assert len(readme) >= 10 and len(COMMANDS) >= 25, COMMANDS


@pytest.mark.parametrize("where, args", COMMANDS, ids=[where for where, _ in COMMANDS])
def test_command_example_parses_against_the_cli(where, args, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    check_command(args)


@pytest.mark.parametrize("args, problem", [
    ("fit run.stepz=10", "unknown config key 'run.stepz'.*run.steps"),
    ("fit -c cartpol", "config file 'cartpol' not found"),
    ("fit trainer.devics=2", "trainer.devices"),
    ("config model.size=size3m", "unknown model.size"),
    ("fitt -c cartpole", "invalid choice"),
    ("eval runs/x", "--ckpt"),
    ("eval --ckpt runs/<RUN> episode=3", "unknown option 'episode=3'"),
    ("eval --ckpt runs/<RUN> episodes=ten", "bad value"),
    ("eval --ckpt runs/<RUN> env.time_limt=5", "env.time_limit"),
    ("compare metrc=train/return", "unknown option 'metrc=train/return'"),
    ("bench -c cartpole bench.stepz=3", "unknown option 'stepz=3'"),
    ("export --ckpt runs/<RUN> fromat=onnx", "unknown option 'fromat=onnx'"),
    ("register --ckpt runs/<RUN> nmae=cartpole", "unknown option 'nmae=cartpole'"),
    ("eval --ckpt runs/<run name>", "write placeholders as <NAME>"),
    ("fit run.seed=<seed>", "write placeholders as <NAME>"),
])
def test_a_wrong_command_example_is_caught(args, problem):
    with pytest.raises(AssertionError, match=problem):
        check_command(args)


def test_placeholders_are_filled_and_help_lines_accepted():
    check_command("eval --ckpt runs/<RUN>/checkpoints/<STEP>/model.ckpt episodes=<N> env.time_limit=<STEPS>")
    check_command("fit --help")
    check_command("export --ckpt runs/<RUN> format=torch out=<PATH>")
    check_command("register --ckpt runs/<RUN> name=<NAME> tracking_uri=sqlite:///mlflow.db")
    check_command("compare --help")


def test_commands_are_found_in_code_blocks_and_inline_spans():
    text = ("Run `python -m lit_dreamer fit -c debug` first.\n\n```bash\n# a comment\n"
            "python -m lit_dreamer config run.seed=2   # a comment\n"
            "cd examples && python -m lit_dreamer fit \\\n  run.steps=10\n```\n"
            "`python scripts/seed_sweep.py` is not one.\n")
    assert commands_in(text) == [(5, "config run.seed=2"), (6, "fit run.steps=10"), (1, "fit -c debug")]


# --------------------------------------------------------------------------------------------------
# Links


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of the headings of a markdown file."""
    prose = FENCE.sub("", path.read_text())
    titles = re.findall(r"^#{1,6}\s+(.*?)\s*$", prose, re.M)
    return {re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-") for title in titles}


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_is_live(path):
    prose = FENCE.sub("", path.read_text())
    for target in LINK.findall(prose):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        assert linked.exists(), f"{path.name}: link to {target!r}, which does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{path.name}: link to {target!r}, a heading {linked.name} does not have"


# --------------------------------------------------------------------------------------------------
# Every config key in docs/configs.md


KEY_ROW = re.compile(r"^\| `([\w.]+)` \| `([^`]*)` \|", re.M)
EXPRESSIONS = {"1 - 1/333": 1 - 1 / 333}  # defaults written as the formula they come from


def same_value(written: str, default) -> bool:
    if written in EXPRESSIONS:
        return EXPRESSIONS[written] == default
    if default is None or isinstance(default, (bool, list)):
        return OmegaConf.to_container(OmegaConf.create(f"v: {written}"))["v"] == default
    if isinstance(default, (int, float)):
        return float(written) == default
    return written == default


def test_configs_page_lists_every_key_with_its_default(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rows = dict(KEY_ROW.findall((ROOT / "docs" / "configs.md").read_text()))
    for key, default, _ in schema_keys():
        assert key in rows, f"docs/configs.md has no row for {key!r} (default {default!r})"
        assert same_value(rows[key], default), f"docs/configs.md gives {key} = {rows[key]!r}, the code {default!r}"
    unknown = set(rows) - {key for key, _, _ in schema_keys()}
    assert not unknown, f"docs/configs.md lists keys the config does not have: {sorted(unknown)}"
