#!/usr/bin/env bash
# The whole test suite: lint, types, the pytest suite (daemon, real HTTP, real S3, real dockerd),
# then the system test (a .deb installed into a real systemd in systemd-nspawn).
# Needs the packages of scripts/setup.sh and root (dockerd, nspawn, privilege drops).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== ruff"
python3 -m ruff check .
echo "== mypy --strict"
python3 -m mypy
echo "== pytest"
# pytest exits 5 when it collected no test; set -e turns that, like any failure, into a failed run.
python3 -m pytest -q -p no:cacheprovider "$@"
if [ -x tests/system/run.sh ]; then
    echo "== system test"
    tests/system/run.sh
fi
