"""The azaiond entry point: config, services, the socket, then serve until SIGTERM or SIGINT.

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
from azaiond.config import Config, load
from azaiond.errors import AzaionError, ConfigError
from azaiond.notify import Notifier
from azaiond.rpc.calllog import CallLog
from azaiond.rpc.dispatch import Dispatcher, Limits
from azaiond.rpc.listen import Listener, ListenError, open_listener
from azaiond.rpc.server import Server

log = logging.getLogger("azaiond")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
SHUTDOWN_TIMEOUT = 30.0  # seconds in-flight calls get to finish after SIGTERM
WORKERS = 32


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


async def serve(
    daemon: wiring.Daemon,
    listener: Listener,
    notifier: Notifier,
    *,
    config: Config,
    shutdown_timeout: float = SHUTDOWN_TIMEOUT,
) -> bool:
    """Serve calls until SIGTERM/SIGINT; True when every call in flight finished in time."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    limits = Limits(
        max_batch=config.socket.max_batch,
        batch_inline_bytes=config.socket.max_batch_inline_bytes,
        inline_bytes=config.resources.inline_limit_bytes,
        calls_per_uid=config.socket.max_calls_per_uid,
    )
    dispatcher = Dispatcher(daemon.table, workers=WORKERS, observers=[CallLog()], limits=limits)
    server = Server(
        listener.sock,
        dispatcher,
        max_message_bytes=config.socket.max_message_bytes,
        admin_groups=config.socket.admin_groups,
    )
    try:
        await server.start()
        notifier.ready()
        notifier.start(loop, daemon.status_line)
        daemon.start()
        log.info("azaiond %s serving (%d methods)", __version__, len(daemon.table))
        await stop.wait()
        log.info("stopping")
        notifier.stopping()
        notifier.status("stopping: waiting for calls in flight")
        notifier.stop()
        return await server.shutdown(shutdown_timeout)
    finally:
        dispatcher.close()
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
    notifier = Notifier()
    notifier.status("starting")
    # The socket first: a second daemon must fail here, before it touches the state dir.
    try:
        listener = open_listener(config.socket)
    except ListenError as exc:
        log.error("%s", exc)
        return EXIT_FAILURE
    try:
        # The unlock job reports progress as systemd STATUS= lines (`systemctl status azaiond`).
        daemon = wiring.build(config, status_line=notifier.status)
    except ConfigError as exc:
        listener.close()
        log.error("%s", exc.message)
        return EXIT_CONFIG
    except AzaionError as exc:
        listener.close()
        log.error("cannot start: %s", exc.message)
        return EXIT_FAILURE
    except Exception:
        listener.close()
        log.exception("cannot start")
        return EXIT_FAILURE
    # Everything built so far lives as long as the process: take it out of the collector's
    # view, so full collections stop walking the imported libraries' objects between calls.
    gc.collect()
    gc.freeze()
    finished = True
    try:
        finished = asyncio.run(serve(daemon, listener, notifier, config=config))
    finally:
        listener.close()
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
