"""A parsed expression compiled for the three ways the replica answers it:

- one user (`evaluate`): Kleene logic over a leaf answer function, short-circuit;
- many users (`evaluate_many`): the same logic as roaring operations over the set of users;
- an audience (`members`, `count`): two-valued set algebra over whole segments, for
  expressions whose result is bounded.

`compile_expr` caches compiled forms per expression string, so a repeated expression costs a
dictionary lookup. Nothing here knows where answers come from: callers pass the answer
function or the bitmaps, and must not change those bitmaps while a call runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pyroaring import BitMap64

from .parser import And, ExprError, Node, Not, Or, Seg, parse

#: leaf index -> True / False / None (unknown)
Answer = Callable[[int], "bool | None"]
_Eval = Callable[[Answer], "bool | None"]
CACHE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class _Lit:
    """A segment or its negation: the leaves of the negation normal form."""

    index: int
    negated: bool
    position: int  # of the segment, or of the "!" that negates it


#: negation normal form: And / Or nodes over _Lit leaves only
NNF = _Lit | And | Or


class Expr:
    """One compiled expression. Immutable; shared through the cache."""

    __slots__ = ("source", "segments", "tree", "_eval", "_nnf", "_unbounded_at", "_scan")

    def __init__(self, source: str) -> None:
        parsed = parse(source)
        self.source = source
        #: the distinct segments referenced, in order of first reference; leaves index it
        self.segments: tuple[str, ...] = parsed.segments
        self.tree: Node = parsed.tree
        self._eval = _closure(parsed.tree)
        self._nnf = _to_nnf(parsed.tree, False, -1)
        self._unbounded_at = _unbounded(self._nnf)
        self._scan: Callable[..., bytes] | None = None

    def __repr__(self) -> str:
        return f"Expr({self.source!r})"

    # -- one user -------------------------------------------------------------------------
    def evaluate(self, answer: Answer) -> bool | None:
        """Kleene value for one user; `answer(i)` is segment i's membership (None unknown).
        Operands are asked left to right and only until the result is decided."""
        return self._eval(answer)

    # -- many users -------------------------------------------------------------------------
    def evaluate_many(
        self, bitmaps: Sequence[BitMap64 | None], users: BitMap64
    ) -> tuple[BitMap64, BitMap64]:
        """(members, unknown) among `users`; `bitmaps[i]` is segment i, or None when its
        answers are unknown. The rest of `users` are not members."""
        true, false = _tri(self.tree, bitmaps, users)
        return true, users - true - false

    def members_of(self, bitmaps: Sequence[BitMap64], users: Iterable[int]) -> bytes:
        """One byte per user, 1 member / 0 not, when every segment is known (two-valued):
        the expression compiled to one Python comprehension (`u in b0 and not u in b1 ...`),
        several times faster for a list of users than roaring operations on its bitmap."""
        if self._scan is None:
            self._scan = _scanner(self.tree, len(self.segments))
        return self._scan(users, *bitmaps)

    # -- audiences ----------------------------------------------------------------------------
    @property
    def bounded(self) -> bool:
        return self._unbounded_at is None

    def require_bounded(self) -> None:
        """ExprError unless the result is a finite set whatever the segments hold: every
        negation (after pushing negations down to the segments) sits under an `&` with a
        bounded side."""
        if self._unbounded_at is not None:
            raise ExprError(
                "the result is unbounded (everyone outside a segment): the negation must sit "
                "under an '&' with a bounded side, as in 'a & !b'",
                self._unbounded_at,
            )

    def members(self, bitmaps: Sequence[BitMap64]) -> BitMap64:
        """The audience as a new bitmap (never one of `bitmaps`)."""
        self.require_bounded()
        result, negated, owned = _sets(self._nnf, bitmaps)
        assert not negated  # bounded
        return result if owned else result.copy()

    def count(self, bitmaps: Sequence[BitMap64]) -> int:
        """len(members(bitmaps)), without building the result for the common shapes."""
        self.require_bounded()
        node = self._nnf
        if isinstance(node, _Lit):
            return len(bitmaps[node.index])
        if all(isinstance(x, _Lit) for x in node.operands) and len(node.operands) == 2:
            a, b = node.operands  # type: ignore[misc]
            if isinstance(node, Or):
                return bitmaps[a.index].union_cardinality(bitmaps[b.index])
            if not a.negated and not b.negated:
                return bitmaps[a.index].intersection_cardinality(bitmaps[b.index])
            pos, neg = (a, b) if b.negated else (b, a)
            return bitmaps[pos.index].difference_cardinality(bitmaps[neg.index])
        result, negated, _ = _sets(node, bitmaps)
        assert not negated
        return len(result)


@lru_cache(maxsize=CACHE_SIZE)
def compile_expr(source: str) -> Expr:
    """The compiled form of `source` (cached); ExprError / BadRequest when it is not one."""
    return Expr(source)


def compile_arg(source: object) -> Expr:
    """`compile_expr` for client input of any type."""
    if type(source) is not str:
        parse(source)  # raises the BadRequest naming the type
    return compile_expr(source)  # type: ignore[arg-type]


# -- one user: a closure per node ------------------------------------------------------------
def _closure(node: Node) -> _Eval:
    if isinstance(node, Seg):
        index = node.index
        return lambda answer: answer(index)
    if isinstance(node, Not):
        inner = _closure(node.operand)

        def negation(answer: Answer) -> bool | None:
            v = inner(answer)
            return None if v is None else not v

        return negation
    parts = tuple(_closure(x) for x in node.operands)
    # "&" is decided by the first false operand, "|" by the first true one.
    decisive = not isinstance(node, And)

    def connective(answer: Answer) -> bool | None:
        unknown = False
        for part in parts:
            v = part(answer)
            if v is decisive:
                return decisive
            if v is None:
                unknown = True
        return None if unknown else not decisive

    return connective


# -- many users -------------------------------------------------------------------------------
def _scanner(tree: Node, n: int) -> Callable[..., bytes]:
    """`f(users, b0, ..., bn-1)` -> answer bytes. The source is built from the parsed tree
    only (segment indexes and operators: no text of the expression reaches `compile`)."""
    params = ", ".join(f"b{i}" for i in range(n))
    source = f"def scan(users, {params}):\n    return bytes([{_python(tree)} for u in users])\n"
    namespace: dict[str, Any] = {}
    exec(compile(source, "<expr>", "exec"), namespace)  # noqa: S102
    return namespace["scan"]  # type: ignore[no-any-return]


def _python(node: Node) -> str:
    if isinstance(node, Seg):
        return f"u in b{node.index}"
    if isinstance(node, Not):  # binds looser than `in`, tighter than `and`
        return f"not {_python(node.operand)}"
    joiner = " and " if isinstance(node, And) else " or "
    return "(" + joiner.join(_python(x) for x in node.operands) + ")"


# (members, non-members) bitmaps within a set of users, three-valued
def _tri(
    node: Node, bitmaps: Sequence[BitMap64 | None], users: BitMap64
) -> tuple[BitMap64, BitMap64]:
    if isinstance(node, Seg):
        bm = bitmaps[node.index]
        if bm is None:
            return BitMap64(), BitMap64()
        true = users & bm
        return true, users - true
    if isinstance(node, Not):
        true, false = _tri(node.operand, bitmaps, users)
        return false, true
    values = [_tri(x, bitmaps, users) for x in node.operands]
    trues = [t for t, _ in values]
    falses = [f for _, f in values]
    if isinstance(node, And):
        return BitMap64.intersection(*trues), BitMap64.union(*falses)
    return BitMap64.union(*trues), BitMap64.intersection(*falses)


# -- audiences: negation normal form and set algebra ------------------------------------------
def _to_nnf(node: Node, negated: bool, position: int) -> NNF:
    """Push negations down to the segments (De Morgan); a negated leaf keeps the position of
    the outermost "!" that negates it."""
    if isinstance(node, Seg):
        return _Lit(node.index, negated, position if negated else node.position)
    if isinstance(node, Not):
        return _to_nnf(node.operand, not negated, node.position if not negated else -1)
    parts = tuple(_to_nnf(x, negated, position) for x in node.operands)
    conjunction = isinstance(node, And) != negated
    kind: type[And] | type[Or] = And if conjunction else Or
    flat: list[NNF] = []
    for p in parts:
        flat.extend(p.operands if isinstance(p, kind) else (p,))
    return kind(tuple(flat))


def _unbounded(node: NNF) -> int | None:
    """None when `node` is a finite set for any segments, else the position of a negation
    that makes it unbounded."""
    if isinstance(node, _Lit):
        return node.position if node.negated else None
    found = [_unbounded(x) for x in node.operands]
    if isinstance(node, And):
        return None if None in found else min(p for p in found if p is not None)
    return next((p for p in found if p is not None), None)


def _sets(node: NNF, bitmaps: Sequence[BitMap64]) -> tuple[BitMap64, bool, bool]:
    """(bitmap, negated, owned): the node's value is `bitmap`, or everything but it when
    negated; owned is False when `bitmap` is one of the inputs (never to be changed).
    `&` and `|` nodes have at least two operands, so they always build a new bitmap."""
    if isinstance(node, _Lit):
        return bitmaps[node.index], node.negated, False
    values = [_sets(x, bitmaps) for x in node.operands]
    pos = [bm for bm, negated, _ in values if not negated]
    neg = [bm for bm, negated, _ in values if negated]
    if isinstance(node, And):
        if not pos:  # !a & !b = !(a | b)
            return _union(neg), True, True
        return _minus(*_intersection(pos), neg), False, True
    if not neg:
        return _union(pos), False, True
    # !a | !b | c = !((a & b) - c)
    return _minus(*_intersection(neg), pos), True, True


def _union(bitmaps: list[BitMap64]) -> BitMap64:
    """A new bitmap: the union, in the operands' own algebra (BitMap64, or the replica's
    `SortedIds` for compact segments: sidecar/replica/sorted_ids.py)."""
    return type(bitmaps[0]).union(*bitmaps)


def _intersection(bitmaps: list[BitMap64]) -> tuple[BitMap64, bool]:
    """(the intersection, whether it is a new bitmap); smallest first keeps every
    intermediate small."""
    if len(bitmaps) == 1:
        return bitmaps[0], False
    bitmaps = sorted(bitmaps, key=len)
    result = bitmaps[0] & bitmaps[1]
    for bm in bitmaps[2:]:
        result &= bm
    return result, True


def _minus(result: BitMap64, owned: bool, others: list[BitMap64]) -> BitMap64:
    """A new bitmap: `result` without `others`. Measured with pyroaring 1.2 (BitMap64): the
    n-ary `difference` is ~15x slower than `-`; in-place `-=` is ~20x slower than `-` for
    operands of similar size but hundreds of times faster when the removed set is small (it
    touches only its containers, where `-` walks the whole left side)."""
    for bm in others:
        if len(bm) * 8 < len(result):
            if not owned:
                result, owned = result.copy(), True
            result -= bm
        else:
            result, owned = result - bm, True
    return result if owned else result.copy()
