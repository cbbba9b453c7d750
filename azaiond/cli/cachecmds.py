"""azaionctl commands for the big-part cache and for whole-file API resources.

``cache ls|drop|prefetch`` and ``api-load`` / ``api-upload``, kept apart from main.py, which
owns the global options; ``register`` adds them to its subcommand parser.
"""

from __future__ import annotations

import argparse
import datetime
import os
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from azaiond.cli import exitcodes
from azaiond.cli.progress import Progress

if TYPE_CHECKING:
    from azaiond.cli.main import Command, Context

Add = Callable[[str, "Command", str], argparse.ArgumentParser]
Download = Callable[["Context", str, dict[str, Any], "str | None", str], int]
Upload = Callable[["Context", str, dict[str, Any], str, str], dict[str, Any]]


def _mib(n: Any) -> str:
    return f"{int(n or 0) / (1024 * 1024):.1f} MiB"


def cache_text(total: Any, limit: Any) -> str:
    """``12.3 MiB of 100.0 MiB`` or ``12.3 MiB (no limit)``, for ``status`` and ``cache ls``."""
    return f"{_mib(total)} of {_mib(limit)}" if limit else f"{_mib(total)} (no limit)"


def cmd_cache_ls(ctx: Context, args: argparse.Namespace) -> int:
    result = ctx.client.call("cache_list")
    lines = []
    for entry in result.get("entries") or []:
        when = datetime.datetime.fromtimestamp(float(entry.get("last_used") or 0)).strftime("%Y-%m-%d %H:%M:%S")
        lines.append(f"{entry.get('folder')}/{entry.get('name')}\t{entry.get('size')}\t{when}")
    lines.append(f"total: {cache_text(result.get('total_bytes'), result.get('limit_bytes'))}")
    ctx.show(result, "\n".join(lines))
    return exitcodes.EXIT_OK


def cmd_cache_drop(ctx: Context, args: argparse.Namespace) -> int:
    params: dict[str, Any] = {}
    if args.folder is not None:
        params["folder"] = args.folder
    if args.name is not None:
        params["name"] = args.name
    if not params and not args.all:
        args.drop_parser.error("name a --folder (and a resource), or pass --all")  # exits 2
    result = ctx.client.call("cache_drop", params)
    ctx.show(result, f"dropped {result.get('dropped')} entries, freed {_mib(result.get('freed_bytes'))}")
    return exitcodes.EXIT_OK


def cmd_cache_prefetch(ctx: Context, args: argparse.Namespace) -> int:
    with Progress(f"prefetch {args.folder}/{args.name}", ctx.stderr) as bar:
        result = ctx.client.call("prefetch", {"name": args.name, "folder": args.folder}, progress=bar.listener)
    ctx.show(result, f"cached {args.folder}/{args.name} ({result.get('big_size')} bytes of big part)")
    return exitcodes.EXIT_OK


def cmd_api_load(ctx: Context, args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"name": args.name, "folder": args.folder}
    download: Download = args.download
    return download(ctx, "api_load", params, args.output, f"api-load {args.folder}/{args.name}")


def cmd_api_upload(ctx: Context, args: argparse.Namespace) -> int:
    upload: Upload = args.upload
    params: dict[str, Any] = {"name": args.name, "folder": args.folder}
    if args.file != "-":
        try:
            info = os.stat(args.file)
        except OSError:
            info = None  # _upload reports it
        if info is not None and stat.S_ISREG(info.st_mode):
            params["size"] = info.st_size  # a file changed under us then fails instead of committing
    result = upload(ctx, "api_upload", params, args.file, f"api-upload {args.folder}/{args.name}")
    ctx.show(result, f"uploaded {result.get('size')} bytes to the Resource API as {args.folder}/{args.name}")
    return exitcodes.EXIT_OK


def register(add: Add, common: argparse.ArgumentParser, download: Download, upload: Upload) -> None:
    """Add the commands; ``common`` holds the global options every subcommand accepts, and
    ``download`` / ``upload`` are main's descriptor-passing transfers."""
    p = add("cache", cmd_cache_ls, "list, drop or prefetch cached big parts (default: ls)")
    sub = p.add_subparsers(dest="cache_command", metavar="ACTION")
    ls = sub.add_parser("ls", parents=[common], help="list cached big parts with size and last use")
    ls.set_defaults(func=cmd_cache_ls)
    drop = sub.add_parser(
        "drop", parents=[common], help="drop one entry (--folder F NAME), a folder (--folder F) or all (--all)"
    )
    drop.add_argument("name", nargs="?")
    drop.add_argument("--folder")
    drop.add_argument("--all", action="store_true", help="drop every entry")
    drop.set_defaults(func=cmd_cache_drop, drop_parser=drop)
    pre = sub.add_parser("prefetch", parents=[common], help="fetch a resource's big part into the cache (no plaintext)")
    pre.add_argument("name")
    pre.add_argument("--folder", required=True)
    pre.set_defaults(func=cmd_cache_prefetch)

    p = add("api-load", cmd_api_load, "fetch and decrypt a whole file kept on the Resource API")
    p.set_defaults(download=download)
    p.add_argument("name")
    p.add_argument("--folder", required=True)
    p.add_argument("-o", "--output", metavar="FILE", help="output file, - for stdout")

    p = add("api-upload", cmd_api_upload, "store a file as it is on the Resource API")
    p.set_defaults(upload=upload)
    p.add_argument("file", help="input file, - for stdin")
    p.add_argument("name")
    p.add_argument("--folder", required=True)
