"""Typed reads of fields from untrusted JSON configs (a Hugging Face config.json, an engine's build settings).

Each reader returns the field's value as the promised Python type or raises ``ValueError`` naming
the field and the value, which the caller turns into a :class:`compiler_core.errors.ConfigError`
naming the file. JSON has no separate integer type for floats like ``2.0`` and Python counts
``true`` as 1; both are refused where an integer belongs, so a config says exactly what it means.
NaN and infinities (which Python's json accepts) are refused where a number belongs.
"""

from __future__ import annotations

import math
from typing import Any

#: Marks a field that has no default: absent (or null) is an error.
REQUIRED: Any = object()


def _pick(data: dict[str, Any], names: tuple[str, ...]) -> tuple[str, Any]:
    """(name, value) of the first of ``names`` set to something other than null, else (names[0], None)."""
    for name in names:
        if data.get(name) is not None:
            return name, data[name]
    return names[0], None


def _absent(names: tuple[str, ...], default: Any) -> Any:
    if default is REQUIRED:
        raise ValueError(f"field {' / '.join(repr(n) for n in names)} is missing")
    return default


def is_int(value: Any) -> bool:
    """True for a JSON integer (``true``/``false`` are not integers here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def int_field(data: dict[str, Any], *names: str, default: Any = REQUIRED, minimum: int | None = None) -> int:
    """The integer at the first of ``names`` that is set, at least ``minimum``."""
    name, value = _pick(data, names)
    if value is None:
        return _absent(names, default)
    if not is_int(value) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"field {name!r} must be an integer{bound}, got {value!r}")
    return value


def float_field(data: dict[str, Any], *names: str, default: Any = REQUIRED, positive: bool = False) -> float:
    """The finite number at the first of ``names`` that is set (greater than 0 when ``positive``)."""
    name, value = _pick(data, names)
    if value is None:
        return _absent(names, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"field {name!r} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"field {name!r} must be greater than 0, got {value!r}")
    return float(value)


def bool_field(data: dict[str, Any], name: str, default: Any = REQUIRED) -> bool:
    """The boolean ``name`` (JSON true or false)."""
    value = data.get(name)
    if value is None:
        return _absent((name,), default)
    if not isinstance(value, bool):
        raise ValueError(f"field {name!r} must be true or false, got {value!r}")
    return value


def str_field(data: dict[str, Any], name: str, default: Any = REQUIRED) -> str:
    """The string ``name``."""
    value = data.get(name)
    if value is None:
        return _absent((name,), default)
    if not isinstance(value, str):
        raise ValueError(f"field {name!r} must be a string, got {value!r}")
    return value


def dict_field(data: dict[str, Any], *names: str) -> dict[str, Any] | None:
    """The object at the first of ``names`` that is set, or None."""
    name, value = _pick(data, names)
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"field {name!r} must be an object, got {value!r}")
    return value


def _is_token_id(value: Any) -> bool:
    return is_int(value) and value >= 0


def token_id_field(data: dict[str, Any], name: str, default: Any = None) -> int | None:
    """A token id (an integer >= 0) or None."""
    value = data.get(name, default)
    if value is not None and not _is_token_id(value):
        raise ValueError(f"field {name!r} must be a token id (an integer >= 0), got {value!r}")
    return value


def token_ids_field(data: dict[str, Any], name: str, default: Any = None) -> int | list[int] | None:
    """A token id, a non-empty list of them (transformers' several stop tokens), or None."""
    value = data.get(name, default)
    if value is None or _is_token_id(value):
        return value
    if isinstance(value, list) and value and all(_is_token_id(v) for v in value):
        return value
    raise ValueError(f"field {name!r} must be a token id or a list of token ids (integers >= 0), got {value!r}")
