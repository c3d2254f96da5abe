"""Per-guest files on the node: a qcow2 overlay on the cached base image, the seed ISO, the console log."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from vtorque.services.image_stager import leases

from .domain import GuestDisks


class DiskError(Exception):
    pass


def guest_dir(root: str | Path, guest_name: str) -> Path:
    return Path(root) / guest_name


def prepare(root: str | Path, guest_name: str, job_id: str, base: Path, base_format: str,
            seed: dict[str, bytes], data_size_mib: int | None = None, data_image: str | None = None) -> GuestDisks:
    """Create the guest's directory, overlay, seed and extra disk; on any failure nothing of it is left.
    `data_image` must already be checked (shared/user_files.py): it is attached, never copied or probed."""
    gdir = guest_dir(root, guest_name)
    Path(root).mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o711)  # QEMU runs as libvirt-qemu and must traverse to its disks, not list them
    if gdir.exists():
        leases.release(gdir)
        shutil.rmtree(gdir)
    gdir.mkdir(mode=0o711)
    try:
        (gdir / "job").write_text(job_id)
        overlay = gdir / "root.qcow2"
        leases.take(base, gdir, job_id)  # the store never evicts a base image while an overlay uses it
        _run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", base_format, "-b", str(base), str(overlay)])
        seed_path = gdir / "seed.iso"
        write_seed_iso(seed, seed_path)
        console = gdir / "console.log"
        console.touch()
        data, data_format = None, "qcow2"
        if data_size_mib:
            data = gdir / "data.qcow2"
            _run(["qemu-img", "create", "-q", "-f", "qcow2", str(data), f"{data_size_mib}M"])
        elif data_image:
            # The format comes from the name, never from probing: a "raw" user file with a qcow2 header
            # could otherwise name any host file as its backing file.
            data, data_format = Path(data_image), ("qcow2" if data_image.endswith(".qcow2") else "raw")
        return GuestDisks(overlay=str(overlay), seed=str(seed_path), console_log=str(console),
                          data=str(data) if data else None, data_format=data_format)
    except BaseException:
        leases.release(gdir)
        shutil.rmtree(gdir, ignore_errors=True)
        raise


def write_seed_iso(files: dict[str, bytes], dest: Path) -> None:
    """A NoCloud seed as cloud-localds makes it: ISO 9660, volume label cidata, Joliet + Rock Ridge."""
    with tempfile.TemporaryDirectory(prefix="vtorque-seed-") as tmp:
        for name, content in files.items():
            (Path(tmp) / name).write_bytes(content)
        _run(["genisoimage", "-quiet", "-output", str(dest), "-volid", "cidata", "-joliet", "-rock",
              *[str(Path(tmp) / name) for name in files]])


def remove(root: str | Path, guest_name: str) -> bool:
    gdir = guest_dir(root, guest_name)
    if not gdir.exists():
        return False
    leases.release(gdir)
    shutil.rmtree(gdir, ignore_errors=True)
    return True


def guests_of_job(root: str | Path, job_id: str) -> list[str]:
    """Guest directories on this node that belong to `job_id`, whether or not a domain exists for them."""
    found = []
    for job_file in Path(root).glob("*/job"):
        try:
            if job_file.read_text() == job_id:
                found.append(job_file.parent.name)
        except OSError:
            continue
    return found


def _run(argv: list[str]) -> None:
    try:
        subprocess.run(argv, check=True, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise DiskError(f"{argv[0]} is not installed") from None
    except subprocess.CalledProcessError as exc:
        raise DiskError(f"{argv[0]} failed: {(exc.stderr or exc.stdout).strip()[:300]}") from None
