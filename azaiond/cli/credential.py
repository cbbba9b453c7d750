"""``azaionctl credential login``: write the daemon's ``login`` credential, safely for any password.

The credential is one JSON object, ``{"email": ..., "password": ...}``: JSON round-trips every
string (quotes, ``#``, ``:``, digits only, a leading ``*``, any unicode), where a YAML file
written with printf reads many passwords as something else. Where ``systemd-creds`` is
installed the file is encrypted with it (the host key, and the TPM2 if there is one), so a
copy of the disk alone does not reveal the password; the unit then needs
``LoadCredentialEncrypted=`` (operators.md shows the drop-in).

No daemon is involved: this writes a file for systemd to hand to the daemon at its next start.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

PLAIN_PATH = Path("/etc/credstore/azaiond.login")
ENCRYPTED_PATH = Path("/etc/credstore.encrypted/azaiond.login")
CREDENTIAL_NAME = "login"  # the name the daemon reads from $CREDENTIALS_DIRECTORY


class CredentialError(Exception):
    pass


def login_document(email: str, password: str) -> bytes:
    return (json.dumps({"email": email, "password": password}, ensure_ascii=False) + "\n").encode("utf-8")


def systemd_creds() -> str | None:
    return shutil.which("systemd-creds")


@dataclass(frozen=True)
class Written:
    path: str
    encrypted: bool


def _atomic_write(path: Path, data: bytes) -> None:
    """0600 temp file in the target's directory (0700 if created), fsync, rename."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_login(email: str, password: str, *, output: str | None, encrypt: bool | None) -> Written:
    """Write the credential; ``encrypt`` None means: when systemd-creds is installed.

    ``output`` ``-`` writes to stdout (never encrypted on a terminal's behalf: the caller chose).
    """
    document = login_document(email, password)
    tool = systemd_creds()
    if encrypt is None:
        encrypt = tool is not None
    if encrypt and tool is None:
        raise CredentialError("systemd-creds is not installed: drop --encrypt, or install systemd")
    if output == "-":
        if encrypt:
            raise CredentialError("--encrypt needs a file: pass -o PATH")
        os.write(1, document)
        return Written("-", False)
    path = Path(output) if output else (ENCRYPTED_PATH if encrypt else PLAIN_PATH)
    if not encrypt:
        _atomic_write(path, document)
        return Written(str(path), False)
    assert tool is not None
    # systemd-creds reads the plaintext from stdin ("-"): it never touches a file or argv.
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        done = subprocess.run(
            [tool, "encrypt", f"--name={CREDENTIAL_NAME}", "-", str(temp)],
            input=document,
            capture_output=True,
            check=False,
            timeout=60,
        )
        if done.returncode != 0:
            reason = done.stderr.decode(errors="replace").strip() or f"exit status {done.returncode}"
            raise CredentialError(f"systemd-creds encrypt failed: {reason}")
        os.chmod(temp, 0o600)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return Written(str(path), True)
