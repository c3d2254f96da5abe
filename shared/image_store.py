"""The content-addressed image store: <store>/sha256/<digest>, verified while copied, written atomically.

An image under sha256/ is complete and verified: copies go to tmp/ and are renamed in only after their digest
matched. Making the bytes durable (fsync) is not on the job's path: it runs in the background right after the
rename, and until it is done the image's meta says `durable: false` with this host's boot id. In this boot the
page cache holds exactly the verified bytes, so the image is good; after a crash and reboot it may not be, so
an image staged here and not yet durable in an earlier boot is not `has()` and is verified again before use.
So a crash at any point leaves either nothing usable or a complete verified image. The store is a directory
every stager (and every node worker) sees; all its coordination is in files, so it holds across threads,
processes and hosts sharing it:

    sha256/<digest>            verified images (the digest is the sha256 of the catalog's source bytes)
    meta/<digest>.json         how it was staged: source, formats, sizes, when, by whom
    tmp/                       partial copies: <digest>.part (+ .part.json: an http download to resume)
    locks/<digest>.lock        flock: exclusive to copy or evict an image, shared to take a lease on it
    used/<digest>              its mtime is when the image was last asked for or leased (LRU)
    wants/<digest>/<job>.<id>  requests waiting for the image; when none is left, a running copy stops
    cancelled/<job>            the scheduler deleted the job (written by JobDeleted; mtime = when)
    leases/<digest>/<holder>   one per guest overlay backed by the image (image_leases.py): never evicted then
    journal.jsonl              one line per copy, mismatch, failure, cancellation and eviction

Single-flight: the copier holds the digest's lock; everyone else polls for the finished image (or the lock)
and answers from the store, so N requests anywhere make one copy. Eviction takes the same lock without
waiting, and skips images with leases or waiting requests.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import fcntl
import json
import os
import re
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import image_fetch as fetch
from .image_fetch import FetchCancelled, FetchError

HOST = socket.gethostname().split(".")[0]
try:
    BOOT_ID = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
except OSError:
    BOOT_ID = ""
_durability = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-fsync")
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
TOMBSTONE_TTL = 7 * 24 * 3600.0


class StageError(Exception):
    pass


class StageCancelled(StageError):
    """Every request for the image went away (their jobs were deleted) before it was staged."""


@dataclass(frozen=True)
class StagedImage:
    digest: str
    path: Path
    bytes: int
    seconds: float
    cached: bool
    format: str | None = None
    converted: bool = False


@dataclass(frozen=True)
class ImageUsage:
    digest: str
    bytes: int
    last_used: float
    leases: int = 0
    wants: int = 0
    meta: dict = field(default_factory=dict, compare=False)


# -- pure ---------------------------------------------------------------------------------------------------

def parse_size(text: str | int | None) -> int | None:
    """'50G', '512MiB', '1.5T', 1048576 → bytes (binary units); None stays None."""
    if text is None or isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (e.g. 200G)")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def plan_eviction(images: Iterable[ImageUsage], budget: int, incoming: int = 0,
                  protect: Iterable[str] = ()) -> list[str]:
    """Least recently used first, until what stays plus `incoming` fits the budget. Images with a lease (a
    guest overlay is backed by them) or a waiting request, and `protect`ed ones, are never picked; if they
    alone exceed the budget, the store stays over it."""
    images = list(images)
    keep = set(protect)
    total = sum(i.bytes for i in images) + incoming
    victims = []
    for image in sorted(images, key=lambda i: (i.last_used, i.digest)):
        if total <= budget:
            break
        if image.leases or image.wants or image.digest in keep:
            continue
        victims.append(image.digest)
        total -= image.bytes
    return victims


def job_file_name(job_id: str) -> str:
    """A job id as one safe file name: "1.vm" → "1%2Evm" (as Config.job_dir escapes it)."""
    return re.sub(r"[^A-Za-z0-9_-]", lambda c: f"%{ord(c.group()):02X}", job_id) or "%"


# -- the store ----------------------------------------------------------------------------------------------

class ImageStore:
    def __init__(self, root: str | Path, budget: int | None = None, http_timeout: float = 30.0,
                 http_retries: int = 5):
        self.root = Path(root)
        self.budget = budget
        self._pending: list[concurrent.futures.Future] = []
        self.http_timeout, self.http_retries = http_timeout, http_retries

    def path(self, digest: str) -> Path:
        return self.root / "sha256" / digest

    def has(self, digest: str) -> bool:
        """The image is there, verified, and can be trusted (see `suspect`)."""
        return self.path(digest).is_file() and not self.suspect(digest)

    def suspect(self, digest: str) -> bool:
        """Staged on this host in an earlier boot and not yet durable then: a crash may have torn it."""
        meta = self.meta(digest)
        return meta.get("durable") is False and meta.get("host") == HOST and meta.get("boot_id") != BOOT_ID

    def meta(self, digest: str) -> dict:
        try:
            return json.loads((self.root / "meta" / f"{digest}.json").read_text())
        except (OSError, ValueError):
            return {}

    def _dirs(self) -> None:
        for sub in ("sha256", "meta", "tmp", "locks", "used", "wants", "cancelled", "leases"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # -- staging ----------------------------------------------------------------------------------------

    def stage(self, source: str | Path, digest: str, *, source_format: str | None = None,
              target_format: str | None = None, compress: bool = False, size_hint: int | None = None,
              progress: Callable[[int, int | None], None] | None = None,
              cancelled: Callable[[], bool] | None = None, job_id: str = "") -> StagedImage:
        """Make `digest` available in the store from `source` (a path, file:// or http(s) URL) unless it is
        there already. The sha256 of the source's bytes must be `digest`. With a `target_format` other than
        `source_format`, or `compress`, the verified bytes are converted with qemu-img before they go in.
        `cancelled()` is asked while waiting and while copying: True stops with StageCancelled."""
        started = time.monotonic()
        cancelled = cancelled or (lambda: False)
        self._dirs()
        final = self.path(digest)
        if self.has(digest):
            return self._hit(digest, started)
        lock = self._wait_for_lock(digest, cancelled)
        if lock is None:  # another stager finished it while we waited
            return self._hit(digest, started)
        try:
            if final.is_file() and (not self.suspect(digest) or self._verify_again(digest)):
                return self._hit(digest, started)
            if cancelled():
                raise StageCancelled(f"staging of {digest[:12]}… cancelled: no job needs it any more")
            if self.budget is not None:
                self.evict(self.budget, incoming=size_hint or _local_size(source), protect={digest})
            self._check_space(size_hint or _local_size(source))
            size, converted = self._copy_in(str(source), digest, source_format, target_format, compress,
                                            progress, cancelled, job_id)
        finally:
            _unlock(lock)
        seconds = time.monotonic() - started
        self.journal("copied", digest=digest, bytes=size, seconds=round(seconds, 3), source=_shown(source),
                     job_id=job_id, converted=converted)
        self.touch(digest)
        if self.budget is not None:
            self.evict(self.budget, protect={digest})
        return StagedImage(digest, final, final.stat().st_size, seconds, False, self.meta(digest).get("format"),
                           bool(converted))

    def _hit(self, digest: str, started: float) -> StagedImage:
        self.touch(digest)
        final = self.path(digest)
        meta = self.meta(digest)
        return StagedImage(digest, final, final.stat().st_size, time.monotonic() - started, True,
                           meta.get("format"), bool(meta.get("converted_from")))

    def _wait_for_lock(self, digest: str, cancelled: Callable[[], bool]):
        """The digest's exclusive lock, or None as soon as the image is there (someone else copied it)."""
        fh = open(self.root / "locks" / f"{digest}.lock", "a")
        delay = 0.01
        try:
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return fh
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                if self.has(digest):
                    fh.close()
                    return None
                if cancelled():
                    raise StageCancelled(f"staging of {digest[:12]}… cancelled: no job needs it any more")
                time.sleep(delay)
                delay = min(delay * 1.5, 0.2)
        except BaseException:
            fh.close()
            raise

    def _copy_in(self, source: str, digest: str, source_format: str | None, target_format: str | None,
                 compress: bool, progress, cancelled, job_id: str) -> tuple[int, str | None]:
        part = self.root / "tmp" / f"{digest}.part"
        converted_path = self.root / "tmp" / f"{digest}.convert"
        sidecar = part.with_name(part.name + ".json")
        progress = progress or (lambda done, total: None)
        keep_part = False
        try:
            try:
                if fetch.is_url(source):
                    size, got = fetch.download(source, part, timeout=self.http_timeout,
                                               retries=self.http_retries, progress=progress, cancelled=cancelled)
                else:
                    size, got = fetch.copy_local(fetch.local_path(source), part, progress=progress,
                                                 cancelled=cancelled)
            except FetchCancelled:
                self.journal("cancelled", digest=digest, source=_shown(source), job_id=job_id)
                raise StageCancelled(f"staging of {digest[:12]}… cancelled: no job needs it any more") from None
            except FetchError as exc:
                keep_part = fetch.is_url(source)  # an interrupted download resumes from here next time
                self.journal("failed", digest=digest, source=_shown(source), job_id=job_id, reason=str(exc))
                raise StageError(str(exc)) from None
            except OSError as exc:
                self.journal("failed", digest=digest, source=_shown(source), job_id=job_id, reason=str(exc))
                raise StageError(f"writing into the image store {self.root}: {exc.strerror or exc}") from None
            if got != digest:
                self.journal("mismatch", digest=digest, got=got, source=_shown(source), job_id=job_id)
                raise StageError(f"sha256 mismatch for {_shown(source)}: the catalog says {digest[:12]}…, "
                                 f"the file is {got[:12]}…; nothing was staged")
            source_format = source_format or ("qcow2" if _head(part) == fetch.QCOW2_MAGIC else "raw")
            target_format = target_format or source_format
            staged, converted_from = part, None
            if target_format != source_format or compress:
                _convert(part, converted_path, source_format, target_format, compress, cancelled)
                staged, converted_from = converted_path, source_format
            meta = {"digest": digest, "source": _shown(source), "format": target_format,
                    "source_format": source_format, "converted_from": converted_from, "compressed": compress,
                    "source_bytes": size, "bytes": staged.stat().st_size, "staged_at": time.time(),
                    "host": HOST, "pid": os.getpid(), "job_id": job_id, "durable": False, "boot_id": BOOT_ID}
            _write_atomic(self.root / "meta" / f"{digest}.json", json.dumps(meta, indent=1).encode(), 0o644)
            os.chmod(staged, 0o644)
            os.rename(staged, self.path(digest))
            self._pending.append(_durability.submit(self._make_durable, digest))
            return size, converted_from
        finally:
            if not keep_part:
                part.unlink(missing_ok=True)
                sidecar.unlink(missing_ok=True)
            converted_path.unlink(missing_ok=True)

    def _make_durable(self, digest: str) -> None:
        path = self.path(digest)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return  # evicted meanwhile
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(path.parent)
        meta = self.meta(digest)
        if meta.get("durable") is False:
            meta["durable"] = True
            _write_atomic(self.root / "meta" / f"{digest}.json", json.dumps(meta, indent=1).encode(), 0o644)
            _fsync_dir(self.root / "meta")

    def wait_durable(self, timeout: float | None = None) -> None:
        """Until the images this store object staged are on disk (tests, benchmarks, a clean shutdown)."""
        concurrent.futures.wait(self._pending, timeout=timeout)
        for future in self._pending:
            if future.done():
                future.result()
        self._pending = [f for f in self._pending if not f.done()]

    def _verify_again(self, digest: str) -> bool:
        """Hash a suspect image (see `suspect`) again: True and durable when it is whole, else it is removed."""
        size, got = fetch.hash_file(self.path(digest))
        if got == digest:
            self._make_durable(digest)
            self.journal("verified-again", digest=digest, bytes=size)
            return True
        self.path(digest).unlink(missing_ok=True)
        self.journal("torn", digest=digest, got=got)
        return False

    def _check_space(self, needed: int | None) -> None:
        if not needed:
            return
        st = os.statvfs(self.root)
        free = st.f_bavail * st.f_frsize
        if free < needed:
            raise StageError(f"image store {self.root} has {free / 2**30:.1f} GiB free, the image needs "
                             f"{needed / 2**30:.1f} GiB")

    def used_at(self, digest: str) -> float:
        """When a guest last used the image (its `used/` stamp's mtime, `touch`ed at each use); 0.0: never."""
        return _mtime(self.root / "used" / digest)

    def touch(self, digest: str) -> None:
        stamp = self.root / "used" / digest
        try:
            os.utime(stamp)
        except FileNotFoundError:
            with contextlib.suppress(OSError):
                stamp.touch()
        except OSError:
            pass

    # -- requests and cancellation ------------------------------------------------------------------------

    @contextlib.contextmanager
    def want(self, digest: str, job_id: str) -> Iterator[Path]:
        """Registers a request for `digest` for as long as the block runs (see `wanted`, `cancel_job`)."""
        self._dirs()
        wdir = self.root / "wants" / digest
        wdir.mkdir(exist_ok=True)
        path = wdir / f"{job_file_name(job_id)}.{uuid.uuid4().hex[:12]}"
        path.write_text(json.dumps({"job_id": job_id, "host": HOST, "pid": os.getpid(), "at": time.time()}))
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)

    def wanted(self, digest: str) -> bool:
        try:
            with os.scandir(self.root / "wants" / digest) as entries:
                return any(True for _ in entries)
        except FileNotFoundError:
            return False

    def cancel_job(self, job_id: str) -> list[str]:
        """The scheduler deleted the job: drop its requests everywhere (a copy nobody else wants then stops)
        and remember it, so a request of it that is still queued is not staged either."""
        self._dirs()
        name = job_file_name(job_id)
        _write_atomic(self.root / "cancelled" / name, job_id.encode(), 0o644)
        dropped = []
        for want in (self.root / "wants").glob(f"*/{name}.*"):
            want.unlink(missing_ok=True)
            dropped.append(want.parent.name)
        self._prune_tombstones()
        return sorted(set(dropped))

    def job_cancelled(self, job_id: str, asked_at: float) -> bool:
        """Was the job deleted after this request was made? (Torque reuses job ids after a fresh database,
        so only a deletion newer than the request counts.)"""
        try:
            return (self.root / "cancelled" / job_file_name(job_id)).stat().st_mtime >= asked_at
        except OSError:
            return False

    def _prune_tombstones(self) -> None:
        cutoff = time.time() - TOMBSTONE_TTL
        for stone in (self.root / "cancelled").iterdir():
            with contextlib.suppress(OSError):
                if stone.stat().st_mtime < cutoff:
                    stone.unlink()

    # -- usage and eviction -------------------------------------------------------------------------------

    def usage(self) -> list[ImageUsage]:
        images = []
        try:
            entries = list(os.scandir(self.root / "sha256"))
        except FileNotFoundError:
            return []
        for entry in entries:
            if not re.fullmatch(r"[0-9a-f]{64}", entry.name):
                continue
            try:
                info = entry.stat()
            except FileNotFoundError:
                continue
            digest = entry.name
            leases = self.live_leases(digest)
            used = self.used_at(digest) or info.st_mtime  # the image's own mtime: when staged
            last = max([used] + [_mtime(p) for p in leases])
            # Blocks, not the apparent size: a sparse raw image costs the store only its data.
            images.append(ImageUsage(digest, info.st_blocks * 512, last, len(leases), self._live_wants(digest),
                                     self.meta(digest)))
        return images

    def live_leases(self, digest: str) -> list[Path]:
        """Leases on the image; one of this host whose guest directory is gone is stale and removed here
        (its node worker died between making and removing the overlay). Other hosts' leases are trusted."""
        found = []
        ldir = self.root / "leases" / digest
        for lease in (ldir.iterdir() if ldir.is_dir() else ()):
            try:
                doc = json.loads(lease.read_text())
            except FileNotFoundError:
                continue
            except (OSError, ValueError):
                doc = {}
            if doc.get("host") == HOST and doc.get("guest_dir") and not Path(doc["guest_dir"]).exists():
                lease.unlink(missing_ok=True)
                continue
            found.append(lease)
        return found

    def _live_wants(self, digest: str) -> int:
        count = 0
        wdir = self.root / "wants" / digest
        for want in (wdir.iterdir() if wdir.is_dir() else ()):
            try:
                doc = json.loads(want.read_text())
            except (OSError, ValueError):
                continue
            if doc.get("host") == HOST and not _pid_alive(int(doc.get("pid", 0))):
                want.unlink(missing_ok=True)  # its stager died: nobody is waiting there any more
                continue
            count += 1
        return count

    def evict(self, budget: int, incoming: int | None = 0, protect: Iterable[str] = ()) -> list[str]:
        """Remove least recently used images until the store plus `incoming` bytes fits `budget`."""
        evicted = []
        for digest in plan_eviction(self.usage(), budget, incoming or 0, protect):
            fh = open(self.root / "locks" / f"{digest}.lock", "a")
            try:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # being copied, or a lease is being taken right now: not a victim
                if self.live_leases(digest) or self._live_wants(digest):
                    continue
                path = self.path(digest)
                try:
                    size = path.stat().st_size
                except FileNotFoundError:
                    continue
                path.unlink()
                (self.root / "meta" / f"{digest}.json").unlink(missing_ok=True)
                (self.root / "used" / digest).unlink(missing_ok=True)
                self.journal("evicted", digest=digest, bytes=size)
                evicted.append(digest)
            finally:
                fh.close()
        return evicted

    # -- the journal --------------------------------------------------------------------------------------

    def journal(self, event: str, **fields) -> None:
        """One JSON line per event; O_APPEND keeps concurrent writers' lines whole (local filesystems)."""
        line = json.dumps({"ts": round(time.time(), 3), "event": event, "host": HOST, "pid": os.getpid(),
                           **fields}) + "\n"
        fd = os.open(self.root / "journal.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def read_journal(self) -> list[dict]:
        try:
            lines = (self.root / "journal.jsonl").read_text().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def clean_tmp(self, max_age: float = 24 * 3600.0) -> int:
        """Remove temporary files nobody works on: conversions at once, partial downloads after `max_age`."""
        removed = 0
        tmp = self.root / "tmp"
        for path in (tmp.iterdir() if tmp.is_dir() else ()):
            digest = path.name.split(".", 1)[0]
            fh = open(self.root / "locks" / f"{digest}.lock", "a")
            try:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue
                resumable = path.name.endswith((".part", ".part.json"))
                if not resumable or time.time() - _mtime(path) > max_age:
                    path.unlink(missing_ok=True)
                    removed += 1
            finally:
                fh.close()
        return removed


# -- helpers ------------------------------------------------------------------------------------------------

def _unlock(fh) -> None:
    try:
        fcntl.flock(fh, fcntl.LOCK_UN)
    finally:
        fh.close()


def _convert(src: Path, dst: Path, source_format: str, target_format: str, compress: bool, cancelled) -> None:
    argv = ["qemu-img", "convert", "-q", "-f", source_format, "-O", target_format]
    if compress:
        if target_format != "qcow2":
            raise StageError("compression needs format qcow2")
        argv.append("-c")
    argv += [str(src), str(dst)]
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    except FileNotFoundError:
        raise StageError("qemu-img is not installed: cannot convert the image") from None
    while proc.poll() is None:
        if cancelled():
            proc.kill()
            proc.wait()
            raise StageCancelled("conversion cancelled: no job needs the image any more")
        time.sleep(0.05)
    if proc.returncode != 0:
        err = proc.stderr.read() if proc.stderr else ""  # stderr=PIPE
        raise StageError(f"qemu-img convert failed: {err.strip()[:300]}")


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    os.rename(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _head(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(4)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _local_size(source) -> int | None:
    if fetch.is_url(str(source)):
        return None
    try:
        return fetch.local_path(str(source)).stat().st_size
    except OSError:
        return None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _shown(source) -> str:
    return fetch._shown(str(source)) if fetch.is_url(str(source)) else str(source)

