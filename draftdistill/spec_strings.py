"""The one grammar of the `name:key=value,...` strings that pick a divergence or an OPD objective.

    parse_spec("jsd:beta=0.5")                     -> ("jsd", {"beta": 0.5})
    parse_spec("opd:clip=none,reward_scale=1.25")  -> ("opd", {"clip": None, "reward_scale": 1.25})
    parse_spec("topk_tail : k=20, base=rkl")       -> ("topk_tail", {"k": 20, "base": "rkl"})

    spec    := name [":" [item ("," item)*]]
    item    := key "=" value          (spaces around any part are ignored; empty items are skipped)
    value   := int | float | true | false | none | null | text   (tried in that order;
               the words are case-insensitive, so "1e-3" is 0.001 and "rkl" stays "rkl")

Names and keys are Python identifiers; a key may appear once. Values cannot contain "," or "=".
Every error is a ValueError that quotes the whole spec. Only the syntax is checked here: which
names and parameters exist is for the registry that owns them (losses.registry for divergences,
opd.objectives for objectives).
"""
from __future__ import annotations

from typing import Any

_WORDS = {"true": True, "false": False, "none": None, "null": None}


def parse_value(text: str) -> Any:
    """One value: int, float, true/false, none/null (any case), else the text itself."""
    word = text.lower()
    if word in _WORDS:
        return _WORDS[word]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_spec(text: str, kind: str = "spec") -> tuple[str, dict[str, Any]]:
    """"name" or "name:key=value,..." -> (name, params) with typed values (see the module docstring).

    kind names what the string is for ("divergence", "objective") in error messages.
    """
    if not isinstance(text, str):
        raise ValueError(f"{kind} spec must be a string like 'name:key=value', got {text!r}")
    name, _, rest = text.strip().partition(":")
    name = name.strip()
    if not name.isidentifier():
        raise ValueError(f"bad {kind} spec {text!r}: expected a name, then optionally "
                         f"':key=value,key=value' (got name {name!r})")
    params: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or not key or not value:
            raise ValueError(f"bad {kind} parameter {item!r} in {text!r}; expected key=value")
        if not key.isidentifier():
            raise ValueError(f"bad {kind} parameter name {key!r} in {text!r}")
        if key in params:
            raise ValueError(f"{kind} parameter {key!r} given twice in {text!r}")
        params[key] = parse_value(value)
    return name, params


def format_spec(name: str, params: dict[str, Any] | None = None) -> str:
    """The inverse of parse_spec for values it produces: ("jsd", {"beta": 0.5}) -> "jsd:beta=0.5"."""
    def show(v):
        return "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)

    items = ",".join(f"{k}={show(v)}" for k, v in (params or {}).items())
    return f"{name}:{items}" if items else name
