"""Crash-safe file output: write to a temporary sibling, fsync, then rename into place.

A process killed half way leaves either the old output or the new one, never a torn mix. What a
kill does leave behind is a hidden ``.<name>.tmp-*`` sibling; :func:`remove_stale_temporaries`
clears those. Running out of disk inside :func:`atomic_dir` / :func:`atomic_file` raises
:class:`DiskFull` (an :class:`~edgetune.errors.EdgetuneError`, so the CLI prints one line) and the
previous output, if any, is untouched.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import EdgetuneError

# errno values that mean "the disk (or quota) is full"
DISK_FULL_ERRNOS = frozenset(e for e in (getattr(errno, "ENOSPC", None), getattr(errno, "EDQUOT", None),
                                         getattr(errno, "EFBIG", None)) if e is not None)


class DiskFull(EdgetuneError):
    """The disk or quota filled up while writing; whatever was there before is intact."""


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


def disk_full_error(what: str | os.PathLike, exc: OSError | None = None, hint: str = "") -> DiskFull:
    reason = os.strerror(exc.errno) if exc is not None and exc.errno else "no space left on device"
    return DiskFull(f"out of disk space writing {what} ({reason}); free some space and retry"
                    + (f"; {hint}" if hint else ""))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fsync_file(os.path.join(dirpath, name))
        fsync_dir(dirpath)


def check_output_path(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing output unless ``overwrite``; do it before any expensive work starts."""
    out = Path(out)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise EdgetuneError(f"output {out} already exists (pass --overwrite to replace it)")
    return out


def remove_stale_temporaries(directory: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Delete the ``.<name>.tmp-*`` / ``.<name>.old-*`` leftovers of killed atomic writes in ``directory``."""
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        if not p.name.startswith("."):
            continue
        for marker in (".tmp-", ".old-"):
            if marker in p.name:
                stem = p.name[1:].rsplit(marker, 1)[0]
                break
        else:
            continue
        if name is not None and stem != name:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory that becomes ``out`` only if the block succeeds."""
    out = check_output_path(out, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full_error(out, exc) from None
        raise
    try:
        yield tmp
        _fsync_tree(tmp)
        if out.exists() or out.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(exc):
            raise disk_full_error(out, exc, "nothing was replaced") from None
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the same directory; on success it replaces ``path`` atomically."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full_error(path, exc) from None
        raise
    tmp = Path(tmp_name)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if is_disk_full(exc):
            raise disk_full_error(path, exc, "nothing was replaced") from None
        raise
