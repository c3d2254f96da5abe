"""Warm start's pure parts: the save file's header patch, the restored guest's XML, the shape key, which guests may
be restored, where warm images are trusted from, and the choice between restore and cold boot."""

import json
import os
import struct
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import msgspec
import pytest

from vtorque.services.node_worker import save_image, warm, warm_boot
from vtorque.services.node_worker.domain import (
    IDENTITY_CHANNEL,
    IDENTITY_SOCKET,
    BootSource,
    GuestDisks,
    GuestMetadata,
    domain_xml,
    parse_metadata,
)
from vtorque.shared import messages as m

BOOT = BootSource("/k/vmlinux", "/k/initrd.img")
GUEST = m.GuestPlan(name="vt-7_srv-n1-0", node="n1", index=0, image="tiny", image_digest="a" * 64, vcpus=2,
                    ram_mib=256, cores=[3, 5], owner=m.Owner(user="bob", uid=1001, gid=1002),
                    ssh_authorized_keys=["ssh-ed25519 AAAAkey bob"])


def disks_in(d: str) -> GuestDisks:
    return GuestDisks(overlay=f"{d}/root.qcow2", seed=f"{d}/seed.iso", console_log=f"{d}/console.log")


ENTRY = msgspec.convert({"source": "/i", "sha256": "a" * 64, "kernel": "/k/vmlinux"}, warm.ImageEntry)
META = GuestMetadata(job_id="7.srv", owner="bob", deadline=datetime(2030, 1, 1, tzinfo=UTC), index=0, node="n1")


# -- the save file --------------------------------------------------------------------------------------------

def save_file(xml: str, cookie: bytes = b"<cookie/>\n", data_len: int = 4004, stream: bytes = b"QEVM" * 1000
              ) -> bytes:
    body = xml.encode() + b"\0" + cookie + b"\0"
    head = struct.pack("=16s5I14I", b"LibvirtQemudSave", 2, data_len, 1, 0, len(xml) + 1, *[0] * 14)
    return head + body + b"\0" * (data_len - len(body)) + stream


def test_header_parsed_as_libvirt_writes_it():
    header = save_image.parse(save_file("<domain><name>a</name></domain>"))
    assert (header.version, header.data_len, header.was_running) == (2, 4004, 1)
    assert header.xml == "<domain><name>a</name></domain>" and header.cookie == b"<cookie/>\n"
    assert header.stream_offset == 92 + 4004


@pytest.mark.parametrize("bad", [b"LibvirtQemudPart" + b"\0" * 200, b"short", b"x" * 300])
def test_not_a_complete_save_file_is_refused(bad):
    with pytest.raises(save_image.SaveImageError):
        save_image.parse(bad)


def test_copy_carries_the_new_xml_and_the_stream_untouched(tmp_path):
    stream = os.urandom(200_000)
    src, dest = tmp_path / "warm.save", tmp_path / "copy.save"
    src.write_bytes(save_file("<domain><name>vt-warm-x</name></domain>", stream=stream))
    save_image.copy_with_xml(src, dest, "<domain><name>vt-job-n1-0</name></domain>")
    copy = save_image.read_header(dest)
    assert copy.xml == "<domain><name>vt-job-n1-0</name></domain>" and copy.cookie == b"<cookie/>\n"
    assert copy.data_len == 4004  # it fit: the stream starts where it did
    assert dest.read_bytes()[copy.stream_offset:] == stream
    assert dest.stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):  # never over a file that is there (O_EXCL)
        save_image.copy_with_xml(src, dest, "<domain/>")


def test_a_longer_xml_grows_the_header_by_pages(tmp_path):
    stream = b"STREAM" * 10
    src, dest = tmp_path / "warm.save", tmp_path / "copy.save"
    src.write_bytes(save_file("<domain/>", stream=stream))
    long = "<domain>" + "x" * 9000 + "</domain>"
    save_image.copy_with_xml(src, dest, long)
    copy = save_image.read_header(dest)
    assert copy.xml == long and copy.cookie == b"<cookie/>\n"
    assert copy.data_len == 4004 + 2 * 4096
    assert dest.read_bytes()[copy.stream_offset:] == stream


# -- the restored guest's XML ---------------------------------------------------------------------------------

SAVED_DIR = "/g/vt-warm-0a1c31e8a0789326"


def saved_xml() -> str:
    """What libvirt keeps in the header of a warm build's save (shape only, no metadata), abridged."""
    plan = warm.warm_plan("vt-warm-0a1c31e8a0789326", "tiny", ENTRY, "n1", 2, 256)
    xml = warm.without_metadata(domain_xml(plan, disks_in(SAVED_DIR), BOOT, META, identity_channel=True))
    root = ET.fromstring(xml)
    ET.SubElement(root, "uuid").text = "3414f947-3900-4f71-b2ca-c263920cd514"
    root.find("genid").text = "eb1e1cf5-647b-402f-95a4-6bb1408dc7ad"
    return ET.tostring(root, encoding="unicode")


def test_restored_xml_is_the_new_guests_own():
    gdir = "/var/lib/vtorque/guests/vt-7_srv-n1-0"
    fresh = domain_xml(GUEST, disks_in(gdir), BOOT, META, identity_channel=True)
    xml = warm_boot.restore_xml(saved_xml(), fresh, SAVED_DIR, gdir)
    root = ET.fromstring(xml)
    assert root.findtext("name") == GUEST.name
    assert root.findtext("uuid") not in ("", "3414f947-3900-4f71-b2ca-c263920cd514")
    assert root.findtext("genid") not in ("", "eb1e1cf5-647b-402f-95a4-6bb1408dc7ad")
    assert parse_metadata(xml)["job"] == "7.srv" and parse_metadata(xml)["owner"] == "bob"
    assert [(p.get("vcpu"), p.get("cpuset")) for p in root.iter("vcpupin")] == [("0", "3"), ("1", "5")]
    assert SAVED_DIR not in xml
    assert [d.find("source").get("file") for d in root.iter("disk")] == [f"{gdir}/root.qcow2", f"{gdir}/seed.iso"]
    assert root.find("devices/serial/source").get("path") == f"{gdir}/console.log"
    channel = root.find("devices/channel")
    assert channel.find("source").get("path") == f"{gdir}/{IDENTITY_SOCKET}"
    assert channel.find("target").get("name") == IDENTITY_CHANNEL
    assert any(f"addr.path={gdir}/link.sock" in a.get("value") for a in root.iter(f"{{{warm_boot.QEMU_NS}}}arg"))
    # Two restores of one save: two uuids.
    again = ET.fromstring(warm_boot.restore_xml(saved_xml(), fresh, SAVED_DIR, gdir))
    assert again.findtext("uuid") != root.findtext("uuid")


def test_a_path_that_cannot_be_moved_refuses_the_restore():
    # QEMU's option syntax doubles a comma: a directory with one appears in the saved XML in two spellings.
    plan = warm.warm_plan("vt-warm-x", "tiny", ENTRY, "n1", 2, 256)
    saved = warm.without_metadata(domain_xml(plan, disks_in("/g/vt,warm"), BOOT, META, identity_channel=True))
    gdir = "/g/vt-7_srv-n1-0"
    fresh = domain_xml(GUEST, disks_in(gdir), BOOT, META, identity_channel=True)
    with pytest.raises(warm_boot.RestoreFailed):
        warm_boot.restore_xml(saved, fresh, "/g/vt,warm", gdir)


def test_identity_carries_the_seed_env_clock_and_fresh_random():
    seed = {"vtorque.env": b"VT_USER=bob\n"}
    one, two = warm_boot.identity_env(seed, 1_700_000_000), warm_boot.identity_env(seed, 1_700_000_000)
    assert one.startswith(b"VT_USER=bob\nVT_CLOCK=1700000000\nVT_RANDOM=")
    assert one != two  # 32 fresh random bytes each time


# -- the shape key and who may be restored -------------------------------------------------------------------

def test_shape_key_ignores_who_and_where_and_names_the_devices():
    key = warm.shape_key(GUEST, BOOT, "qemu")
    other_job = msgspec.structs.replace(GUEST, name="vt-9-n2-1", node="n2", index=1, cores=[0, 1],
                                        owner=m.Owner(user="eve", uid=1666, gid=1666), ssh_authorized_keys=["k"],
                                        end_by=datetime(2031, 1, 1, tzinfo=UTC))
    assert warm.shape_key(other_job, BOOT, "qemu") == key
    for changed in (msgspec.structs.replace(GUEST, vcpus=1), msgspec.structs.replace(GUEST, ram_mib=512),
                    msgspec.structs.replace(GUEST, image_digest="b" * 64)):
        assert warm.shape_key(changed, BOOT, "qemu") != key
    assert warm.shape_key(GUEST, BOOT, "kvm") != key
    assert warm.shape_key(GUEST, BootSource("/k/vmlinux", "/k/other-initrd"), "qemu") != key


@pytest.mark.parametrize("change, why", [
    ({"disk": m.DataDisk(size_mib=100)}, "data disk"),
    ({"vrdma": True}, "vRDMA"),
    ({"iocm_max_cores": 2, "iocm_min_cores": 1, "io_cores": [1, 2]}, "IOcm"),
    ({"fs_type": "ramdisk"}, "ramdisk"),
    ({"distro": "osv"}, "OSv"),
    ({"user_metadata": {"timezone": "Europe/Vienna"}}, "cloud-init keys"),
])
def test_guests_a_warm_image_cannot_be(change, why):
    assert why in warm.why_not_warm(msgspec.structs.replace(GUEST, **change))
    assert warm.why_not_warm(GUEST) is None


def test_the_identity_free_seed_names_no_user_and_one_host_key_type():
    import json

    seed = warm.identity_free_seed("vt-warm-x")
    assert seed["vtorque.env"] == b"VT_WARM=1\n"
    assert json.loads(seed["meta-data"]) == {"instance-id": "vt-warm-x"}
    head, body = seed["user-data"].split(b"\n", 1)
    assert head == b"#cloud-config" and json.loads(body) == {"users": [], "ssh_genkeytypes": ["ed25519"]}


def test_only_a_warm_guest_has_the_channel_and_a_generation_id():
    cold = ET.fromstring(domain_xml(GUEST, disks_in("/g/x"), BOOT, META))
    assert cold.find("genid") is None and cold.find("devices/channel") is None
    hot = ET.fromstring(domain_xml(GUEST, disks_in("/g/x"), BOOT, META, identity_channel=True))
    assert hot.find("genid") is not None and hot.find("devices/channel").get("type") == "unix"


# -- where warm images are trusted from -------------------------------------------------------------------------

class Store:
    def __init__(self, digests):
        self.digests, self.root = set(digests), Path("/store")

    def has(self, digest):
        return digest in self.digests


def make_image(root: Path, digest: str, key: str, mode: int = 0o600) -> Path:
    root.mkdir(mode=0o700, exist_ok=True)
    d = root / f"{digest[:16]}-{key}"
    d.mkdir(mode=0o700)
    for name in (warm.SAVE_FILE, warm.OVERLAY):
        (d / name).write_bytes(b"x")
        (d / name).chmod(mode)
    (d / warm.META).write_text(json.dumps({"format": warm.FORMAT, "digest": digest, "key": key,
                                           "saved_dir": "/g/vt-warm-k"}))
    (d / warm.META).chmod(0o600)
    return d


@pytest.fixture
def warm_config(tmp_path):
    if os.geteuid() != 0:
        pytest.fail("warm images are root's: these tests run as root, as the node worker does")
    root = tmp_path / "warm"
    tmp_path.chmod(0o711)
    return SimpleNamespace(node=SimpleNamespace(warm_dir=str(root)), state_dir=str(tmp_path)), root


def test_a_warm_image_is_found_only_when_whole_root_only_and_its_base_still_staged(warm_config):
    config, root = warm_config
    d = make_image(root, "a" * 64, "k1")
    assert warm.find(config, Store(["a" * 64]), "a" * 64, "k1").dir == d
    assert warm.find(config, Store(["a" * 64]), "a" * 64, "k2") is None  # another shape
    (d / warm.SAVE_FILE).chmod(0o644)  # readable by others: not a warm image of root's alone
    assert warm.find(config, Store(["a" * 64]), "a" * 64, "k1") is None
    (d / warm.SAVE_FILE).chmod(0o600)
    # Its base image evicted: the warm image goes with it.
    assert warm.find(config, Store([]), "a" * 64, "k1") is None
    assert not d.exists()


def test_a_warm_root_others_may_write_is_never_read(warm_config):
    config, root = warm_config
    make_image(root, "a" * 64, "k1")
    root.chmod(0o777)
    assert warm.find(config, Store(["a" * 64]), "a" * 64, "k1") is None
    assert warm.listing(config) == []


def test_sweep_removes_the_warm_images_of_evicted_and_uncatalogued_images(warm_config):
    config, root = warm_config
    make_image(root, "a" * 64, "k1")
    make_image(root, "b" * 64, "k1")
    make_image(root, "c" * 64, "k1")
    gone = warm.sweep(config, Store(["a" * 64, "b" * 64]), keep_digests={"a" * 64, "c" * 64})
    assert sorted(gone) == sorted([f"{'b' * 16}-k1", f"{'c' * 16}-k1"])
    assert [i.digest for i in warm.listing(config)] == ["a" * 64]


# -- restore or cold boot ----------------------------------------------------------------------------------------

class Span:
    def __init__(self):
        self.attributes = {}

    def set_attributes(self, attrs):
        self.attributes.update(attrs)


@pytest.fixture
def span(monkeypatch):
    recorded = Span()
    monkeypatch.setattr(warm_boot.trace, "get_current_span", lambda: recorded)
    return recorded


def worker(catalog=None, booting=()):
    return SimpleNamespace(domain_type="qemu", config=SimpleNamespace(images=SimpleNamespace(catalog=catalog or {})),
                           store=None, node="n1", hv=None, booting_now=lambda: set(booting))


CMD = SimpleNamespace(job_id="7.srv", deadline=datetime(2030, 1, 1, tzinfo=UTC), peers=[], network=None)


def test_no_warm_image_boots_cold_and_says_why(monkeypatch, span):
    monkeypatch.setattr(warm, "find", lambda *_a: None)
    assert warm_boot.try_restore(worker(), CMD, GUEST, ENTRY, Path("/b"), None, 1e9, 0.0) is None
    assert span.attributes[warm_boot.PATH] == "cold"
    assert "no warm image of tiny" in span.attributes[warm_boot.WHY]


def test_a_guest_no_warm_image_can_be_is_not_looked_up(monkeypatch, span):
    monkeypatch.setattr(warm, "find", lambda *_a: pytest.fail("looked up"))
    guest = msgspec.structs.replace(GUEST, vrdma=True)
    assert warm_boot.try_restore(worker(), CMD, guest, ENTRY, Path("/b"), None, 1e9, 0.0) is None
    assert span.attributes == {warm_boot.PATH: "cold", warm_boot.WHY: "the guest has vRDMA"}


def test_a_failed_restore_falls_back_to_cold_and_says_why(monkeypatch, span):
    image = warm.WarmImage(dir=Path("/w/aaaa-k"), key="k", digest="a" * 64, saved_dir="/g/x", meta={})
    monkeypatch.setattr(warm, "find", lambda *_a: image)

    def broken(*_a):
        raise warm_boot.RestoreFailed("libvirt said no")

    monkeypatch.setattr(warm_boot, "_restore", broken)
    assert warm_boot.try_restore(worker(), CMD, GUEST, ENTRY, Path("/b"), None, 1e9, 0.0) is None
    assert span.attributes[warm_boot.PATH] == "cold"
    assert "aaaa-k failed: libvirt said no" in span.attributes[warm_boot.WHY]


def test_a_restore_that_worked_is_the_guest(monkeypatch, span):
    image = warm.WarmImage(dir=Path("/w/aaaa-k"), key="k", digest="a" * 64, saved_dir="/g/x", meta={})
    monkeypatch.setattr(warm, "find", lambda *_a: image)
    timings = m.PhaseTimings(image=0, disks=0.1, define=0.2, start=1.0, kernel_up=None, ready=1.5)
    monkeypatch.setattr(warm_boot, "_restore", lambda *_a: (timings, Path("/g/ssh.sock")))
    assert warm_boot.try_restore(worker(), CMD, GUEST, ENTRY, Path("/b"), None, 1e9, 0.0) == (
        timings, Path("/g/ssh.sock"))
    assert span.attributes[warm_boot.PATH] == "warm"


def test_a_new_digest_of_a_kept_warm_image_is_made_on_demand_once_the_node_is_idle(monkeypatch, span):
    old = warm.WarmImage(dir=Path("/w/old"), key="k-old", digest="0" * 64, saved_dir="/g/x", meta={"image": "tiny"})
    monkeypatch.setattr(warm, "find", lambda *_a: None)
    monkeypatch.setattr(warm, "listing", lambda _c: [old])
    removed, built = [], []
    monkeypatch.setattr(warm, "remove", removed.append)
    monkeypatch.setattr(warm_boot, "IDLE_POLL", 0.01)
    booting = {"vt-7_srv-n1-0"}
    w = worker({"tiny": ENTRY}, booting)
    w.booting_now = lambda: set(booting)

    def build(_config, _hv, _store, image, vcpus, ram_mib, _domain_type):
        assert not booting  # never beside a boot
        built.append((image, vcpus, ram_mib))

    monkeypatch.setattr(warm, "build", build)
    guest = msgspec.structs.replace(GUEST, vcpus=1)
    assert warm_boot.try_restore(w, CMD, guest, ENTRY, Path("/b"), None, 1e9, 0.0) is None
    [thread] = [t for t in __import__("threading").enumerate() if t.name.startswith("warm-")]
    booting.clear()
    thread.join(5)
    assert built == [("tiny", 1, 256)] and removed == [old.dir]


def test_no_warm_image_is_made_for_an_image_the_operator_keeps_none_of(monkeypatch, span):
    monkeypatch.setattr(warm, "find", lambda *_a: None)
    monkeypatch.setattr(warm, "listing", lambda _c: [])
    monkeypatch.setattr(warm, "build", lambda *_a: pytest.fail("built"))
    key = warm.shape_key(GUEST, BOOT, "qemu")
    assert warm_boot.rebuild_later(worker({"tiny": ENTRY}), GUEST, key) is None
