"""The image store on a real filesystem, with http sources served from 127.0.0.1 and qemu-img: resumable and
bounded downloads, verification, atomicity across a killed stager, conversion, eviction and leases."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from vtorque.shared import image_leases as leases
from vtorque.shared.image_store import ImageStore, StageCancelled, StageError

from . import stager_support as ss

MiB = 2**20


@pytest.fixture
def server():
    with ss.ImageServer() as srv:
        yield srv


def files_in(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


# -- local files -------------------------------------------------------------------------------------------

def test_a_local_image_is_verified_written_atomically_and_then_cached(tmp_path):
    digest = ss.make_image(tmp_path / "a.raw", 70 * MiB + 123)
    store = ImageStore(tmp_path / "store")
    seen = []
    staged = store.stage(tmp_path / "a.raw", digest, progress=lambda done, total: seen.append((done, total)))
    assert not staged.cached and staged.bytes == 70 * MiB + 123 and staged.format == "raw"
    assert ss.sha256_of(store.path(digest)) == digest
    assert seen[-1] == (70 * MiB + 123, 70 * MiB + 123)
    assert files_in(tmp_path / "store" / "tmp") == []
    assert oct(store.path(digest).stat().st_mode & 0o777) == "0o644"
    again = store.stage(tmp_path / "a.raw", digest)
    assert again.cached and again.path == staged.path
    assert [j["event"] for j in store.read_journal()] == ["copied"]


def test_an_image_becomes_durable_in_the_background(tmp_path):
    digest = ss.make_image(tmp_path / "b.raw", 8 * MiB)
    store = ImageStore(tmp_path / "store")
    store.stage(tmp_path / "b.raw", digest)
    assert store.has(digest)  # usable at once: this boot's page cache holds the verified bytes
    store.wait_durable(30)
    assert store.meta(digest)["durable"] is True


def crash_before_durable(store: ImageStore, digest: str) -> None:
    """What a reboot before the background fsync leaves: meta from an earlier boot, not durable."""
    meta_path = store.root / "meta" / f"{digest}.json"
    meta = json.loads(meta_path.read_text())
    meta.update(durable=False, boot_id="an-earlier-boot")
    meta_path.write_text(json.dumps(meta))


def test_after_a_crash_an_image_not_yet_durable_is_verified_again_before_use(tmp_path):
    digest = ss.make_image(tmp_path / "v.raw", 8 * MiB)
    store = ImageStore(tmp_path / "store")
    store.stage(tmp_path / "v.raw", digest)
    store.wait_durable(30)
    crash_before_durable(store, digest)
    assert not store.has(digest)  # a node worker waits for the stager rather than trusting it
    again = store.stage(tmp_path / "v.raw", digest)
    assert again.cached and store.has(digest) and store.meta(digest)["durable"] is True
    assert [j["event"] for j in store.read_journal()] == ["copied", "verified-again"]


def test_after_a_crash_a_torn_image_is_copied_again(tmp_path):
    digest = ss.make_image(tmp_path / "w.raw", 8 * MiB)
    store = ImageStore(tmp_path / "store")
    store.stage(tmp_path / "w.raw", digest)
    store.wait_durable(30)
    crash_before_durable(store, digest)
    with open(store.path(digest), "r+b") as fh:  # the tail never reached the disk
        fh.truncate(5 * MiB)
    staged = store.stage(tmp_path / "w.raw", digest)
    assert not staged.cached and ss.sha256_of(staged.path) == digest
    assert [j["event"] for j in store.read_journal()] == ["copied", "torn", "copied"]


def test_a_sparse_image_stays_sparse(tmp_path):
    src = tmp_path / "sparse.raw"
    with open(src, "wb") as fh:
        fh.write(b"boot" * 1024)
        fh.seek(1024 * MiB)
        fh.write(b"end")
    digest = ss.sha256_of(src)
    store = ImageStore(tmp_path / "store")
    store.stage(src, digest)
    info = store.path(digest).stat()
    assert info.st_size == 1024 * MiB + 3
    assert info.st_blocks * 512 < 4 * MiB  # the hole was not written out
    assert ss.sha256_of(store.path(digest)) == digest


def test_a_missing_source_fails_with_its_name(tmp_path):
    with pytest.raises(StageError, match=r"cannot read .*/nope.raw: No such file"):
        ImageStore(tmp_path / "store").stage(tmp_path / "nope.raw", "a" * 64)


def test_a_mismatch_leaves_nothing_behind(tmp_path):
    ss.make_image(tmp_path / "m.raw", 3 * MiB)
    store = ImageStore(tmp_path / "store")
    with pytest.raises(StageError, match="sha256 mismatch .* nothing was staged"):
        store.stage(tmp_path / "m.raw", "f" * 64)
    assert files_in(tmp_path / "store" / "sha256") == [] and files_in(tmp_path / "store" / "tmp") == []
    assert [j["event"] for j in store.read_journal()] == ["mismatch"]


KILLED_STAGER = textwrap.dedent("""
    import sys
    from vtorque.shared.image_store import ImageStore
    def progress(done, total):
        print(done, flush=True)
    ImageStore(sys.argv[1]).stage(sys.argv[2], sys.argv[3], progress=progress)
""")


@pytest.mark.parametrize("where", ["local", "http"])
def test_a_stager_killed_mid_copy_leaves_no_image_and_the_next_one_completes(tmp_path, server, where):
    digest = ss.make_image(tmp_path / "k.raw", 96 * MiB, seed=7)
    source = str(tmp_path / "k.raw") if where == "local" else server.add("k.raw", tmp_path / "k.raw", rate=32 * MiB)
    store_dir = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_STAGER, str(store_dir), source, digest],
                            stdout=subprocess.PIPE, text=True)
    first = int(proc.stdout.readline())  # it copied something ...
    assert 0 < first < 96 * MiB
    os.kill(proc.pid, signal.SIGKILL)  # ... and dies without any clean-up
    proc.wait()
    store = ImageStore(store_dir)
    assert not store.has(digest) and files_in(store_dir / "sha256") == []
    staged = store.stage(source, digest)  # the lock died with the process: the next stager takes over
    assert not staged.cached and ss.sha256_of(staged.path) == digest
    if where == "http":  # the partial download was continued, not started again
        ranges = [r.range for r in server.gets("k.raw")]
        assert ranges[0] is None and ranges[1] and int(ranges[1][6:-1]) >= first
    assert files_in(store_dir / "tmp") == []


def test_concurrent_requests_in_threads_make_one_copy(tmp_path):
    digest = ss.make_image(tmp_path / "t.raw", 64 * MiB)
    store = ImageStore(tmp_path / "store")
    results, errors = [], []

    def one():
        try:
            results.append(store.stage(tmp_path / "t.raw", digest))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 12
    assert sum(not r.cached for r in results) == 1
    assert [j["event"] for j in store.read_journal()] == ["copied"]


# -- http(s) ---------------------------------------------------------------------------------------------

def test_an_http_image_is_streamed_verified_and_reports_its_total(tmp_path, server):
    digest = ss.make_image(tmp_path / "h.raw", 20 * MiB + 7)
    url = server.add("h.raw", tmp_path / "h.raw")
    seen = []
    staged = ImageStore(tmp_path / "store").stage(url, digest, progress=lambda d, t: seen.append((d, t)))
    assert ss.sha256_of(staged.path) == digest
    assert seen[-1] == (20 * MiB + 7, 20 * MiB + 7)
    assert [r.range for r in server.gets("h.raw")] == [None]


def test_a_dropped_connection_is_resumed_with_a_range_request(tmp_path, server):
    digest = ss.make_image(tmp_path / "d.raw", 16 * MiB)
    url = server.add("d.raw", tmp_path / "d.raw", drop_after=5 * MiB + 17)
    staged = ImageStore(tmp_path / "store").stage(url, digest)
    assert ss.sha256_of(staged.path) == digest
    got = server.gets("d.raw")
    assert [r.range for r in got] == [None, f"bytes={5 * MiB + 17}-"] and got[1].status == 206


def test_a_stalled_server_times_out_and_the_rest_is_fetched_with_a_range_request(tmp_path, server):
    digest = ss.make_image(tmp_path / "s.raw", 8 * MiB)
    url = server.add("s.raw", tmp_path / "s.raw", stall_after=3 * MiB, stall_seconds=4.0)
    store = ImageStore(tmp_path / "store", http_timeout=1.0)
    started = time.monotonic()
    staged = store.stage(url, digest)
    assert time.monotonic() - started < 4.0  # it did not wait for the stalled response
    assert ss.sha256_of(staged.path) == digest
    ranges = [r.range for r in server.gets("s.raw")]
    assert ranges[0] is None and ranges[1].startswith("bytes=") and int(ranges[1][6:-1]) >= 3 * MiB


def test_a_server_that_keeps_stalling_fails_the_staging_after_the_retries(tmp_path, server):
    digest = ss.make_image(tmp_path / "h2.raw", 4 * MiB)
    url = server.add("h2.raw", tmp_path / "h2.raw", stall_after=0, stall_seconds=3.0, stall_always=True)
    store = ImageStore(tmp_path / "store", http_timeout=0.5, http_retries=2)
    with pytest.raises(StageError, match=r"h2.raw: timed out \(3 attempts\)"):
        store.stage(url, digest)
    assert not store.has(digest)
    assert [j["event"] for j in store.read_journal()] == ["failed"]


def test_a_server_without_ranges_is_read_again_from_the_start(tmp_path, server):
    digest = ss.make_image(tmp_path / "nr.raw", 6 * MiB)
    url = server.add("nr.raw", tmp_path / "nr.raw", drop_after=2 * MiB, ranges=False)
    staged = ImageStore(tmp_path / "store").stage(url, digest)
    assert ss.sha256_of(staged.path) == digest
    assert [(r.range, r.status) for r in server.gets("nr.raw")] == [(None, 200), (f"bytes={2 * MiB}-", 200)]


def test_http_errors_are_not_retried_and_say_what_happened(tmp_path, server):
    url = server.add("missing.raw", tmp_path / "missing.raw", status=404)
    with pytest.raises(StageError, match=r"^http://127.0.0.1:\d+/missing.raw: HTTP 404 Not Found$"):
        ImageStore(tmp_path / "store").stage(url, "a" * 64)
    assert len(server.gets("missing.raw")) == 1


def test_an_http_mismatch_leaves_nothing_behind(tmp_path, server):
    ss.make_image(tmp_path / "x.raw", 2 * MiB)
    url = server.add("x.raw", tmp_path / "x.raw")
    store = ImageStore(tmp_path / "store")
    with pytest.raises(StageError, match="sha256 mismatch"):
        store.stage(url, "e" * 64)
    assert files_in(tmp_path / "store" / "tmp") == [] and files_in(tmp_path / "store" / "sha256") == []


def test_a_staging_is_cancelled_when_its_last_request_is_withdrawn(tmp_path, server):
    digest = ss.make_image(tmp_path / "c.raw", 32 * MiB)
    url = server.add("c.raw", tmp_path / "c.raw", rate=8 * MiB)
    store = ImageStore(tmp_path / "store")
    outcome = []

    def stage():
        with store.want(digest, "1.vm"):
            try:
                store.stage(url, digest, cancelled=lambda: not store.wanted(digest), job_id="1.vm")
                outcome.append("staged")
            except StageCancelled as exc:
                outcome.append(str(exc))

    t = threading.Thread(target=stage)
    t.start()
    deadline = time.monotonic() + 10
    while not (tmp_path / "store" / "tmp" / f"{digest}.part").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    assert store.cancel_job("1.vm") == [digest]
    t.join(10)
    assert outcome and "no job needs it" in outcome[0]
    assert files_in(tmp_path / "store" / "tmp") == [] and not store.has(digest)
    assert store.job_cancelled("1.vm", asked_at=time.time() - 60)
    assert not store.job_cancelled("1.vm", asked_at=time.time() + 60)  # a later job that reuses the id


# -- conversion ----------------------------------------------------------------------------------------------

def test_a_raw_source_is_stored_as_compressed_qcow2(tmp_path):
    src = tmp_path / "conv.raw"
    with open(src, "wb") as fh:
        fh.write(b"\0" * 4 * MiB + b"data" * 1024 * 256 + b"\0" * 4 * MiB)
    digest = ss.sha256_of(src)
    store = ImageStore(tmp_path / "store")
    staged = store.stage(src, digest, source_format="raw", target_format="qcow2", compress=True)
    assert staged.converted and staged.format == "qcow2"
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(staged.path)], check=True,
                                     capture_output=True, text=True).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == src.stat().st_size
    assert staged.bytes < src.stat().st_size
    same = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(src), str(staged.path)])
    assert same.returncode == 0
    assert store.meta(digest)["converted_from"] == "raw"
    assert files_in(tmp_path / "store" / "tmp") == []


# -- eviction and leases -------------------------------------------------------------------------------------

def stage_three(tmp_path, budget=None):
    store = ImageStore(tmp_path / "store", budget=budget)
    digests = []
    for i in range(3):
        digest = ss.make_image(tmp_path / f"e{i}.raw", 8 * MiB, seed=10 + i)
        store.stage(tmp_path / f"e{i}.raw", digest)
        os.utime(tmp_path / "store" / "used" / digest, (1000 + i, 1000 + i))  # e0 least recently used
        digests.append(digest)
    return store, digests


def test_the_least_recently_used_image_goes_when_a_new_one_needs_room(tmp_path):
    store, (e0, e1, e2) = stage_three(tmp_path)
    store.budget = 30 * MiB
    d3 = ss.make_image(tmp_path / "e3.raw", 8 * MiB, seed=20)
    store.stage(tmp_path / "e3.raw", d3)
    assert [store.has(d) for d in (e0, e1, e2, d3)] == [False, True, True, True]
    assert [(j["event"], j["digest"]) for j in store.read_journal() if j["event"] == "evicted"] == [("evicted", e0)]


def test_an_image_used_by_a_guest_overlay_is_never_evicted(tmp_path):
    store, (e0, e1, e2) = stage_three(tmp_path)
    guest = tmp_path / "guests" / "vt-1-n-0"
    guest.mkdir(parents=True)
    lease = leases.take(store.path(e0), guest, "1.vm")
    assert lease.exists() and json.loads(lease.read_text())["job_id"] == "1.vm"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(store.path(e0)),
                    str(guest / "root.qcow2")], check=True)
    assert store.evict(0) == [e1, e2]  # everything but the leased one
    assert store.has(e0)
    from vtorque.services.node_worker.disks import release_lease

    assert release_lease(guest, tmp_path / "store") and not lease.exists()
    assert store.evict(0) == [e0]


def test_a_stale_lease_of_this_host_is_dropped_and_one_of_another_host_is_kept(tmp_path):
    store, (e0, e1, e2) = stage_three(tmp_path)
    guest = tmp_path / "gone-guest"
    guest.mkdir()
    leases.take(store.path(e0), guest, "2.vm")
    os.rename(guest, tmp_path / "elsewhere")  # the node worker died and its directory went away
    other = tmp_path / "store" / "leases" / e1 / "n7--var_lib_vtorque_guests_vt-3-n7-0"
    other.parent.mkdir()
    other.write_text(json.dumps({"host": "n7", "guest_dir": "/var/lib/vtorque/guests/vt-3-n7-0"}))
    assert store.evict(0) == [e2, e0]  # least recently used first: taking the lease was a use of e0
    assert store.has(e1)


def test_a_lease_on_an_evicted_image_is_refused(tmp_path):
    store, (e0, _, _) = stage_three(tmp_path)
    store.evict(0)
    guest = tmp_path / "g"
    guest.mkdir()
    with pytest.raises(leases.LeaseError, match="evicted"):
        leases.take(store.path(e0), guest)
    assert files_in(tmp_path / "store" / "leases" / e0) == []


def test_a_base_outside_a_store_takes_no_lease(tmp_path):
    assert leases.take(tmp_path / "plain.qcow2", tmp_path) is None
    from vtorque.services.node_worker.disks import release_lease

    assert not release_lease(tmp_path)


def test_the_node_workers_guest_disks_hold_a_lease_for_as_long_as_they_exist(tmp_path):
    from vtorque.services.node_worker import disks

    store, (e0, e1, e2) = stage_three(tmp_path)
    seed = {"meta-data": b"instance-id: t\n", "user-data": b"#cloud-config\n"}
    files = disks.prepare(tmp_path / "guests", "vt-9-n-0", "9.vm", store.path(e0), "raw", seed)
    assert Path(files.overlay).exists()
    assert [u.leases for u in store.usage() if u.digest == e0] == [1]
    assert store.evict(0) == [e1, e2] and store.has(e0)
    assert disks.remove(tmp_path / "guests", "vt-9-n-0")
    assert store.evict(0) == [e0]
