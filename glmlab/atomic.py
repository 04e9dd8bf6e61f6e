"""Atomic file writes: a temp file in the same directory, fsync, then ``os.replace``.

A crash or Ctrl-C mid-write leaves the previous version of the file intact, never half a file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from glmlab.errors import GlmlabError

_WRITE_REASONS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
                  errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                  errno.EPERM: "permission denied"}
WRITE_ERRNOS = tuple(_WRITE_REASONS)


def write_error(path: str | Path, exc: OSError, fix: str = "free space or choose a writable output directory",
                ) -> GlmlabError:
    """One clear message for a failed write: full disk, read-only or forbidden output directory."""
    reason = _WRITE_REASONS.get(exc.errno, exc.strerror or str(exc))
    return GlmlabError(f"cannot write {path}: {reason}", fix)

_UMASK = os.umask(0)
os.umask(_UMASK)


def usual_permissions(path: str | Path) -> None:
    """Give ``path`` the permissions a new file gets (0666 less the umask)."""
    os.chmod(path, 0o666 & ~_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path to write (a hidden file beside ``path`` ending in ``suffix``, for writers that check
    the extension); on success it replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield tmp_path
        usual_permissions(tmp_path)  # again: a writer may have replaced the file (safetensors writes 0600)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_with(path: str | Path, writer: Callable[[Path], None]) -> None:
    """Atomically write ``path`` with a function that writes to a given (temporary) path."""
    with atomic_path(path) as tmp, os_errors(path):
        writer(tmp)


_OS_ERROR = re.compile(r"\(os error (\d+)\)")


@contextlib.contextmanager
def os_errors(path: str | Path) -> Iterator[None]:
    """A library's own exception that reports an operating-system error (safetensors' ``SafetensorError: ... I/O
    error: No space left on device (os error 28)``) raised as the :class:`OSError` it is, so a full disk gets the
    one clear message every other write gets."""
    try:
        yield
    except OSError:
        raise
    except Exception as exc:
        match = _OS_ERROR.search(str(exc))
        if match is None:
            raise
        code = int(match.group(1))
        raise OSError(code, os.strerror(code), str(path)) from exc
