"""A method's settings as one typed dataclass: every default, help text and command-line flag in one place.

A method's config is a `MethodConfig` subclass whose fields are declared with `option(default, help, ...)`. The
command line (`diffdistill distill METHOD`) is generated from those fields, the Python API (`diffdistill.distill`)
fills the same dataclass from keyword overrides, and both call `resolve(teacher, loop)` for the defaults that
depend on the teacher or the run (None in a field means "decided by resolve"). So the CLI and the API cannot
disagree on a default, and a new option is written once.

This module imports no argparse at import time and nothing heavy: the CLI calls `add_config_arguments` and
`config_from_namespace`, the API `make_config`.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any

from ..errors import UsageError


def option(default: Any, help: str, *, metavar: str | tuple | None = None, choices: typing.Sequence | None = None,
           parse: typing.Callable[[str], Any] | None = None, cli: bool = True) -> Any:
    """A config field: its default, the help text of its command-line option `--field-name` (argparse's
    %(default)s works), and optionally its metavar, allowed choices, a parser of one command-line value (default:
    from the field's type) and cli=False for a setting the command line does not expose. The flag is always the
    field's name, so that settings written as a dict (recipes, the Python API) and as options are the same."""
    meta = dict(help=help, metavar=metavar, choices=tuple(choices) if choices is not None else None,
                parse=parse, cli=cli)
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class MethodConfig:
    """Base of every method's settings. Subclasses declare fields with `option` and override `resolve` when a
    default depends on the teacher or the run."""

    def resolve(self, teacher, loop) -> MethodConfig:
        """A copy with the teacher- and run-dependent defaults filled in and the values checked. `teacher`: the
        loaded teacher denoiser; `loop`: the run's TrainConfig (total_kimg, batch, out, device, seed, progress),
        or None when the method is built outside a run (then run-dependent defaults take their run-free value).
        Idempotent: a method's constructor resolves the config it is given again. Raises UsageError on a bad
        value."""
        return replace(self)


# --------------------------------------------------------------------------------------------------
# Field types


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _strip_optional(tp) -> tuple[Any, bool]:
    """(the type inside `X | None`, whether None is allowed)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        return (args[0] if len(args) == 1 else tp), optional
    return tp, False


def _flag(f: dataclasses.Field) -> str:
    return "--" + f.name.replace("_", "-")


def cli_fields(cls) -> list[dataclasses.Field]:
    """The fields of a config class that the command line exposes."""
    return [f for f in fields(cls) if f.metadata.get("cli", False)]


def _default(f: dataclasses.Field):
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    raise TypeError(f"config field {f.name} has no default")


# --------------------------------------------------------------------------------------------------
# The command line


def add_config_arguments(parser, cls, title: str) -> None:
    """One argparse option per CLI field of `cls`, in a group named `title`; dest = the field name, default =
    the field's default."""
    import argparse

    hints = _hints(cls)
    group = parser.add_argument_group(title)
    for f in cli_fields(cls):
        tp, optional = _strip_optional(hints[f.name])
        meta = f.metadata
        kwargs = dict(dest=f.name, default=_default(f), help=meta["help"])
        if meta.get("metavar") is not None:
            kwargs["metavar"] = meta["metavar"]
        if meta.get("choices") is not None:
            kwargs["choices"] = list(meta["choices"])
        if meta.get("parse") is not None:
            kwargs_parse = _argparse_type(meta["parse"], argparse)
        origin = typing.get_origin(tp)
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction if optional or kwargs["default"] else "store_true"
        elif origin in (tuple, list):
            args = typing.get_args(tp)
            kwargs["type"] = kwargs_parse if meta.get("parse") else args[0]
            kwargs["nargs"] = len(args) if origin is tuple and Ellipsis not in args else "+"
            if kwargs["default"] is not None:
                kwargs["default"] = list(kwargs["default"])
        else:
            kwargs["type"] = kwargs_parse if meta.get("parse") else (tp if tp in (int, float, str) else str)
        group.add_argument(_flag(f), **kwargs)


def _argparse_type(parse, argparse):
    """`parse` for argparse: its ValueError's message becomes the usage error (not "invalid parse value")."""
    def typed(text):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    typed.__name__ = parse.__name__
    return typed


def config_from_namespace(cls, ns) -> MethodConfig:
    """The config the parsed command line `ns` describes (fields missing from `ns` keep their defaults)."""
    hints = _hints(cls)
    values = {}
    for f in cli_fields(cls):
        if hasattr(ns, f.name):
            values[f.name] = _convert(hints[f.name], getattr(ns, f.name))
    return cls(**values)


def _convert(tp, value):
    tp, _ = _strip_optional(tp)
    if value is not None and typing.get_origin(tp) is tuple:
        return tuple(value)
    if value is not None and typing.get_origin(tp) is list:
        return list(value)
    return value


def flag_of(cls, name: str) -> str | None:
    """The command-line flag of field `name` (None: not a CLI field of `cls`)."""
    for f in cli_fields(cls):
        if f.name == name:
            return _flag(f)
    return None


# --------------------------------------------------------------------------------------------------
# The Python API


def make_config(cls, overrides: dict, what: str = "") -> MethodConfig:
    """`cls(**overrides)`, with unknown names and wrong types reported in one line."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise UsageError(f"{what or cls.__name__}: unknown setting(s) {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(known))})")
    hints = _hints(cls)
    return cls(**{k: _convert(hints[k], v) for k, v in overrides.items()})
