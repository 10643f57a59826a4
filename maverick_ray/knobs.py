"""Settings declared once, as dataclass fields, and derived everywhere else.

A knob is a field of a config dataclass (`EngineConfig`, `ParallelConfig`) made with `knob()`:
its default, help text, allowed values and command-line flag live in that one declaration.
The `generate` and `serve` flags (`add_arguments`), the Serve app's args
(`serve/settings.py`) and validation (`check_choices`) are all derived from it, so a knob added
to a config appears on the CLI and in Serve with no other edit (tests/test_settings.py).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

_TYPES = {"int": int, "float": float, "str": str}


def knob(default: Any, help: str, *, choices: tuple | None = None, flag: str | None = None,
         cli: bool = True) -> Any:
    """A config field with its help text. `flag`: the CLI flag (default: --field-name);
    `cli=False`: settable from Serve args and code only (structured values such as maps)."""
    return dataclasses.field(default=default,
                             metadata={"help": help, "choices": choices, "flag": flag, "cli": cli})


def knobs(cls) -> list[dataclasses.Field]:
    """The fields of `cls` declared with knob()."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def check_choices(obj) -> None:
    """Raises ConfigError for a knob whose value is not one of its choices."""
    from .config import ConfigError

    for f in knobs(type(obj)):
        allowed = f.metadata["choices"]
        value = getattr(obj, f.name)
        if allowed and value not in allowed:
            raise ConfigError(f"{f.name}: must be one of {', '.join(map(str, allowed))}, got {value!r}")


def add_arguments(parser: argparse.ArgumentParser, cls, defaults: dict[str, Any] | None = None) -> None:
    """Adds one flag per CLI knob of `cls` (dest = the field name). `defaults` overrides the
    declared defaults for this parser (`serve` runs EP = 2 by default, `generate` EP = 1)."""
    defaults = defaults or {}
    for f in knobs(cls):
        if not f.metadata["cli"]:
            continue
        default = defaults.get(f.name, f.default)
        kind = _TYPES[f.type if isinstance(f.type, str) else f.type.__name__]
        parser.add_argument(flag_of(f), dest=f.name, type=kind, default=default, choices=f.metadata["choices"],
                            metavar=None if f.metadata["choices"] else ("VALUE" if kind is str else "N"),
                            help=f"{f.metadata['help']} (default: {default})")


def from_arguments(cls, args: argparse.Namespace, **extra):
    """Builds `cls` from the flags add_arguments added (plus `extra` fields)."""
    values = {f.name: getattr(args, f.name) for f in knobs(cls) if f.metadata["cli"]}
    return cls(**values, **extra)


def as_dict(obj) -> dict[str, Any]:
    """Every knob of a config object by name (what the Serve app's args take)."""
    return {f.name: getattr(obj, f.name) for f in knobs(type(obj))}
