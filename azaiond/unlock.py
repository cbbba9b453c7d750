"""Boot-time unlock (docs/unlock.md): decrypt ``images.enc`` straight into the Docker engine.

One run, on its own thread: check the images (all there: ``ready``), log in, fetch the key
fragment, then stream the archive through ``StreamDecryptor`` into ``images.load`` and check the
images again. No plaintext byte ever touches the disk and memory stays flat (1 MiB reads).

Why the stream holds plaintext back: v1 has no MAC, and a bad key or a damaged tail shows only in
the padding of the *last* block, while docker's tar reader is satisfied once it has seen the two
zero blocks that end a tar. So the generator

- checks the first 512 plaintext bytes are a tar header before sending anything (a wrong key is
  caught on the first chunk, deterministically, instead of surfacing as a docker tar error);
- always keeps at least the last 1 KiB of plaintext back, and releases it only after the padding
  check passed and the tar's end-of-archive blocks are there. A failure raises inside the
  generator, the SDK aborts the request, and docker never sees a complete archive, so no image
  is created or tagged.

Before any of that, ``check_tail`` vets the padding from the file's last 32 bytes, so a truncated
or tail-tampered archive fails before docker is even contacted.

Format v2 archives (magic ``AZIMGS02``) need none of that holding back: every chunk is opened
(its tag verified) before it is passed on, and the file's length is checked against the header
first (archives.py).

Either way, an unlock touches only the names in ``unlock.images``: a first pass reads the tar's
metadata (manifest.json, repositories, index.json) without handing anything to docker, and an
archive that would set any other name is refused (``integrity``, naming the names). The docker
pass watches the metadata again and refuses to finish if it changed in between.

The last outcome is kept in ``unlock.json`` (0600). A run persists its first state before any work,
so a daemon killed mid-run does not report a run that never ends after its restart: it reports
``idle`` (nothing is running; ``azaionctl unlock --wait`` starts a new run when it sees idle) with
the error kind ``interrupted`` saying why the last run has no outcome. A run cancelled by a daemon
shutdown ends the same way.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from azaiond import archives, crypto
from azaiond.account import Account
from azaiond.apiclient import Credentials
from azaiond.config import Config
from azaiond.errors import AzaionError, Busy, DockerError, IntegrityError, NotFound, StorageError, UnwantedImages
from azaiond.fsutil import atomic_write
from azaiond.images import DockerImages
from azaiond.seal import archive_key
from azaiond.tarcheck import TarWatch

log = logging.getLogger(__name__)

IDLE, READY, ERROR = "idle", "ready", "error"
AUTHENTICATING, DOWNLOADING_KEY = "authenticating", "downloading_key"
DECRYPTING, LOADING = "decrypting", "loading"
RUNNING = frozenset({AUTHENTICATING, DOWNLOADING_KEY, DECRYPTING, LOADING})
INTERRUPTED = "interrupted"  # error kind (state idle) of a run the daemon did not finish

TAR_BLOCK = 512
TAR_END = 2 * TAR_BLOCK  # a tar ends with two zero blocks; they must never leave early
INTEGRITY_MESSAGE = "the image archive could not be decrypted: wrong key fragment, or a damaged archive"
JOIN_TIMEOUT = 30.0  # close() waits this long; a load docker is still digesting may outlast it


class Archive(Protocol):
    """What the stream needs of the archive file (a raw ``FileIO`` in the daemon)."""

    def readinto(self, buffer: bytearray, /) -> int | None: ...
    def read(self, size: int = -1, /) -> bytes | None: ...
    def seek(self, offset: int, whence: int = 0, /) -> int: ...


class _Cancelled(Exception):
    """Raised inside the stream when the daemon shuts down; never leaves this module."""


def _tar_header_ok(block: bytes | bytearray) -> bool:
    """Is ``block`` a plausible tar header (its checksum field matches)?"""
    if len(block) < TAR_BLOCK:
        return False
    field = bytes(block[148:156]).strip(b"\0 ")
    try:
        stored = int(field, 8)
    except ValueError:
        return False
    # The checksum counts its own field as eight spaces.
    computed = sum(block[:148]) + 8 * 0x20 + sum(block[156:TAR_BLOCK])
    return stored == computed


def precheck(archive: Archive, size: int, key: bytes) -> None:
    """Fail early on a wrong length or a bad final block, from the file's last 32 bytes."""
    if size < crypto.IV_SIZE + crypto.BLOCK or (size - crypto.IV_SIZE) % crypto.BLOCK:
        raise IntegrityError(INTEGRITY_MESSAGE)
    archive.seek(size - 2 * crypto.BLOCK)
    crypto.check_tail(archive.read(2 * crypto.BLOCK) or b"", key)
    archive.seek(0)


def decrypted_tar(
    archive: Archive,
    key: bytes,
    on_progress: Callable[[int], None] = lambda done: None,
    cancelled: Callable[[], bool] = lambda: False,
    *,
    chunk: int = crypto.CHUNK,
    expect: str | None = None,
) -> Iterator[bytes]:
    """Plaintext of ``IV || CBC(tar)`` for ``images.load``, with the guards of the module doc.

    ``on_progress`` gets the ciphertext bytes read so far. Raises ``IntegrityError`` for any
    decryption failure, always before the end of the tar has been yielded. With ``expect`` (the
    metadata digest of the first pass) the tar's metadata must be the same this time.
    """
    watch = TarWatch()
    dec = crypto.StreamDecryptor(key, chunk=chunk)
    buf = bytearray(chunk)
    view = memoryview(buf)
    held = bytearray()  # newest plaintext, not yet released; at least the last TAR_END bytes
    head = bytearray()  # the first tar block, for the header check
    done = 0
    while True:
        if cancelled():
            raise _Cancelled
        try:
            n = archive.readinto(buf)
        except OSError as exc:
            # Not an OSError: that would read as "docker went away" to DockerImages.load.
            raise AzaionError(f"cannot read the image archive: {exc.strerror}") from exc
        if not n:
            break
        done += n
        on_progress(done)
        out = dec.update(view[:n])
        if not out:
            continue
        if expect is not None:
            watch.feed(out)
        if len(head) < TAR_BLOCK:
            head += out[: TAR_BLOCK - len(head)]
            if len(head) == TAR_BLOCK and not _tar_header_ok(head):
                raise IntegrityError(INTEGRITY_MESSAGE)
        if len(out) >= TAR_END and len(head) == TAR_BLOCK:
            if held:
                yield bytes(held)
            held = bytearray(out)  # copied: the decryptor reuses its buffer
        else:
            held += out
    last = dec.finalize()  # the padding check: raises IntegrityError on any failure
    held += last
    if len(head) < TAR_BLOCK or len(held) < TAR_END or any(held[-TAR_END:]):
        raise IntegrityError(INTEGRITY_MESSAGE)
    if expect is not None:
        watch.feed(last)
        if not watch.done or watch.digest() != expect:
            raise IntegrityError(INTEGRITY_MESSAGE)
    yield bytes(held)


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.0f} MiB"


class UnlockJob:
    def __init__(
        self,
        config: Config,
        account: Account,
        images: DockerImages,
        status_line: Callable[[str], None] = lambda s: None,
        on_finish: Callable[[str, float], None] = lambda outcome, seconds: None,
    ) -> None:
        self._config = config
        self._on_finish = on_finish  # (outcome, seconds) once per run, for metrics
        self._account = account
        self._images = images
        self._status_line = status_line
        self._path = config.unlock_state_path
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()
        self._closed = False
        self._state, self._error = self._restore()
        self._progress: tuple[int, int] | None = None
        self._reported_pct = -1

    # -- the interface the handlers call --------------------------------------------------

    def start(self, credentials: Credentials | None) -> dict[str, object]:
        """Start a run unless one is under way; returns the (new or current) run's state."""
        with self._lock:
            if self._state in RUNNING:
                return {"state": self._state}
            if self._closed:
                raise Busy("the daemon is shutting down")
            # The first state is set here, under the lock, so this reply and every later status
            # already show the new run, never the previous outcome. The image check runs as
            # "loading": it is a question to docker, as is the final check.
            self._state, self._error, self._progress = LOADING, None, None
            self._reported_pct = -1
            self._thread = threading.Thread(
                target=self._run, args=(credentials,), name="unlock", daemon=True
            )
            self._thread.start()
            return {"state": self._state}

    def status(self) -> dict[str, object]:
        with self._lock:
            progress = None
            if self._progress is not None:
                progress = {"done": self._progress[0], "total": self._progress[1]}
            error = dict(self._error) if self._error else None
            return {"state": self._state, "error": error, "progress": progress}

    def close(self) -> None:
        """Cancel a running job (daemon shutdown) and wait for it to stop."""
        with self._lock:
            self._closed = True
            thread = self._thread
        self._cancel.set()
        if thread is not None:
            thread.join(JOIN_TIMEOUT)
            if thread.is_alive():
                log.warning("unlock: still waiting for docker after %.0fs; leaving it", JOIN_TIMEOUT)
        self._images.close()

    # -- the run ------------------------------------------------------------------------------

    def _run(self, credentials: Credentials | None) -> None:
        started = time.monotonic()
        try:
            self._run_once(credentials)
        finally:
            with self._lock:
                outcome = self._error["kind"] if self._error else self._state
            self._on_finish(outcome, time.monotonic() - started)

    def _run_once(self, credentials: Credentials | None) -> None:
        self._persist({"state": LOADING, "error": None})  # "running": a crash reads as interrupted
        self._status_line("unlock: checking images")
        try:
            self._work(credentials)
        except _Cancelled:
            self._finish(IDLE, INTERRUPTED, "the daemon stopped during the unlock; run unlock again")
        except UnwantedImages as exc:
            self._finish(ERROR, exc.kind, exc.message)
        except IntegrityError:
            self._finish(ERROR, IntegrityError.kind, INTEGRITY_MESSAGE)
        except AzaionError as exc:
            self._finish(ERROR, exc.kind, exc.message)
        except Exception:
            log.exception("unlock failed unexpectedly")
            self._finish(ERROR, "internal", "the unlock failed unexpectedly; see the daemon's log")

    def _work(self, credentials: Credentials | None) -> None:
        cfg = self._config.unlock
        wanted = [name.replace("{version}", cfg.version) for name in cfg.images]
        if not wanted:
            # Nothing is asked for, so nothing can be missing: ready without touching Docker,
            # which a host without Docker (it is only Recommended) must not need at boot.
            log.warning("unlock.images is empty: nothing to unlock")
            self._finish(READY)
            return
        missing = self._images.missing(wanted)
        if not missing:
            self._finish(READY)
            return
        if not cfg.archive.is_file():
            raise NotFound(
                f"the image archive {cfg.archive} does not exist and docker lacks {', '.join(missing)}"
            )
        log.info("unlock: docker lacks %s; unlocking %s", ", ".join(missing), cfg.archive)

        self._check_cancel()
        self._enter(AUTHENTICATING)
        api = self._account.api
        if credentials is not None or api.credentials() is not None or not api.authenticated:
            self._account.login(credentials)
        # else: no credentials anywhere, but a cached token is still good for the key fragment.

        self._check_cancel()
        self._enter(DOWNLOADING_KEY)
        key = archive_key(api.key_fragment())

        self._check_cancel()
        with open(cfg.archive, "rb", buffering=0) as archive:
            total = os.fstat(archive.fileno()).st_size
            self._enter(DECRYPTING, (0, total))
            if archives.is_v2(archive):
                header = archives.v2_header(archive, total, key)
                expect = archives.scan_names(archives.v2_reader(archive, header), wanted)
                stream = archives.v2_tar(archive, header, expect, self._progress_to, self._check_cancel)
            else:
                precheck(archive, total, key)
                expect = archives.scan_names(archives.v1_reader(archive, total, key), wanted)
                stream = decrypted_tar(archive, key, self._progress_to, self._cancel.is_set, expect=expect)
            started = time.monotonic()
            loaded = self._images.load(self._then_loading(stream, total))
        log.info("unlock: docker loaded %d image(s) in %.1fs", len(loaded), time.monotonic() - started)

        still = self._images.missing(wanted)
        if still:
            raise DockerError(
                f"the archive is loaded but docker still lacks {', '.join(still)}: "
                "check unlock.images and unlock.version against the sealed archive"
            )
        self._finish(READY)

    def _then_loading(self, stream: Iterator[bytes], total: int) -> Iterator[bytes]:
        """Pass the stream on; once its last piece is out, docker is digesting: ``loading``."""
        yield from stream
        self._enter(LOADING, (total, total))

    # -- state --------------------------------------------------------------------------------

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise _Cancelled

    def _enter(self, state: str, progress: tuple[int, int] | None = None) -> None:
        with self._lock:
            self._state, self._progress = state, progress
        self._status_line(f"unlock: {state.replace('_', ' ')}")

    def _progress_to(self, done: int) -> None:
        with self._lock:
            total = self._progress[1] if self._progress else done
            self._progress = (done, total)
            pct = done * 100 // total if total else 100
            report = pct >= self._reported_pct + 5
            if report:
                self._reported_pct = pct - pct % 5
        if report:
            self._status_line(f"unlock: decrypting {pct}% ({_mib(done)} of {_mib(total)})")

    def _finish(self, state: str, kind: str = "", message: str = "") -> None:
        error = {"kind": kind, "message": message} if kind else None
        self._persist({"state": state, "error": error})
        with self._lock:
            self._state, self._error, self._progress = state, error, None
        if error:
            log.warning("unlock failed (%s): %s", kind, message, extra={"fields": {"event": "unlock", "kind": kind}})
            self._status_line(f"unlock: error ({kind}): {message}")
        else:
            log.info("unlock: ready", extra={"fields": {"event": "unlock"}})
            self._status_line("unlock: ready")

    def _persist(self, record: dict[str, Any]) -> None:
        record = {**record, "time": time.time()}
        try:
            atomic_write(self._path, json.dumps(record).encode("utf-8"), mode=0o600)
        except StorageError as exc:
            # The run itself is fine; only the memory of it across a restart is lost.
            log.warning("cannot save the unlock state: %s", exc.message)

    def _restore(self) -> tuple[str, dict[str, str] | None]:
        """The last run's outcome; a run that was still going counts as interrupted.

        The file is untrusted input: anything but a mapping with a known ``state`` string (and
        an ``error`` that is null or a mapping) is logged once and read as no outcome at all.
        """
        try:
            record = json.loads(self._path.read_bytes())
            if not isinstance(record, dict):
                raise TypeError("not a mapping")
            state = record["state"]
            error = record.get("error")
            if not isinstance(state, str) or state not in RUNNING | {IDLE, READY, ERROR}:
                raise ValueError("unknown state")
            if error is not None and not isinstance(error, dict):
                raise TypeError("error is not a mapping")
        except FileNotFoundError:
            return IDLE, None
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            log.warning("ignoring an unreadable unlock state in %s (%s)", self._path, type(exc).__name__)
            return IDLE, None
        if state == READY:
            return READY, None
        if state in RUNNING:
            return IDLE, {
                "kind": INTERRUPTED,
                "message": "the previous unlock was interrupted (the daemon stopped); run unlock again",
            }
        if state in (ERROR, IDLE) and isinstance(error, dict):
            kind, message = error.get("kind"), error.get("message")
            if isinstance(kind, str) and isinstance(message, str):
                return state, {"kind": kind, "message": message}
        return IDLE, None
