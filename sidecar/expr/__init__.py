"""Segment expressions: parse, compile (cached), evaluate for one user, many users and whole
audiences (DESIGN.md "Audiences: segment expressions"). Pure: no replica, no I/O."""

from __future__ import annotations

from .compiled import Expr, compile_arg, compile_expr
from .parser import MAX_LENGTH, MAX_REFERENCES, ExprError, parse
from .results import Audience, Count
from .stream import id_chunks

__all__ = [
    "MAX_LENGTH",
    "MAX_REFERENCES",
    "Audience",
    "Count",
    "Expr",
    "ExprError",
    "compile_arg",
    "compile_expr",
    "id_chunks",
    "parse",
]
