"""Per-guest files on the node: a qcow2 overlay on the cached base image, the seed ISO, the console log.

Every path here is derived from a configured root and a checked guest name (trust.py), never taken from a
message. The roots are created by root and checked before each use (trust.secure_dir: no symlink, no
group/other write, owned by root): a directory a user made first (say /dev/shm/vtorque) is refused, not used.
A guest's files are root's, mode 0600 (libvirt gives them to the QEMU user while the guest runs), in a 0711
directory: nobody else can read a live overlay, a seed's user-data or a console.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vtorque.shared import image_leases as leases
from vtorque.shared.logs import log
from vtorque.shared.messages import domain_name
from vtorque.shared.user_files import copy_user_image

from . import root_files
from .domain import GuestDisks
from .trust import Refused, check_guest_name, is_safe_dir, own_entry, secure_dir

LOG = logging.getLogger("vtorque.node_worker.disks")
FILE_MODE = 0o600
DIR_MODE = 0o711  # QEMU runs as libvirt-qemu and must traverse to its disks, not list them
SMALL = 4096
SUBPROCESS_TIMEOUT = 120.0


class DiskError(Exception):
    pass


@dataclass(frozen=True)
class UserImage:
    """The owner's own image (spec key `disk`), to be copied in as its owner (shared/user_files.py)."""

    path: str
    uid: int
    gid: int
    home: str
    user_dirs: tuple[str, ...] = ()
    timeout: float = 600.0
    max_bytes: int = 1 << 40  # the site's [spec] max_disk: a copy is never bigger

    @property
    def format(self) -> str:
        # The format comes from the name, never from probing: a "raw" user file with a qcow2 header could
        # otherwise name any host file as its backing file.
        return "qcow2" if self.path.endswith(".qcow2") else "raw"


def guest_dir(root: str | Path, guest_name: str) -> Path:
    return Path(root) / check_guest_name(guest_name)


def prepare(root: str | Path, guest_name: str, job_id: str, base: Path, base_format: str,
            seed: dict[str, bytes], data_size_mib: int | None = None, user_image: UserImage | None = None,
            store: str | Path | None = None, node: str | None = None,
            memory_cap_mib: int | None = None) -> GuestDisks:
    """Create the guest's directory, overlay, seed and extra disk; on any failure nothing of it is left.
    `memory_cap_mib` (fs_type=ramdisk): the directory is a tmpfs of the guest's own of that size, so what the
    guest writes to its disks in node memory stops there (shared/spec.py ramdisk_mib: what the job was counted).
    Raises trust.Refused (an unsafe root, a bad name), UserFileRefused (the owner's image) or DiskError."""
    gdir = guest_dir(root, guest_name)
    secure_dir(root, DIR_MODE)
    if own_entry(Path(root), guest_name) is not None:
        if read_small(gdir, "job") not in (job_id, None):
            raise Refused(f"{gdir} belongs to another job: left alone")
        _remove_tree(gdir, store)  # a leftover of an earlier attempt at this guest
    try:
        os.mkdir(gdir, DIR_MODE)
    except FileExistsError:
        raise Refused(f"{gdir} exists and is not a guest directory of root's: refusing to use it") from None
    os.chmod(gdir, DIR_MODE)
    try:
        if memory_cap_mib:
            # Its own mount: nosuid, nodev, noexec; root's, 0711 as the directory it covers.
            _run(["mount", "-t", "tmpfs", "-o", f"size={memory_cap_mib}m,mode={DIR_MODE:o},uid=0,gid=0,"
                  "nosuid,nodev,noexec", "vtorque-guest", str(gdir)])
        _write_new(gdir / "job", job_id.encode())
        if node:
            _write_new(gdir / "node", node.encode())  # whose it is, on a shared test host
        overlay = gdir / "root.qcow2"
        if leases.take(base, gdir, job_id):  # the store never evicts a base image while an overlay uses it
            os.chmod(gdir / leases.MARKER, FILE_MODE)
        _run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", base_format, "-b", str(base), str(overlay)])
        seed_path = gdir / "seed.iso"
        write_seed_iso(seed, seed_path)
        console = gdir / "console.log"
        _write_new(console, b"")
        data, data_format = None, "qcow2"
        if data_size_mib:
            data = gdir / "data.qcow2"
            _run(["qemu-img", "create", "-q", "-f", "qcow2", str(data), f"{data_size_mib}M"])
        elif user_image:
            data_format = user_image.format
            data = gdir / f"data.{data_format}"
            fd = os.open(data, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
            try:
                copy_user_image("disk", user_image.path, data_format, user_image.uid, user_image.gid,
                                user_image.home, list(user_image.user_dirs), fd, timeout=user_image.timeout,
                                max_bytes=user_image.max_bytes)
            finally:
                os.close(fd)
        for path in (overlay, seed_path, data):
            if path is not None:
                os.chmod(path, FILE_MODE)
        return GuestDisks(overlay=str(overlay), seed=str(seed_path), console_log=str(console),
                          data=str(data) if data else None, data_format=data_format)
    except BaseException:
        _remove_tree(gdir, store)
        raise


def write_seed_iso(files: dict[str, bytes], dest: Path) -> None:
    """A NoCloud seed as cloud-localds makes it: ISO 9660, volume label cidata, Joliet + Rock Ridge."""
    with tempfile.TemporaryDirectory(prefix="vtorque-seed-") as tmp:  # 0700, root's
        for name, content in files.items():
            if "/" in name or name.startswith("."):
                raise DiskError(f"seed file name {name!r}")
            _write_new(Path(tmp) / name, content)
        _run(["genisoimage", "-quiet", "-output", str(dest), "-volid", "cidata", "-joliet", "-rock",
              *[str(Path(tmp) / name) for name in files]])


def remove(root: str | Path, guest_name: str, store: str | Path | None = None) -> bool:
    """Remove the guest's directory, when it is one root made in a root that is still safe; True if removed."""
    try:
        gdir = guest_dir(root, guest_name)
    except Refused:
        return False
    why = is_safe_dir(root)
    if why:
        if Path(root).exists():
            log(LOG, logging.WARNING, "guest root not used", root=str(root), reason=why)
        return False
    if own_entry(Path(root), guest_name) is None:
        return False
    _remove_tree(gdir, store)
    return True


def guest_dirs(root: str | Path) -> dict[str, Path]:
    """name → directory of every guest directory root made under `root`, when `root` is safe (else none)."""
    why = is_safe_dir(root)
    if why:
        if Path(root).exists():
            log(LOG, logging.WARNING, "guest root not used", root=str(root), reason=why)
        return {}
    found = {}
    for entry in os.scandir(root):
        if _valid_name(entry.name) and own_entry(Path(root), entry.name) is not None:
            found[entry.name] = Path(root) / entry.name
    return found


def read_small(gdir: Path, name: str) -> str | None:
    """A small file root wrote in a guest directory (job, node), never through a symlink; None otherwise."""
    data = root_files.read_small(gdir / name, SMALL)
    return None if data is None else data.decode(errors="replace")


def mtime_of(gdir: Path, name: str = "job") -> float | None:
    try:
        st = os.lstat(gdir / name)
    except OSError:
        return None
    return st.st_mtime if stat.S_ISREG(st.st_mode) and st.st_uid == 0 else None


def guests_of_job(root: str | Path, job_id: str) -> list[str]:
    """Guest directories on this node that belong to `job_id`, whether or not a domain exists for them.
    Only the names the job's guests can have are looked into (domain_name's prefix; its `job` file decides):
    a teardown reads its own guests' files, not every guest's on the node."""
    why = is_safe_dir(root)
    if why:
        return []
    prefix = domain_name(job_id, "", 0).removesuffix("-0")  # vt-<job>-
    found = []
    for entry in os.scandir(root):
        if entry.name.startswith(prefix) and _valid_name(entry.name) \
                and own_entry(Path(root), entry.name) is not None \
                and read_small(Path(root) / entry.name, "job") == job_id:
            found.append(entry.name)
    return sorted(found)


def release_lease(gdir: Path, store: str | Path | None = None) -> bool:
    """Drop the lease of the overlay in `gdir`, only for a marker root wrote that names this very guest's lease
    file: a marker naming anything else is left alone (never an unlink of a path some file says)."""
    marker = gdir / leases.MARKER
    text = read_small(gdir, leases.MARKER)
    if text is None:
        return False
    lease = Path(text.strip())
    if not leases.is_lease_of(lease, gdir, store or None):
        log(LOG, logging.WARNING, "lease marker names another file: left alone", guest_dir=str(gdir),
            named=text.strip()[:200])
        marker.unlink(missing_ok=True)
        return False
    existed = lease.exists()
    lease.unlink(missing_ok=True)
    marker.unlink(missing_ok=True)
    return existed


def _remove_tree(gdir: Path, store: str | Path | None) -> None:
    if not os.path.isdir(gdir) or os.path.islink(gdir):
        return
    release_lease(gdir, store)
    if os.path.ismount(gdir):
        # A ramdisk guest's own tmpfs: detached, its memory freed once QEMU (already gone, or going) lets go.
        subprocess.run(["umount", "--lazy", str(gdir)], capture_output=True, timeout=SUBPROCESS_TIMEOUT,
                       stdin=subprocess.DEVNULL)
    # shutil.rmtree walks by file descriptor (symlink-attack resistant); it never follows a link inside.
    assert shutil.rmtree.avoids_symlink_attacks
    shutil.rmtree(gdir, ignore_errors=True)


def _valid_name(name: str) -> bool:
    try:
        check_guest_name(name)
    except Refused:
        return False
    return True


def _write_new(path: Path, content: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    try:
        os.write(fd, content)
    finally:
        os.close(fd)


def _run(argv: list[str]) -> None:
    try:
        subprocess.run(argv, check=True, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, umask=0o077,
                       stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise DiskError(f"{argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise DiskError(f"{argv[0]} did not finish within {SUBPROCESS_TIMEOUT:.0f}s") from None
    except subprocess.CalledProcessError as exc:
        raise DiskError(f"{argv[0]} failed: {(exc.stderr or exc.stdout).strip()[:300]}") from None
