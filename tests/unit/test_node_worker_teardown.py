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

    def __init__(self, names: list[str], failing: dict[str, int] | None = None, down: bool = False):
        self.domains = {n: {"job": "7", "node": NODE} for n in names}
        self.failing, self.down, self.asked = dict(failing or {}), down, []

    def vtorque_domains(self):
        if self.down:
            raise HypervisorError("cannot connect to qemu:///system: Failed to connect socket")
        return dict(self.domains)

    def remove(self, name):
        self.asked.append(name)
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
