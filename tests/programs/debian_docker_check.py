"""DockerImages under Debian's own python3 and python3-docker: tests/test_unlock.py runs this
with /usr/bin/python3.

    debian_docker_check.py DOCKER_URL IMAGE TAR DEAD_URL

Prints the SDK's version, the loaded image's id and the error texts; exits non-zero when
DockerImages misbehaves with that SDK.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import docker

from azaiond.errors import DockerError
from azaiond.images import DockerImages


class Stop(Exception):
    pass


def main() -> None:
    url, name, tar, dead = sys.argv[1:]
    print("sdk", docker.__version__)
    images = DockerImages(url, 600)
    assert images.missing([name]) == [name]
    with open(tar, "rb") as f:
        data = f.read()

    def failing() -> Iterator[bytes]:
        yield data[:-2048]
        raise Stop()

    try:
        images.load(failing())
        raise SystemExit("a failing generator must raise")
    except Stop:
        pass
    assert images.missing([name]) == [name], "nothing may be loaded from a failed stream"
    try:
        images.load(iter([b"not a tar" * 1000]))
        raise SystemExit("garbage must be refused")
    except DockerError as exc:
        print("refused:", exc)
    loaded = images.load(iter([data[i : i + 65536] for i in range(0, len(data), 65536)]))
    assert images.missing([name]) == [], loaded
    print("id", images.image_id(name))
    try:
        DockerImages(dead, 5).missing([name])
        raise SystemExit("a dead engine must fail")
    except DockerError as exc:
        print("dead:", exc)


if __name__ == "__main__":
    main()
