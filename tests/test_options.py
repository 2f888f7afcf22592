"""The key=value parser of eval, bench and compare: typed by OmegaConf, checked per field, unknown keys
answered with the closest one, --help from the field docstrings; and the three commands through it."""

from __future__ import annotations

import dataclasses
from typing import Optional

import pytest

from lit_dreamer.config import ConfigError, field_docs
from lit_dreamer.options import at_least, checked, dataclass_help, one_of, option_values, parse_options


def shout(value: str, key: str) -> str:
    """A check that maps a value, as eval's mode maps its deprecated aliases."""
    return value.upper()


@dataclasses.dataclass
class Toy:
    """Options of a made-up command."""

    count: int = checked(3, at_least(1))
    """How many (at least 1)."""
    rate: float = 0.5
    """A fraction."""
    name: str = checked("a", shout)
    """A name, upper-cased."""
    limit: Optional[int] = None
    """A limit (null: none)."""
    flag: bool = False
    """A switch."""


def parse(*items: str, **kwargs) -> Toy:
    return parse_options(Toy, items, command="toy", **kwargs)


def test_values_are_converted_to_the_field_types_and_checked():
    assert parse() == Toy()
    assert parse("count=7", "rate=0.25", "name=bob", "limit=9", "flag=true") == Toy(7, 0.25, "BOB", 9, True)
    assert parse("limit=9", "limit=null").limit is None  # later wins; null for a field that may be None
    assert parse("count=2", "count=5").count == 5


def test_one_of_keeps_a_listed_value_and_refuses_another_with_the_choices_and_their_meaning():
    check = one_of(("up", "down"), "which way to go")
    assert check("down", "way") == "down"
    with pytest.raises(ConfigError) as error:
        check("sideways", "bench.way")
    assert str(error.value) == "bench.way must be one of up, down (which way to go), got 'sideways'"


def test_a_str_option_keeps_its_text_as_written():
    # Not read as YAML: a run id prefix 0123 would be the octal 83, 1e5 the float 100000.0.
    assert [parse(f"name={text}").name for text in ("0123", "1e5", "yes", "null")] == ["0123", "1E5", "YES", "NULL"]


@pytest.mark.parametrize("item, message", [
    ("count=abc", "count must be a whole number, got 'abc'"),
    ("count=2.5", "count must be a whole number, got '2.5'"),
    ("rate=fast", "rate must be a number, got 'fast'"),
    ("flag=maybe", "flag must be true or false, got 'maybe'"),
    ("count=0", "count must be at least 1, got 0"),
    ("cuont=2", "unknown toy option 'cuont'; did you mean count=N? toy options: count=N, rate=X, name=TEXT, "
                "limit=N, flag=true|false (see `python -m lit_dreamer toy --help`)"),
    ("count", "toy option 'count' is not of the form key=value; toy options: count=N"),
    ("zzz=1", "unknown toy option 'zzz'; toy options:"),
])
def test_bad_items_name_the_key_and_the_fix(item, message):
    with pytest.raises(ConfigError) as err:
        parse(item)
    assert message in str(err.value)


def test_a_prefix_is_required_and_shown_and_passthrough_items_are_left_alone():
    assert parse("toy.count=4", prefix="toy.").count == 4
    with pytest.raises(ConfigError, match=r"unknown toy option 'count'; did you mean toy.count=N\?"):
        parse("count=4", prefix="toy.")
    assert parse("count=4", "env.anything=x", passthrough=["env."]).count == 4
    with pytest.raises(ConfigError, match=r"toy options: .*flag=true\|false, env.<key>=VALUE "):
        parse("nope=1", passthrough=["env."])
    assert option_values(Toy, ["toy.limit=3", "toy.name=x"], command="toy", prefix="toy.") == {"limit": 3,
                                                                                              "name": "X"}


def test_help_lists_each_option_with_its_default_and_docstring():
    text = dataclass_help(Toy, prefix="toy.", notes=["more"])
    assert text.splitlines()[:4] == ["Options (key=value):", "", "  toy.count = 3", "      How many (at least 1)."]
    for name, doc in field_docs(Toy).items():
        assert f"  toy.{name} = {getattr(Toy(), name)!r}\n      {doc}\n" in text + "\n"
    assert text.endswith("\n  more")


# --------------------------------------------------------------------------------------------------
# The commands


def help_of(command: str, capsys) -> str:
    from lit_dreamer.__main__ import main
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return capsys.readouterr().out


@pytest.mark.parametrize("command, module, cls, prefix", [
    ("eval", "lit_dreamer.evaluation", "EvalOptions", ""),
    ("bench", "lit_dreamer.bench", "BenchConfig", "bench."),
    ("compare", "lit_dreamer.compare", "CompareOptions", ""),
])
def test_command_help_comes_from_the_option_docstrings(command, module, cls, prefix, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    options = getattr(__import__(module, fromlist=[cls]), cls)
    docs, defaults, text = field_docs(options), options(), help_of(command, capsys)
    assert set(docs) == {f.name for f in dataclasses.fields(options)}, "every option has a docstring"
    for name, doc in docs.items():
        assert f"  {prefix}{name} = {getattr(defaults, name)!r}\n      {' '.join(doc.split())}\n" in text


def eval_args(tmp_path, monkeypatch, *items: str):
    """(options, env overrides) that `eval` passes on; no checkpoint needed."""
    import lit_dreamer.evaluation as evaluation
    from lit_dreamer.__main__ import main
    seen = []

    def evaluate_checkpoint(ckpt, options, env_overrides):
        seen.append((options, env_overrides))
        raise ConfigError("stop here")

    monkeypatch.setattr(evaluation, "evaluate_checkpoint", evaluate_checkpoint)
    monkeypatch.setattr("lit_dreamer.resume.find_checkpoint", lambda path: path)
    assert main(["eval", "--ckpt", str(tmp_path / "model.ckpt"), *items]) == 2
    return seen[0] if seen else None


def test_eval_options_and_env_overrides_are_typed(tmp_path, monkeypatch, capsys):
    from lit_dreamer.evaluation import EvalOptions
    options, env = eval_args(tmp_path, monkeypatch, "episodes=4", "seed=0", "mode=stochastic", "video=0123.gif",
                             "env.time_limit=5", "env.asynchronous=true", "env.obs=pixels")
    assert options == EvalOptions(episodes=4, mode="sample", seed=0, video="0123.gif")
    # an int, not "5": gymnasium's TimeLimit refuses a str
    assert env == {"time_limit": 5, "asynchronous": True, "obs": "pixels"}
    assert capsys.readouterr().err.splitlines() == [
        "warning: mode=stochastic is deprecated and will be removed; use mode=sample", "error: stop here"]
    assert eval_args(tmp_path, monkeypatch, "env.time_limit=null")[1] == {"time_limit": None}


@pytest.mark.parametrize("items, message", [
    (["episode=3"], "unknown eval option 'episode'; did you mean episodes=N? eval options: episodes=N, "
                    "mode=mode|sample, seed=N, tracking_uri=TEXT, instructions=train|held_out, text=own|shuffled, video=TEXT, env.<key>=VALUE"),
    (["episodes=abc"], "episodes must be a whole number, got 'abc'"),
    (["episodes=0"], "episodes must be at least 1, got 0"),
    (["seed=-1"], "seed must be at least 0, got -1"),
    (["env.time_limt=5"], "unknown eval option 'env.time_limt'; did you mean env.time_limit=N?"),
    (["env.time_limit=soon"], "env.time_limit must be a whole number, got 'soon'"),
])
def test_eval_refuses_bad_options_before_looking_for_the_checkpoint(tmp_path, monkeypatch, capsys, items, message):
    assert eval_args(tmp_path, monkeypatch, *items) is None
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("item, message", [
    ("bench.stepz=2", "unknown bench option 'bench.stepz'; did you mean bench.steps=N? bench options: "
                      "bench.steps=N, bench.warmup=N, bench.collector_steps=N, bench.profile_steps=N"),
    ("bench.steps=0", "bench.steps must be at least 1, got 0"),
    ("bench.warmup=two", "bench.warmup must be a whole number, got 'two'"),
    ("bench.collector_steps=-5", "bench.collector_steps must be at least 0, got -5"),
])
def test_bench_refuses_bad_options_before_running(item, message, capsys, monkeypatch):
    import lit_dreamer.bench as bench
    from lit_dreamer.__main__ import main
    monkeypatch.setattr(bench, "main", lambda cfg, options: pytest.fail("bench ran"))
    assert main(["bench", "-c", "debug", item]) == 2
    assert message in capsys.readouterr().err


def test_bench_and_compare_options_reach_the_command(capsys, monkeypatch):
    import lit_dreamer.bench as bench
    import lit_dreamer.compare as compare
    from lit_dreamer.__main__ import main
    seen = []
    monkeypatch.setattr(bench, "main", lambda cfg, options: seen.append(options))
    monkeypatch.setattr(compare, "main", lambda options: seen.append(options))
    assert main(["bench", "-c", "debug", "bench.steps=3", "bench.profile_steps=2", "run.seed=1"]) == 0
    assert main(["compare", "runs=0123,1e5", "experiment=x", "tracking_uri=sqlite:///a.db"]) == 0
    assert seen == [bench.BenchConfig(steps=3, profile_steps=2),
                    compare.CompareOptions(runs="0123,1e5", experiment="x", tracking_uri="sqlite:///a.db")]
    assert main(["compare", "metrc=x"]) == 2
    assert "unknown compare option 'metrc'; did you mean metric=TEXT?" in capsys.readouterr().err
