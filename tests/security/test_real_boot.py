"""The checks do not stop real work: an ordinary user's job boots a real guest (libvirt + QEMU) with her own
disk image, which QEMU gets only as root's private copy; her file keeps its owner, mode and bytes throughout.
Boots a guest: run under `flock /tmp/vtorque-e2e.lock`."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vtorque.shared import messages as m

from .conftest import file_state, make_site

pytestmark = [pytest.mark.slow, pytest.mark.guest]


@pytest.fixture
def guest_site(base_image, test_guest):
    s = make_site(base_image, entry=test_guest, boot_timeout=150.0)
    yield s
    for name in s.domains():
        s.worker.hv.remove(name)
    shutil.rmtree(s.root, ignore_errors=True)


def test_an_ordinary_users_guest_boots_with_her_disk_as_roots_private_copy(guest_site, users):
    site = guest_site
    a, _ = users
    img = a.home / "job-data.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "8M"], check=True)
    os.chown(img, a.uid, a.gid)
    img.chmod(0o600)
    before = file_state(img)
    j = "4242.sec"
    plan = site.plan(a, j, vcpus=1, ram_mib=192, disk=m.DataDisk(image=str(img)))
    try:
        answers = site.boot(j, plan)
        assert len(answers) == 1 and isinstance(answers[0], m.GuestReady), answers
        assert file_state(img) == before  # not chowned to libvirt-qemu, not relabelled, not written
        xml = ET.fromstring(site.worker.hv.xml(site.worker.hv.lookup(plan.name)))
        sources = {d.find("target").get("dev"): d.find("source").get("file") for d in xml.iter("disk")}
        gdir = Path(site.config.node.guest_dir) / plan.name
        assert sources["vdc"] == str(gdir / "data.qcow2")
        for path in gdir.iterdir():
            if path.is_file():
                assert stat.S_IMODE(path.stat().st_mode) == 0o600, path  # root's or QEMU's, nobody else's
    finally:
        site.worker.on_teardown_guests(m.TeardownGuests.new(job_id=j, deadline=60.0, node=site.node))
        for thread in site.worker.teardown_threads:  # the files follow the answer, in their own thread
            thread.join(60)
    assert isinstance(site.sent.sent[-1], m.GuestsTornDown) and site.sent.sent[-1].guests == [plan.name]
    assert not (Path(site.config.node.guest_dir) / plan.name).exists()
    assert file_state(img) == before


def test_a_ramdisk_guest_boots_on_a_tmpfs_of_its_own_sized_as_its_job_was_counted(base_image, test_guest, users):
    """fs_type=ramdisk: the guest's files are on a tmpfs of exactly ramdisk_mib (what the bridge counted against
    the job's memory), QEMU runs from it (under /dev/shm, as on a node: libvirt gives QEMU a /dev of its own and
    moves /dev/shm's mounts into it), and the teardown takes the mount with the files."""
    import uuid

    from vtorque.shared.spec import ramdisk_mib

    shm = Path(f"/dev/shm/vtorque-sec-{uuid.uuid4().hex[:8]}")
    site = make_site(base_image, entry=test_guest, boot_timeout=150.0, ramdisk_dir=str(shm / "guests"))
    a, _ = users
    j = "4243.sec"
    plan = site.plan(a, j, vcpus=1, ram_mib=192, fs_type="ramdisk", disk=m.DataDisk(size_mib=32))
    gdir = Path(site.config.node.ramdisk_dir) / plan.name
    mounts = lambda: [line.split() for line in Path("/proc/mounts").read_text().splitlines()]  # noqa: E731
    try:
        answers = site.boot(j, plan)
        assert len(answers) == 1 and isinstance(answers[0], m.GuestReady), answers
        (mount,) = [fields for fields in mounts() if fields[1] == str(gdir)]
        assert mount[2] == "tmpfs" and {"nosuid", "nodev", "noexec"} <= set(mount[3].split(","))
        st = os.statvfs(gdir)
        assert st.f_blocks * st.f_frsize == ramdisk_mib("ramdisk", 32, False, site.config.spec) << 20
        assert (gdir / "root.qcow2").exists() and (gdir / "data.qcow2").exists()
    finally:
        site.worker.on_teardown_guests(m.TeardownGuests.new(job_id=j, deadline=60.0, node=site.node))
        for thread in site.worker.teardown_threads:  # the files follow the answer, in their own thread
            thread.join(60)
        for name in site.domains():
            site.worker.hv.remove(name)
    assert site.sent.sent[-1].guests == [plan.name]
    assert not gdir.exists() and not any(fields[1] == str(gdir) for fields in mounts())
    shutil.rmtree(shm, ignore_errors=True)
    shutil.rmtree(site.root, ignore_errors=True)
