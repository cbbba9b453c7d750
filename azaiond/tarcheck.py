"""Which image names a ``docker save`` tar would set, read from the tar as it streams past.

Docker takes the names it tags from the archive's metadata files: ``manifest.json``
(``RepoTags``), the legacy ``repositories`` and, for OCI layouts, ``index.json`` (the
``io.containerd.image.name`` annotation). An unlock must refuse an archive that would set a name
outside ``unlock.images`` before Docker sees any layer, since a tag that docker moves replaces an
image the host runs under that name.

``TarWatch`` follows a tar fed in pieces of any size: it parses each header (ustar prefix, GNU
long names and pax ``path`` records included, as Go's archive/tar, which docker uses, honours
them), keeps the contents of the metadata files (capped) and counts the rest without keeping
it. It can also tell how many bytes of an entry nobody needs, so a first pass can jump over
layer data instead of decrypting it (see unlock.py).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from azaiond.errors import IntegrityError

BLOCK = 512
METADATA = frozenset({"manifest.json", "repositories", "index.json"})
MAX_METADATA = 4 * 1024 * 1024  # far above any real manifest; keeps memory flat on a hostile tar
BAD_TAR = "the image archive is not a docker save tar"


def _octal(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for sizes over 8 GiB
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError as exc:
        raise IntegrityError(BAD_TAR) from exc


def _pax_path(data: bytes) -> str | None:
    """The ``path`` record of a pax extended header, if any."""
    path = None
    rest = data
    while rest:
        space = rest.find(b" ")
        try:
            length = int(rest[:space])
        except ValueError as exc:
            raise IntegrityError(BAD_TAR) from exc
        if length <= space or length > len(rest):
            raise IntegrityError(BAD_TAR)
        record, rest = rest[space + 1 : length], rest[length:]
        key, _, value = record.rstrip(b"\n").partition(b"=")
        if key == b"path":
            path = value.decode("utf-8", "replace")
    return path


def _clean(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


class TarWatch:
    def __init__(self) -> None:
        self._head = bytearray()  # a header block being gathered
        self._left = 0  # data bytes of the current entry still to come
        self._pad = 0  # padding after them
        self._keep: bytearray | None = None  # contents being kept (metadata, long names)
        self._kind = ""  # what the kept contents are: a file name, "pax" or "longname"
        self._next_name: str | None = None  # from a pax header or a GNU long name
        self.files: list[tuple[str, bytes]] = []  # metadata files in the order they came
        self.done = False  # the end-of-archive block was seen

    def skippable(self) -> int:
        """Bytes coming next that belong to an entry nobody keeps."""
        return self._left if self._keep is None and not self.done else 0

    def skip(self, n: int) -> None:
        assert n <= self.skippable()
        self._left -= n

    def feed(self, data: memoryview | bytes) -> None:
        view = memoryview(data)
        while view and not self.done:
            if self._left:
                n = min(self._left, len(view))
                if self._keep is not None:
                    self._keep += view[:n]
                self._left -= n
                view = view[n:]
                if not self._left:
                    self._entry_done()
            elif self._pad:
                n = min(self._pad, len(view))
                self._pad -= n
                view = view[n:]
            else:
                n = min(BLOCK - len(self._head), len(view))
                self._head += view[:n]
                view = view[n:]
                if len(self._head) == BLOCK:
                    self._header(bytes(self._head))
                    self._head.clear()

    def _header(self, block: bytes) -> None:
        if not any(block):
            self.done = True
            return
        stored = _octal(block[148:156])
        if stored != sum(block[:148]) + 8 * 0x20 + sum(block[156:]):
            raise IntegrityError(BAD_TAR)
        name = block[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if block[257:262] == b"ustar":
            prefix = block[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
            if prefix:
                name = f"{prefix}/{name}"
        size = _octal(block[124:136])
        flag = block[156:157]
        if flag in (b"x", b"L"):
            self._kind = "pax" if flag == b"x" else "longname"
            self._start(size, keep=True)
            return
        if self._next_name is not None:
            name, self._next_name = self._next_name, None
        name = _clean(name)
        regular = flag in (b"0", b"\0", b"7")
        self._kind = name
        # Links, devices, directories and fifos carry no data whatever their size field says
        # (as Go's reader treats them).
        data = 0 if flag in (b"1", b"2", b"3", b"4", b"5", b"6") else size
        self._start(data, keep=regular and name in METADATA)

    def _start(self, size: int, keep: bool) -> None:
        if keep and size > MAX_METADATA:
            raise IntegrityError(f"the image archive holds an oversized {self._kind}")
        self._left = size
        self._pad = -size % BLOCK
        self._keep = bytearray() if keep else None
        if not size:
            self._entry_done()

    def _entry_done(self) -> None:
        kept, self._keep = self._keep, None
        if kept is None:
            return
        if self._kind == "pax":
            path = _pax_path(bytes(kept))
            if path is not None:
                self._next_name = path
        elif self._kind == "longname":
            self._next_name = bytes(kept).split(b"\0", 1)[0].decode("utf-8", "replace")
        else:
            self.files.append((self._kind, bytes(kept)))

    def digest(self) -> str:
        """A fingerprint of the metadata seen, to tell two passes over the archive apart."""
        h = hashlib.sha256()
        for name, data in self.files:
            h.update(f"{name}\0{len(data)}\0".encode())
            h.update(data)
        return h.hexdigest()

    def names(self) -> set[str]:
        """Every image name the metadata would set, normalised."""
        found: set[str] = set()
        for name, data in self.files:
            try:
                doc: Any = json.loads(data)
            except ValueError as exc:
                raise IntegrityError(f"the image archive's {name} is not valid JSON") from exc
            found.update(_names_in(name, doc))
        return found


def _names_in(name: str, doc: Any) -> set[str]:
    out: set[str] = set()
    try:
        if name == "manifest.json":
            for entry in doc:
                out.update(normalise(tag) for tag in entry.get("RepoTags") or [])
        elif name == "repositories":
            for repo, tags in doc.items():
                out.update(normalise(f"{repo}:{tag}") for tag in tags)
        else:
            for entry in doc.get("manifests") or []:
                notes = entry.get("annotations") or {}
                if "io.containerd.image.name" in notes:
                    out.add(normalise(notes["io.containerd.image.name"]))
                ref = notes.get("org.opencontainers.image.ref.name")
                if isinstance(ref, str) and ("/" in ref or ":" in ref):
                    out.add(normalise(ref))
    except (AttributeError, TypeError) as exc:
        raise IntegrityError(f"the image archive's {name} has an unexpected shape") from exc
    return out


def normalise(ref: object) -> str:
    """``docker.io/library/x`` -> ``x:latest``: the form docker prints, for comparing names."""
    if not isinstance(ref, str):
        raise TypeError(ref)
    for prefix in ("docker.io/library/", "index.docker.io/library/", "docker.io/", "index.docker.io/"):
        if ref.startswith(prefix):
            ref = ref[len(prefix) :]
            break
    if "@" not in ref and ":" not in ref.rsplit("/", 1)[-1]:
        ref += ":latest"
    return ref
