"""Live reload (SIGHUP, ``systemctl reload azaiond``): which config keys each service can take
without a restart, and who applies them.

A service registers the dotted keys it can change live (``api.retries``) or whole sections
(``metrics``) with a callback taking the new Config. On reload the daemon re-reads the file;
a file with errors changes nothing. Otherwise every callback whose keys changed is called,
and every changed key that no callback claimed is named as needing a restart, so an
operator never believes a change took effect when it did not.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from azaiond.config import Config

log = logging.getLogger(__name__)

Apply = Callable[[Config], None]


def flatten(config: Config) -> dict[str, Any]:
    """Every key of ``config`` as ``section.key -> value`` (``source`` left out)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, obj: Any) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                walk(f"{prefix}{f.name}.", value)
            elif f.name != "source" or prefix:
                out[f"{prefix}{f.name}"] = value

    walk("", config)
    return out


def changed_keys(old: Config, new: Config) -> list[str]:
    a, b = flatten(old), flatten(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


@dataclass
class ReloadReport:
    applied: list[str] = field(default_factory=list)
    needs_restart: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # keys whose callback raised


@dataclass
class _Hook:
    name: str
    keys: tuple[str, ...]
    apply: Apply

    def claims(self, key: str) -> bool:
        return any(key == k or key.startswith(k + ".") for k in self.keys)


class ReloadHooks:
    """The registry services put their live-changeable keys in."""

    def __init__(self) -> None:
        self._hooks: list[_Hook] = []

    def register(self, name: str, keys: Iterable[str], apply: Apply) -> None:
        self._hooks.append(_Hook(name, tuple(keys), apply))

    @property
    def live_keys(self) -> list[str]:
        return sorted({k for hook in self._hooks for k in hook.keys})

    def apply(self, old: Config, new: Config) -> ReloadReport:
        report = ReloadReport()
        changed = changed_keys(old, new)
        due: list[tuple[_Hook, list[str]]] = []
        for key in changed:
            owners = [hook for hook in self._hooks if hook.claims(key)]
            if not owners:
                report.needs_restart.append(key)
            for hook in owners:
                entry = next((e for e in due if e[0] is hook), None)
                if entry is None:
                    due.append((hook, [key]))
                else:
                    entry[1].append(key)
        for hook, keys in due:
            try:
                hook.apply(new)
            except Exception:
                log.exception("reload: %s could not apply %s", hook.name, ", ".join(keys))
                report.failed.extend(keys)
            else:
                report.applied.extend(keys)
        report.applied = sorted(set(report.applied) - set(report.failed))
        return report
