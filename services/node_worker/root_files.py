"""Root's private files on the node: a directory of root's alone, and small records and big copies written in it
so that a reader sees the whole file or none (suspend.py's records, checkpoint.py's memory, disks and records).

Never through a link, never a file root did not write: a reader takes only a regular file owned by root.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from . import trust

SMALL = 4096
CHUNK = 1 << 30


def private_dir(path: str | os.PathLike) -> Path:
    """`path`, made root's, 0700, if it is not there; trust.UnsafeDir if it (or a parent) is not root's alone."""
    made = trust.secure_dir(path, 0o700)
    if stat.S_IMODE(os.stat(made).st_mode) != 0o700:
        os.chmod(made, 0o700)
    return made


def read_small(path: str | os.PathLike, limit: int = SMALL) -> bytes | None:
    """A small file root wrote, or None: a link, a file of anyone else's, a non-regular file or a big one is not
    read (O_NOFOLLOW | O_NONBLOCK: neither a link nor a FIFO is followed or waited on)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_size > limit:
            return None
        return os.read(fd, limit)
    finally:
        os.close(fd)


def root_file(path: str | os.PathLike) -> os.stat_result | None:
    """The lstat of a regular file of root's, one link to it, else None (a symlink, a hard link, anyone else's)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) and st.st_uid == 0 and st.st_nlink == 1 else None


def temp_of(final: Path) -> Path:
    """Where `final` is written before it gets its name (a write cut short leaves only this)."""
    return final.with_name(f".{final.name}.tmp")


def write_atomic(final: Path, data: bytes, sync: bool = False) -> None:
    """`final` (root's, 0600) holds `data` whole, or is as it was. `sync`: on disk before its name is (a record
    that says other files are complete must not be there before them after a crash)."""
    tmp = temp_of(final)
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, final)
    if sync:
        sync_dir(final.parent)


def copy_atomic(src: Path, final: Path) -> int:
    """A copy of root's file `src` as `final` (root's, 0600, on disk before it has its name); its size."""
    tmp = temp_of(final)
    tmp.unlink(missing_ok=True)
    fd_in = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd_in).st_size
        fd_out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            offset = 0
            while offset < size:
                sent = os.copy_file_range(fd_in, fd_out, min(size - offset, CHUNK), offset, offset)
                if sent == 0:
                    raise OSError(f"{src} shrank while it was copied")
                offset += sent
            os.fsync(fd_out)
        finally:
            os.close(fd_out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd_in)
    os.rename(tmp, final)
    return size


def sync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
