"""The method table of docs/protocol.md: name, handler, access level and params, as data."""

from __future__ import annotations

from azaiond.handlers import Handlers
from azaiond.rpc.table import Access, MethodSpec, MethodTable, Param

OPEN, ADMIN = Access.OPEN, Access.ADMIN
# The byte count an upload's input must have; a mismatch fails the call and commits nothing.
SIZE = Param("size", int, required=False)


def method_table(h: Handlers) -> MethodTable:
    specs = (
        MethodSpec("health", h.health, OPEN, blocking=False),
        MethodSpec("status", h.status, OPEN, blocking=False),
        MethodSpec("unlock_status", h.unlock_status, OPEN, blocking=False),
        # On a worker: building the text takes longer than a quick call should hold the loop.
        MethodSpec("metrics", h.metrics, OPEN),
        MethodSpec(
            "load", h.load, OPEN, (Param("name", str), Param("folder", str), Param("memfd", bool, required=False))
        ),
        MethodSpec("login", h.login, ADMIN, (Param("email", str), Param("password", str))),
        MethodSpec("logout", h.logout, ADMIN),
        MethodSpec(
            "upload",
            h.upload,
            ADMIN,
            (
                Param("name", str),
                Param("folder", str),
                Param("data", str, required=False),
                Param("format", int, required=False),
                SIZE,
            ),
        ),
        MethodSpec(
            "cdn_upload",
            h.cdn_upload,
            ADMIN,
            (Param("bucket", str), Param("key", str), Param("data", str, required=False), SIZE),
        ),
        MethodSpec("cdn_download", h.cdn_download, ADMIN, (Param("bucket", str), Param("key", str))),
        MethodSpec("prefetch", h.prefetch, OPEN, (Param("name", str), Param("folder", str))),
        MethodSpec("cache_list", h.cache_list, OPEN),
        MethodSpec(
            "cache_drop",
            h.cache_drop,
            ADMIN,
            (Param("folder", str, required=False), Param("name", str, required=False)),
        ),
        MethodSpec("api_load", h.api_load, OPEN, (Param("name", str), Param("folder", str))),
        MethodSpec(
            "api_upload",
            h.api_upload,
            ADMIN,
            (
                Param("name", str),
                Param("folder", str),
                Param("data", str, required=False),
                SIZE,
            ),
        ),
        MethodSpec(
            "unlock",
            h.unlock,
            ADMIN,
            (Param("email", str, required=False), Param("password", str, required=False)),
        ),
    )
    return {spec.name: spec for spec in specs}
