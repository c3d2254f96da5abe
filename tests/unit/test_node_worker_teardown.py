"""A teardown is always answered: the epilogue waits for GuestsTornDown, so a libvirt that refuses a destroy
(a QEMU slow to die under load: 'Device or resource busy') or is down must not turn into a crashed handler, a
dead-lettered command and an epilogue waiting out its deadline. The hypervisor here is a stand-in with the
two calls teardown makes; the rest is the node worker's own code on a directory of the test's own."""

from __future__ import annotations

from pathlib import Path

import pytest

from vtorque.services.node_worker import service
from vtorque.services.node_worker.hypervisor import HypervisorError
from vtorque.services.node_worker.service import NodeWorker
from vtorque.shared import messages as m
from vtorque.shared.config import Config, ImagesConfig, NodeConfig

NODE = "n1"


class FlakyHypervisor:
    """Domains of one job; `remove` fails the first `failing[name]` times it is asked for that domain."""

    def __init__(self, names: list[str], failing: dict[str, int] | None = None, down: bool = False,
                 killable: bool = False):
        self.domains = {n: {"job": "7", "node": NODE} for n in names}
        self.failing, self.down, self.asked = dict(failing or {}), down, []
        self.killable, self.running = killable, set(names)

    def kill(self, name):
        """A local system QEMU's is killed and waited for (Hypervisor.kill); another driver's cannot be."""
        if not self.killable:
            return False
        self.running.discard(name)
        return True

    def vtorque_domains(self):
        if self.down:
            raise HypervisorError("cannot connect to qemu:///system: Failed to connect socket")
        return dict(self.domains)

    def remove(self, name):
        self.asked.append(name)
        self.running.discard(name)
        if self.failing.get(name):
            self.failing[name] -= 1
            raise HypervisorError(f"destroy {name} failed: Failed to terminate process 4242 with SIGKILL: "
                                  "Device or resource busy")
        return self.domains.pop(name, None) is not None


class Sent:
    def __init__(self):
        self.sent: list[m.Message] = []

    def publish(self, message):
        self.sent.append(message)


@pytest.fixture(autouse=True)
def no_wait(monkeypatch):
    monkeypatch.setattr(service, "REMOVE_RETRY_DELAY", 0.0)


def worker(tmp_path: Path, hv) -> tuple[NodeWorker, Sent]:
    config = Config(state_dir=str(tmp_path / "state"), images=ImagesConfig(store=str(tmp_path / "images")),
                    node=NodeConfig(name=NODE, guest_dir=str(tmp_path / "guests"),
                                    ramdisk_dir=str(tmp_path / "shm")))
    sent = Sent()
    return NodeWorker(config, sent, hypervisor=hv, store=object()), sent


def teardown(w: NodeWorker) -> m.GuestsTornDown:
    w.on_teardown_guests(m.TeardownGuests.new(job_id="7", deadline=60.0, node=NODE))
    (answer,) = w.publisher.sent
    assert isinstance(answer, m.GuestsTornDown)
    return answer


def test_a_destroy_that_fails_once_is_asked_again_and_the_guest_is_gone(tmp_path):
    hv = FlakyHypervisor(["vt-7-n1-0"], failing={"vt-7-n1-0": 1})
    w, _ = worker(tmp_path, hv)
    answer = teardown(w)
    assert answer.guests == ["vt-7-n1-0"] and answer.not_removed == [] and answer.reason == ""
    assert hv.asked == ["vt-7-n1-0", "vt-7-n1-0"] and hv.domains == {}


def test_a_destroy_that_keeps_failing_is_answered_with_what_is_left_and_why(tmp_path):
    left = "vt-7-n1-1"
    hv = FlakyHypervisor(["vt-7-n1-0", left], failing={left: service.REMOVE_ATTEMPTS})
    w, _ = worker(tmp_path, hv)
    answer = teardown(w)
    assert answer.guests == ["vt-7-n1-0"] and answer.not_removed == [left] and list(hv.domains) == [left]
    assert answer.reason.startswith(f"{left}: destroy {left} failed") and "Device or resource busy" in answer.reason
    assert hv.asked.count(left) == service.REMOVE_ATTEMPTS


def test_libvirt_down_is_an_answer_with_its_reason_not_a_crash(tmp_path):
    w, _ = worker(tmp_path, FlakyHypervisor(["vt-7-n1-0"], down=True))
    answer = teardown(w)
    assert answer.guests == [] and answer.reason.startswith("libvirt: cannot connect to qemu:///system")


# -- the answer first, the files after (issue 13: the job leaves the scheduler's queue once its guests are gone)

class Segments:
    """The job networks of this host: vni → job; no taps left on them."""

    def __init__(self, present: dict[int, str]):
        self.nets = dict(present)

    def present(self):
        return dict(self.nets)

    def ports(self, vni):
        return []

    def remove(self, vni, job_id):
        return self.nets.pop(vni, None) is not None


def a_job_here(tmp_path: Path, monkeypatch, names=("vt-7-n1-0",), killable=False):
    """A worker with job 7's domains, their guest directories, the launcher's job files, an ivshmem region and
    the job network, as a boot leaves them."""
    from vtorque.services.node_worker import trust, vrdma

    hv = FlakyHypervisor(list(names), killable=killable)
    w, sent = worker(tmp_path, hv)
    w.segments = Segments({4242: "7"})
    shm = trust.secure_dir(tmp_path / "devshm")
    trust.secure_dir(w.config.state_dir)
    monkeypatch.setattr(vrdma, "SHM_DIR", shm)
    region = shm / vrdma.shmem_name("7", vrdma.node_secret(w.config.state_dir))
    region.write_bytes(b"\0" * 16)
    trust.secure_dir(w.config.node.guest_dir)
    jdir = trust.secure_dir(w.config.job_dir("7"), mode=0o755)
    for name in names:
        gdir = Path(w.config.node.guest_dir) / name
        gdir.mkdir(mode=0o700)
        for file, text in (("job", "7"), ("node", NODE), ("overlay.qcow2", "disk")):
            (gdir / file).write_text(text)
        (jdir / f"{name}.json").write_text(f'{{"guest": "{name}", "node": "{NODE}"}}')
    return w, sent, hv, region


def left_of(w: NodeWorker, region: Path) -> dict:
    jdir = w.config.job_dir("7")
    return {"guest dirs": sorted(p.name for p in Path(w.config.node.guest_dir).iterdir()),
            "job files": sorted(p.name for p in jdir.iterdir()) if jdir.exists() else [],
            "shm": region.exists(), "networks": sorted(w.segments.nets)}


NOTHING = {"guest dirs": [], "job files": [], "shm": False, "networks": []}


@pytest.mark.parametrize("killable", [False, True], ids=["destroyed through libvirt", "QEMU killed"])
def test_the_answer_goes_once_the_guests_are_stopped_and_the_files_after_it(tmp_path, monkeypatch, killable):
    w, sent, hv, region = a_job_here(tmp_path, monkeypatch, killable=killable)
    at_answer = {}

    def publish(message):
        at_answer.update(running=set(hv.running), domains=sorted(hv.domains), **left_of(w, region),
                         clean_up_listed=len(w.teardown_threads),
                         clean_up_joinable=all(t.ident is not None for t in w.teardown_threads))
        sent.sent.append(message)

    monkeypatch.setattr(sent, "publish", publish)
    answer = teardown(w)
    assert answer.guests == ["vt-7-n1-0"] and answer.disks_removed == 1 and answer.reason == ""
    # When the epilogue hears it, nothing of the job runs: its QEMU is gone (and its shared memory, which only
    # a live QEMU maps); a killed QEMU's domain, its disks, guest directory, job file and network are still
    # there...
    assert at_answer == {"running": set(), "domains": ["vt-7-n1-0"] if killable else [],
                         "guest dirs": ["vt-7-n1-0"], "job files": ["vt-7-n1-0.json"], "shm": False,
                         "networks": [4242], "clean_up_listed": 1 if killable else 0, "clean_up_joinable": True}
    # (a clean-up left to a thread is listed and started before the answer goes: whoever hears the answer can
    # join it; joining a thread not yet started raises)
    # ... and gone once the teardown's own thread is done (the node's next command does not wait for it).
    for thread in w.teardown_threads:
        thread.join(10)
    assert left_of(w, region) == NOTHING and hv.domains == {}


def test_a_worker_that_dies_after_the_answer_leaves_nothing_for_good(tmp_path, monkeypatch):
    """The worker answered, then died before removing the files: reconciliation (a restarted worker's first
    round and the next) removes the guest directory, the job file and the job network; nothing leaks."""
    import os
    import threading
    import time

    from vtorque.services.node_worker.reconcile import Reconciler

    w, sent, hv, region = a_job_here(tmp_path, monkeypatch, names=("vt-7-n1-0", "vt-7-n1-1"), killable=True)

    def dies(job_id, result):
        pass  # the worker is gone before its teardown thread did anything

    monkeypatch.setattr(w, "remove_job_files", dies)
    w.on_teardown_guests(m.TeardownGuests.new(job_id="7", deadline=60.0, node=NODE))
    for thread in w.teardown_threads:
        thread.join(10)
    (answer,) = sent.sent
    assert sorted(answer.guests) == ["vt-7-n1-0", "vt-7-n1-1"] and hv.running == set()
    assert sorted(hv.domains) == ["vt-7-n1-0", "vt-7-n1-1"]  # killed, not yet undefined
    assert left_of(w, region) == {"guest dirs": ["vt-7-n1-0", "vt-7-n1-1"],
                                  "job files": ["vt-7-n1-0.json", "vt-7-n1-1.json"], "shm": False,
                                  "networks": [4242]}
    # The guests booted a while ago (reconciliation leaves a directory younger than its grace to a boot).
    for name in ("vt-7-n1-0", "vt-7-n1-1"):
        old = time.time() - 600
        os.utime(Path(w.config.node.guest_dir) / name / "job", (old, old))
    monkeypatch.undo()  # a new worker process: its own remove_job_files, and SHM_DIR as set above is gone...
    from vtorque.services.node_worker import vrdma

    monkeypatch.setattr(vrdma, "SHM_DIR", region.parent)  # ... but the same /dev/shm
    reconciler = Reconciler(w, threading.Event(), 60.0, alive=lambda job: False)
    reconciler.run_once()
    reconciler.run_once()  # a job network goes when two rounds in a row found it unused
    assert left_of(w, region) == NOTHING and hv.domains == {}


def _qemu_like(argv_tail: list[str]):
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *argv_tail])


def test_kill_stops_only_the_domains_own_qemu_and_waits_for_it(tmp_path):
    """Hypervisor.kill reads the domain's pid file, checks that the process is that guest's QEMU (its -name
    guest=<name>, argument), kills it and returns once it has exited, without waiting for its reaping."""
    from vtorque.services.node_worker.hypervisor import Hypervisor

    hv = Hypervisor("qemu:///system", qemu_run_dir=tmp_path)
    ours = _qemu_like(["-name", "guest=vt-7-n1-0,debug-threads=on"])
    other = _qemu_like(["-name", "guest=vt-7-n1-00,debug-threads=on"])  # another guest's, under our name's file
    try:
        (tmp_path / "vt-7-n1-0.pid").write_text(f"{ours.pid}\n")
        (tmp_path / "vt-7-n1-1.pid").write_text(f"{other.pid}\n")
        assert hv.kill("vt-7-n1-0") is True
        assert ours.poll() is not None or ours.wait(timeout=1) == -9  # exited (and reaped only now, by us)
        assert hv.kill("vt-7-n1-1") is False and other.poll() is None  # not that guest's: left alone
        assert hv.kill("vt-7-n1-2") is False  # no pid file
        (tmp_path / "vt-7-n1-3.pid").write_text("garbage")
        assert hv.kill("vt-7-n1-3") is False
        # Another driver (the test driver, a remote libvirt) has no QEMU of this host to kill: libvirt it is.
        assert Hypervisor("test:///default").kill("vt-7-n1-0") is False
    finally:
        for proc in (ours, other):
            proc.kill()
            proc.wait()
