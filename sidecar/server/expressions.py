"""The query layer's segment-expression ops (DESIGN.md "Audiences: segment expressions"):
`eval`, `eval_many`, `count` and the audience export. Part of `Queries` (a mixin, so the ops
share its fallback and result shape: `(value, source)`, or a coroutine returning it).

Each segment of an expression is answered as `check` answers it: locally when
`Replica.local` says so, else from the fallback (one call per user, shared by every segment
of the expression), else unknown. The local answers are read once, under the replica's lock
(sidecar/replica/view.py), and kept while the fallback is asked, so one evaluation never mixes
two versions of a segment. The fallback is asked only when the local answers leave the result
unknown: `a & b` with `a` false locally is false whatever `b` is (Kleene logic).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..expr import Expr, compile_arg
from ..ids import user_id
from ..packed import MEMBER, UNKNOWN, unpack_users
from ..replica import view
from .results import AEROSPIKE, LOCAL, NONE, Result

if TYPE_CHECKING:
    from ..fallback.base import Fallback
    from ..replica.runner import Replica


class ExpressionQueries:
    replica: Replica
    _fb: Fallback | None

    if TYPE_CHECKING:  # Queries has them

        async def ask(self, user: int) -> dict[str, int] | None: ...

        async def _ask_many(self, users: list[int]) -> dict[int, dict[str, int] | None]: ...

    # -- one user ---------------------------------------------------------------------------------
    def eval(self, user: object, expr: object, *, versions: bool = False) -> Any:
        """The membership of `user` in `expr`: True / False / None. With `versions`, the
        value is `(member, {segment: version})`: the local segments' versions, for segments
        the fallback answered the version in the user's map (None: not a member), None for
        segments nobody answered."""
        user = user_id(user)
        compiled = compile_arg(expr)
        leaves = view.local_answers(self.replica, compiled, user)
        member = compiled.evaluate(leaves.values.__getitem__)
        if member is not None or self._fb is None:
            return _eval_value(member, compiled, leaves.versions, versions), (
                LOCAL if member is not None else NONE
            )
        return self._eval_fallback(user, compiled, leaves, versions)

    async def _eval_fallback(
        self, user: int, compiled: Expr, leaves: view.Leaves, versions: bool
    ) -> Result:
        m = await self.ask(user)
        if m is None:
            return _eval_value(None, compiled, leaves.versions, versions), NONE
        values = list(leaves.values)
        found = dict(leaves.versions)
        for i in leaves.missing:
            segment = compiled.segments[i]
            values[i] = segment in m
            version = m.get(segment)
            found[segment] = version if type(version) is int else None  # type: ignore[assignment]
        member = compiled.evaluate(values.__getitem__)
        return _eval_value(member, compiled, found, versions), AEROSPIKE

    # -- many users -------------------------------------------------------------------------------
    def eval_many(self, users: object, expr: object) -> Any:
        """`expr` for each of `users` (bin, little-endian uint64, as in `batch_packed`): bin,
        one byte per user in request order, 0 not a member, 1 member, 2 unknown."""
        ids = unpack_users(users)
        compiled = compile_arg(expr)
        if not ids:
            return b"", LOCAL
        many = view.local_many(self.replica, compiled, ids)
        if many.answers is not None:
            return many.answers, LOCAL
        members, unknown = many.members, many.unknown
        if not unknown:
            return bytes([u in members for u in ids]), LOCAL
        out = bytearray(len(ids))
        for k, u in enumerate(ids):
            if u in members:
                out[k] = MEMBER
            elif u in unknown:
                out[k] = UNKNOWN
        if self._fb is None:
            return bytes(out), NONE
        return self._eval_many_fallback(ids, compiled, many, out)

    async def _eval_many_fallback(
        self, ids: Sequence[int], compiled: Expr, many: view.ManyLeaves, out: bytearray
    ) -> Result:
        maps = await self._ask_many(list(many.unknown))
        source = AEROSPIKE
        answers: dict[int, int] = {}
        segments = compiled.segments
        for user, m in maps.items():
            if m is None:
                source = NONE
                continue
            values = [
                segments[i] in m if bm is None else user in bm
                for i, bm in enumerate(many.restricted)
            ]
            member = compiled.evaluate(values.__getitem__)
            answers[user] = int(member)  # type: ignore[arg-type]  # every leaf answered
        for k, u in enumerate(ids):
            if out[k] == UNKNOWN and u in answers:
                out[k] = answers[u]
        return bytes(out), source

    # -- audiences --------------------------------------------------------------------------------
    def count(self, expr: object) -> Result:
        """`{"count", "versions"}` of a bounded expression over segments all answered
        locally (else NotLocal, a BadRequest naming them)."""
        n, versions = view.count(self.replica, compile_arg(expr))
        return {"count": n, "versions": versions}, LOCAL

    def audience(self, expr: object) -> view.Audience:
        """The members (a new bitmap) and the versions of a bounded expression over segments
        all answered locally (else NotLocal)."""
        return view.audience(self.replica, compile_arg(expr))


def _eval_value(member: bool | None, compiled: Expr, found: dict[str, int], versions: bool) -> Any:
    if not versions:
        return member
    return member, {s: found.get(s) for s in compiled.segments}
