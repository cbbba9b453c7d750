#!/usr/bin/env bash
# Installs everything the demo, the tests and the benchmarks need on a fresh Debian 12 machine.
# Run as root. Idempotent: a second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "setup.sh installs system packages: run it as root (sudo $0)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
packages=(
    openssl util-linux procps time socat          # openssl interop, setpriv, /usr/bin/time
    docker.io python3-docker                       # a real dockerd; Debian's SDK for the compat test
    systemd-container debootstrap                  # the system test boots systemd in nspawn
    nginx-light                                    # a fast read origin for scripts/bench_cold.py
    systemd python3-systemd                        # systemd-creds (credential tests), the journal API
    bash-completion                                # the shipped completion, tried in the tests
    debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools
    lintian build-essential fakeroot               # building and linting the .deb
)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -e '.[test]'
echo "setup: done"
