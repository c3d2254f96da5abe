"""Getting an image's bytes into a temporary file of the store while computing their sha256.

Two sources: a local path (or file:// URL), copied by the kernel (copy_file_range) while this thread hashes
what was written, read back from the page cache; and an http(s) URL, streamed and hashed as it arrives,
resumed with a Range request after a dropped connection or a read timeout. Both report progress through a
callback and stop when `cancelled()` says so. Neither decides anything about the store: see image_store.py.

Why the local copy looks like this (measured, docs/benchmarks.md "Image staging"): sha256 runs at ~1.4 GB/s
on one core here, about as fast as the disk reads, so hashing must overlap the copy rather than follow it;
the kernel copy needs little CPU, leaving the other core to the hash, which reads what was written straight
from the page cache (mmap), so the bytes verified are the bytes stored. Neither function fsyncs: the store
makes a verified image durable in the background (image_store.py). Holes in a sparse source (raw cloud images) stay
holes: only its data segments are copied.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import mmap
import os
import re
import socket
import stat
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

CHUNK = 64 * 1024 * 1024  # one copy_file_range / one hash step; a multiple of any page size
WINDOW = 4  # chunks the copier may run ahead of the hasher: what it wrote is still in the page cache
NET_BUFFER = 1024 * 1024
QCOW2_MAGIC = b"QFI\xfb"

Progress = Callable[[int, "int | None"], None]
Cancelled = Callable[[], bool]


class FetchError(Exception):
    """The source could not be read (missing, unreachable, refused): one line naming it."""


class FetchCancelled(Exception):
    pass


def is_url(source: str) -> bool:
    return urllib.parse.urlsplit(source).scheme in ("http", "https")


def local_path(source: str) -> Path:
    parts = urllib.parse.urlsplit(source)
    if parts.scheme == "file":
        return Path(urllib.parse.unquote(parts.path))
    return Path(source)


def _never() -> bool:
    return False


def _no_progress(done: int, total: int | None) -> None:
    pass


# -- local files ------------------------------------------------------------------------------------------

def data_segments(fd: int, size: int) -> list[tuple[int, int]]:
    """[start, end) ranges holding data; holes between them read as zeros. Whole file if SEEK_DATA is absent."""
    segments: list[tuple[int, int]] = []
    offset = 0
    try:
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole is left
                    break
                raise
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            segments.append((start, end))
            offset = end
    except (OSError, AttributeError):
        return [(0, size)] if size else []
    return segments


class _CopyState:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.copied = 0  # every byte below this offset is in the destination
        self.hashed = 0
        self.stop = False
        self.error: BaseException | None = None


def copy_local(source: Path, dest: Path, *, progress: Progress = _no_progress, cancelled: Cancelled = _never,
               chunk: int = CHUNK) -> tuple[int, str]:
    """Copy `source` to a new file `dest`; return (bytes, sha256 hex of what `dest` holds)."""
    try:
        src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise FetchError(f"cannot read {source}: {exc.strerror}") from None
    try:
        info = os.fstat(src)
        if not stat.S_ISREG(info.st_mode):
            raise FetchError(f"{source} is not a regular file")
        size = info.st_size
        dst = os.open(dest, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(dst, size)  # full length at once: holes stay holes, and the hasher may map any range
            os.posix_fadvise(src, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            digest = _copy_and_hash(src, dst, size, data_segments(src, size), progress, cancelled, chunk)
        finally:
            os.close(dst)
    finally:
        os.close(src)
    return size, digest


def _copy_and_hash(src: int, dst: int, size: int, segments: list[tuple[int, int]], progress: Progress,
                   cancelled: Cancelled, chunk: int) -> str:
    state = _CopyState()
    copier = threading.Thread(target=_copier, args=(src, dst, size, segments, state, chunk),
                              name="stager-copy", daemon=True)
    copier.start()
    h = hashlib.sha256()
    try:
        while True:
            with state.cond:
                while state.copied <= state.hashed and state.error is None and state.hashed < size:
                    state.cond.wait(0.5)
                if state.error is not None:
                    raise state.error
                upto = state.copied
            if state.hashed >= size:
                break
            while state.hashed < upto:
                n = min(chunk, upto - state.hashed)
                _hash_range(h, dst, state.hashed, n)
                with state.cond:
                    state.hashed += n
                    state.cond.notify_all()
                progress(state.hashed, size)
                if cancelled():
                    raise FetchCancelled()
    finally:
        with state.cond:
            state.stop = True
            state.cond.notify_all()
        copier.join()
    return h.hexdigest()


def _copier(src: int, dst: int, size: int, segments: list[tuple[int, int]], state: _CopyState,
            chunk: int) -> None:
    try:
        offset = 0
        for start, end in segments + [(size, size)]:
            while offset < start:  # a hole: nothing to copy (it reads as zeros), only to hand on, in steps
                offset = min(start, offset + chunk)
                if not _advance(state, offset, chunk):
                    return
            while offset < end:
                n = min(chunk, end - offset)
                _copy_range(src, dst, offset, n)
                offset += n
                if not _advance(state, offset, chunk):
                    return
    except BaseException as exc:  # noqa: BLE001 - handed to the hashing thread, which raises it
        with state.cond:
            state.error = exc if isinstance(exc, OSError) else FetchError(str(exc))
            state.cond.notify_all()


def _advance(state: _CopyState, offset: int, chunk: int) -> bool:
    """Hand bytes up to `offset` to the hasher; first wait while more than WINDOW chunks are unhashed (they
    must still be in the page cache when the hasher reads them). False when the hasher gave up."""
    with state.cond:
        while offset - state.hashed > (WINDOW + 1) * chunk and not state.stop:
            state.cond.wait(0.5)
        if state.stop:
            return False
        state.copied = max(state.copied, offset)
        state.cond.notify_all()
        return True


_use_copy_file_range = hasattr(os, "copy_file_range")


def _copy_range(src: int, dst: int, offset: int, length: int) -> None:
    global _use_copy_file_range
    done = 0
    while done < length:
        if _use_copy_file_range:
            try:
                n = os.copy_file_range(src, dst, length - done, offset + done, offset + done)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                _use_copy_file_range = False  # this kernel/filesystem pair cannot: copy through a buffer
                continue
        else:
            data = os.pread(src, min(length - done, 8 * 1024 * 1024), offset + done)
            n = os.pwrite(dst, data, offset + done) if data else 0
        if n == 0:
            raise FetchError("the source file shrank while it was copied")
        done += n


def _hash_range(h, fd: int, offset: int, length: int) -> None:
    """Hash [offset, offset+length) of fd straight from the page cache (no copy into Python)."""
    base = offset - offset % mmap.ALLOCATIONGRANULARITY
    try:
        mm = mmap.mmap(fd, length + (offset - base), flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                       prot=mmap.PROT_READ, offset=base)
    except (OSError, ValueError):  # a filesystem without mmap
        pos = offset
        while pos < offset + length:
            data = os.pread(fd, min(8 * 1024 * 1024, offset + length - pos), pos)
            if not data:
                raise FetchError("short read while hashing") from None
            h.update(data)
            pos += len(data)
        return
    try:
        with memoryview(mm) as view:
            h.update(view[offset - base:])
    finally:
        mm.close()


def hash_file(path: Path, progress: Progress = _no_progress, upto: int | None = None) -> tuple[int, str]:
    """(bytes, sha256) of a file, or of its first `upto` bytes."""
    h = hashlib.sha256()
    buf = bytearray(8 * 1024 * 1024)
    view = memoryview(buf)
    done = 0
    with open(path, "rb", buffering=0) as fh:
        total = os.fstat(fh.fileno()).st_size if upto is None else upto
        while done < total:
            n = fh.readinto(view[:min(len(buf), total - done)])
            if not n:
                break
            h.update(view[:n])
            done += n
            progress(done, total)
    return done, h.hexdigest()


# -- http(s) ----------------------------------------------------------------------------------------------

_CONTENT_RANGE = re.compile(r"^bytes\s+(\d+)-(\d+)/(\d+|\*)$")


def parse_content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """'bytes 100-199/1000' → (100, 199, 1000); None when absent or malformed."""
    match = _CONTENT_RANGE.match((value or "").strip())
    if not match:
        return None
    total = None if match.group(3) == "*" else int(match.group(3))
    return int(match.group(1)), int(match.group(2)), total


def retry_delay(attempt: int) -> float:
    return min(0.2 * 2 ** (attempt - 1), 5.0)


class _Restart(Exception):
    """The server sent the whole body again (it ignored Range, or the file changed): start from byte 0."""


def download(url: str, dest: Path, *, timeout: float = 30.0, retries: int = 5, resume: bool = True,
             progress: Progress = _no_progress, cancelled: Cancelled = _never) -> tuple[int, str]:
    """Stream `url` into `dest`; return (bytes, sha256 hex). A partial `dest` left by an earlier attempt for the
    same URL (its sidecar `dest.json` says which) is hashed again and continued, not downloaded again.

    `timeout` bounds the connection and every read; a dropped connection or a read timeout is retried up to
    `retries` times in a row (any progress resets the count) with a Range request for the rest."""
    sidecar = dest.with_name(dest.name + ".json")
    validator: dict[str, str] = {}
    done, h = 0, hashlib.sha256()
    if resume and dest.exists():
        try:
            saved = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            saved = {}
        if saved.get("url") == url:
            done = _rehash(dest, h)
            validator = {k: v for k, v in saved.items() if k in ("etag", "last_modified")}
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, done)
        os.lseek(fd, done, os.SEEK_SET)
        failures = 0
        total: int | None = None
        buf = bytearray(NET_BUFFER)
        view = memoryview(buf)
        while True:
            if cancelled():
                raise FetchCancelled()
            got_bytes = False
            try:
                response = _open(url, done, validator, timeout)
                with response:
                    status = response.status
                    if done and status == 200:  # it ignored the Range (or the file changed): take it all again
                        os.ftruncate(fd, 0)
                        os.lseek(fd, 0, os.SEEK_SET)
                        done, h = 0, hashlib.sha256()
                    if status == 206:
                        rng = parse_content_range(response.headers.get("Content-Range"))
                        if rng is None or rng[0] != done:
                            raise _Restart()
                        total = rng[2]
                    else:
                        length = response.headers.get("Content-Length")
                        total = int(length) if length and length.isdigit() else None
                    validator = {k: v for k, v in (("etag", response.headers.get("ETag")),
                                                   ("last_modified", response.headers.get("Last-Modified"))) if v}
                    sidecar.write_text(json.dumps({"url": url, **validator}))
                    while True:
                        n = response.readinto(view)
                        if not n:
                            break
                        _write_all(fd, view[:n])
                        h.update(view[:n])
                        done += n
                        got_bytes = True
                        progress(done, total)
                        if cancelled():
                            raise FetchCancelled()
                if total is not None and done < total:
                    raise http.client.IncompleteRead(b"", total - done)
                break
            except _Restart:
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                done, h, validator = 0, hashlib.sha256(), {}
                failures += 1
                if failures > retries:
                    raise FetchError(f"{_shown(url)}: the server keeps restarting the download") from None
            except urllib.error.HTTPError as exc:
                if exc.code == 416 and done:  # our partial file is not a prefix of what is there now
                    os.ftruncate(fd, 0)
                    os.lseek(fd, 0, os.SEEK_SET)
                    done, h, validator = 0, hashlib.sha256(), {}
                    continue
                if exc.code not in (408, 429) and exc.code < 500:
                    raise FetchError(f"{_shown(url)}: HTTP {exc.code} {exc.reason}") from None
                failures = _failed(url, failures, retries, f"HTTP {exc.code} {exc.reason}", cancelled)
            except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
                failures = 0 if got_bytes else failures
                failures = _failed(url, failures, retries, _reason(exc), cancelled)
    finally:
        os.close(fd)
    sidecar.unlink(missing_ok=True)
    return done, h.hexdigest()


def _failed(url: str, failures: int, retries: int, reason: str, cancelled: Cancelled) -> int:
    failures += 1
    if failures > retries:
        raise FetchError(f"{_shown(url)}: {reason} ({failures} attempts)")
    deadline = time.monotonic() + retry_delay(failures)
    while time.monotonic() < deadline:
        if cancelled():
            raise FetchCancelled()
        time.sleep(0.05)
    return failures


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else exc
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(exc, http.client.IncompleteRead):
        return "connection closed before the end of the file"
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return text


def _open(url: str, offset: int, validator: dict[str, str], timeout: float):
    headers = {"User-Agent": "vtorque-stager", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if validator.get("etag") or validator.get("last_modified"):
            headers["If-Range"] = validator.get("etag") or validator["last_modified"]
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _rehash(path: Path, h) -> int:
    with open(path, "rb", buffering=0) as fh:
        buf = bytearray(8 * 1024 * 1024)
        view = memoryview(buf)
        done = 0
        while n := fh.readinto(view):
            h.update(view[:n])
            done += n
    return done


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data):]


def _shown(url: str) -> str:
    """The URL without user:password, for messages and logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.username or parts.password:
        parts = parts._replace(netloc=(parts.hostname or "") + (f":{parts.port}" if parts.port else ""))
    return urllib.parse.urlunsplit(parts)


def sniff_format(head: bytes) -> str:
    return "qcow2" if head[:4] == QCOW2_MAGIC else "raw"
