"""File IO on the sweep's storage: a local folder or a URI (s3://, gs://), through pyarrow.fs as Ray does.

Every write is atomic: a local file is written beside its target and renamed over it; an object
store PUT is atomic by itself (readers see the old object or the new one, never half of one).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow.fs as pafs

from common import files
from common.files import atomic_write, sha256_bytes


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files 0600; exported files get the permissions a plain open() would give them.
_FILE_MODE = 0o666 & ~_current_umask()


class StorageError(OSError):
    """Storage that cannot be read or written; the message names the path and what to do."""


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def join(base: str | os.PathLike, *parts: str) -> str:
    if is_uri(base):
        return "/".join([str(base).rstrip("/"), *[p.strip("/") for p in parts]])
    return str(Path(base).joinpath(*parts))


def _fs(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())
    try:
        return pafs.FileSystem.from_uri(str(location))
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError / ... per scheme
        raise StorageError(f"{location}: cannot open this storage URI ({err}); check the scheme and credentials") from None


def exists(location: str | os.PathLike) -> bool:
    fs, path = _fs(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(location: str | os.PathLike) -> bool:
    fs, path = _fs(location)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def size(location: str | os.PathLike) -> int:
    """Bytes of a file; -1 when it does not exist."""
    fs, path = _fs(location)
    info = fs.get_file_info(path)
    return -1 if info.type == pafs.FileType.NotFound else int(info.size)


def listdir(location: str | os.PathLike) -> list[str]:
    """Names (not paths) directly under a folder; [] when it does not exist."""
    fs, path = _fs(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted(Path(i.path).name for i in infos)


def read_bytes(location: str | os.PathLike) -> bytes:
    fs, path = _fs(location)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise StorageError(f"{location}: not found") from None


def read_text(location: str | os.PathLike) -> str:
    return read_bytes(location).decode("utf-8")


def write_bytes(location: str | os.PathLike, data: bytes) -> None:
    """Write a whole file atomically; on failure nothing (not even a partial file) is left behind."""
    if not is_uri(location):
        _write_local(Path(location).expanduser(), data)
        return
    fs, path = _fs(location)
    try:
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(data)
    except OSError as err:
        raise StorageError(f"{location}: cannot write ({err}); check the bucket permissions") from None


def write_text(location: str | os.PathLike, text: str) -> None:
    write_bytes(location, text.encode("utf-8"))


def _write_local(dst: Path, data: bytes) -> None:
    _local_atomic(dst, lambda tmp: tmp.write_bytes(data))


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy one file between any two locations, atomically at the destination."""
    if not is_uri(src) and not is_uri(dst):
        _copy_local(Path(src), Path(dst).expanduser())
        return
    write_bytes(dst, read_bytes(src))


def _copy_local(src: Path, dst: Path) -> None:
    # Streamed rather than read whole: LoRA files of large ranks reach hundreds of MB.
    if not src.is_file():
        raise StorageError(f"{src}: not found")
    _local_atomic(dst, lambda tmp: shutil.copyfile(src, tmp))


def _local_atomic(dst: Path, write) -> None:
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StorageError(f"{dst}: cannot write ({err.strerror}); make {dst.parent} writable "
                           "or choose another `storage:`") from None
    try:
        atomic_write(dst, write, mode=_FILE_MODE)
    except OSError as err:
        raise StorageError(f"{dst}: write failed ({err.strerror}); nothing was written (disk full?)") from None


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a local file or of an object at a URI."""
    return sha256_bytes(read_bytes(path)) if is_uri(path) else files.sha256_file(path)


def check_writable(location: str | os.PathLike) -> None:
    """Fail early, before any training, when the sweep's storage cannot take files."""
    probe = join(location, f".write-test-{os.getpid()}")
    try:
        write_bytes(probe, b"ok")
    except StorageError as err:
        raise StorageError(f"storage {location} is not writable: {err}") from None
    fs, path = _fs(probe)
    fs.delete_file(path)


def list_files(location: str | os.PathLike) -> list[str]:
    """Paths (relative, with /) of every file under a folder, sorted; [] when it does not exist."""
    fs, path = _fs(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    root = path.rstrip("/") + "/"
    return sorted(i.path[len(root):] for i in infos if i.type == pafs.FileType.File)


def upload_folder(local: str | os.PathLike, dst: str | os.PathLike) -> int:
    """Copy every file under a local folder to `dst` (any location), each atomically; returns how many."""
    local = Path(local)
    names = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    for name in names:
        copy_file(local / name, join(dst, name))
    return len(names)


def download_folder(src: str | os.PathLike, local: str | os.PathLike, skip: tuple[str, ...] = ()) -> int:
    """Copy every file under `src` (any location) into the local folder `local`, but the names in
    `skip`; the folder appears whole or not at all. Returns how many files."""
    from common.files import atomic_folder

    names = [n for n in list_files(src) if n not in skip]
    with atomic_folder(Path(local)) as tmp:
        for name in names:
            copy_file(join(src, name), tmp / name)
    return len(names)
