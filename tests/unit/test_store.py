"""The image store's pure parts: sizes, the eviction plan, progress reports, HTTP ranges, the catalog file."""

import tomllib

import msgspec
import pytest

from vtorque.services.image_stager.service import ProgressMeter
from vtorque.shared.config import ImageEntry
from vtorque.shared.image_catalog import facts_from_qemu_img, guess_distro, render_catalog, toml_value
from vtorque.shared.image_fetch import parse_content_range, retry_delay, sniff_format
from vtorque.shared.image_store import ImageUsage, job_file_name, parse_size, plan_eviction

G = 2**30


def usage(digest, gib, last_used, leases=0, wants=0):
    return ImageUsage(digest=digest, bytes=int(gib * G), last_used=last_used, leases=leases, wants=wants)


@pytest.mark.parametrize("text,expected", [
    ("200G", 200 * G), ("512M", 512 * 2**20), ("512MiB", 512 * 2**20), ("1.5T", int(1.5 * 2**40)),
    ("4096", 4096), ("10k", 10240), (None, None), (123, 123),
])
def test_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "G", "12X", "-1G", "1 2G"])
def test_bad_sizes_say_so(text):
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def test_eviction_takes_least_recently_used_first_until_it_fits():
    images = [usage("new", 4, 300), usage("old", 4, 100), usage("mid", 4, 200)]
    assert plan_eviction(images, budget=12 * G) == []
    assert plan_eviction(images, budget=10 * G) == ["old"]
    assert plan_eviction(images, budget=5 * G) == ["old", "mid"]


def test_eviction_makes_room_for_the_incoming_image():
    images = [usage("a", 4, 100), usage("b", 4, 200)]
    assert plan_eviction(images, budget=10 * G, incoming=3 * G) == ["a"]


def test_leased_wanted_and_protected_images_are_never_evicted():
    images = [usage("leased", 4, 1, leases=1), usage("wanted", 4, 2, wants=1), usage("mine", 4, 3),
              usage("free", 4, 4)]
    assert plan_eviction(images, budget=1 * G, protect={"mine"}) == ["free"]


def test_over_budget_with_nothing_evictable_evicts_nothing():
    assert plan_eviction([usage("a", 8, 1, leases=2)], budget=1 * G) == []


def test_job_ids_become_safe_file_names():
    assert job_file_name("1.vm") == "1%2Evm"
    assert job_file_name("../x") == "%2E%2E%2Fx"
    assert job_file_name("") == "%"


def test_progress_is_reported_at_most_once_per_interval_with_the_recent_rate():
    now = [0.0]
    meter = ProgressMeter(1.0, clock=lambda: now[0])
    assert meter.update(0, 100) is None
    now[0] = 0.5
    assert meter.update(10, 100) is None
    now[0] = 1.0
    assert meter.update(20, 100) == (20, 100, 20.0)
    now[0] = 3.0
    assert meter.update(60, 100) == (60, 100, 20.0)
    now[0] = 3.1
    assert meter.update(100, 100, final=True) == (100, 100, pytest.approx(400.0))


@pytest.mark.parametrize("value,expected", [
    ("bytes 100-199/1000", (100, 199, 1000)), ("bytes 0-0/*", (0, 0, None)), (None, None), ("items 1-2/3", None),
])
def test_content_range(value, expected):
    assert parse_content_range(value) == expected


def test_retries_back_off_and_are_capped():
    assert [retry_delay(n) for n in (1, 2, 3)] == [0.2, 0.4, 0.8]
    assert retry_delay(20) == 5.0


def test_format_sniffing():
    assert sniff_format(b"QFI\xfb\x00\x00\x00\x03") == "qcow2"
    assert sniff_format(b"\xeb\x63\x90") == "raw"


def test_catalog_file_round_trips_through_toml():
    entries = {
        "deb": ImageEntry(source="https://example.org/debian-12.qcow2", sha256="a" * 64, distro="debian",
                          size=123),
        "raw-q": ImageEntry(source='/srv/img "quoted" \\ name.raw', sha256="b" * 64, format="qcow2",
                            source_format="raw", compress=True, cmdline="console=ttyS0 root=/dev/vda"),
    }
    text = render_catalog(entries)
    data = tomllib.loads(text)
    back = {name: msgspec.convert(e, ImageEntry) for name, e in data["images"]["catalog"].items()}
    assert back == entries
    assert "kernel" not in text and "compress = true" in text  # defaults are left out


def test_toml_values():
    assert toml_value(True) == "true"
    assert toml_value(7) == "7"
    text = "tab\tnl\né"
    assert tomllib.loads("x = " + toml_value(text))["x"] == text


@pytest.mark.parametrize("names,expected", [
    (("debian-12-genericcloud-amd64.qcow2",), "debian"),
    (("jammy-server-cloudimg-amd64.img",), "ubuntu"),
    (("CentOS-Stream-GenericCloud-9-latest.x86_64.qcow2",), "centos"),
    (("Rocky-9-GenericCloud.latest.x86_64.qcow2",), "redhat"),
    (("tiny", "rootfs.qcow2"), None),
    (("mybox", "bookworm.raw"), "debian"),
])
def test_distro_is_guessed_from_names(names, expected):
    assert guess_distro(*names) == expected


def test_qemu_img_info_facts():
    assert facts_from_qemu_img({"format": "qcow2", "virtual-size": 2147483648,
                                "backing-filename": "/etc/shadow"}) == ("qcow2", 2147483648, "/etc/shadow")
    assert facts_from_qemu_img({"format": "raw", "virtual-size": 10}) == ("raw", 10, None)


def test_a_lease_is_released_only_when_its_marker_names_that_guests_own_lease_file(tmp_path):
    """The layout `take` writes is the one `is_lease_of` accepts (the node worker unlinks nothing else)."""
    from pathlib import Path

    from vtorque.shared import image_leases as leases

    digest = "ab" * 32
    base = tmp_path / "store" / "sha256" / digest
    base.parent.mkdir(parents=True)
    base.write_bytes(b"image")
    guest, other = tmp_path / "guests" / "vt-1-n1-0", tmp_path / "guests" / "vt-2-n1-0"
    guest.mkdir(parents=True)
    other.mkdir()
    lease = leases.take(base, guest, "1.srv")
    assert lease is not None and (guest / leases.MARKER).read_text() == str(lease)
    assert leases.is_lease_of(lease, guest) and leases.is_lease_of(lease, guest, tmp_path / "store")
    assert not leases.is_lease_of(lease, guest, tmp_path / "another-store")
    assert not leases.is_lease_of(lease, other)  # another guest's
    ldir = lease.parent
    for named in (ldir / ".." / digest / lease.name, Path(lease.name), tmp_path / "etc" / "x" / lease.name,
                  ldir.parent / ("0" * 63) / lease.name, tmp_path / "store" / "sha256" / digest / lease.name):
        assert not leases.is_lease_of(named, guest), named


def test_when_an_image_was_last_used_is_the_stores_to_say(tmp_path):
    """`vtorque images list`'s last use and eviction's come from the one `used/` stamp (ImageStore.used_at)."""
    import os

    from vtorque.cli.images import _store_state
    from vtorque.shared.config import Config, ImagesConfig
    from vtorque.shared.image_store import ImageStore

    digest = "cd" * 32
    store = ImageStore(tmp_path / "store")
    (store.root / "sha256").mkdir(parents=True)
    (store.root / "used").mkdir()
    store.path(digest).write_bytes(b"image")
    os.utime(store.path(digest), (1000, 1000))
    config = Config(images=ImagesConfig(store=str(store.root), catalog_file=None))
    entry = ImageEntry(source="/dev/null", sha256=digest)
    assert store.used_at(digest) == 0.0 and _store_state(config, entry)["last_used"] == 1000  # never used: staged
    store.touch(digest)
    assert store.used_at(digest) > 1000 and _store_state(config, entry)["last_used"] == store.used_at(digest)
    [usage] = store.usage()
    assert usage.last_used == store.used_at(digest)
