"""Secrets from systemd credentials ($CREDENTIALS_DIRECTORY; docs/formats.md, files), read on demand.

Nothing here is cached on disk or logged. A credential file is read each time it is needed, so
an operator who installs one does not have to restart the daemon for a login to use it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import yaml

from azaiond.apiclient import Credentials

log = logging.getLogger(__name__)


def _credential_path(name: str) -> Path | None:
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    return Path(directory) / name if directory else None


def read_credential(name: str) -> str | None:
    path = _credential_path(name)
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read credential %s: %s", name, exc.strerror)
        return None


def login_credentials() -> Credentials | None:
    """``{email, password}`` from the ``login`` credential, or None."""
    text = read_credential("login")
    if text is None:
        return None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        log.warning("the 'login' credential is not valid YAML; expected {email: ..., password: ...}")
        return None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), str) and data[k] for k in ("email", "password")):
        log.warning("the 'login' credential lacks email or password")
        return None
    return Credentials(email=data["email"], password=data["password"])


def resource_key(configured: str | None) -> str | None:
    """The shared resource key: the ``resource-key`` credential, else config ``resources.key``."""
    text = read_credential("resource-key")
    if text is not None and text.strip():
        return text.strip()
    return configured
