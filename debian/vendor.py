#!/usr/bin/python3
"""Bring the two pure-Python libraries that Debian bookworm lacks into the package.

jsonrpcserver 5.0.9 (an sdist) and OSlash 0.6.3 (a wheel) are MIT-licensed. Each archive is
pinned by file name and SHA-256. It is taken from $AZAIOND_VENDOR_DIR when that directory holds
it (offline builds; tests/system/run.sh fills one with the host's pip), else fetched by package
name with `pip download`, and checked against the pinned hash either way. Only the import package
and the license file are kept: the package goes to DEST/<name>/, the license to
LICENSES/<project>.LICENSE.

Usage: vendor.py DEST LICENSES
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

PINNED = [
    {
        "project": "jsonrpcserver",
        "requirement": "jsonrpcserver==5.0.9",
        "file": "jsonrpcserver-5.0.9.tar.gz",
        "sha256": "a71fb2cfa18541c80935f60987f92755d94d74141248c7438847b96eee5c4482",
        "package": "jsonrpcserver",
        "prefix": "jsonrpcserver-5.0.9/",
        "license": "jsonrpcserver-5.0.9/LICENSE",
    },
    {
        "project": "oslash",
        "requirement": "oslash==0.6.3",
        "file": "OSlash-0.6.3-py3-none-any.whl",
        "sha256": "89b978443b7db3ac2666106bdc3680add3c886a6d8fcdd02fd062af86d29494f",
        "package": "oslash",
        "prefix": "",
        "license": "OSlash-0.6.3.dist-info/LICENSE",
    },
]


def _pip() -> list[str] | None:
    """A pip to download with: this interpreter's, else one on PATH."""
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    found = shutil.which("pip3") or shutil.which("pip")
    return [found] if found else None


def fetch(pin: dict[str, str]) -> bytes:
    local = os.environ.get("AZAIOND_VENDOR_DIR")
    if local and (Path(local) / pin["file"]).is_file():
        path = Path(local) / pin["file"]
    else:
        pip = _pip()
        if pip is None:
            sys.exit(
                "vendor.py: no pip here to fetch " + pin["requirement"] + "; fill a directory with "
                "`pip download --no-deps jsonrpcserver==5.0.9 oslash==0.6.3 -d DIR` and set AZAIOND_VENDOR_DIR=DIR"
            )
        tmp = Path(tempfile.mkdtemp(prefix="azvendor-"))
        subprocess.run([*pip, "download", "-q", "--no-deps", pin["requirement"], "-d", str(tmp)], check=True)
        path = tmp / pin["file"]
        if not path.is_file():
            sys.exit(f"vendor.py: pip download {pin['requirement']} did not give {pin['file']}")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != pin["sha256"]:
        sys.exit(f"vendor.py: {path}: sha256 {digest}, expected {pin['sha256']}")
    print(f"vendor.py: {pin['file']} ok ({path})")
    return data


def members(pin: dict[str, str], data: bytes) -> dict[str, bytes]:
    """Archive path -> content, for regular files only."""
    out: dict[str, bytes] = {}
    if pin["file"].endswith(".whl"):
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    out[info.filename] = zf.read(info)
    else:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tf:
            for info in tf.getmembers():
                if info.isfile():
                    extracted = tf.extractfile(info)
                    assert extracted is not None
                    out[info.name] = extracted.read()
    return out


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    dest, licenses = Path(sys.argv[1]), Path(sys.argv[2])
    licenses.mkdir(parents=True, exist_ok=True)
    for pin in PINNED:
        files = members(pin, fetch(pin))
        pkg_prefix = pin["prefix"] + pin["package"] + "/"
        target = dest / pin["package"]
        shutil.rmtree(target, ignore_errors=True)
        count = 0
        for name, content in sorted(files.items()):
            if not name.startswith(pkg_prefix) or name.endswith((".pyc", ".pyo")):
                continue
            rel = PurePosixPath(name[len(pkg_prefix):])
            if rel.is_absolute() or ".." in rel.parts:
                sys.exit(f"vendor.py: {pin['file']}: unsafe member {name}")
            path = target / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            path.chmod(0o644)
            count += 1
        if count == 0:
            sys.exit(f"vendor.py: {pin['file']}: no {pin['package']}/ inside")
        lic = licenses / f"{pin['project']}.LICENSE"
        lic.write_bytes(files[pin["license"]])
        lic.chmod(0o644)
        print(f"vendor.py: {count} files of {pin['package']} -> {target}")


if __name__ == "__main__":
    main()
