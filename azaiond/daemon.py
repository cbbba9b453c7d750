"""The azaiond entry point: load the config, build the daemon (wiring.py), serve until SIGTERM or SIGINT.

SIGHUP (``systemctl reload azaiond``) re-reads the config and applies what can change live
(azaiond.reload); a config with errors is refused and the running one kept.

Exit statuses: 0 after a clean stop (and for a good ``--check-config``), 1 when the socket or
a service cannot start, 2 for a bad config (the unit's RestartPreventExitStatus=2 then skips
pointless restarts).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from azaiond import __version__, logs, malloc, wiring
from azaiond.config import load
from azaiond.errors import AzaionError, ConfigError
from azaiond.notify import Notifier
from azaiond.rpc.listen import ListenError

log = logging.getLogger("azaiond")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
# Seconds in-flight calls get to finish after SIGTERM: well inside the unit's TimeoutStopSec=30s,
# so the daemon always stops by itself, never by systemd's SIGKILL.
SHUTDOWN_TIMEOUT = 20.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="azaiond", description="The azaion host daemon.")
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="config file (default: $AZAIOND_CONFIG, else /etc/azaiond/config.yaml)",
    )
    parser.add_argument(
        "--check-config",
        nargs="?",
        const=True,
        default=None,
        metavar="PATH",
        help="check the config (PATH, else the one --config names) and exit: 0 when it is good, "
        "2 with every problem listed when not",
    )
    parser.add_argument("--version", action="version", version=f"azaiond {__version__}")
    return parser.parse_args(argv)


_INSECURE = "plain http:// to a remote host sends the password, the token and the CDN keys in clear"


def check_config(path: Path | None) -> int:
    """``--check-config``: every problem, one per line, on stderr; exit 2 if there is any."""
    try:
        config = load(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"azaiond: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"{config.source}: ok")
    if config.allow_insecure_http:
        print(f"{config.source}: warning: allow_insecure_http is true: {_INSECURE}")
    return EXIT_OK


def reload_config(daemon: wiring.Daemon, path: Path | None, notifier: Notifier) -> None:
    """SIGHUP: re-read the config; apply it if it is good, keep the running one if not."""
    notifier.reloading()
    try:
        try:
            new = load(path)
        except ConfigError as exc:
            log.error(
                "reload refused, the running config is kept: %s", "; ".join(exc.problems),
                extra={"fields": {"event": "reload_failed"}},
            )
            return
        if new.allow_insecure_http:
            log.warning("allow_insecure_http is true: %s", _INSECURE, extra={"fields": {"event": "insecure_http"}})
        report = daemon.reload(new)
        if report.applied:
            log.info("reload applied: %s", ", ".join(report.applied), extra={"fields": {"event": "reload"}})
        if report.failed:
            log.error("reload could not apply: %s", ", ".join(report.failed),
                      extra={"fields": {"event": "reload_failed"}})
        if report.needs_restart:
            log.warning(
                "reload: these changes need a restart (systemctl restart azaiond): %s",
                ", ".join(report.needs_restart), extra={"fields": {"event": "reload"}},
            )
        if not (report.applied or report.failed or report.needs_restart):
            log.info("reload: the config is unchanged", extra={"fields": {"event": "reload"}})
    except Exception:  # a bug in a hook must not end the daemon from a signal handler
        log.exception("reload failed")
    finally:
        notifier.ready()


async def serve(
    daemon: wiring.Daemon, *, config_path: Path | None = None, shutdown_timeout: float = SHUTDOWN_TIMEOUT
) -> bool:
    """Serve calls until SIGTERM/SIGINT; True when every call in flight finished in time."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    notifier, server = daemon.notifier, daemon.rpc.server
    # Reading a small file and setting a few attributes: quick enough for the loop itself.
    loop.add_signal_handler(signal.SIGHUP, reload_config, daemon, config_path, notifier)
    try:
        await server.start()
        notifier.ready()
        notifier.start(loop)
        daemon.services.start()
        log.info("azaiond %s serving (%d methods)", __version__, len(daemon.services.table))
        await stop.wait()
        log.info("stopping")
        notifier.stopping()
        notifier.status("stopping: waiting for calls in flight")
        notifier.stop()
        return await server.shutdown(shutdown_timeout)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.check_config is not None:
        return check_config(args.config if args.check_config is True else Path(args.check_config))
    return run(args)


def run(args: argparse.Namespace) -> int:
    """Start and serve until stopped; the exit status."""
    # Until the loop handles it (serve), a reload request must not end the daemon.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    malloc.tune()  # before any stream allocates (see azaiond/malloc.py)
    logs.setup("info")
    try:
        config = load(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"azaiond: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    logs.setup(config.log_level)
    if config.allow_insecure_http:
        log.warning("allow_insecure_http is true: %s", _INSECURE, extra={"fields": {"event": "insecure_http"}})
    try:
        daemon = wiring.build(config)
    except ListenError as exc:
        log.error("%s", exc)
        return EXIT_FAILURE
    except ConfigError as exc:
        log.error("%s", exc.message)
        return EXIT_CONFIG
    except AzaionError as exc:
        log.error("cannot start: %s", exc.message)
        return EXIT_FAILURE
    except Exception:
        log.exception("cannot start")
        return EXIT_FAILURE
    # Everything built so far lives as long as the process: take it out of the collector's
    # view, so full collections stop walking the imported libraries' objects between calls.
    gc.collect()
    gc.freeze()
    finished = True
    try:
        finished = asyncio.run(serve(daemon, config_path=args.config))
    finally:
        try:
            daemon.close()
        except Exception:
            log.exception("closing the services failed")
    log.info("stopped")
    if not finished:
        # A worker thread that ignored Call.cancel would block interpreter exit for ever
        # (executor threads are joined at exit); systemd wants us gone now.
        logging.shutdown()
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os._exit(EXIT_OK)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
