"""Leases: a guest overlay backed by a store image says so in the store, so eviction never removes that image.

The node worker calls `take` just before it makes a guest's overlay and, when it removes the guest's directory,
unlinks the lease its marker names only if `is_lease_of` says it is that guest's own
(services/node_worker/disks.py). A lease is a file <store>/leases/<digest>/<host>--<guest dir> holding JSON
{host, guest_dir, job_id, at}; the guest directory keeps the lease's path in `.image-lease`, so releasing needs
nothing but that directory. Taking holds the digest's lock shared (eviction takes it
exclusive, without waiting), and checks the image is still there under it: a lease never points at an image
that eviction already decided to remove.

Why files and not a scan of the node's guest directories: a store shared by many nodes is evicted by a stager
that cannot see their (node-local) guest directories. A node that dies leaves its leases behind; they keep the
image (safe) until that node's worker removes the guest directory, or a stager on that host finds the
directory gone (ImageStore.live_leases).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import time
from pathlib import Path

from .image_store import HOST

MARKER = ".image-lease"
LEASES = "leases"  # <store>/leases/<digest>/<lease_name>
LOCK_WAIT = 30.0
_DIGEST = re.compile(r"[0-9a-f]{64}")


class LeaseError(OSError):
    """The image left the store before the lease was taken (evicted): the boot is retried, staging again."""


def store_of(base: Path) -> tuple[Path, str] | None:
    """(store root, digest) when `base` is an image of a vtorque store (<root>/sha256/<digest>), else None."""
    base = Path(base)
    if base.parent.name != "sha256" or not _DIGEST.fullmatch(base.name):
        return None
    return base.parent.parent, base.name


def lease_name(guest_dir: Path) -> str:
    return f"{HOST}--" + re.sub(r"[^A-Za-z0-9_.-]", "_", str(Path(guest_dir).resolve()).strip("/"))


def is_lease_of(lease: Path, guest_dir: Path, store: str | Path | None = None) -> bool:
    """Whether `lease` (the path a guest directory's marker names) is that guest's own lease file, as `take` made
    it: <store>/leases/<digest>/<lease_name(guest_dir)>, absolute and normal, in `store` when given. Releasing
    unlinks nothing else: never a path some file says."""
    lease = Path(lease)
    return (lease.is_absolute() and os.path.normpath(str(lease)) == str(lease)
            and lease.name == lease_name(guest_dir) and _DIGEST.fullmatch(lease.parent.name) is not None
            and lease.parent.parent.name == LEASES
            and (store is None or lease.parent.parent == Path(store).resolve() / LEASES))


def take(base: Path, guest_dir: Path, job_id: str = "") -> Path | None:
    """Lease `base` for the overlay in `guest_dir`; None when `base` is not a store image (nothing to hold)."""
    found = store_of(base)
    if found is None:
        return None
    root, digest = found
    ldir = root / LEASES / digest
    ldir.mkdir(parents=True, exist_ok=True)
    (root / "locks").mkdir(parents=True, exist_ok=True)
    lease = ldir / lease_name(guest_dir)
    with open(root / "locks" / f"{digest}.lock", "a") as lock:
        _lock_shared(lock, digest)
        tmp = ldir / f".{lease.name}.{os.getpid()}"
        tmp.write_text(json.dumps({"host": HOST, "guest_dir": str(Path(guest_dir).resolve()), "job_id": job_id,
                                   "at": time.time()}))
        os.rename(tmp, lease)
        if not Path(base).is_file():
            lease.unlink(missing_ok=True)
            raise LeaseError(errno.ENOENT, f"image {digest[:12]}… was evicted from the store before its "
                                           f"overlay was made; staging it again")
    try:
        os.utime(root / "used" / digest)
    except OSError:
        pass
    (Path(guest_dir) / MARKER).write_text(str(lease))
    return lease


def _lock_shared(lock, digest: str) -> None:
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        if time.monotonic() > deadline:
            raise LeaseError(errno.EAGAIN, f"image {digest[:12]}… stayed locked for {LOCK_WAIT:.0f}s")
        time.sleep(0.02)
