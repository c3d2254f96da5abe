"""The warm pool's pure parts (names, records, what to refill, which pooled guest a job takes, what reconciliation
removes, live pinning, who the relay lets in) and its claim, relay and reconciliation against fakes."""

import json
import os
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

from vtorque.services.node_worker import guest_link, warm_boot, warm_pool
from vtorque.services.node_worker.domain import BootSource, GuestDisks, GuestMetadata, domain_xml
from vtorque.services.node_worker.warm_pool import Pooled, Target
from vtorque.shared import messages as m
from vtorque.shared.config import Config

KEY = "0123456789ab" + "c" * 12
DIGEST = "d" * 64
TARGET = Target(key=KEY, digest=DIGEST, created=1000.0, ram_mib=192, image="tiny")
NAME = warm_pool.pool_name(KEY, "00000001")


def pooled(token: str = "00000001", created: float = 1.0, claimed: str | None = None, key: str = KEY,
           digest: str = DIGEST, warm_created: float = 1000.0) -> Pooled:
    return Pooled(name=warm_pool.pool_name(key, token), key=key, digest=digest, warm_created=warm_created,
                  created=created, claimed_by=claimed, claimed_at=5.0 if claimed else None)


# -- names and records --------------------------------------------------------------------------------------

def test_a_pool_name_is_recognised_and_nothing_else_is():
    assert warm_pool.is_pool_name(NAME) and NAME == "vt-pool-0123456789ab-00000001"
    for other in ("vt-7_srv-n1-0", "vt-warm-0123456789abcdef", "vt-pool-0123456789ab-0000000g",
                  "vt-pool-../../etc-00000001", "vt-pool-0123456789AB-00000001", NAME + "x", "x" + NAME):
        assert not warm_pool.is_pool_name(other), other
    with pytest.raises(ValueError):
        warm_pool.pool_name("../../etc/passwd", "00000001")


def test_a_record_reads_back_as_written():
    text = warm_pool.record_text(KEY, DIGEST, 1000.0, 7.0)
    assert warm_pool.parse_record(NAME, text) == Pooled(NAME, KEY, DIGEST, 1000.0, 7.0)
    claimed = warm_pool.parse_record(NAME, text, "12.srv\n", 9.0)
    assert claimed is not None and (claimed.claimed_by, claimed.claimed_at) == ("12.srv", 9.0)
    # An empty claim file is still a claim: the guest is never offered again.
    assert warm_pool.parse_record(NAME, text, "").claimed_by == "?"


@pytest.mark.parametrize("text", [
    None, "", "not json", "[]", "null",
    json.dumps({"format": 2, "key": KEY, "digest": DIGEST, "warm_created": 1, "created": 1}),
    json.dumps({"format": 1, "key": "f" * 24, "digest": DIGEST, "warm_created": 1, "created": 1}),  # not its name's
    json.dumps({"format": 1, "key": KEY[:-1] + "G", "digest": DIGEST, "warm_created": 1, "created": 1}),
    json.dumps({"format": 1, "key": KEY, "digest": "d" * 63, "warm_created": 1, "created": 1}),
    json.dumps({"format": 1, "key": KEY, "digest": DIGEST, "warm_created": True, "created": 1}),
    json.dumps({"format": 1, "key": KEY, "digest": DIGEST, "warm_created": "1", "created": 1}),
    json.dumps({"format": 1, "key": KEY, "digest": DIGEST, "warm_created": 1}),
])
def test_a_record_not_as_the_worker_writes_it_is_no_pooled_guest(text):
    assert warm_pool.parse_record(NAME, text) is None


def test_a_record_under_a_name_that_is_not_a_pool_name_is_nothing():
    assert warm_pool.parse_record("vt-7_srv-n1-0", warm_pool.record_text(KEY, DIGEST, 1.0, 1.0)) is None


# -- which pooled guest a job takes ---------------------------------------------------------------------------

def test_a_job_takes_only_an_unclaimed_guest_of_the_current_warm_image_oldest_first():
    old, new = pooled("00000001", created=1.0), pooled("00000002", created=2.0)
    taken = pooled("00000003", created=0.5, claimed="9.srv")
    stale = pooled("00000004", created=0.1, warm_created=999.0)  # of the warm image before its rebuild
    other_digest = pooled("00000005", created=0.1, digest="e" * 64)
    other_shape = pooled("00000006", created=0.1, key="f" * 24)
    assert warm_pool.candidates([new, taken, stale, old, other_digest, other_shape], TARGET) == [old, new]
    assert warm_pool.candidates([taken, stale], TARGET) == []


# -- what to refill ----------------------------------------------------------------------------------------------

def plan(pool=(), size=2, mem=4096, reserve=1024, busy=False, filling=0, targets=(TARGET,)):
    return warm_pool.refill_plan(list(targets), list(pool), size, mem, reserve, busy, filling)


def test_the_pool_is_refilled_up_to_its_size_per_warm_image():
    assert plan() == TARGET
    assert plan([pooled("00000001")]) == TARGET
    assert plan([pooled("00000001"), pooled("00000002")]) is None
    # A claimed guest is the job's: it counts no more, and one is made in its place.
    assert plan([pooled("00000001"), pooled("00000002", claimed="9.srv")]) == TARGET


def test_no_refill_while_the_node_boots_or_fills_or_when_off():
    assert plan(busy=True) is None
    assert plan(filling=1) is None
    assert plan(size=0) is None


def test_no_refill_that_would_eat_into_the_hosts_reserve_or_with_free_memory_unknown():
    assert plan(mem=1024 + 192 + warm_pool.OVERHEAD_MIB) == TARGET
    assert plan(mem=1024 + 192 + warm_pool.OVERHEAD_MIB - 1) is None
    assert plan(mem=None) is None


def test_the_warm_image_with_fewest_waiting_is_filled_first():
    other = Target(key="f" * 24, digest=DIGEST, created=1.0, ram_mib=192, image="tiny")
    pool = [pooled("00000001")]
    assert plan(pool, targets=(TARGET, other)) == other


def test_the_pools_memory_is_what_the_scheduler_should_not_give_jobs():
    other = Target(key="f" * 24, digest=DIGEST, created=1.0, ram_mib=512)
    assert warm_pool.pool_memory_mib([TARGET, other], 2) == 2 * (192 + 512 + 2 * warm_pool.OVERHEAD_MIB)
    assert warm_pool.pool_memory_mib([TARGET], 0) == 0


# -- what reconciliation removes ---------------------------------------------------------------------------------

def removals(pool, active=None, job_domains=(), targets=(TARGET,), size=2, filling=(), mtimes=None, now=10_000.0):
    names = {p.name if isinstance(p, Pooled) else p: p if isinstance(p, Pooled) else None for p in pool}
    active = set(names) if active is None else set(active)
    return dict(warm_pool.removals(names, mtimes or {}, active, set(job_domains), list(targets), size,
                                   set(filling), now))


def test_current_pooled_guests_are_kept():
    assert removals([pooled("00000001"), pooled("00000002")]) == {}


def test_pooled_guests_of_an_evicted_or_rebuilt_warm_image_are_removed():
    stale = pooled("00000001", warm_created=999.0)
    assert removals([stale]) == {stale.name: "its warm image was evicted or rebuilt"}
    assert removals([pooled("00000002")], targets=()) == {pooled("00000002").name:
                                                          "its warm image was evicted or rebuilt"}


def test_more_than_the_pool_size_goes_the_newest_first():
    pool = [pooled("00000001", created=1), pooled("00000002", created=2), pooled("00000003", created=3)]
    assert removals(pool, size=2) == {pool[2].name: "more than warm_pool = 2"}
    assert set(removals(pool, size=0)) == {p.name for p in pool}  # the pool turned off


def test_a_pooled_guest_without_its_domain_or_a_pool_domain_without_its_directory_goes():
    p = pooled("00000001")
    assert removals([p], active=()) == {p.name: "its domain is gone"}
    assert removals([], active={NAME}) == {NAME: "a pool domain without its directory"}


def test_a_directory_being_filled_is_left():
    assert removals([NAME], active=(), filling={NAME}, mtimes={NAME: 0.0}) == {}
    assert removals([], active={NAME}, filling={NAME}) == {}


def test_a_directory_without_a_valid_record_goes_once_past_the_grace():
    now = 10_000.0
    assert removals([NAME], mtimes={NAME: now - 5}, now=now) == {}
    assert removals([NAME], mtimes={NAME: now - warm_pool.GRACE - 1}, now=now) == {
        NAME: "a pooled guest without a valid record"}


def test_a_claimed_guest_is_never_kept_in_the_pool():
    claimed = pooled("00000001", claimed="9.srv")
    # It became the job's (its metadata): normal reconciliation's, removed with its job, not here.
    assert removals([claimed], job_domains={claimed.name}) == {}
    # A claim that never became a job's guest (the worker died in between): removed past the grace.
    assert removals([claimed], now=5.0 + warm_pool.GRACE + 1) == {
        claimed.name: "claimed by job 9.srv but never became its guest"}
    assert removals([claimed], now=6.0) == {}


# -- live pinning -----------------------------------------------------------------------------------------------

def test_cpusets_parse_and_nothing_else_does():
    assert warm_pool.parse_cpuset("3") == {3}
    assert warm_pool.parse_cpuset("0-2,5") == {0, 1, 2, 5}
    for bad in ("", "a", "1-", "-1", "1;2", "1-b"):
        with pytest.raises(ValueError):
            warm_pool.parse_cpuset(bad)


def test_a_job_guests_pinning_is_read_from_its_own_xml():
    guest = m.GuestPlan(name="vt-7_srv-n1-0", node="n1", index=0, image="tiny", image_digest=DIGEST, vcpus=2,
                        ram_mib=256, cores=[3, 5], owner=m.Owner(user="bob", uid=1001, gid=1002),
                        ssh_authorized_keys=[])
    files = GuestDisks(overlay="/g/root.qcow2", seed="/g/seed.iso", console_log="/g/console.log")
    meta = GuestMetadata(job_id="7.srv", owner="bob", deadline=datetime(2030, 1, 1, tzinfo=UTC), index=0)
    pins = warm_pool.live_pins(domain_xml(guest, files, BootSource("/k"), meta, identity_channel=True))
    assert pins.vcpus == {0: {3}, 1: {5}} and not pins.numa
    assert warm_pool.cpumap({3}, 6) == (False, False, False, True, False, False)
    for cpus in (set(), {6}):
        with pytest.raises(ValueError):
            warm_pool.cpumap(cpus, 6)


def test_the_link_lets_in_root_and_the_sockets_owner_alone():
    assert guest_link.allowed(0, 0) and guest_link.allowed(0, 1001) and guest_link.allowed(1001, 1001)
    assert not guest_link.allowed(1001, 0)  # unclaimed: root's alone
    assert not guest_link.allowed(1002, 1001)


def test_the_pool_is_off_unless_configured():
    assert Config().node.warm_pool == 0


def test_the_pools_reason_comes_first_in_the_boot_spans_why(monkeypatch):
    recorded: dict = {}
    monkeypatch.setattr(warm_boot.trace, "get_current_span",
                        lambda: SimpleNamespace(set_attributes=recorded.update))
    guest = m.GuestPlan(name="vt-7_srv-n1-0", node="n1", index=0, image="tiny", image_digest=DIGEST, vcpus=1,
                        ram_mib=192, cores=None, owner=m.Owner(user="bob", uid=1001, gid=1002),
                        ssh_authorized_keys=[], vrdma=True)
    w = SimpleNamespace(domain_type="qemu")
    assert warm_boot.try_restore(w, None, guest, ENTRY, Path("/b"), None, 1e9, 0.0, "no pooled guest free") is None
    assert recorded == {warm_boot.PATH: "cold", warm_boot.WHY: "no pooled guest free; the guest has vRDMA"}


# -- against fakes: the claim, reconciliation, the relay ------------------------------------------------------

class FakeHv:
    def __init__(self, active=()):
        self.active, self.removed, self.domains = set(active), [], {}

    def active_names(self):
        return set(self.active)

    def vtorque_domains(self):
        return dict(self.domains)

    def remove(self, name):
        self.removed.append(name)
        self.active.discard(name)


@pytest.fixture
def site(tmp_path):
    if os.geteuid() != 0:
        pytest.fail("pooled guests are root's: these tests run as root, as the node worker does")
    tmp_path.chmod(0o711)
    guests = tmp_path / "guests"
    guests.mkdir(mode=0o711)
    hv = FakeHv()

    def remove_disks(name):
        import shutil

        shutil.rmtree(guests / name, ignore_errors=True)
        return 1

    worker = SimpleNamespace(
        config=SimpleNamespace(node=SimpleNamespace(guest_dir=str(guests), warm_pool=2),
                               spec=SimpleNamespace(host_reserve_ram="0M")),
        hv=hv, node="n1", domain_type="qemu", booting_now=set, _remove_disks=remove_disks, store=None)
    pool = warm_pool.WarmPool(worker, mem_available=lambda: 1 << 20, clock=lambda: 2000.0)
    return pool, guests, hv


def make_pooled(guests: Path, hv: FakeHv, token: str, created: float = 1.0, warm_created: float = 1000.0) -> str:
    name = warm_pool.pool_name(KEY, token)
    gdir = guests / name
    gdir.mkdir(mode=0o711)
    for fname, text in (("job", warm_pool.POOL_JOB), ("node", "n1"),
                        (warm_pool.RECORD, warm_pool.record_text(KEY, DIGEST, warm_created, created))):
        (gdir / fname).write_text(text)
        (gdir / fname).chmod(0o600)
    hv.active.add(name)
    return name


GUEST = m.GuestPlan(name="vt-7_srv-n1-0", node="n1", index=0, image="tiny", image_digest=DIGEST, vcpus=1,
                    ram_mib=192, cores=None, owner=m.Owner(user="bob", uid=1001, gid=1002), ssh_authorized_keys=[])
ENTRY = SimpleNamespace(kernel="/k", initrd=None, cmdline=None)


def claim_setup(monkeypatch, pool):
    monkeypatch.setattr(pool, "targets", lambda: [TARGET])
    monkeypatch.setattr(warm_pool, "_log", lambda *a, **k: None)
    monkeypatch.setattr("vtorque.services.node_worker.warm.shape_key", lambda *_a: KEY)


def test_a_pooled_guest_is_taken_by_exactly_one_job(site, monkeypatch):
    pool, guests, hv = site
    claim_setup(monkeypatch, pool)
    name = make_pooled(guests, hv, "00000001")
    gate = threading.Barrier(2)
    taken: dict = {}

    def resume(cmd, guest, p, *_a):
        return ("timings", p.name)

    monkeypatch.setattr(pool, "_resume", resume)

    def boot(job):
        gate.wait()
        cmd = SimpleNamespace(job_id=job, network=None)
        taken[job] = pool.claim_for(cmd, GUEST, ENTRY, None, time.monotonic() + 5, 0.0)

    threads = [threading.Thread(target=boot, args=(job,)) for job in ("1.srv", "2.srv")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results = sorted(taken.values(), key=lambda r: r[0] is None)
    assert results[0] == (("timings", name), "")
    assert results[1] == (None, "no pooled guest free for this shape")
    winner = next(job for job, r in taken.items() if r[0] is not None)
    assert (guests / name / warm_pool.CLAIM).read_text() == winner
    # Never offered again, to any job.
    assert pool.claim_for(SimpleNamespace(job_id="3.srv", network=None), GUEST, ENTRY, None, 1e9, 0.0) == (
        None, "no pooled guest free for this shape")


def test_a_pooled_guest_that_fails_after_its_claim_is_removed_and_the_reason_returned(site, monkeypatch):
    pool, guests, hv = site
    claim_setup(monkeypatch, pool)
    name = make_pooled(guests, hv, "00000001")

    def broken(*_a):
        raise OSError("the guest's identity channel did not open")

    monkeypatch.setattr(pool, "_resume", broken)
    result, why = pool.claim_for(SimpleNamespace(job_id="1.srv", network=None), GUEST, ENTRY, None, 1e9, 0.0)
    assert result is None and why == f"pooled guest {name} failed: the guest's identity channel did not open"
    assert hv.removed == [name] and not (guests / name).exists()


def test_a_guest_the_pool_cannot_be_or_a_shape_without_a_warm_image_says_why(site, monkeypatch):
    pool, guests, hv = site
    claim_setup(monkeypatch, pool)
    cmd = SimpleNamespace(job_id="1.srv", network=None)
    assert pool.claim_for(cmd, GUEST.__class__(**{**{f: getattr(GUEST, f) for f in GUEST.__struct_fields__},
                                                  "vrdma": True}), ENTRY, None, 1e9, 0.0) == (
        None, "no pooled guest: the guest has vRDMA")
    monkeypatch.setattr(pool, "targets", lambda: [])
    result, why = pool.claim_for(cmd, GUEST, ENTRY, None, 1e9, 0.0)
    assert result is None and why.startswith("no pooled guest: no warm image for this shape")
    pool.size = 0
    assert pool.claim_for(cmd, GUEST, ENTRY, None, 1e9, 0.0) == (None, "")


def test_reconciliation_keeps_current_pooled_guests_and_removes_a_rebuilt_warm_images(site, monkeypatch):
    pool, guests, hv = site
    monkeypatch.setattr(pool, "targets", lambda: [TARGET])
    monkeypatch.setattr(warm_pool, "_log", lambda *a, **k: None)
    current = make_pooled(guests, hv, "00000001")
    stale = make_pooled(guests, hv, "00000002", warm_created=999.0)
    keep = pool.reconcile()
    assert keep == {current}
    assert hv.removed == [stale] and not (guests / stale).exists() and (guests / current).exists()
    # The warm image evicted: its pooled guests go too.
    monkeypatch.setattr(pool, "targets", lambda: [])
    assert pool.reconcile() == set()
    assert not (guests / current).exists()


def test_the_refill_thread_runs_with_the_worker_and_ends_with_its_stop(site, monkeypatch):
    pool, guests, hv = site
    monkeypatch.setattr(pool, "targets", lambda: [TARGET])
    monkeypatch.setattr(warm_pool, "_log", lambda *a, **k: None)
    monkeypatch.setattr(warm_pool, "REFILL_POLL", 0.01)
    calls = []

    def fill_once():
        calls.append(time.monotonic())
        if len(calls) == 2:
            raise OSError("libvirt said no")  # one failed fill does not end the refill
        return None

    monkeypatch.setattr(pool, "fill_once", fill_once)
    stop = threading.Event()
    thread = pool.start(stop)
    assert thread is not None
    until = time.monotonic() + 5
    while len(calls) < 4 and time.monotonic() < until:
        time.sleep(0.01)
    assert len(calls) >= 4
    stop.set()
    thread.join(2)
    assert not thread.is_alive()
    pool.size = 0
    assert pool.start(threading.Event()) is None  # off: no thread


def test_no_fill_while_the_node_boots(site, monkeypatch):
    pool, guests, hv = site
    monkeypatch.setattr(pool, "targets", lambda: [TARGET])
    monkeypatch.setattr(pool, "fill", lambda target: pytest.fail("filled while booting"))
    pool.worker.booting_now = lambda: {"vt-7_srv-n1-0"}
    assert pool.fill_once() is None
    pool.worker.booting_now = set
    monkeypatch.setattr(pool, "fill", lambda target: "made")
    assert pool.fill_once() == "made"


def test_the_pool_judges_time_by_its_node_workers_clock():
    from vtorque.shared.testing import FakeClock

    clock = FakeClock()
    worker = type("W", (), {"clock": clock, "config": type("C", (), {"node": type("N", (), {"warm_pool": 1})()})()})()
    pool = warm_pool.WarmPool(worker)
    before = pool.clock()
    clock.advance(3600)
    assert pool.clock() == before + 3600  # the worker's clock, moved by hand: not the machine's
