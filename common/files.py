"""Writing files that other processes read at any moment: atomic replace, an advisory lock, sha256."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path

FILE_MODE = 0o644  # mkstemp makes 0600; other users and Ray workers read shared caches
DIR_MODE = 0o755


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], fsync: bool = True,
                 mode: int = FILE_MODE) -> Path:
    """Call `write(tmp)` for a temporary file beside `path`, then move it into place.

    Readers see the old file or the whole new one, never half of it; a failed write leaves
    nothing behind. `fsync` makes the content durable before the rename (checkpoints, exports).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, fsync: bool = True) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), fsync=fsync)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success it replaces `path` whole.

    An existing folder at `path` is replaced only after the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, DIR_MODE)
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_leftovers(folder: str | os.PathLike, name: str) -> None:
    """Delete temporary files and folders that a killed writer of `folder/name` left behind.

    Call it while holding the lock that writers of `name` take, so none of them is in use.
    """
    for stale in Path(folder).glob(f".{name}.*.tmp"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Exclusive advisory lock (fcntl) on `path`, held for the block; other processes wait.

    Works across processes on one machine and on NFS with lockd; the lock file is left behind.
    flock conflicts between open file descriptions even within one process: never nest two
    locks on the same path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file, remembered per (path, inode, size, mtime) in this process: SD 1.5's UNet
    is 3.4 GB, and a file replaced or rewritten gets a new inode or mtime."""
    st = os.stat(path)
    return _sha256_file(str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=64)
def _sha256_file(path: str, inode: int, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()
