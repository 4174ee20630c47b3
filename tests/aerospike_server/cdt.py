"""Map CDT operations (the op value is a msgpack array ``[cdt_op_code, args...]``).

Covered: SET_TYPE, ADD/ADD_ITEMS, PUT/PUT_ITEMS, REPLACE/REPLACE_ITEMS, INCREMENT/DECREMENT,
CLEAR, SIZE, and remove/get by key, key list, key interval, value, value list, index,
index range, rank, rank range, with every return type and the INVERTED flag. Maps are kept
key-ordered (what the capture shows the server returning). List CDT ops and CDT contexts
(nested maps) are not covered: they answer ERR_UNSUPPORTED_FEATURE.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import wire
from .msgpack_codec import key_ordered, sort_key

MAP_SET_TYPE = 64
MAP_ADD = 65
MAP_ADD_ITEMS = 66
MAP_PUT = 67
MAP_PUT_ITEMS = 68
MAP_REPLACE = 69
MAP_REPLACE_ITEMS = 70
MAP_INCREMENT = 73
MAP_DECREMENT = 74
MAP_CLEAR = 75
MAP_REMOVE_BY_KEY = 76
MAP_REMOVE_BY_INDEX = 77
MAP_REMOVE_BY_VALUE = 78
MAP_REMOVE_BY_RANK = 79
MAP_REMOVE_BY_KEY_LIST = 81
MAP_REMOVE_ALL_BY_VALUE = 82
MAP_REMOVE_BY_VALUE_LIST = 83
MAP_REMOVE_BY_KEY_INTERVAL = 84
MAP_REMOVE_BY_INDEX_RANGE = 85
MAP_REMOVE_BY_RANK_RANGE = 87
MAP_SIZE = 96
MAP_GET_BY_KEY = 97
MAP_GET_BY_INDEX = 98
MAP_GET_BY_VALUE = 99
MAP_GET_BY_RANK = 100
MAP_GET_ALL_BY_VALUE = 102
MAP_GET_BY_KEY_INTERVAL = 103
MAP_GET_BY_INDEX_RANGE = 104
MAP_GET_BY_RANK_RANGE = 106
MAP_GET_BY_KEY_LIST = 107
MAP_GET_BY_VALUE_LIST = 108
CONTEXT_EVAL = 0xFF

# map write flags (as_cdt_map_modify_flags)
FLAG_NO_OVERWRITE = 0x01  # create-only
FLAG_NO_CREATE = 0x02  # update-only
FLAG_NO_FAIL = 0x04
FLAG_DO_PARTIAL = 0x08

# return types
RT_NONE = 0
RT_INDEX = 1
RT_REVERSE_INDEX = 2
RT_RANK = 3
RT_REVERSE_RANK = 4
RT_COUNT = 5
RT_KEY = 6
RT_VALUE = 7
RT_KEY_VALUE = 8
RT_EXISTS = 13
RT_UNORDERED_MAP = 16
RT_ORDERED_MAP = 17
RT_INVERTED = 0x10000

READ_ONLY_OPS = frozenset(
    {
        MAP_SIZE,
        MAP_GET_BY_KEY,
        MAP_GET_BY_INDEX,
        MAP_GET_BY_VALUE,
        MAP_GET_BY_RANK,
        MAP_GET_ALL_BY_VALUE,
        MAP_GET_BY_KEY_INTERVAL,
        MAP_GET_BY_INDEX_RANGE,
        MAP_GET_BY_RANK_RANGE,
        MAP_GET_BY_KEY_LIST,
        MAP_GET_BY_VALUE_LIST,
    }
)


class CdtError(Exception):
    """A CDT op failed with an Aerospike result code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _arg(args: list[Any], i: int, default: Any = None) -> Any:
    return args[i] if len(args) > i else default


# ---------------------------------------------------------------------------------------
# selection: which keys an op addresses (in key order), and whether it is a single-item op


def _value_order(m: dict[Any, Any]) -> list[Any]:
    """Keys ordered by (value, key): the rank order."""
    return sorted(m, key=lambda k: (sort_key(m[k]), sort_key(k)))


def _norm_index(i: int, n: int) -> int:
    return i + n if i < 0 else i


def _range(seq: list[Any], start: int, count: int | None) -> list[Any]:
    n = len(seq)
    start = _norm_index(start, n)
    if start < 0:
        if count is not None:
            count += start
        start = 0
    end = n if count is None else min(n, start + max(count, 0))
    return seq[start:end] if start < n else []


def _in_interval(k: Any, begin: Any, end: Any) -> bool:
    kk = sort_key(k)
    if begin is not None and kk < sort_key(begin):
        return False
    return end is None or kk < sort_key(end)


Selector = Callable[[dict[Any, Any], list[Any]], list[Any]]

_SELECTORS: dict[str, tuple[Selector, bool]] = {
    "key": (lambda m, a: [a[0]] if a[0] in m else [], True),
    "key_list": (lambda m, a: [k for k in m if k in set(a[0])], False),
    "key_interval": (lambda m, a: [k for k in m if _in_interval(k, a[0], _arg(a, 1))], False),
    "value": (lambda m, a: [k for k in m if m[k] == a[0]], False),
    "value_list": (lambda m, a: [k for k in m if m[k] in a[0]], False),
    "index": (lambda m, a: _range(list(m), a[0], 1), True),
    "index_range": (lambda m, a: _range(list(m), a[0], _arg(a, 1)), False),
    "rank": (lambda m, a: _range(_value_order(m), a[0], 1), True),
    "rank_range": (lambda m, a: _range(_value_order(m), a[0], _arg(a, 1)), False),
}

# op code -> (selector name, removes?)
_BY_OPS: dict[int, tuple[str, bool]] = {
    MAP_REMOVE_BY_KEY: ("key", True),
    MAP_REMOVE_BY_KEY_LIST: ("key_list", True),
    MAP_REMOVE_BY_KEY_INTERVAL: ("key_interval", True),
    MAP_REMOVE_BY_VALUE: ("value", True),
    MAP_REMOVE_ALL_BY_VALUE: ("value", True),
    MAP_REMOVE_BY_VALUE_LIST: ("value_list", True),
    MAP_REMOVE_BY_INDEX: ("index", True),
    MAP_REMOVE_BY_INDEX_RANGE: ("index_range", True),
    MAP_REMOVE_BY_RANK: ("rank", True),
    MAP_REMOVE_BY_RANK_RANGE: ("rank_range", True),
    MAP_GET_BY_KEY: ("key", False),
    MAP_GET_BY_KEY_LIST: ("key_list", False),
    MAP_GET_BY_KEY_INTERVAL: ("key_interval", False),
    MAP_GET_BY_VALUE: ("value", False),
    MAP_GET_ALL_BY_VALUE: ("value", False),
    MAP_GET_BY_VALUE_LIST: ("value_list", False),
    MAP_GET_BY_INDEX: ("index", False),
    MAP_GET_BY_INDEX_RANGE: ("index_range", False),
    MAP_GET_BY_RANK: ("rank", False),
    MAP_GET_BY_RANK_RANGE: ("rank_range", False),
}


def _result(rt: int, m: dict[Any, Any], keys: list[Any], single: bool) -> Any:
    """Shape the result of a by-X op for return type rt (m is the map before removal)."""
    order = list(m)
    n = len(order)
    if rt == RT_NONE:
        return None
    if rt == RT_COUNT:
        return len(keys)
    if rt == RT_EXISTS:
        return bool(keys)
    if rt in (RT_KEY_VALUE, RT_UNORDERED_MAP, RT_ORDERED_MAP):
        return {k: m[k] for k in keys}
    per_key: dict[int, Callable[[Any], Any]] = {
        RT_KEY: lambda k: k,
        RT_VALUE: lambda k: m[k],
        RT_INDEX: order.index,
        RT_REVERSE_INDEX: lambda k: n - 1 - order.index(k),
        RT_RANK: _value_order(m).index,
        RT_REVERSE_RANK: lambda k: n - 1 - _value_order(m).index(k),
    }
    if rt not in per_key:
        raise CdtError(wire.ERR_PARAMETER, f"unsupported map return type {rt}")
    items = [per_key[rt](k) for k in keys]
    if single:
        return items[0] if items else None
    return items


# ---------------------------------------------------------------------------------------
# writes


def _put_items(m: dict[Any, Any], items: dict[Any, Any], flags: int) -> dict[Any, Any]:
    out = dict(m)
    for k, v in items.items():
        if flags & FLAG_NO_OVERWRITE and k in out:
            if flags & FLAG_DO_PARTIAL and flags & FLAG_NO_FAIL:
                continue
            if flags & FLAG_NO_FAIL:
                return m
            raise CdtError(wire.ERR_ELEMENT_EXISTS, f"map key {k!r} exists")
        if flags & FLAG_NO_CREATE and k not in out:
            if flags & FLAG_DO_PARTIAL and flags & FLAG_NO_FAIL:
                continue
            if flags & FLAG_NO_FAIL:
                return m
            raise CdtError(wire.ERR_ELEMENT_NOT_FOUND, f"map key {k!r} not found")
        out[k] = v
    return key_ordered(out)


def _increment(
    m: dict[Any, Any], key: Any, delta: Any, sign: int, flags: int
) -> tuple[dict[Any, Any], Any]:
    if delta is None:
        delta = 1
    if not isinstance(delta, (int, float)) or isinstance(delta, bool):
        raise CdtError(wire.ERR_PARAMETER, "increment delta must be a number")
    current = m.get(key)
    if current is None:
        if flags & FLAG_NO_CREATE:
            raise CdtError(wire.ERR_ELEMENT_NOT_FOUND, f"map key {key!r} not found")
        current = 0.0 if isinstance(delta, float) else 0
    if not isinstance(current, (int, float)) or isinstance(current, bool):
        raise CdtError(wire.ERR_INCOMPATIBLE_TYPE, "map value is not a number")
    new = current + sign * delta
    out = dict(m)
    out[key] = new
    return key_ordered(out), new


def apply(current: dict[Any, Any] | None, request: Any) -> tuple[dict[Any, Any] | None, Any]:
    """Apply one map op to a bin value (None = missing bin).

    Returns the new map (None = leave the bin missing) and the op's result.
    """
    if not isinstance(request, list) or not request or not isinstance(request[0], int):
        raise CdtError(wire.ERR_PARAMETER, "CDT op is not [op, args...]")
    code, args = request[0], request[1:]
    if code == CONTEXT_EVAL:
        raise CdtError(wire.ERR_UNSUPPORTED_FEATURE, "CDT contexts are not supported")
    if code < MAP_SET_TYPE:
        raise CdtError(wire.ERR_UNSUPPORTED_FEATURE, f"list CDT op {code} is not supported")
    if current is not None and not isinstance(current, dict):
        raise CdtError(wire.ERR_INCOMPATIBLE_TYPE, "bin is not a map")
    m: dict[Any, Any] = current if current is not None else {}

    if code == MAP_SET_TYPE:
        return m, None
    if code in (MAP_PUT, MAP_ADD, MAP_REPLACE):
        flags = {MAP_PUT: 0, MAP_ADD: FLAG_NO_OVERWRITE, MAP_REPLACE: FLAG_NO_CREATE}[code]
        if code == MAP_PUT:
            flags = _arg(args, 3, 0) or 0
        new = _put_items(m, {args[0]: args[1]}, flags)
        return new, len(new)
    if code in (MAP_PUT_ITEMS, MAP_ADD_ITEMS, MAP_REPLACE_ITEMS):
        items = args[0]
        if not isinstance(items, dict):
            raise CdtError(wire.ERR_PARAMETER, "put_items expects a map")
        flags = {
            MAP_PUT_ITEMS: 0,
            MAP_ADD_ITEMS: FLAG_NO_OVERWRITE,
            MAP_REPLACE_ITEMS: FLAG_NO_CREATE,
        }[code]
        if code == MAP_PUT_ITEMS:
            flags = _arg(args, 2, 0) or 0
        new = _put_items(m, items, flags)
        return new, len(new)
    if code in (MAP_INCREMENT, MAP_DECREMENT):
        sign = 1 if code == MAP_INCREMENT else -1
        return _increment(m, args[0], _arg(args, 1), sign, _arg(args, 3, 0) or 0)
    if code == MAP_CLEAR:
        return ({} if current is not None else None), None
    if code == MAP_SIZE:
        return current, len(m)
    if code in _BY_OPS:
        selector_name, removes = _BY_OPS[code]
        rt = args[0]
        select, single = _SELECTORS[selector_name]
        try:
            keys = select(m, args[1:])
        except (IndexError, TypeError) as exc:
            raise CdtError(wire.ERR_PARAMETER, f"bad arguments for map op {code}") from exc
        if rt & RT_INVERTED:
            chosen = set(keys)
            keys = [k for k in m if k not in chosen]
            single = False
        result = _result(rt & 0xFFFF, m, keys, single)
        if not removes or current is None:
            return current, result
        gone = set(keys)
        return {k: v for k, v in m.items() if k not in gone}, result
    raise CdtError(wire.ERR_UNSUPPORTED_FEATURE, f"map op {code} is not supported")


def is_read_only(request: Any) -> bool:
    return isinstance(request, list) and bool(request) and request[0] in READ_ONLY_OPS
