"""The demo's unlock step: make a small image, seal it as images.enc, and remove it.

The daemon's later ``unlock`` must then bring it back from the sealed archive alone.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import docker

from azaiond.seal import ChunkReader, saved_images, seal

DEMO_IMAGE = "azaion/demo"


def _rootfs_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        body = b"this image was unlocked by azaiond\n"
        info = tarfile.TarInfo("etc/azaion-demo")
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    return buf.getvalue()


def prepare_sealed_image(docker_url: str, archive: Path, key_fragment: bytes, tag: str = "latest") -> str:
    """Import a one-file image, seal ``docker save`` of it into ``archive``, then remove it."""
    name = f"{DEMO_IMAGE}:{tag}"
    client = docker.DockerClient(base_url=docker_url, version="auto", timeout=120)
    try:
        client.api.import_image_from_data(_rootfs_tar(), repository=DEMO_IMAGE, tag=tag)
        image_id = client.images.get(name).id
        size = seal(io.BufferedReader(ChunkReader(saved_images(docker_url, [name]))), key_fragment, archive)
        client.images.remove(name, force=True)
        print(f"  sealed {name} ({image_id[:19]}) into {archive} ({size} bytes) and removed the image")
    finally:
        client.close()
    return name
