"""Secrets from systemd credentials ($CREDENTIALS_DIRECTORY; docs/formats.md, files), read on demand.

Nothing here is cached on disk or logged. A credential file is read each time it is needed, so
an operator who installs one does not have to restart the daemon for a login to use it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

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


def parse_login(text: str) -> Credentials | None:
    """``{email, password}`` from a ``login`` credential: JSON, else (older files) YAML.

    ``azaionctl credential login`` writes JSON, because YAML reads many passwords as something
    else (``12345678`` as a number, ``yes`` as true, ``p #1`` as ``p``, ``*x`` as an alias).

    JSON first: a JSON document is not always the same YAML document (``"\\/"``, tabs,
    unicode escapes beyond the BMP). Problems are logged without the value.
    """
    data: Any
    try:
        data = json.loads(text)
    except ValueError:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError:
            log.warning(
                "the 'login' credential is neither JSON nor YAML; write it with: azaionctl credential login EMAIL"
            )
            return None
    if not isinstance(data, dict):
        log.warning("the 'login' credential is not an object with email and password")
        return None
    for key in ("email", "password"):
        value = data.get(key)
        if not isinstance(value, str) or not value:
            # YAML turns an unquoted 12345678 into a number and yes into true: say so.
            what = "missing or empty" if value in (None, "") else f"not a string but {type(value).__name__}"
            log.warning(
                "the 'login' credential's %s is %s; write it as JSON with: azaionctl credential login EMAIL",
                key,
                what,
            )
            return None
    return Credentials(email=data["email"], password=data["password"])


def login_credentials() -> Credentials | None:
    """``{email, password}`` from the ``login`` credential, or None."""
    text = read_credential("login")
    if text is None:
        return None
    return parse_login(text)


def resource_key(configured: str | None) -> str | None:
    """The shared resource key: the ``resource-key`` credential, else config ``resources.key``."""
    text = read_credential("resource-key")
    if text is not None and text.strip():
        return text.strip()
    return configured
