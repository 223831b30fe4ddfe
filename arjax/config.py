"""Typed, frozen-dataclass configs: presets, `a.b=value` overrides and early validation.

Configs are hashable so they can be static jit arguments. Every check here runs on the host,
before anything is compiled, and raises `ConfigError` with a message that says how to fix it.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import json
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from arjax.errors import UserError

C = TypeVar("C")


class ConfigError(UserError, ValueError):
    """A configuration value is invalid; the message says which one and what is allowed."""


def check(condition: bool, message: str) -> None:
    """Raises `ConfigError(message)` unless `condition` holds."""
    if not condition:
        raise ConfigError(message)


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, kind: Any) -> tuple[bool, Any]:
    """(value fits the annotation `kind`, value converted to it: int -> float, list -> tuple)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for option in args:
            ok, converted = _coerce(value, option)
            if ok:
                return True, converted
        return False, value
    if kind is type(None):
        return value is None, value
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if kind in (bool, str):
        return isinstance(value, kind), value
    if origin is tuple and isinstance(value, (list, tuple)):
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) != len(value):
            return False, value
        converted = [_coerce(v, k) for v, k in zip(value, items)]
        return all(ok for ok, _ in converted), tuple(v for _, v in converted)
    if dataclasses.is_dataclass(kind):
        return isinstance(value, kind), value
    return False, value


def _describe(kind: Any) -> str:
    return getattr(kind, "__name__", None) or str(kind).replace("typing.", "")


def _parse_value(text: str, kind: Any, dotted: str) -> Any:
    """`text` as a value of the field's annotated type, or a ConfigError naming the field."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # bare strings: --set sample.cfg_schedule=linear
    if isinstance(value, str) and text.lower() in ("true", "false", "none", "null"):
        value = {"true": True, "false": False}.get(text.lower())
    ok, converted = _coerce(value, kind)
    if not ok and not isinstance(value, str):  # --set data.name=123: the text is the string
        ok, converted = _coerce(text, kind)
    check(ok, f"override {dotted}={text!r}: expected {_describe(kind)}, got "
              f"{type(value).__name__} {value!r}")
    return converted


def override(cfg: C, assignments: Sequence[str]) -> C:
    """Returns `cfg` with `["model.depth=12", "lr=3e-4"]` applied (nested dataclasses allowed)."""
    for assignment in assignments:
        check("=" in assignment, f"override {assignment!r} must look like key.sub=value")
        dotted, text = assignment.split("=", 1)
        dotted = dotted.strip()
        source = getattr(type(cfg), "DERIVED", {}).get(dotted)
        check(source is None, f"{dotted} is derived from {source}; set {source} instead")
        cfg = _replace_path(cfg, dotted.split("."), text.strip(), dotted)
    return cfg


def _replace_path(obj: Any, path: list[str], text: str, dotted: str) -> Any:
    check(dataclasses.is_dataclass(obj),
          f"override {dotted!r}: {path[0]!r} is not a config section")
    names = [f.name for f in dataclasses.fields(obj)]
    check(path[0] in names, f"override {dotted!r}: unknown field {path[0]!r}; known: {names}")
    current = getattr(obj, path[0])
    if len(path) == 1:
        check(not dataclasses.is_dataclass(current),
              f"override {dotted!r}: {path[0]!r} is a section; set one of its fields instead")
        new = _parse_value(text, _field_types(type(obj))[path[0]], dotted)
    else:
        new = _replace_path(current, path[1:], text, dotted)
    return dataclasses.replace(obj, **{path[0]: new})


def to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-friendly nested dict of a config (for logs and the work dir's config.json)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def from_argv(presets: Mapping[str, C], argv: Sequence[str], doc: str = ""
              ) -> tuple[C, argparse.Namespace]:
    """Parses `--config PRESET [--set k=v ...] [--workdir DIR]` into a config and the args."""
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help=f"preset, one of {sorted(presets)}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (type-checked), e.g. --set seed=1")
    parser.add_argument("--workdir", default=None, help="checkpoints, logs and samples go here")
    parser.add_argument("--tag", default=None,
                        help="name of this run's report folder <workdir>/samples/<tag> "
                             "(default step<N>; never overwrites an earlier report)")
    parser.add_argument("--distributed", default=None, choices=("auto", "explicit", "off"),
                        help="multi-process setup (arjax.distributed; default env "
                             "ARJAX_DISTRIBUTED or auto: joins a detected TPU pod / SLURM / "
                             "MPI job, else one process)")
    args = parser.parse_args(list(argv))
    check(args.config in presets,
          f"unknown --config {args.config!r}; choose one of {sorted(presets)}")
    return override(presets[args.config], args.set), args
