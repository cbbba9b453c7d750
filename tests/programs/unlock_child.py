"""An unlock run in its own process, until killed: tests/test_unlock.py kills it with SIGKILL.

    unlock_child.py STATE API_URL DOCKER_URL ARCHIVE IMAGE EMAIL PASSWORD

Built through wiring like the daemon; prints each status line (``unlock: decrypting 40%``) so the
test can kill it mid-stream.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from azaiond import wiring
from azaiond.apiclient import Credentials
from azaiond.config import ApiConfig, Config, DockerConfig, UnlockConfig

HARDWARE = "CPU: test. GPU: none. Memory: 1 kB. DriveSerial: x."


def main() -> None:
    state, api_url, docker_url, archive, image, email, password = sys.argv[1:]
    config = Config(
        api=ApiConfig(url=api_url, retries=3, timeout=10, backoff=0.01),
        state_dir=Path(state),
        hardware=HARDWARE,
        unlock=UnlockConfig(archive=Path(archive), images=(image,)),
        docker=DockerConfig(base_url=docker_url, timeout=600),
    )
    creds = Credentials(email, password)
    services = wiring.build_services(
        config, wiring.Overrides(login_credentials=lambda: creds), status_line=lambda text: print(text, flush=True)
    )
    services.unlock.start(None)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
