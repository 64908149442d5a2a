"""Options are ``str`` enums resolved once, at the boundary, with one error message shape."""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

__all__ = ["resolve"]

E = TypeVar("E", bound=Enum)


def resolve(enum: type[E], value, name: str) -> E:
    """``enum(value)``, or a ``ValueError`` that names the value and lists the choices."""
    try:
        return enum(value)
    except ValueError:
        choices = ", ".join(repr(e.value) for e in enum)
        raise ValueError(f"unknown {name} {value!r}; choose one of {choices}.") from None
