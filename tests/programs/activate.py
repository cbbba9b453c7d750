"""What systemd does for a socket-activated service: tests/test_systemd.py runs the daemon so.

    activate.py FD CONFIG

The listening socket goes to fd 3, LISTEN_PID names this process (exec keeps the pid),
LISTEN_FDS=1, then the daemon is exec'd in its place.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    fd = int(sys.argv[1])
    os.dup2(fd, 3)
    os.close(fd)
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.environ["LISTEN_FDS"] = "1"
    os.execv(sys.executable, [sys.executable, "-m", "azaiond.daemon", "--config", sys.argv[2]])


if __name__ == "__main__":
    main()
