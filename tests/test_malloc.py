"""azaiond.malloc: thresholds fixed unless the operator set their own, and what that buys."""

from __future__ import annotations

import json
import subprocess
import sys

from azaiond import malloc

# Allocate and free 1 MiB objects in the order a stream to Docker does (our chunk, then
# urllib3's framed copy of it); report the minor page faults per MiB moved.
_PATTERN = """
import json, resource, sys
from azaiond import malloc
tuned = malloc.tune() if sys.argv[1] == "tune" else False
chunk = bytes(1 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(256):
    new = bytes(bytearray(chunk))
    framed = b"%x\\r\\n%b\\r\\n" % (len(new), new)
    del framed
    chunk = new
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"tuned": tuned, "faults_per_mib": faults / 256}))
"""


def _run(mode: str, **env: str) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, "-c", _PATTERN, mode], capture_output=True, text=True, check=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path), **env},
    )
    result: dict[str, object] = json.loads(proc.stdout)
    return result


def test_operator_settings_win() -> None:
    for name in ("GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        assert malloc.tune({name: "1"}) is False


def test_tuned_streams_reuse_their_pages() -> None:
    result = _run("tune")
    assert result["tuned"] is True  # glibc, as on every supported host
    # 256 faults would be one fresh page per 4 KiB of every MiB; reused heap pages take none.
    assert isinstance(result["faults_per_mib"], float) and result["faults_per_mib"] < 16
