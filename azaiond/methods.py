"""The method table of SPEC section 7: name, handler, access level and params, as data."""

from __future__ import annotations

from azaiond.handlers import Handlers
from azaiond.rpc.table import Access, MethodSpec, MethodTable, Param

OPEN, ADMIN = Access.OPEN, Access.ADMIN


def method_table(h: Handlers) -> MethodTable:
    specs = (
        MethodSpec("health", h.health, OPEN, blocking=False),
        MethodSpec("status", h.status, OPEN, blocking=False),
        MethodSpec("unlock_status", h.unlock_status, OPEN, blocking=False),
        # On a worker: the cache's size is read from the disk.
        MethodSpec("metrics", h.metrics, OPEN),
        MethodSpec(
            "load", h.load, OPEN, (Param("name", str), Param("folder", str), Param("memfd", bool, required=False))
        ),
        MethodSpec("login", h.login, ADMIN, (Param("email", str), Param("password", str))),
        MethodSpec("logout", h.logout, ADMIN),
        MethodSpec(
            "upload", h.upload, ADMIN, (Param("name", str), Param("folder", str), Param("data", str, required=False))
        ),
        MethodSpec(
            "cdn_upload",
            h.cdn_upload,
            ADMIN,
            (Param("bucket", str), Param("key", str), Param("data", str, required=False)),
        ),
        MethodSpec("cdn_download", h.cdn_download, ADMIN, (Param("bucket", str), Param("key", str))),
        MethodSpec(
            "unlock",
            h.unlock,
            ADMIN,
            (Param("email", str, required=False), Param("password", str, required=False)),
        ),
    )
    return {spec.name: spec for spec in specs}
