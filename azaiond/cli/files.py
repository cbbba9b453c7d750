"""Output files written by the daemon through a descriptor the CLI opened.

The CLI opens the file itself, with the caller's rights, so the daemon (root) never creates a
path on a user's behalf. It writes into a temp file next to the target and renames it onto the
target only when the daemon reported success: a failed or interrupted download never leaves a
truncated FILE, and never clobbers an older good one.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from types import TracebackType


def current_umask() -> int:
    # os.umask can only be read by setting it; call this before any thread starts.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class OutputFile:
    """A temp file in ``path``'s directory; ``commit()`` renames it onto ``path``.

    Leaving the ``with`` block without ``commit()`` (an error, Ctrl-C) unlinks the temp file.
    """

    def __init__(self, path: str, umask: int | None = None) -> None:
        self.path = path
        self._umask = current_umask() if umask is None else umask
        if os.path.isdir(path):
            raise IsADirectoryError(f"{path} is a directory")
        directory = os.path.dirname(os.path.abspath(path))
        base = os.path.basename(path)
        # O_EXCL with a random name: a link planted in the directory cannot redirect the write,
        # and 0600 keeps the partial plaintext private until it is complete.
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        for _ in range(16):
            candidate = os.path.join(directory, f".{base}.{secrets.token_hex(4)}.azaionctl-tmp")
            try:
                self.fd = os.open(candidate, flags, 0o600)
            except FileExistsError:
                continue
            self.temp_path = candidate
            break
        else:
            raise FileExistsError(f"could not create a temp file in {directory}")
        self._directory = directory
        self._done = False

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def commit(self) -> None:
        """Give the file the mode a plain create would have, flush it to disk, rename it in place."""
        os.fchmod(self.fd, 0o666 & ~self._umask)
        os.fsync(self.fd)
        os.close(self.fd)
        self._done = True
        try:
            os.rename(self.temp_path, self.path)
        except OSError:
            os.unlink(self.temp_path)
            raise
        # The rename itself must reach the disk too, or a crash could bring back the old name.
        try:
            dir_fd = os.open(self._directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            os.fsync(dir_fd)
        except OSError:
            pass  # some file systems cannot fsync a directory; the data itself is synced
        finally:
            os.close(dir_fd)

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        os.close(self.fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.temp_path)

    def __enter__(self) -> OutputFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()
