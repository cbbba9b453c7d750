"""azaionctl's exit statuses and the advice printed with each error kind.

Scripts and systemd units branch on these numbers, so they are a contract: the per-kind codes
are ``KIND_BASE`` + the kind's index in ``azaiond.errors.ALL_ERRORS`` (whose order is fixed),
and new kinds only ever append. docs/cli.md carries the same table.
"""

from __future__ import annotations

from azaiond.errors import ALL_ERRORS

EXIT_OK = 0
EXIT_FAILURE = 1  # anything without a code of its own: internal errors, local file errors
EXIT_USAGE = 2  # argparse's own choice for bad arguments; kept for our usage errors too
EXIT_UNAVAILABLE = 3  # no daemon on the socket: missing, stale, or unreachable
EXIT_NO_PERMISSION = 4  # the socket exists but this user may not connect (not in group azaion)
EXIT_TIMEOUT = 5  # unlock --wait --timeout ran out
KIND_BASE = 10

KIND_EXIT: dict[str, int] = {cls.kind: KIND_BASE + i for i, cls in enumerate(ALL_ERRORS)}

# What a person should do next, per kind. Kept short: it follows the daemon's own message.
HINTS: dict[str, str] = {
    "not_authenticated": "run: azaionctl login EMAIL",
    "forbidden": "this needs root or membership in azaion-admin",
    "not_found": "check the name, folder, bucket or key",
    "upstream": "the Resource API failed; check the network and: journalctl -u azaiond",
    "cdn": "the CDN failed; check the network and: journalctl -u azaiond",
    "integrity": "decryption failed: the data, the key or the password is wrong",
    "busy": "another operation is under way; try again later",
    "too_large": "pass -o FILE so the bytes travel through a file descriptor",
    # invalid_name: the daemon's message already says what is allowed.
    "hardware_mismatch": "this user is bound to another machine; ask the vendor to reset the binding",
    "invalid_params": "this azaionctl may not match the daemon's version",
    "docker": "check the Docker engine: systemctl status docker",
    "config": "check /etc/azaiond/config.yaml and: journalctl -u azaiond",
    "method_not_found": "this azaionctl may not match the daemon's version",
    "cancelled": "the daemon stopped or the call was given up; run it again",
    "rollback": "the resource is older than one this host has loaded; ask the publisher",
    "storage": "the host's disk failed; free space or fix the state dir, then: journalctl -u azaiond",
    "stale": "the CDN and the Resource API hold different versions; try again once the publish is done",
}


def exit_code_for_kind(kind: str) -> int:
    """The exit status for an error kind; kinds without their own code exit 1."""
    return KIND_EXIT.get(kind, EXIT_FAILURE)


def table_rows() -> list[tuple[int, str]]:
    """(code, meaning) for every exit status, in order, for --help and the docs."""
    rows = [
        (EXIT_OK, "success"),
        (EXIT_FAILURE, "other failure (internal error, local file error, protocol error)"),
        (EXIT_USAGE, "usage error"),
        (EXIT_UNAVAILABLE, "daemon not reachable (socket missing or stale)"),
        (EXIT_NO_PERMISSION, "permission denied on the socket (not in group azaion)"),
        (EXIT_TIMEOUT, "unlock --wait --timeout expired"),
    ]
    rows += [(code, kind) for kind, code in KIND_EXIT.items()]
    return rows


def epilog() -> str:
    lines = ["exit status:"]
    lines += [f"  {code:>3}  {meaning}" for code, meaning in table_rows()]
    return "\n".join(lines)
