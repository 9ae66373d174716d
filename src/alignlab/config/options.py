"""The option machinery: :func:`opt` declares a field with its help, choices and range; :class:`Checked` validates a
config when it is built; :func:`build_config` reads defaults, YAML and ``key=value`` overrides; and the helpers the
CLI uses to list a config's fields."""

from __future__ import annotations

import dataclasses
import functools
import math
import types
from dataclasses import field
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from alignlab.errors import AlignlabError

__all__ = [
    "Checked",
    "build_config",
    "check_value",
    "config_fields",
    "config_to_dict",
    "describe_range",
    "opt",
    "parse_columns",
    "validate_config",
]

T = TypeVar("T")


def opt(default: Any, help: str, *, choices: list | None = None, ge: float | None = None,  # noqa: A002
        gt: float | None = None, le: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field with its help text, and what values it allows: ``choices``, or a range (``ge``/``gt``:
    at least / above, ``le``/``lt``: at most / below). One declaration feeds the CLI, ``--help`` (the range is
    shown), YAML and the Python API: :class:`Checked` configs reject a value outside it when they are built."""
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = choices
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    if bounds:
        metadata["range"] = bounds  # a list option: the range of each of its values
    if isinstance(default, list):  # each config gets its own copy
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def describe_range(bounds: dict[str, float] | None) -> str:
    """``{'ge': 0, 'lt': 1}`` -> ``'0 <= x < 1'``; ``{'gt': 0}`` -> ``'> 0'``; empty -> ``''``."""
    if not bounds:
        return ""
    lower = f"{_num(bounds['ge'])} <= " if "ge" in bounds else f"{_num(bounds['gt'])} < " if "gt" in bounds else ""
    upper = f" <= {_num(bounds['le'])}" if "le" in bounds else f" < {_num(bounds['lt'])}" if "lt" in bounds else ""
    if lower and upper:
        return f"{lower}x{upper}"
    if lower:
        return (">= " if "ge" in bounds else "> ") + lower.split(" ")[0]
    return upper.strip()


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def check_value(name: str, value: Any, typ: Any, metadata: Any) -> None:
    """Raise an :class:`AlignlabError` naming option ``name`` when ``value`` is not of type ``typ`` (after
    :func:`_coerce`), is a NaN/inf number, or lies outside the field's declared choices or range."""
    origin = get_origin(typ)
    if origin in (Union, types.UnionType):
        if value is None:
            return
        typ = [a for a in get_args(typ) if a is not type(None)][0]
    if typ is bool and not isinstance(value, bool):
        raise AlignlabError(f"expected true/false, got {value!r}", field=name)
    if typ in (int, float):
        wrong_type = not isinstance(value, int if typ is int else (int, float))
        if isinstance(value, bool) or wrong_type:
            raise AlignlabError(f"expected {'an integer' if typ is int else 'a number'}, got {value!r}", field=name)
        if not math.isfinite(value):
            raise AlignlabError(f"expected a finite number, got {value!r}", field=name)
        bounds = metadata.get("range")
        if bounds and not (value >= bounds.get("ge", -math.inf) and value > bounds.get("gt", -math.inf)
                           and value <= bounds.get("le", math.inf) and value < bounds.get("lt", math.inf)):
            raise AlignlabError(f"{_num(value)} is out of range: the allowed range is {describe_range(bounds)}",
                                field=name)
    if typ is str and not isinstance(value, str):
        raise AlignlabError(f"expected a string, got {value!r}", field=name)
    choices = metadata.get("choices")
    if choices and value not in choices:
        raise AlignlabError(f"'{value}' is not one of {choices}", field=name)


def validate_config(cfg: Any) -> None:
    """Check every field of a config dataclass against its declared type, choices and range (see :func:`opt`)."""
    hints = _hints(type(cfg))
    for f in dataclasses.fields(cfg):
        check_value(f.name, getattr(cfg, f.name), hints[f.name], f.metadata)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


class Checked:
    """Base of the config dataclasses: a config is validated when it is built, whichever way (CLI, YAML,
    ``SFTConfig(lr=...)`` in Python), so a bad value fails at once with the same message everywhere."""

    def __post_init__(self) -> None:
        validate_config(self)


def parse_columns(spec: str) -> dict[str, str] | None:
    """``'instruction=Q,output=A'`` -> ``{'instruction': 'Q', 'output': 'A'}``."""
    if not spec:
        return None
    out = {}
    for part in spec.split(","):
        if "=" not in part:
            raise AlignlabError(f"expected NAME=COLUMN, got '{part}'", field="columns")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _coerce(value: Any, typ: Any, name: str) -> Any:
    origin = get_origin(typ)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        typ = args[0]
    if typ is bool:
        if isinstance(value, bool):
            return value
        s = str(value).lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise AlignlabError(f"expected true/false, got '{value}'", field=name)
    if typ in (int, float):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise AlignlabError(f"expected {typ.__name__}, got '{value}'", field=name) from None
        if typ is int:
            if not number.is_integer():
                raise AlignlabError(f"expected an integer, got '{value}'", field=name)
            return int(number)
        return number
    if typ is str:
        return "" if value is None else str(value)
    if get_origin(typ) is list:
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
        inner = (get_args(typ) or (str,))[0]
        return [_coerce(v, inner, name) for v in items] if inner in (int, float) else items
    return value


def build_config(cls: type[T], *, yaml_file: str | None = None, overrides: dict[str, Any] | None = None) -> T:
    """Build ``cls`` from defaults, then a YAML file, then overrides (later wins). Unknown keys are errors."""
    hints = _hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    if yaml_file:
        path = Path(yaml_file)
        if not path.exists():
            raise AlignlabError("config file does not exist", file=yaml_file)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise AlignlabError(f"invalid YAML: {e}", file=yaml_file) from e
        if not isinstance(loaded, dict):
            raise AlignlabError("a config file must hold a mapping of option: value", file=yaml_file)
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    out = {}
    for key, value in values.items():
        key = key.replace("-", "_")
        if key not in names:
            raise AlignlabError(f"unknown option '{key}' for {cls.__name__}", file=yaml_file, field=key)
        out[key] = _coerce(value, hints[key], key)
    return cls(**out)  # validates every value (Checked.__post_init__), with the same message as the Python API


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict of a config dataclass (for config.yaml and cache keys)."""
    return dataclasses.asdict(cfg)


def config_fields(cls: type) -> list[tuple[str, Any, Any, str, list | None]]:
    """(name, type, default, help, choices) for each field, in declaration order, for the CLI; the help ends with
    the field's allowed range when it declares one."""
    hints = _hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f.metadata.get("help", "")
        if f.metadata.get("range"):
            help_text += f"; range: {describe_range(f.metadata['range'])}"
        out.append((f.name, hints[f.name], default, help_text, f.metadata.get("choices")))
    return out
