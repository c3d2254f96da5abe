"""Finding 11: `fs_type=ramdisk` writes landed in host RAM charged to no job and capped by nothing. Now each
ramdisk guest's directory is a tmpfs of its own, as large as what the bridge counted against the job's memory
(shared/spec.py ramdisk_mib: root disk growth up to [spec] ramdisk_root_max, plus the data disk): a guest that
writes more gets ENOSPC on its own disks and nothing else on the node is touched; removal frees it.

Driven through the node worker's own disks.prepare/remove on a real tmpfs (root), as a boot and a teardown do."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from vtorque.services.node_worker import disks
from vtorque.shared.config import SpecConfig
from vtorque.shared.messages import domain_name
from vtorque.shared.spec import ramdisk_mib

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")


def mounted(path: Path) -> bool:
    return any(line.split()[1] == str(path) for line in Path("/proc/mounts").read_text().splitlines())


def test_a_ramdisk_guest_cannot_write_past_what_its_job_was_counted_and_removal_frees_it(site):
    root = Path(site.config.node.ramdisk_dir)
    name = domain_name("88", site.node, 0)
    cap = ramdisk_mib("ramdisk", 8, False, SpecConfig(ramdisk_root_max="16M"))
    assert cap == 24
    files = disks.prepare(root, name, "88", _base(site), "raw", {"meta-data": b"{}\n"}, data_size_mib=8,
                          store=site.config.images.store, node=site.node, memory_cap_mib=cap)
    gdir = Path(files.overlay).parent
    try:
        assert mounted(gdir)
        st = os.statvfs(gdir)
        assert st.f_blocks * st.f_frsize == cap << 20  # the tmpfs is exactly what was counted
        assert (os.stat(gdir).st_uid, oct(os.stat(gdir).st_mode & 0o777)) == (0, oct(disks.DIR_MODE))
        # What QEMU would write for the guest (its overlay growing): stops at the cap with ENOSPC.
        with pytest.raises(OSError) as full:
            with open(gdir / "root.qcow2", "ab") as overlay:
                for _ in range(cap + 8):
                    overlay.write(b"\1" * (1 << 20))
                    overlay.flush()
        assert full.value.errno == errno.ENOSPC
    finally:
        assert disks.remove(root, name, site.config.images.store)
    assert not mounted(gdir) and not gdir.exists()


def test_a_failed_prepare_leaves_no_mount(site):
    root = Path(site.config.node.ramdisk_dir)
    name = domain_name("89", site.node, 0)
    with pytest.raises(disks.DiskError):
        # qemu-img fails (no base image) after the mount: the mount goes with the rest
        disks.prepare(root, name, "89", Path("/nonexistent/base.raw"), "raw", {"meta-data": b"{}\n"},
                      store=site.config.images.store, node=site.node, memory_cap_mib=16)
    assert not mounted(root / name) and not (root / name).exists()


def _base(site) -> Path:
    """The site's staged base image (conftest: a 1 MiB raw file in the store)."""
    return next(p for p in Path(site.config.images.store).rglob("*") if p.is_file() and p.stat().st_size == 1 << 20)
