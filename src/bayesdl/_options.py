"""Options checked once, at the boundary, with one error message shape: ``str`` enums resolved by
name, numbers checked by :func:`require`."""

from __future__ import annotations

import math
from enum import Enum
from typing import TypeVar

__all__ = ["is_number", "is_positive", "require", "resolve"]

E = TypeVar("E", bound=Enum)


def resolve(enum: type[E], value, name: str) -> E:
    """``enum(value)``, or a ``ValueError`` that names the value and lists the choices."""
    try:
        return enum(value)
    except ValueError:
        choices = ", ".join(repr(e.value) for e in enum)
        raise ValueError(f"unknown {name} {value!r}; choose one of {choices}.") from None


def is_number(value) -> bool:
    """A finite ``int`` or ``float`` (not a ``bool``)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_positive(value) -> bool:
    """A finite number ``> 0``."""
    return is_number(value) and value > 0


def require(ok: bool, name: str, value, want: str) -> None:
    """A ``ValueError`` naming the option, what it must be and what came, unless ``ok``."""
    if not ok:
        raise ValueError(f"{name} must be {want}, got {value!r}.")
