"""The content-addressed image store: <store>/sha256/<digest>, verified while copied, written atomically.

A file under sha256/ is always complete and verified: copies go to tmp/ and are renamed in only after their
digest matched. A lock file per digest (flock, so it holds across stager processes and hosts sharing the
store) makes concurrent requests for one image produce a single copy.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

CHUNK = 4 * 1024 * 1024


class StageError(Exception):
    pass


@dataclass(frozen=True)
class StagedImage:
    digest: str
    path: Path
    bytes: int
    seconds: float
    cached: bool


class ImageStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, digest: str) -> Path:
        return self.root / "sha256" / digest

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def _dirs(self) -> None:
        for sub in ("sha256", "tmp", "locks"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def _locked(self, digest: str):
        with open(self.root / "locks" / f"{digest}.lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def stage(self, source: str | Path, digest: str) -> StagedImage:
        """Copy `source` into the store as `digest`, unless it is there already; verify the sha256."""
        started = time.monotonic()
        self._dirs()
        final = self.path(digest)
        if final.is_file():
            return StagedImage(digest, final, final.stat().st_size, time.monotonic() - started, True)
        with self._locked(digest):
            if final.is_file():  # another stager finished it while we waited for the lock
                return StagedImage(digest, final, final.stat().st_size, time.monotonic() - started, True)
            size = self._copy_verified(Path(source), digest, final)
        return StagedImage(digest, final, size, time.monotonic() - started, False)

    def _copy_verified(self, source: Path, digest: str, final: Path) -> int:
        tmp = self.root / "tmp" / f"{digest}.{os.getpid()}.part"
        h, size = hashlib.sha256(), 0
        try:
            try:
                src = open(source, "rb")
            except OSError as exc:
                raise StageError(f"cannot read {source}: {exc.strerror}") from None
            with src, open(tmp, "wb") as dst:
                while chunk := src.read(CHUNK):
                    h.update(chunk)
                    dst.write(chunk)
                    size += len(chunk)
                dst.flush()
                os.fsync(dst.fileno())
            if h.hexdigest() != digest:
                raise StageError(f"sha256 mismatch for {source}: catalog says {digest[:12]}…, "
                                 f"file is {h.hexdigest()[:12]}…")
            os.chmod(tmp, 0o644)
            os.rename(tmp, final)
            dir_fd = os.open(final.parent, os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
            return size
        finally:
            tmp.unlink(missing_ok=True)
