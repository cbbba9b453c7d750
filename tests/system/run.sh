#!/usr/bin/env bash
# System test: the .deb in a real systemd.
#
# Builds the package once, then for each Debian release (bookworm and trixie by default) boots a
# clean root (debootstrap, cached per release) under systemd-nspawn, installs the same .deb there
# with apt (so its dependencies must resolve against that release), and checks the units, the
# socket's access rules, restarts, the watchdog-style crash restart, the boot-time unlock after a
# reboot, and the purge. The container shares the host's network: the
# reference Resource API and moto's S3 (python3 -m tests.support.devstack) run on the host's loopback,
# and a private dockerd's socket is bound in as /run/docker.sock.
#
# Each check prints one line when it passes; the first failure prints what it ran, its output
# and the daemon's journal, then everything started here is torn down (trap).
#
# Run as root on Debian 12. Environment:
#   AZAIOND_SYSTEST_CACHE  cache dir for the debootstrap roots and apt's .debs, one subdir per
#                          release (default /var/cache/azaiond-systest; delete it to start afresh)
#   RELEASES               the Debian releases to boot, in order (default "bookworm trixie")
#   MIRROR                 the Debian mirror (default http://deb.debian.org/debian)
#   PYTHON                 host interpreter with the project's test deps (moto) (default python3)
#   KEEP=1                 keep the work dir (and the stopped container's overlay) for a post-mortem
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${AZAIOND_SYSTEST_CACHE:-/var/cache/azaiond-systest}
PY=${PYTHON:-python3}
RELEASES=${RELEASES:-bookworm trixie}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
RELEASE=""
MACHINE=""
ROOT=""
T0=$SECONDS
W=""
NSPAWN_PID=""
LEADER=""
DOCKERD_PID=""
STACK_PID=""
OVERLAY_MOUNTED=""

# ---------------------------------------------------------------------------------------------
# reporting

step() { printf '%4ds  ok    %s%s\n' $((SECONDS - T0)) "${RELEASE:+$RELEASE: }" "$*"; }

fail() {
    printf '%4ds  FAIL  %s%s\n' $((SECONDS - T0)) "${RELEASE:+$RELEASE: }" "$*" >&2
    if [ -n "$W" ] && [ -s "$W/last.out" ]; then
        echo "---- output of the failed check" >&2
        tail -n 40 "$W/last.out" >&2
    fi
    if [ -n "$LEADER" ] && kill -0 "$LEADER" 2>/dev/null; then
        echo "---- journal of azaiond*, last 60 lines" >&2
        ctx journalctl --no-pager -n 60 -u azaiond.socket -u azaiond.service -u azaiond-unlock.service >&2 || true
    fi
    exit 1
}

# check NAME CMD...: run CMD (output to $W/last.out); print NAME when it succeeds, else fail.
check() {
    local name=$1
    shift
    if "$@" >"$W/last.out" 2>&1; then
        step "$name"
    else
        fail "$name (exit $?): $*"
    fi
}

# expect_rc RC NAME CMD...: like check, but CMD must exit with RC.
expect_rc() {
    local want=$1 name=$2 rc=0
    shift 2
    "$@" >"$W/last.out" 2>&1 || rc=$?
    [ "$rc" -eq "$want" ] || fail "$name (exit $rc, expected $want): $*"
    step "$name"
}

# wait_for SECONDS NAME CMD...: retry CMD every 0.2 s until it succeeds.
wait_for() {
    local limit=$1 name=$2
    shift 2
    local end=$((SECONDS + limit))
    until "$@" >"$W/last.out" 2>&1; do
        [ "$SECONDS" -lt "$end" ] || fail "$name (not within ${limit}s): $*"
        sleep 0.2
    done
    step "$name"
}

# ---------------------------------------------------------------------------------------------
# the container

# ctx CMD...: run CMD inside the container (all its namespaces), with a clean environment.
ctx() { nsenter -t "$LEADER" -a env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 HOME=/root "$@"; }

# ctx_sh SCRIPT: run a shell script inside the container.
ctx_sh() { ctx /bin/sh -ec "$1"; }

boot() {
    systemd-nspawn -D "$ROOT" -b --register=no --keep-unit --console=pipe -M "$MACHINE" \
        --bind="$W/docker/docker.sock:/run/docker.sock" \
        --bind="$CACHE/$RELEASE/apt-archives:/var/cache/apt/archives" \
        >>"$W/nspawn.log" 2>&1 &
    NSPAWN_PID=$!
    LEADER=""
    local end=$((SECONDS + 30))
    while [ -z "$LEADER" ]; do
        kill -0 "$NSPAWN_PID" 2>/dev/null || { tail -20 "$W/nspawn.log" >&2; fail "systemd-nspawn exited"; }
        [ "$SECONDS" -lt "$end" ] || fail "no systemd inside the container within 30s"
        LEADER=$(ps -o pid=,comm= --ppid "$NSPAWN_PID" | awk '$2 == "systemd" {print $1}' || true)
        sleep 0.1
    done
    # /run/systemd/private exists once PID 1 can take requests (and a SIGTERM halts it cleanly).
    wait_for 60 "container booted (systemd PID $LEADER)" test -S "/proc/$LEADER/root/run/systemd/private"
}

halt() {
    [ -n "$NSPAWN_PID" ] || return 0
    if kill -0 "$NSPAWN_PID" 2>/dev/null; then
        kill -TERM "$NSPAWN_PID" # the first SIGTERM halts the container cleanly
        local end=$((SECONDS + 30))
        while kill -0 "$NSPAWN_PID" 2>/dev/null && [ "$SECONDS" -lt "$end" ]; do sleep 0.2; done
        kill -0 "$NSPAWN_PID" 2>/dev/null && kill -TERM "$NSPAWN_PID" # a second one kills it at once
        wait "$NSPAWN_PID" 2>/dev/null || true
    fi
    NSPAWN_PID=""
    LEADER=""
}

cleanup() {
    local rc=$?
    trap - ERR
    set +e +E
    halt
    if [ -n "$STACK_PID" ]; then kill -TERM "$STACK_PID" 2>/dev/null; wait "$STACK_PID" 2>/dev/null; fi
    if [ -n "$DOCKERD_PID" ]; then
        kill -TERM "$DOCKERD_PID" 2>/dev/null
        for _ in $(seq 1 100); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$DOCKERD_PID" 2>/dev/null
    fi
    if [ -n "$W" ]; then
        # Whatever dockerd or nspawn left mounted below the work dir, deepest first.
        awk -v w="$W/" 'index($2, w) == 1 {print $2}' /proc/self/mounts | sort -r | while read -r m; do
            umount -l "$m"
        done
        [ -n "$OVERLAY_MOUNTED" ] && umount -l "$ROOT" 2>/dev/null
        for r in $RELEASES; do
            rm -rf "/run/systemd/nspawn/propagate/azst$$$r" "/run/systemd/nspawn/unix-export/azst$$$r"
        done
        rmdir /run/systemd/nspawn/propagate /run/systemd/nspawn/unix-export /run/systemd/nspawn/locks \
            /run/systemd/nspawn 2>/dev/null
        if [ "${KEEP:-}" = 1 ]; then
            echo "kept: $W" >&2
        else
            rm -rf "$W"
        fi
    fi
    if [ "$rc" -eq 0 ]; then
        printf '%4ds  system test passed (%s)\n' $((SECONDS - T0)) "$RELEASES"
    fi
}

# ---------------------------------------------------------------------------------------------
# preconditions

[ "$(id -u)" -eq 0 ] || { echo "run.sh: run as root (dockerd, systemd-nspawn, mounts)" >&2; exit 1; }
W=$(mktemp -d /tmp/azst.XXXXXX) # short: dockerd's socket path must stay under 108 bytes
trap cleanup EXIT
trap 'exit 130' INT TERM
set -E
trap 'fail "unexpected failure at line $LINENO: $BASH_COMMAND"' ERR

packages=(systemd-container debootstrap docker.io debhelper dh-python pybuild-plugin-pyproject
    python3-all python3-setuptools lintian build-essential fakeroot)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    check "installed ${missing[*]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
check "host python has the dev stack's deps (moto)" "$PY" -c "import moto.server, boto3, yaml, jwt"

# ---------------------------------------------------------------------------------------------
# build

VERSION=$(dpkg-parsechangelog -l "$REPO/debian/changelog" -S Version)
mkdir -p "$W/build/azaiond-$VERSION"
tar -C "$REPO" --exclude=.git --exclude='*.egg-info' --exclude=__pycache__ --exclude=.mypy_cache \
    --exclude=.ruff_cache --exclude=.pytest_cache --exclude=debian/azaiond --exclude=debian/.debhelper \
    -cf - . | tar -C "$W/build/azaiond-$VERSION" -xf -
# The build runs Debian's python3, which may have no pip: fetch the two vendored libraries by
# package name with the host's pip first (debian/vendor.py checks their pinned SHA-256).
if [ -z "${AZAIOND_VENDOR_DIR:-}" ]; then
    AZAIOND_VENDOR_DIR=$W/vendor
    python3 -m pip download -q --no-deps jsonrpcserver==5.0.9 oslash==0.6.3 -d "$AZAIOND_VENDOR_DIR"
fi
build() (
    cd "$W/build/azaiond-$VERSION" &&
        env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
            ${https_proxy:+https_proxy=$https_proxy} ${AZAIOND_VENDOR_DIR:+AZAIOND_VENDOR_DIR=$AZAIOND_VENDOR_DIR} \
            dpkg-buildpackage -us -uc -b
)
check "built the .deb (dpkg-buildpackage -b)" build
DEB=$W/build/azaiond_${VERSION}_all.deb
check "lintian --fail-on warning is clean" lintian --fail-on warning "$DEB"
check "the .deb carries the units, sysusers, launchers, vendored libs, man pages, conffile" sh -ec "
    dpkg-deb -c '$DEB' > '$W/contents'
    for f in ./lib/systemd/system/azaiond.socket ./lib/systemd/system/azaiond.service \
             ./lib/systemd/system/azaiond-unlock.service ./usr/lib/sysusers.d/azaiond.conf \
             ./usr/bin/azaiond ./usr/bin/azaionctl ./usr/lib/azaiond/vendor/jsonrpcserver/__init__.py \
             ./usr/lib/azaiond/vendor/oslash/__init__.py ./usr/share/doc/azaiond/vendor/jsonrpcserver.LICENSE \
             ./usr/share/doc/azaiond/vendor/oslash.LICENSE ./usr/share/man/man8/azaiond.8.gz \
             ./usr/share/man/man1/azaionctl.1.gz ./etc/azaiond/config.yaml; do
        grep -q \" \$f\$\" '$W/contents' || { echo missing \$f; exit 1; }
    done
    dpkg-deb -e '$DEB' '$W/control'
    grep -qx /etc/azaiond/config.yaml '$W/control/conffiles'"

# ---------------------------------------------------------------------------------------------
# one clean Debian root per release (cached)

# rootfs REL: debootstrap REL (minbase + systemd, python3) into $CACHE/REL/rootfs once, with the
# release's updates and security suites in its sources and their package lists fetched.
rootfs() {
    local rel=$1 dir=$CACHE/$1
    mkdir -p "$dir/apt-archives/partial"
    [ -x "$dir/rootfs/lib/systemd/systemd" ] && return 0
    rm -rf "$dir/rootfs.tmp"
    check "debootstrap $rel (minbase + systemd, python3) into $dir" \
        debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,python3 "$rel" "$dir/rootfs.tmp" "$MIRROR"
    printf 'deb %s %s main\ndeb %s %s-updates main\ndeb %s-security %s-security main\n' \
        "$MIRROR" "$rel" "$MIRROR" "$rel" "$MIRROR" "$rel" >"$dir/rootfs.tmp/etc/apt/sources.list"
    check "sources $rel, $rel-updates, $rel-security; apt-get update" chroot "$dir/rootfs.tmp" apt-get update
    mv "$dir/rootfs.tmp" "$dir/rootfs"
}

# overlay REL: this run's root for REL, an overlay on the cached one.
overlay() {
    local rel=$1
    ROOT=$W/$rel/root
    mkdir -p "$W/$rel/upper" "$W/$rel/work" "$ROOT"
    mount -t overlay overlay -o "lowerdir=$CACHE/$rel/rootfs,upperdir=$W/$rel/upper,workdir=$W/$rel/work" "$ROOT"
    OVERLAY_MOUNTED=1
    cp "$DEB" "$ROOT/root/"
    # apt's daily timers could take the dpkg lock in the middle of a check.
    ln -sf /dev/null "$ROOT/etc/systemd/system/apt-daily.timer"
    ln -sf /dev/null "$ROOT/etc/systemd/system/apt-daily-upgrade.timer"
    step "container root: overlay on the cached $rel rootfs (Debian $(cat "$ROOT/etc/debian_version"))"
}

# ---------------------------------------------------------------------------------------------
# shared by every release: a private dockerd, the dev stack, the daemon's config

mkdir -p "$W/docker"
dockerd --iptables=false --ip6tables=false --bridge=none --storage-driver=overlay2 \
    --host "unix://$W/docker/docker.sock" --data-root "$W/docker/data" --exec-root "$W/docker/exec" \
    --pidfile "$W/docker/docker.pid" >"$W/dockerd.log" 2>&1 &
DOCKERD_PID=$!
DOCKER=(docker -H "unix://$W/docker/docker.sock")
wait_for 30 "private dockerd answers" "${DOCKER[@]}" version

(cd "$REPO" && exec "$PY" -m tests.support.devstack --workdir "$W/stack" --no-enforce-keys) >"$W/stack.log" 2>&1 &
STACK_PID=$!
wait_for 60 "dev stack up (reference Resource API + moto S3 on loopback)" test -s "$W/stack/stack.json"
API_URL=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["api_url"])' "$W/stack/stack.json")
S3_URL=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["s3_url"])' "$W/stack/stack.json")
read -r ADMIN_EMAIL ADMIN_PW < <("$PY" -c '
import sys, yaml
d = yaml.safe_load(open(sys.argv[1]))
print(d["email"], d["password"])' "$W/stack/credentials/login")

# The daemon's config inside the container: the dev stack's, with the packaged paths and groups,
# the resource key left to the credential, and the image the unlock must produce.
"$PY" - "$W/stack/config.yaml" "$W/config.yaml" <<'EOF'
import sys, yaml
c = yaml.safe_load(open(sys.argv[1]))
c["socket"] = {"path": "/run/azaiond/azaiond.sock", "group": "azaion", "admin_groups": ["azaion-admin"]}
c["state_dir"] = "/var/lib/azaiond"
c.setdefault("resources", {}).pop("key", None)
c["unlock"] = {"archive": "/var/lib/azaiond/images.enc", "version": "1", "images": ["azsystest/hello:{version}"]}
c["docker"] = {"base_url": "unix:///run/docker.sock", "timeout": 600}
yaml.safe_dump(c, open(sys.argv[2], "w"), sort_keys=False)
EOF

make_bucket() {
    "$PY" - "$S3_URL" <<'EOF'
import sys, boto3
from botocore.config import Config
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1", aws_access_key_id="systest",
                  aws_secret_access_key="systest", config=Config(s3={"addressing_style": "path"}))
s3.create_bucket(Bucket="models")
EOF
}
check "CDN bucket 'models' created" make_bucket

# ---------------------------------------------------------------------------------------------
# once per release, in a fresh container: install, configure, restarts, unlock, upgrade, purge

test_release() {
RELEASE=$1
MACHINE=azst$$$1
overlay "$1"
# The image of the boot-time unlock must be missing until the unlock brings it back.
"${DOCKER[@]}" rmi azsystest/hello:1 >/dev/null 2>&1 || true

# install

boot
# The cached rootfs keeps the package lists of its debootstrap day; when they have gone stale
# (a point release replaced a .deb), refresh them and try again.
apt_install() {
    local deb=/root/azaiond_${VERSION}_all.deb
    ctx env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$deb" || {
        ctx apt-get update && ctx env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$deb"
    }
}
check "apt-get install ./azaiond_${VERSION}_all.deb resolves its dependencies from Debian" apt_install
check "groups azaion and azaion-admin exist (sysusers)" ctx getent group azaion azaion-admin
check "vendored jsonrpcserver imports under Debian's python3" ctx /usr/bin/python3 -I -c \
    'import sys; sys.path.insert(0, "/usr/lib/azaiond/vendor"); import jsonrpcserver, oslash, azaiond.daemon'

verify_units() {
    ctx systemd-analyze verify --man=no azaiond.socket azaiond.service azaiond-unlock.service >"$W/verify.out" 2>&1
    cat "$W/verify.out"
    [ ! -s "$W/verify.out" ]
}
check "systemd-analyze verify: no warnings for the three units" verify_units

security_score() {
    local unit=$1 max=$2 score
    ctx systemd-analyze security --offline=yes "/lib/systemd/system/$unit" >"$W/security.out" 2>&1 || true
    score=$(sed -n 's/.*Overall exposure level for .*: \([0-9.]*\).*/\1/p' "$W/security.out")
    echo "$unit: ${score:-none}"
    [ -n "$score" ] && awk -v s="$score" -v m="$max" 'BEGIN { exit !(s <= m) }'
}
SCORE=$(security_score azaiond.service 2.0 2>/dev/null | cut -d' ' -f2 || true)
check "systemd-analyze security azaiond.service: $SCORE (<= 2.0)" security_score azaiond.service 2.0
SCORE=$(security_score azaiond-unlock.service 1.0 2>/dev/null | cut -d' ' -f2 || true)
check "systemd-analyze security azaiond-unlock.service: $SCORE (<= 1.0)" security_score azaiond-unlock.service 1.0

check "azaiond.socket enabled and active, azaiond-unlock.service enabled" ctx_sh '
    systemctl is-enabled azaiond.socket azaiond-unlock.service
    systemctl is-active azaiond.socket'
check "the daemon is not started eagerly" ctx_sh '! systemctl is-active azaiond.service'
check "socket is root:azaion 0660" ctx_sh '
    stat -c "%U:%G %a %F" /run/azaiond/azaiond.sock
    [ "$(stat -c "%U:%G %a" /run/azaiond/azaiond.sock)" = "root:azaion 660" ]'

# A reboot with nothing configured: the boot-time unlock has no images to wait for and must
# succeed, starting the daemon with the shipped config and no credentials.
unlock_done() {
    local s
    s=$(ctx systemctl show -P ActiveState azaiond-unlock.service)
    echo "azaiond-unlock.service: $s"
    case $s in active | failed) return 0 ;; *) return 1 ;; esac
}
halt
step "container halted (reboot with the package's defaults)"
boot
wait_for 60 "azaiond-unlock.service finished" unlock_done
check "defaults: the boot unlock succeeds (no images configured), daemon up, no unit failed" ctx_sh '
    systemctl status --no-pager azaiond-unlock.service azaiond.service || true
    [ "$(systemctl show -P Result azaiond-unlock.service)" = success ]
    [ "$(systemctl show -P ActiveState azaiond-unlock.service)" = active ]
    systemctl is-active azaiond.service
    ! systemctl is-failed azaiond.socket azaiond.service azaiond-unlock.service'

# ---------------------------------------------------------------------------------------------
# configure, first call, access rules

install -m 0644 "$W/config.yaml" "$ROOT/etc/azaiond/config.yaml"
mkdir -p "$ROOT/etc/credstore"
chmod 0700 "$ROOT/etc/credstore"
install -m 0600 "$W/stack/credentials/resource-key" "$ROOT/etc/credstore/azaiond.resource-key"
step "configured: /etc/azaiond/config.yaml, plain credential /etc/credstore/azaiond.resource-key"
check "daemon stopped (it reads config and credentials at start)" ctx_sh '
    systemctl stop azaiond.service
    ! systemctl is-active azaiond.service
    systemctl is-active azaiond.socket'

check "first call starts the daemon through the socket: azaionctl health" ctx azaionctl health
check "azaiond.service active (READY=1 sent), socket-activated, watchdog armed" ctx_sh '
    systemctl show azaiond.service -p ActiveState -p SubState -p Type -p WatchdogUSec -p TriggeredBy
    [ "$(systemctl show -P ActiveState azaiond.service)" = active ]
    [ "$(systemctl show -P SubState azaiond.service)" = running ]
    [ "$(systemctl show -P WatchdogUSec azaiond.service)" = 30s ]'
check "state dir /var/lib/azaiond is 0700 root" ctx_sh '[ "$(stat -c "%a %U" /var/lib/azaiond)" = "700 root" ]'

check "users: outsider (no group), member (azaion), admin (azaion, azaion-admin)" ctx_sh '
    useradd -M -N -s /usr/sbin/nologin outsider
    useradd -M -N -s /usr/sbin/nologin -G azaion member
    useradd -M -N -s /usr/sbin/nologin -G azaion,azaion-admin opsadmin'
expect_rc 4 "outsider cannot connect (exit 4, permission denied)" ctx runuser -u outsider -- azaionctl status
check "member can call status" ctx runuser -u member -- azaionctl status
expect_rc 11 "member (not azaion-admin) gets forbidden for login (exit 11)" \
    ctx_sh "echo wrong-password | runuser -u member -- azaionctl login '$ADMIN_EMAIL'"
grep -q forbidden "$W/last.out" || fail "the forbidden error names its kind"
forbidden_in_journal() {
    ctx journalctl -u azaiond.service AZAION_KIND=forbidden AZAION_METHOD=login --no-pager -o cat | grep "login failed: forbidden"
}
wait_for 20 "journal: the refused call is an entry with AZAION_KIND=forbidden (python3-systemd's journal API)" \
    forbidden_in_journal
expect_rc 10 "azaion-admin member may call login (refused password: not_authenticated)" \
    ctx_sh "echo wrong-password | runuser -u opsadmin -- azaionctl login '$ADMIN_EMAIL'"

status_json() { ctx azaionctl --json status; }
check "root logs in (password on stdin)" ctx_sh "printf '%s\n' '$ADMIN_PW' | azaionctl login '$ADMIN_EMAIL'"
logged_in() {
    status_json | "$PY" -c '
import json, sys
s = json.load(sys.stdin)
print(s)
assert s["authenticated"] is True and s["user"]["email"] == sys.argv[1], s' "$ADMIN_EMAIL"
}
check "status: authenticated as $ADMIN_EMAIL" logged_in
check "token cache is 0600" ctx_sh '[ "$(stat -c %a /var/lib/azaiond/token.json)" = 600 ]'
check "azaiond --check-config accepts the installed config" ctx azaiond --check-config /etc/azaiond/config.yaml
check "shipped docs and bash completion are installed" ctx_sh '
    ls /usr/share/doc/azaiond/protocol.md* /usr/share/doc/azaiond/cli.md* /usr/share/doc/azaiond/operators.md*
    [ -f /usr/share/bash-completion/completions/azaionctl ]'
check "systemctl reload azaiond: SIGHUP re-reads the config, the daemon stays up and logged in" ctx_sh '
    pid=$(systemctl show -P MainPID azaiond.service)
    systemctl reload azaiond.service
    [ "$(systemctl show -P MainPID azaiond.service)" = "$pid" ]
    systemctl is-active azaiond.service
    azaionctl --json status | python3 -c "import json, sys; assert json.load(sys.stdin)[\"authenticated\"] is True"'
reloaded_in_journal() {
    ctx journalctl -u azaiond.service MESSAGE_ID=54396f03ec4f4de49b9936dc4d684b04 --no-pager -o cat | grep "reload"
}
wait_for 20 "journal: the reload is an entry with its MESSAGE_ID" reloaded_in_journal

# Resources through Debian's boto3 1.26 / botocore 1.29 (the pytest suite runs newer ones). moto's
# key checks are off here (--no-enforce-keys): the read/write key split is the suite's business.
check "root uploads a 20 MB resource (split: Resource API + CDN, multipart upload)" ctx_sh '
    head -c 20000000 /dev/urandom > /root/res.bin
    azaionctl upload /root/res.bin systest.bin --folder models'
check "member loads it back through a descriptor, identical bytes" ctx_sh '
    rm -f /tmp/res.out
    runuser -u member -- azaionctl load systest.bin --folder models -o /tmp/res.out
    cmp /root/res.bin /tmp/res.out'

# ---------------------------------------------------------------------------------------------
# restarts

check "systemctl restart azaiond" ctx systemctl restart azaiond.service
check "the login survives the restart (token cache)" logged_in

main_pid() { ctx systemctl show -P MainPID azaiond.service; }
restarted() {
    local pid state
    pid=$(main_pid)
    state=$(ctx systemctl show -P ActiveState azaiond.service)
    echo "MainPID=$pid ActiveState=$state (before: $PID_BEFORE)"
    [ "$state" = active ] && [ "$pid" != 0 ] && [ "$pid" != "$PID_BEFORE" ]
}
PID_BEFORE=$(main_pid)
NRESTARTS=$(ctx systemctl show -P NRestarts azaiond.service)
check "systemctl kill -s SIGABRT azaiond" ctx systemctl kill -s SIGABRT azaiond.service
wait_for 30 "systemd restarted the daemon after SIGABRT (Restart=on-failure)" restarted
check "NRestarts went up" test "$(ctx systemctl show -P NRestarts azaiond.service)" -gt "$NRESTARTS"
check "the daemon answers after the crash" ctx azaionctl health

# The daemon must ping the watchdog at half its period: with WatchdogSec=2s it has to survive 6 s.
check "runtime drop-in WatchdogSec=2s, restart" ctx_sh '
    mkdir -p /run/systemd/system/azaiond.service.d
    printf "[Service]\nWatchdogSec=2s\n" > /run/systemd/system/azaiond.service.d/watchdog.conf
    systemctl daemon-reload
    systemctl restart azaiond.service'
PID_BEFORE=$(main_pid)
NRESTARTS=$(ctx systemctl show -P NRestarts azaiond.service)
sleep 6
check "WATCHDOG=1 pings keep the daemon alive past 3 watchdog periods" ctx_sh "
    systemctl show -p MainPID -p NRestarts -p ActiveState -p WatchdogUSec azaiond.service
    [ \"\$(systemctl show -P MainPID azaiond.service)\" = $PID_BEFORE ]
    [ \"\$(systemctl show -P NRestarts azaiond.service)\" = $NRESTARTS ]
    [ \"\$(systemctl show -P WatchdogUSec azaiond.service)\" = 2s ]"
check "watchdog drop-in removed" ctx_sh '
    rm -r /run/systemd/system/azaiond.service.d
    systemctl daemon-reload
    systemctl restart azaiond.service'

# A failed unlock is retried, a bounded number of times (here sped up: RestartSec=1s, 3 runs).
# It fails now because there is no archive yet and the image is missing.
check "runtime drop-in for azaiond-unlock.service: RestartSec=1s, StartLimitBurst=3" ctx_sh '
    mkdir -p /run/systemd/system/azaiond-unlock.service.d
    printf "[Unit]\nStartLimitBurst=3\n[Service]\nRestartSec=1s\n" \
        > /run/systemd/system/azaiond-unlock.service.d/fast.conf
    systemctl daemon-reload
    systemctl restart --no-block azaiond-unlock.service  # it is active (exited) since the boot'
unlock_gave_up() {
    ctx systemctl show -p ActiveState -p Result -p NRestarts azaiond-unlock.service
    [ "$(ctx systemctl show -P ActiveState azaiond-unlock.service)" = failed ]
}
wait_for 30 "a failing unlock is retried and then given up (unit failed)" unlock_gave_up
unlock_runs() {
    ctx journalctl -b -u azaiond-unlock.service -o cat --no-pager >"$W/unlock.journal"
    grep -c "Main process exited" "$W/unlock.journal"
    [ "$(grep -c "Main process exited" "$W/unlock.journal")" = 3 ] &&
        grep -q "Start request repeated too quickly" "$W/unlock.journal"
}
check "it ran exactly 3 times (StartLimitBurst), then systemd stopped retrying" unlock_runs
check "the unlock error is reported by unlock-status" ctx_sh '
    azaionctl unlock-status || true
    azaionctl --json unlock-status | grep -q "\"error\""'
check "drop-in removed, unit reset" ctx_sh '
    rm -r /run/systemd/system/azaiond-unlock.service.d
    systemctl daemon-reload
    systemctl reset-failed azaiond-unlock.service'

# ---------------------------------------------------------------------------------------------
# boot-time unlock: seal an image, stage archive + encrypted login credential, reboot

image_tar() {
    mkdir -p "$W/img"
    echo "azaiond system test" >"$W/img/hello.txt"
    tar -C "$W/img" -cf "$W/img.tar" .
    "${DOCKER[@]}" import "$W/img.tar" azsystest/hello:1
    "${DOCKER[@]}" save -o "$W/image.tar" azsystest/hello:1
    "${DOCKER[@]}" rmi azsystest/hello:1
}
check "test image azsystest/hello:1 built, saved and removed from dockerd" image_tar

key_fragment() {
    "$PY" - "$API_URL" "$ADMIN_EMAIL" "$ADMIN_PW" "$W/fragment.bin" <<'EOF'
import sys, requests
url, email, password, out = sys.argv[1:]
r = requests.post(f"{url}/login", json={"email": email, "password": password}, timeout=10)
r.raise_for_status()
token = r.json()["token"]
r = requests.get(f"{url}/binary-split/key-fragment", headers={"Authorization": f"Bearer {token}"}, timeout=10)
r.raise_for_status()
open(out, "wb").write(r.content)
EOF
}
check "key fragment fetched from the Resource API" key_fragment
check "sealed the image into images.enc (azaionctl seal-images, on the publisher's side)" \
    sh -c "cd '$REPO' && exec '$PY' -m azaiond.cli.main seal-images --fragment-file '$W/fragment.bin' \
        --tar '$W/image.tar' -o '$W/images.enc'"
check "logout: the daemon forgets the login, so the unlock must use the credential" ctx azaionctl logout
install -m 0600 "$W/images.enc" "$ROOT/var/lib/azaiond/images.enc"
check "login credential encrypted with systemd-creds, drop-in with LoadCredentialEncrypted=" ctx_sh "
    mkdir -p -m 0700 /etc/credstore.encrypted /etc/systemd/system/azaiond.service.d
    printf 'email: %s\npassword: %s\n' '$ADMIN_EMAIL' '$ADMIN_PW' |
        systemd-creds encrypt --name=login - /etc/credstore.encrypted/azaiond.login
    printf '[Service]\nLoadCredentialEncrypted=login:azaiond.login\n' \
        > /etc/systemd/system/azaiond.service.d/credentials.conf
    systemctl daemon-reload"

halt
step "container halted"
boot
wait_for 120 "azaiond-unlock.service finished after the reboot" unlock_done
check "azaiond-unlock.service is active (exited 0)" ctx_sh '
    systemctl status --no-pager azaiond-unlock.service || true
    [ "$(systemctl show -P ActiveState azaiond-unlock.service)" = active ]
    [ "$(systemctl show -P Result azaiond-unlock.service)" = success ]'
check "azaionctl unlock-status says ready" ctx_sh 'azaionctl unlock-status; azaionctl unlock-status | grep -qw ready'
check "the image is back in dockerd" "${DOCKER[@]}" image inspect azsystest/hello:1
check "the daemon got the login from the encrypted credential" logged_in

ctx journalctl -b --no-pager -o short-monotonic >"$W/journal.txt" 2>&1 || true

# ---------------------------------------------------------------------------------------------
# upgrade (a reinstall runs the same maintainer scripts: prerm upgrade, postinst configure OLD)

check "reinstall over the running daemon (dpkg -i)" ctx_sh "
    systemctl is-active azaiond.service
    dpkg -i /root/azaiond_${VERSION}_all.deb"
check "after the upgrade: socket active, old daemon stopped, next call starts the new one" ctx_sh '
    systemctl is-active azaiond.socket
    ! systemctl is-active azaiond.service
    azaionctl health
    systemctl is-active azaiond.service'
check "state kept across the upgrade (unlock outcome still ready)" ctx_sh '
    azaionctl unlock-status | grep -qw ready'

# ---------------------------------------------------------------------------------------------
# purge

check "apt-get purge azaiond" ctx env DEBIAN_FRONTEND=noninteractive apt-get purge -y azaiond
check "purge removed units, binaries, vendored libs, config, state and credentials" ctx_sh '
    for f in /lib/systemd/system/azaiond.socket /lib/systemd/system/azaiond.service \
             /lib/systemd/system/azaiond-unlock.service /usr/lib/sysusers.d/azaiond.conf \
             /usr/bin/azaiond /usr/bin/azaionctl /usr/lib/azaiond /usr/lib/python3/dist-packages/azaiond \
             /etc/azaiond /var/lib/azaiond /etc/credstore/azaiond.resource-key \
             /etc/credstore.encrypted/azaiond.login /etc/systemd/system/azaiond.service.d \
             /etc/systemd/system/sockets.target.wants/azaiond.socket \
             /etc/systemd/system/multi-user.target.wants/azaiond-unlock.service \
             /run/azaiond/azaiond.sock; do
        if [ -e "$f" ] || [ -L "$f" ]; then echo "left behind: $f"; exit 1; fi
    done'
check "no azaiond unit is loaded or running any more" ctx_sh '
    systemctl daemon-reload
    ! systemctl is-active azaiond.socket azaiond.service azaiond-unlock.service
    ! grep -qx azaiond /proc/[0-9]*/comm'

halt
umount "$ROOT"
OVERLAY_MOUNTED=""
step "passed in $((SECONDS - T_RELEASE))s"
RELEASE=""
}

for rel in $RELEASES; do
    rootfs "$rel"
done
for rel in $RELEASES; do
    T_RELEASE=$SECONDS
    test_release "$rel"
done
