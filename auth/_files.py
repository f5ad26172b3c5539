"""File helpers shared by the key and PKI code.

Secrets are written so that they are never readable by anyone else, not even
for a moment: the temporary file is created with its final mode by ``os.open``
(``O_EXCL``, so an existing file or symlink is never followed), filled, synced
and then renamed over the target with ``os.replace``, which is atomic on POSIX.
A reader therefore sees either the old file or the new one, never half of it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
from pathlib import Path

from .errors import KeyFileError

if sys.platform == "win32":
    # A 0600 mode means nothing there; the file's DACL keeps others out.
    from ._acl_windows import restrict_dir_to_owner, restrict_to_owner
else:

    def restrict_dir_to_owner(path: str | os.PathLike[str]) -> None:
        """Give the folder ``path`` mode 0700."""
        os.chmod(path, PRIVATE_DIR_MODE)

    def restrict_to_owner(path: str | os.PathLike[str]) -> None:
        """Give ``path`` mode 0600: read and write for its owner, nothing for others."""
        os.chmod(path, PRIVATE_MODE)


__all__ = ["write_atomic", "write_private", "write_public", "read_file", "ensure_private_dir"]

PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644
PRIVATE_DIR_MODE = 0o700


def write_atomic(path: Path, data: bytes, *, mode: int) -> None:
    """Replace ``path`` with ``data`` atomically, the new file having ``mode``.

    Args:
        path: Destination file. Its directory must exist.
        data: Complete new content.
        mode: Permission bits of the new file (``0o600`` for secrets).

    Raises:
        KeyFileError: If the file cannot be written; the message names it.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
    except OSError as exc:
        raise KeyFileError(
            f"{path}: cannot create file ({exc.strerror}); check that the folder exists "
            "and is writable"
        ) from exc
    try:
        try:
            # The umask can only remove bits; fchmod makes the mode exact so a
            # public file is readable even under a strict umask.
            os.fchmod(fd, mode)
            if mode == PRIVATE_MODE:
                # On Windows the mode is no protection; an owner-only ACL is,
                # set before the secret is in the file.
                restrict_to_owner(tmp)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise KeyFileError(
            f"{path}: cannot write file ({exc.strerror}); check free space and permissions"
        ) from exc
    _fsync_dir(path.parent)


def write_private(path: Path, data: bytes) -> None:
    """Write a secret (private key, PKCS#12 bundle) with mode 0600, atomically."""
    write_atomic(path, data, mode=PRIVATE_MODE)


def write_public(path: Path, data: bytes) -> None:
    """Write a public file (certificate, JWKS, public key) with mode 0644, atomically."""
    write_atomic(path, data, mode=PUBLIC_MODE)


def read_file(path: Path, what: str) -> bytes:
    """Read a whole file, translating OS errors into :class:`KeyFileError`.

    Args:
        path: File to read.
        what: What the file should be, for the message (``"Ed25519 signing key"``).

    Raises:
        KeyFileError: If the file is missing or unreadable.
    """
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise KeyFileError(f"{path}: {what} not found; check the path") from exc
    except OSError as exc:
        raise KeyFileError(
            f"{path}: cannot read {what} ({exc.strerror}); check the path and permissions"
        ) from exc


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) with mode 0700 if it does not exist.

    On Windows the new folder gets an inheritable owner-only DACL instead
    (a mode means nothing there).  An existing folder is left as it is.

    Raises:
        KeyFileError: If the folder cannot be created or the path is not a folder.
    """
    path = Path(path)
    try:
        path.mkdir(mode=PRIVATE_DIR_MODE, parents=True)
        created = True
    except FileExistsError:
        created = False
    except OSError as exc:
        raise KeyFileError(
            f"{path}: cannot create folder ({exc.strerror}); check permissions"
        ) from exc
    if created:
        try:
            restrict_dir_to_owner(path)
        except OSError as exc:
            raise KeyFileError(
                f"{path}: cannot restrict the new folder to its owner ({exc.strerror}); "
                "check permissions"
            ) from exc
    if not path.is_dir():
        raise KeyFileError(f"{path}: exists and is not a folder; choose another path")
    return path


def _fsync_dir(path: Path) -> None:
    # Make the rename itself durable; not every platform allows opening a folder.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
