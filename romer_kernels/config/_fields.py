"""Small helpers shared by the config dataclasses: range checks that name the field, and JSON dicts."""
from __future__ import annotations

import dataclasses
import math
from typing import Any


def check_number(owner: str, name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> None:
    """Raise ``ValueError`` naming ``owner.name`` unless ``value`` is a finite real in the stated range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{owner}.{name} must be a finite number, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise ValueError(f"{owner}.{name} must be in {left}{lo}, {hi}{right}, got {value!r}")


def check_int(owner: str, name: str, value: Any, *, low: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{owner}.{name} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{owner}.{name} must be >= {low}, got {value!r}")


def check_choice(owner: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{owner}.{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_bool(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{owner}.{name} must be true or false, got {value!r}")


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain JSON-ready dict of a flat config dataclass (tuples become lists)."""
    out = {}
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        out[field.name] = list(value) if isinstance(value, tuple) else value
    return out


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build ``cls`` from a dict; unknown keys are an error so that typos are never silently ignored."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__} must be given as a JSON object, got {type(data).__name__}")
    names = {field.name: field for field in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {', '.join(unknown)}; known: {', '.join(names)}")
    kwargs = {}
    for key, value in data.items():
        default = names[key].default
        kwargs[key] = tuple(value) if isinstance(value, list) and isinstance(default, tuple) else value
    return cls(**kwargs)
