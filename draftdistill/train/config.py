"""Configs: the keys every trainer shares (`TrainConfig`), and the one loader for YAML files with
``key=value`` overrides from the command line.

A trainer's config is a dataclass over `TrainConfig` that adds its own keys and range checks
(`validate`), so no trainer has to refuse another's keys. `load_config` builds one and validates
it before any model or data is read: a wrong value costs nothing.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path

import yaml

from . import distributed


class ConfigError(ValueError):
    """A config file or value that cannot be used; the message names the file (and line) or key."""


def coerce(value: str, kind):
    """Parse a command-line override into the field's type (YAML syntax for everything else)."""
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = value  # e.g. "a: b" for a str field: keep the text
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
        raise ConfigError(f"config key {key!r} expects {kind.__name__}, got {value!r}")
    return value


def read_yaml_mapping(path: str | Path) -> dict:
    """A YAML file of keys -> values (every file in configs/ is one), with errors that name the file
    and line instead of a parser traceback."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read it ({error.strerror or error})") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys to values, got {type(loaded).__name__}")
    return loaded


def load_config(cls, path: str | Path | None = None, overrides: typing.Sequence[str] = ()):
    """Build dataclass ``cls`` from a YAML file, then apply ``key=value`` overrides (they win), and
    validate it. Errors say whether the file or the command line is at fault."""
    values = read_yaml_mapping(path) if path is not None else {}
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"{path}: unknown config keys {unknown}; known: {sorted(fields)}")
    try:
        values = {key: check_type(key, value, hints.get(key)) for key, value in values.items()}
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq:
            raise ConfigError(f"command line: override {item!r}: expected key=value")
        if key not in fields:
            raise ConfigError(f"command line: unknown config key {key!r}; known: {sorted(fields)}")
        kind = hints.get(key)
        try:
            values[key] = check_type(key, coerce(raw, kind if isinstance(kind, type) else None), kind)
        except ConfigError as error:
            raise ConfigError(f"command line: {error}") from None
    cfg = cls(**values)
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        try:
            validate()
        except ValueError as error:
            source = f"{path} with the command line's overrides" if path and overrides else (path or "command line")
            raise ConfigError(f"{source}: {error}") from None
    return cfg


# --- range checks -------------------------------------------------------------------------------


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def at_least(cfg, minimum, *keys: str) -> None:
    for key in keys:
        value = getattr(cfg, key)
        require(isinstance(value, (int, float)) and math.isfinite(value) and value >= minimum,
                f"{key} must be >= {minimum}, got {value!r}")


def positive(cfg, *keys: str) -> None:
    for key in keys:
        value = getattr(cfg, key)
        require(isinstance(value, (int, float)) and math.isfinite(value) and value > 0,
                f"{key} must be > 0, got {value!r}")


def one_of(cfg, key: str, choices: typing.Sequence[str]) -> None:
    require(getattr(cfg, key) in choices, f"{key} must be one of {tuple(choices)}, got {getattr(cfg, key)!r}")


@dataclasses.dataclass
class TrainConfig:
    # --- run, optimizer and schedule (every trainer) -----------------------------------------------
    steps: int = 60  # optimizer steps
    batch_size: int = 4  # prompts per micro-batch on each rank (torchrun: the global batch is N times this)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4  # peak learning rate (AdamW; linear warmup, cosine decay to 10%)
    warmup_steps: int = 5  # linear warmup steps
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping
    save_every: int = 20  # steps between checkpoints
    out_dir: str = "runs/distill"  # checkpoints, metrics, plots and the trained model
    resume: bool = True  # continue from out_dir/checkpoint when it exists (false: start afresh, overwriting it)
    seed: int = 0  # every random draw derives from it (and the step, row)
    device: str | None = None  # cpu | cuda[:N]; default: cuda when there is one
    # --- scale-out: torchrun only (ignored in one process) ------------------------------------------
    fsdp: bool = True  # FSDP2-shard the trained model (false: replicate it, i.e. DDP)
    teacher_parallel: str = "replicate"  # the frozen target / teachers: replicate | shard

    def validate(self) -> None:
        """Range checks of the shared keys; a trainer's config extends it with its own."""
        at_least(self, 1, "steps", "batch_size", "grad_accum", "save_every")
        at_least(self, 0, "warmup_steps", "weight_decay", "seed")
        positive(self, "lr", "max_grad_norm")
        one_of(self, "teacher_parallel", distributed.TEACHER_PARALLEL)
        require(bool(str(self.out_dir).strip()), "out_dir must not be empty")
        require(self.device is None or isinstance(self.device, str), f"device must be a string, got {self.device!r}")
