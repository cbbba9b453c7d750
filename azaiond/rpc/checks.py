"""Checks of one call against the method table: access level, then params (names and types)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from azaiond.errors import InvalidParams
from azaiond.rpc.table import Access, MethodSpec, Param, Peer

_JSON_NAMES: dict[type, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    dict: "object",
    list: "array",
    type(None): "null",
}


def _type_name(types: tuple[type, ...]) -> str:
    return " or ".join(_JSON_NAMES.get(t, t.__name__) for t in types)


def _type_ok(value: Any, types: tuple[type, ...]) -> bool:
    # bool is a subclass of int in Python but a different type in JSON.
    if isinstance(value, bool):
        return bool in types or object in types
    if isinstance(value, types):
        return True
    # JSON has one number type: 3 is a fine value for a float param.
    return float in types and isinstance(value, int)


def validate_params(params: Sequence[Param], given: Mapping[str, Any]) -> None:
    """Raise InvalidParams naming the first missing, extra or mistyped param."""
    names = {p.name for p in params}
    for key in given:
        if key not in names:
            raise InvalidParams(f"extra param '{key}'")
    for p in params:
        if p.name not in given:
            if p.required:
                raise InvalidParams(f"missing param '{p.name}'")
            continue
        types = p.type if isinstance(p.type, tuple) else (p.type,)
        if not _type_ok(given[p.name], types):
            raise InvalidParams(f"param '{p.name}' must be {_type_name(types)}")


def may_call(spec: MethodSpec, peer: Peer) -> bool:
    """Access from the table alone; a level this code does not know refuses."""
    if spec.access is Access.OPEN:
        return True
    if spec.access is Access.ADMIN:
        return peer.is_admin
    return False
