"""Segment expressions (DESIGN.md "Audiences: segment expressions"): the tokenizer and the
parser, the one place that decides what an expression is.

```
expr := or          or  := and ("|" and)*      and := not ("&" not)*
not  := "!" not | atom                         atom := SEGMENT | "(" expr ")"
```

The parser is hand-written operator precedence with an explicit stack rather than recursive
descent: 1,024 characters allow 500 nested parentheses, deeper than Python's recursion limit
would take with one frame per grammar rule. Positions count characters from 0; every error is
an `ExprError` (a `BadRequest`) that names one.

The tree it returns is normalized: `&` and `|` are n-ary with at least two operands (nested
ones of the same kind are flattened), a double negation is removed (`!!x` is `x` in Kleene
logic too), and every `Seg` refers to its segment by its index in `Parsed.segments`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..ids import SEGMENT_RE, BadRequest

MAX_LENGTH = 1024
MAX_REFERENCES = 64
_WHITESPACE = frozenset(" \t\r\n")
_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:-")
_OPERATORS = frozenset("!&|()")


class ExprError(BadRequest):
    """A malformed or refused expression; `position` is the character it is about (from 0)."""

    def __init__(self, message: str, position: int) -> None:
        super().__init__(f"bad expression at position {position}: {message}")
        self.position = position


@dataclass(frozen=True, slots=True)
class Seg:
    index: int  # into Parsed.segments
    position: int


@dataclass(frozen=True, slots=True)
class Not:
    operand: Node
    position: int  # of the "!"


@dataclass(frozen=True, slots=True)
class And:
    operands: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Or:
    operands: tuple[Node, ...]


Node = Seg | Not | And | Or


@dataclass(frozen=True, slots=True)
class Parsed:
    source: str
    tree: Node
    segments: tuple[str, ...]  # distinct, in order of first reference


def tokenize(source: str) -> list[tuple[str, int]]:
    """[(token, position)]: an operator character or a segment id."""
    tokens: list[tuple[str, int]] = []
    i, n = 0, len(source)
    while i < n:
        c = source[i]
        if c in _WHITESPACE:
            i += 1
        elif c in _OPERATORS:
            tokens.append((c, i))
            i += 1
        elif c in _NAME_CHARS:
            start = i
            while i < n and source[i] in _NAME_CHARS:
                i += 1
            name = source[start:i]
            if SEGMENT_RE.match(name) is None:
                shown = name if len(name) <= 40 else name[:40] + "..."
                raise ExprError(
                    f"{shown!r} is not a valid segment id (1-128 chars of [A-Za-z0-9_.:-], "
                    "starting with a letter or digit)",
                    start,
                )
            tokens.append((name, start))
        else:
            raise ExprError(f"unexpected character {c!r}", i)
    return tokens


def parse(source: object) -> Parsed:
    """The normalized tree of `source`, or ExprError naming the position."""
    if type(source) is not str:
        raise BadRequest(f"expr must be a string, got {type(source).__name__}")
    if len(source) > MAX_LENGTH:
        raise ExprError(
            f"it is {len(source):,} characters long; at most {MAX_LENGTH:,} are allowed",
            MAX_LENGTH,
        )
    tokens = tokenize(source)
    if not tokens:
        raise ExprError("it is empty; expected a segment, '!' or '('", 0)
    names: dict[str, int] = {}
    references = 0
    operands: list[Node] = []
    # Pending operators: ("!", pos), ("&", pos), ("|", pos) or ("(", pos).
    ops: list[tuple[str, int]] = []
    expect_operand = True

    def reduce(stop_at: frozenset[str]) -> None:
        """Apply pending operators down to one in `stop_at` (or the bottom)."""
        while ops and ops[-1][0] not in stop_at:
            op, pos = ops.pop()
            if op == "!":
                operands.append(_negate(operands.pop(), pos))
            else:
                right = operands.pop()
                left = operands.pop()
                operands.append(_join(And if op == "&" else Or, left, right))

    for token, pos in tokens:
        if expect_operand:
            if token == "!" or token == "(":
                ops.append((token, pos))
            elif token in _OPERATORS:
                raise ExprError(f"expected a segment, '!' or '(' but found {token!r}", pos)
            else:
                references += 1
                if references > MAX_REFERENCES:
                    raise ExprError(f"more than {MAX_REFERENCES} segment references", pos)
                index = names.setdefault(token, len(names))
                operands.append(Seg(index, pos))
                # "!" binds tightest: apply the ones written just before this operand.
                while ops and ops[-1][0] == "!":
                    operands.append(_negate(operands.pop(), ops.pop()[1]))
                expect_operand = False
        elif token == "&":
            reduce(_BELOW_AND)
            ops.append((token, pos))
            expect_operand = True
        elif token == "|":
            reduce(_BELOW_OR)
            ops.append((token, pos))
            expect_operand = True
        elif token == ")":
            reduce(_PAREN)
            if not ops:
                raise ExprError("')' has no matching '('", pos)
            ops.pop()
            while ops and ops[-1][0] == "!":
                operands.append(_negate(operands.pop(), ops.pop()[1]))
        else:
            shown = "'('" if token == "(" else "'!'" if token == "!" else f"segment {token!r}"
            raise ExprError(f"expected '&', '|' or ')' but found {shown}", pos)
    if expect_operand:
        raise ExprError("it ends where a segment, '!' or '(' is expected", len(source.rstrip()))
    reduce(_PAREN)
    if ops:
        raise ExprError("'(' is never closed", ops[-1][1])
    (tree,) = operands
    return Parsed(source, tree, tuple(names))


_PAREN = frozenset("(")
_BELOW_AND = frozenset("(|")  # "&" reduces pending "!" and "&" (left-associative)
_BELOW_OR = frozenset("(")  # "|" reduces everything down to a "("


def _negate(node: Node, position: int) -> Node:
    if isinstance(node, Not):
        return node.operand
    return Not(node, position)


def _join(kind: type[And] | type[Or], left: Node, right: Node) -> Node:
    parts: list[Node] = []
    for side in (left, right):
        if isinstance(side, kind):
            parts.extend(side.operands)
        else:
            parts.append(side)
    return kind(tuple(parts))
