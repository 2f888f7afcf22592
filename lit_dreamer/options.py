"""A command's `key=value` options, parsed into its options dataclass through OmegaConf.

eval, bench and compare take their options this way. Each key is a field of the command's dataclass
(behind a prefix such as `bench.` where the command shares its line with config keys); OmegaConf's
structured config converts the value to the field's type and refuses what does not fit; a field's
check (declared with `checked`) bounds or maps the value; an unknown key fails with the closest key
suggested; and `dataclass_help` lists the fields with their defaults and docstrings for --help, as
`fit --help` lists the config's. The run config itself stays with `config.load_config`.
"""

from __future__ import annotations

import typing
from dataclasses import field, fields, replace
from typing import Any, Callable, Sequence, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lit_dreamer.config import ConfigError, did_you_mean, key_lines, schema_keys

T = TypeVar("T")
Check = Callable[[Any, str], Any]
"""(value, key as the user wrote it) -> the value to use; raises ConfigError naming the key and the fix."""

CHECK, SHOWN = "check", "shown"  # dataclass field metadata: a field's Check, its value in usage lines
TYPE_WORDS = {int: "a whole number", float: "a number", bool: "true or false"}
PLACEHOLDERS = {int: "N", float: "X", bool: "true|false"}


def checked(default: Any, check: Check, shown: str | None = None) -> Any:
    """A dataclass field with a default and a check that parse_options runs on a value given for it;
    `shown` is its value in usage lines (e.g. mode|sample; default: N, X, true|false or TEXT by type)."""
    return field(default=default, metadata={CHECK: check, SHOWN: shown})


def one_of(choices: Sequence[str], meaning: str) -> Check:
    """A check that refuses values outside `choices`; `meaning` says in words what the choices are."""
    def check(value: Any, key: str) -> Any:
        if value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(choices)} ({meaning}), got {value!r}")
        return value
    return check


def at_least(low: int) -> Check:
    """A check that refuses values below `low`."""
    def check(value: Any, key: str) -> Any:
        if value < low:
            raise ConfigError(f"{key} must be at least {low}, got {value}")
        return value
    return check


# --------------------------------------------------------------------------------------------------
# Parsing


def parse_options(cls: type[T], items: Sequence[str], *, command: str, prefix: str = "",
                  passthrough: Sequence[str] = ()) -> T:
    """The defaults of `cls` with the given items set; items whose key starts with a passthrough prefix
    (e.g. eval's `env.`) are left to the command, which handles them itself."""
    own = [item for item in items if not item.startswith(tuple(passthrough))] if passthrough else list(items)
    return replace(cls(), **option_values(cls, own, command=command, prefix=prefix, passthrough=passthrough))


def option_values(cls: type, items: Sequence[str], *, command: str, prefix: str = "",
                  passthrough: Sequence[str] = ()) -> dict[str, Any]:
    """{field: value} of `prefix<field>=value` items, each value of the field's type and checked; later wins."""
    names = {f.name: f for f in fields(cls)}
    node, values = OmegaConf.structured(cls), {}
    for item in items:
        key, sep, raw = item.partition("=")
        name = key[len(prefix):] if key.startswith(prefix) else None
        if not sep or name not in names:
            raise ConfigError(unknown_message(cls, item, key if sep else None, command, prefix, passthrough))
        value = converted(node, cls, name, raw, key)
        check = names[name].metadata.get(CHECK)
        values[name] = check(value, key) if check else value
    return values


def converted(node: Any, cls: type, name: str, raw: str, key: str) -> Any:
    """`raw` as the field's type, converted by OmegaConf; `null` for a field that may be None."""
    hint = typing.get_type_hints(cls)[name]
    optional = type(None) in typing.get_args(hint)
    if raw == "null" and optional:  # as in fit's key=value overrides and the printed config
        return None
    try:  # the raw text, not YAML: a str option keeps `0123` or `1e5` (run id prefixes) as written
        return OmegaConf.merge(node, {name: raw})[name]
    except OmegaConfBaseException as err:
        base = base_type(hint)
        if base in TYPE_WORDS:
            raise ConfigError(f"{key} must be {TYPE_WORDS[base]}, got {raw!r}") from None
        reason = str(getattr(err, "msg", err)).splitlines()[0]
        raise ConfigError(f"bad value {raw!r} for {key}: {reason}") from None


def base_type(hint: Any) -> Any:
    """int for int and Optional[int]; the hint itself otherwise."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if len(args) == 1 else hint


# --------------------------------------------------------------------------------------------------
# Messages and help


def usage(cls: type, prefix: str = "", passthrough: Sequence[str] = ()) -> list[str]:
    """`key=N`, `key=TEXT`, ... for each option, then `prefix<key>=VALUE` for each passthrough prefix."""
    hints = typing.get_type_hints(cls)
    shown = [f"{prefix}{f.name}={f.metadata.get(SHOWN) or PLACEHOLDERS.get(base_type(hints[f.name]), 'TEXT')}"
             for f in fields(cls)]
    return shown + [f"{p}<key>=VALUE" for p in passthrough]


def unknown_message(cls: type, item: str, key: str | None, command: str, prefix: str,
                    passthrough: Sequence[str]) -> str:
    """What is wrong with an item that names no option, the closest option, and the list of them."""
    known = usage(cls, prefix, passthrough)
    options = f"{command} options: {', '.join(known)} (see `python -m lit_dreamer {command} --help`)"
    if key is None:
        return f"{command} option {item!r} is not of the form key=value; {options}"
    by_key = {u.split("=")[0]: u for u in known}
    hint = did_you_mean(key, list(by_key), shown=by_key.get, n=1, cutoff=0.6)  # few, short keys: the best only
    return f"unknown {command} option {key!r}; " + (f"{hint} " if hint else "") + options


def dataclass_help(cls: type, prefix: str = "", notes: Sequence[str] = ()) -> str:
    """The options' --help listing: each key with its default and its field docstring, then the notes."""
    lines = ["Options (key=value):", "", *key_lines(schema_keys(cls, prefix))]
    return "\n".join(lines + [f"  {note}" for note in notes])
