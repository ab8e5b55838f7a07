"""Small config objects loaded from YAML, with ``key=value`` overrides from the command line."""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import yaml


def coerce(value: str, kind):
    """Parse a command-line override into the field's type (YAML syntax for everything else)."""
    parsed = yaml.safe_load(value)
    if kind is str and not isinstance(parsed, str):
        return value  # "pruned:2" stays a string, and so does "123" for a str field
    return parsed


def check_type(key: str, value, kind):
    """Numbers arrive from YAML as int where a float is meant, and as str for "1e-3" (YAML 1.1
    has no exponent without a dot): accept both, refuse anything else with the key's name."""
    if kind is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    if kind in (int, float, bool, str) and not (isinstance(value, kind) and not
                                                 (kind is int and isinstance(value, bool))):
        raise ValueError(f"config key {key!r} expects {kind.__name__}, got {value!r}")
    return value


def load_config(cls, path: str | Path | None = None, overrides: typing.Sequence[str] = ()):
    """Build dataclass ``cls`` from a YAML file, then apply ``key=value`` overrides (they win)."""
    values = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of config keys to values")
        values.update(loaded)
    hints = typing.get_type_hints(cls)
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq:
            raise ValueError(f"override {item!r}: expected key=value")
        kind = hints.get(key)
        values[key] = coerce(raw, kind if isinstance(kind, type) else None)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    where = f"{path}: " if path else ""
    if unknown:
        raise ValueError(f"{where}unknown config keys {unknown}; known: {sorted(fields)}")
    try:
        values = {key: check_type(key, value, hints.get(key)) for key, value in values.items()}
    except ValueError as error:
        raise ValueError(f"{where}{error}") from None
    return cls(**values)
