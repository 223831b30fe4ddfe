"""Typed, frozen-dataclass configs: presets, `a.b=value` overrides and early validation.

Configs are hashable so they can be static jit arguments. Every check here runs on the host,
before anything is compiled, and raises `ConfigError` with a message that says how to fix it.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

C = TypeVar("C")


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which one and what is allowed."""


def check(condition: bool, message: str) -> None:
    """Raises `ConfigError(message)` unless `condition` holds."""
    if not condition:
        raise ConfigError(message)


def _parse_value(text: str, current: Any) -> Any:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # bare strings: --set sample.cfg_schedule=linear
    if isinstance(current, bool) or current is None:
        return value
    if isinstance(current, float) and isinstance(value, int):
        return float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        return tuple(value)
    return value


def override(cfg: C, assignments: Sequence[str]) -> C:
    """Returns `cfg` with `["model.depth=12", "lr=3e-4"]` applied (nested dataclasses allowed)."""
    for assignment in assignments:
        check("=" in assignment, f"override {assignment!r} must look like key.sub=value")
        dotted, text = assignment.split("=", 1)
        cfg = _replace_path(cfg, dotted.strip().split("."), text.strip(), dotted)
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
        new = _parse_value(text, current)
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
                        help="override a config field, e.g. --set train.steps=100")
    parser.add_argument("--workdir", default=None, help="checkpoints, logs and samples go here")
    args = parser.parse_args(list(argv))
    check(args.config in presets,
          f"unknown --config {args.config!r}; choose one of {sorted(presets)}")
    return override(presets[args.config], args.set), args
