#!/opt/vtorque/venv/bin/python
"""Many node identities in one process, each the real node worker (services/node_worker/) on an instant host.

What is real: NodeWorker (its checks, planning of the boot, domain XML, define/start through Hypervisor, the
readiness wait, the job files, teardown), ServiceRunner and Heartbeat (shared by groups of nodes: see
NodeHost for why). What is instant, and only that:
- the hypervisor: libvirt's test driver, one private instance per node (a node has a libvirtd of its own;
  a test:///<file> URI opens a fresh in-memory driver per connection, so the Hypervisor's threads share one);
- the guest: when the test driver "starts" a domain, InstantGuests writes the guest's ready line to its console
  log, and its link (guest_link.start's stand-in) hands over a connection that answers sshd's banner at once,
  so the node worker's own wait_ready sees a booted guest;
- the guest's disks: disks.prepare is replaced by instant_prepare (the guest directory and its console log, no
  qemu-img and no seed ISO: those are constant per guest, 30-60 ms, measured in bench/staging.py and
  bench/job_vs_bare.py, and would only measure this 2-core box's fork rate at 1,024 guests).
Reconciliation and the IOcm controller are not started (timers, not on a job's path).

As a script (bench/scale_nodes.py starts it): `many_nodes.py CONFIG PREFIX COUNT PORT_BASE [FIRST]` runs COUNT
nodes named PREFIX<FIRST>… (4 digits; FIRST 0 unless told) until SIGTERM; prints one JSON line
{"ready": COUNT, "seconds": …} once all consume. scale_nodes.py starts one per CPU, each with its share of the
nodes: the nodes of a cluster work side by side, and one Python process is one core (its GIL).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgspec

from vtorque.services.node_worker import service as node_service
from vtorque.services.node_worker.heartbeat import Heartbeat

# The instant host (test-driver hypervisor, instant guests, disks and job networks) lives beside the node worker:
# the in-memory flow tests use it too. Imported by name here for bench/scale_nodes.py (many_nodes.InstantGuests…).
from vtorque.services.node_worker.instant import (  # noqa: F401
    InstantGuests,
    InstantHypervisor,
    instant_host,
    instant_prepare,
    instant_segments,
)
from vtorque.shared import messages as m
from vtorque.shared.bus import Publisher, ServiceRunner
from vtorque.shared.config import Config, load_config


def node_config(base: Config, name: str, index: int, root: Path, port_base: int, ports: int) -> Config:
    """The site's config as node `name` sees it: its own name, directories and `ports` ports of its own (on a
    cluster every node has a port space of its own)."""
    lo = port_base + index * ports
    node = msgspec.structs.replace(base.node, name=name, guest_dir=str(root / name / "guests"),
                                   ramdisk_dir=str(root / name / "shm"), ssh_port_min=lo,
                                   ssh_port_max=lo + ports - 1)
    return msgspec.structs.replace(base, node=node, state_dir=str(root / name / "state"))


class NodeHost:
    """COUNT node identities, each a NodeWorker of its own. They share connections: this broker takes about 830
    (its open-file limit, 1,024), and one consumer, one publisher and one heartbeat connection per node would
    need 3,072. So the nodes go in groups of `group` (one ServiceRunner consuming the group's node queues, its
    handler passing each command to the NodeWorker the command names, one Publisher), and one Heartbeat beats
    for `beat_group` nodes. Within a group commands are handled one at a time, as each node handles its own."""

    def __init__(self, config: Config, prefix: str, count: int, port_base: int, workdir: Path, ports: int = 4,
                 group: int = 16, beat_group: int = 128, first: int = 0):
        self.stop = threading.Event()
        self.guests = InstantGuests()
        self.workers: list[node_service.NodeWorker] = []
        self.runners: list[ServiceRunner] = []
        self.beat_group = beat_group
        url = config.broker.connection_url()
        store = node_service.ImageStore(config.images.store)
        for start in range(first, first + count, group):
            publisher = Publisher(url)
            members = {}
            for i in range(start, min(first + count, start + group)):
                cfg = node_config(config, f"{prefix}{i:04d}", i, workdir, port_base, ports)
                worker = node_service.NodeWorker(cfg, publisher, store=store,
                                                 hypervisor=InstantHypervisor(self.guests, str(workdir)),
                                                 segments=instant_segments(workdir))
                members[worker.node] = worker
            self.workers += members.values()
            handlers = {kind: _dispatch(members, kind) for kind in self.workers[-1].handlers()}
            queues = [q for w in members.values() for q in w.queues()]
            self.runners.append(ServiceRunner(url, queues, handlers, heartbeat=config.broker.heartbeat,
                                              user_prefix=config.broker.user_prefix))

    def start(self) -> None:
        # Heartbeats first publish once, synchronously, as `vtorque run node-worker` does before consuming.
        for first in range(0, len(self.workers), self.beat_group):
            Heartbeat(self.workers[first:first + self.beat_group], self.stop).start()
        for runner in self.runners:
            threading.Thread(target=runner.run, name="consumer", daemon=True).start()
        deadline = time.monotonic() + 600
        while not all(r.ready.is_set() for r in self.runners):
            if time.monotonic() > deadline:
                raise RuntimeError("node workers did not all start consuming")
            time.sleep(0.1)

    def shutdown(self) -> None:
        self.stop.set()
        for runner in self.runners:
            runner.stop()


def _dispatch(members: dict, kind: type):
    """The handler of `kind` of the NodeWorker a command is for. A TeardownGuests names its node; a job's one
    BootGuests arrives once per queue of the group's nodes it names (the broker's copies are alike, and a copy
    does not say which queue it came from), so each copy goes to the next of those nodes that has not had it."""
    given: dict[str, set[str]] = {}  # message id → the group's nodes that had their copy

    def handle(command):
        if isinstance(command, m.BootGuests):
            named = [n for n in command.nodes if n in members]
            had = given.setdefault(command.message_id, set())
            node = next(n for n in named if n not in had)
            had.add(node)
            if len(had) == len(named):
                del given[command.message_id]
        else:
            node = command.node
        members[node].handlers()[kind](command)
    return handle


def main(argv: list[str]) -> int:
    config_path, prefix, count, port_base = argv[0], argv[1], int(argv[2]), int(argv[3])
    first = int(argv[4]) if len(argv) > 4 else 0
    config = load_config(config_path, env={})
    workdir = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=Path(config.state_dir)))
    os.chmod(workdir, 0o711)
    t0 = time.monotonic()
    host = NodeHost(config, prefix, count, port_base, workdir, first=first)
    with instant_host(host.guests):
        done = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: sys.exit(0))  # at any point: the process holds nothing to save
        host.start()
        print(json.dumps({"ready": count, "seconds": round(time.monotonic() - t0, 2)}), flush=True)
        done.wait()
        host.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
