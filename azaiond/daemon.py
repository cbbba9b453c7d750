"""The azaiond entry point: load the config, build the daemon (wiring.py), serve until SIGTERM or SIGINT.

Exit statuses: 0 after a clean stop, 1 when the socket or a service cannot start, 2 for a
bad config (systemd's RestartPreventExitStatus= can then skip pointless restarts).
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

from azaiond import __version__, logs, wiring
from azaiond.config import load
from azaiond.errors import AzaionError, ConfigError
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
    parser.add_argument("--version", action="version", version=f"azaiond {__version__}")
    return parser.parse_args(argv)


async def serve(daemon: wiring.Daemon, *, shutdown_timeout: float = SHUTDOWN_TIMEOUT) -> bool:
    """Serve calls until SIGTERM/SIGINT; True when every call in flight finished in time."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    notifier, server = daemon.notifier, daemon.rpc.server
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
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logs.setup("info")
    try:
        config = load(args.config)
    except ConfigError as exc:
        print(f"azaiond: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    logs.setup(config.log_level)
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
        finished = asyncio.run(serve(daemon))
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
