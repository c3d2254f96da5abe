#!/opt/vtorque/venv/bin/python
"""Scale with an instant hypervisor: a job of 1 … 1,024 nodes from its job event to all guests ready, against the
raw broker doing the same fan-out in the same run.

Parts (all on a RabbitMQ node of this run's own, see OwnBroker; never the site's or the stack's):
- bridge: `vtorque run bridge`, a process of its own, as deployed.
- nodes: bench/many_nodes.py, one process holding COUNT node identities, each the real node worker with its
  own consumer, heartbeat and libvirt test-driver instance (an instant hypervisor; see that file for exactly
  what is instant).
- (a) job: what the hook does (its event queue declared first, then JobStarted published), timed until every
  GuestReady arrived; then JobEnded until every GuestsTornDown. For 1, 4, 16, 64, 256, 1024 nodes.
- (b) raw: 1,024 messages to 1,024 durable classic queues, consumed by one process (one channel, prefetch 100,
  an ack per message), first publish → last delivery; a confirm per message, none, and all confirms awaited
  once (the bus's batch); 1 KiB bodies as in ../shared/reference/rabbitmq-on-this-machine.md, and bodies the
  size of the bridge's BootGuests. bridge: the same consumer on 1,024 node queues nobody serves, JobStarted
  published → the job's BootGuests delivered from the last of them (the bridge publishes it once; the broker puts
  it in every node's queue); its ratio = raw time / bridge time (1 = as fast as the raw broker). Bytes per job:
  what the bridge sends for it, and what the broker delivers to the nodes' queues.
- (c) heartbeats: the bridge's heartbeat queue depth while the nodes beat (rabbitmqctl, every 2 s); and a
  burst of one beat per node for 1,024 nodes, published at once, until the bridge's queue is empty.
- (d) one node, 1 … 128 guests: one more guest's boot, a heartbeat's facts, one guest's teardown, in-process.

Usage (root; the rabbitmq-server package installed): bench/scale_nodes.py [--rounds 3] [--nodes 1024] [--heartbeat 10]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import amqp  # noqa: E402
import kombu  # noqa: E402
import many_nodes  # noqa: E402  bench/many_nodes.py

from vtorque.services.node_worker import service as node_service  # noqa: E402
from vtorque.services.node_worker.heartbeat import node_facts  # noqa: E402
from vtorque.shared import messages as m  # noqa: E402
from vtorque.shared import topology  # noqa: E402
from vtorque.shared.bus import EventWaiter, Publisher, declare_topology, node_queue  # noqa: E402
from vtorque.shared.config import load_config  # noqa: E402

BROKER = "127.0.0.1:5672"
SIZES = (1, 4, 16, 64, 256, 1024)
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG2dXW1vjFpNu2d0dw7Fqt5fLwRY7FTl1Qb4mK3xqQ9n bench"
RAW_EXCHANGE = "bench.raw"
PY = sys.executable


class OwnBroker:
    """A RabbitMQ node of this run's own (same package and defaults as the site's, on 127.0.0.1:5682, its own
    data directory, Erlang cookie and node name), started and stopped by this run. Not the site's broker: its
    open-file limit (1,024 soft here, about 830 sockets) and the other work on it would be measured too, and a
    bench that dies must not leave 3,000 queues on a broker others use."""

    def __init__(self, root: Path, port: int = 5682):
        self.dir = root / "rabbitmq"
        self.dir.mkdir()
        (self.dir / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{port}\n")
        (self.dir / "enabled_plugins").write_text("[].\n")
        self.cookie = secrets.token_hex(16)
        cookie = self.dir / ".erlang.cookie"
        cookie.write_text(self.cookie)
        cookie.chmod(0o400)
        self.node = f"vtbench{os.getpid()}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{port}//"
        env = dict(os.environ, HOME=str(self.dir), RABBITMQ_NODENAME=self.node, RABBITMQ_NODE_PORT=str(port),
                   RABBITMQ_DIST_PORT=str(port + 20000), RABBITMQ_MNESIA_BASE=str(self.dir / "mnesia"),
                   RABBITMQ_LOG_BASE=str(self.dir / "log"), RABBITMQ_CONFIG_FILE=str(self.dir / "rabbitmq"),
                   RABBITMQ_ENABLED_PLUGINS_FILE=str(self.dir / "enabled_plugins"),
                   RABBITMQ_PID_FILE=str(self.dir / "pid"), RABBITMQ_CONF_ENV_FILE="/dev/null",
                   ERL_EPMD_ADDRESS="127.0.0.1")
        # The server script itself, not Debian's wrapper: the wrapper becomes the rabbitmq user through PAM,
        # which sets the open-file limit back to 1,024.
        self.proc = subprocess.Popen(["/usr/lib/rabbitmq/bin/rabbitmq-server"], env=env, start_new_session=True,
                                     stdout=open(self.dir / "server.out", "w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:  # await_startup fails at once until the node has registered with epmd
            try:
                self.ctl("await_startup", "--timeout", "60", timeout=90)
                return
            except subprocess.CalledProcessError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(
                        f"RabbitMQ did not start: {(self.dir / 'server.out').read_text()[-2000:]}"
                    ) from None
                time.sleep(1)

    def beam_pids(self) -> list[int]:
        """The broker's Erlang VM (beam.smp, in the session the server script started)."""
        found = []
        for entry in os.listdir("/proc"):
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                if entry.isdigit() and int(fields[3]) == self.proc.pid and \
                        Path(f"/proc/{entry}/comm").read_text().strip().startswith("beam"):
                    found.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
        return found

    def ctl(self, *args: str, timeout: float = 120) -> str:
        return subprocess.run(["rabbitmqctl", "--erlang-cookie", self.cookie, "-n", self.node, "-q", *args],
                              check=True, capture_output=True, text=True, timeout=timeout).stdout

    def stop(self) -> None:
        try:
            self.ctl("stop", timeout=60)
        except (subprocess.SubprocessError, OSError):
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(10)


def write_site(root: Path, url: str, heartbeat: float) -> Path:
    """A site of this run's own: an image in its store (any bytes: the test driver reads no disk)."""
    from vtorque.services.node_worker.service import ImageStore

    image = root / "tiny.raw"
    image.write_bytes(os.urandom(1 << 20))
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    store = ImageStore(root / "images")
    store.stage(image, digest)
    store.wait_durable(30)
    config = root / "vtorque.toml"
    config.write_text(f"""state_dir = "{root}/state"
log_level = "INFO"
[broker]
url = "{url}"
connect_timeout = 10.0
[tracing]
dir = "{root}/traces"
[images]
store = "{root}/images"
[images.catalog.tiny]
source = "{image}"
sha256 = "{digest}"
format = "raw"
[spec]
host_reserve_cores = 0
host_reserve_ram = "0M"
[node]
name = "bench-unused"
domain_type = "qemu"
allow_system_owners = true
heartbeat_interval = {heartbeat}
guest_dir = "{root}/guests"
ramdisk_dir = "{root}/shm"
[scheduler]
kind = "slurm"
bin_dir = "{root}/no-scheduler"
verify_jobs = false
""")
    (root / "state").mkdir(mode=0o711)
    return config


def wait_for_line(path: Path, text: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in (path.read_text() if path.exists() else ""):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{path.name}: no {text!r}:\n{path.read_text()[-3000:]}")
        time.sleep(0.1)


# -- a consumer of many queues, in a process of its own ----------------------------------------------------

def sink(url: str, queue_file: str, expect: int) -> int:
    """Consume `expect` messages from the queues listed in `queue_file`; print when the first and last came."""
    names = Path(queue_file).read_text().split()

    conn = amqp.Connection(**_amqp_args(url))
    conn.connect()
    ch = conn.channel()
    ch.basic_qos(0, 100, False)
    times: list[float] = []

    def on_message(msg):
        times.append(time.monotonic())
        ch.basic_ack(msg.delivery_tag)

    for name in names:
        ch.basic_consume(name, callback=on_message)
    print(json.dumps({"ready": len(names)}), flush=True)
    while len(times) < expect:
        conn.drain_events(timeout=120)
    print(json.dumps({"first": times[0], "last": times[-1], "n": len(times)}), flush=True)
    conn.close()
    return 0


def _amqp_args(url: str) -> dict:
    import urllib.parse

    u = urllib.parse.urlsplit(url)
    return {"host": f"{u.hostname}:{u.port or 5672}", "userid": urllib.parse.unquote(u.username),
            "password": urllib.parse.unquote(u.password), "virtual_host": urllib.parse.unquote(u.path[1:])}


class Sink:
    def __init__(self, url: str, queues: list[str], expect: int, workdir: Path):
        listing = workdir / f"sink-{uuid.uuid4().hex[:6]}.txt"
        listing.write_text("\n".join(queues))
        self.proc = subprocess.Popen([PY, __file__, "--sink", url, str(listing), str(expect)],
                                     stdout=subprocess.PIPE, text=True)
        line = json.loads(self.proc.stdout.readline() or "{}")
        if "ready" not in line:
            raise RuntimeError("the sink did not start")

    def result(self, timeout: float = 300) -> dict:
        out = json.loads(self.proc.stdout.readline() or "{}")
        self.proc.wait(timeout)
        return out


# -- (b) the raw broker -------------------------------------------------------------------------------------

def raw_setup(url: str, n: int) -> list[str]:
    names = [f"bench.raw.{i:04d}" for i in range(n)]
    with kombu.Connection(url) as conn:
        ch = conn.channel()
        ch.exchange_declare(RAW_EXCHANGE, "direct", durable=True)
        for name in names:
            ch.queue_declare(name, durable=True, auto_delete=False)
            ch.queue_bind(name, RAW_EXCHANGE, name)
    return names


def raw_round(url: str, names: list[str], body: bytes, mode: str, workdir: Path) -> float:
    """First publish → last delivery, seconds. mode: confirm (one wait per message), none, batch (one wait),
    bcc (one publish, the other queues' keys in its BCC header, as the bridge sends a job's BootGuests)."""
    s = Sink(url, names, len(names), workdir)
    conn = amqp.Connection(**_amqp_args(url), confirm_publish=(mode == "confirm"))
    conn.connect()
    ch = conn.channel()
    acked = [0]
    if mode == "batch":
        ch.confirm_select()
        ch.events["basic_ack"].add(lambda tag, multiple: acked.__setitem__(0, max(acked[0], tag)))
    t0 = time.monotonic()
    if mode == "bcc":
        ch.confirm_select()
        ch.basic_publish(amqp.Message(body, delivery_mode=2, content_type="application/json",
                                      application_headers={"BCC": names[1:]}), RAW_EXCHANGE, names[0])
    else:
        for name in names:
            ch.basic_publish(amqp.Message(body, delivery_mode=2, content_type="application/json"), RAW_EXCHANGE,
                             name)
    while mode == "batch" and acked[0] < len(names):
        conn.drain_events(timeout=30)
    result = s.result()
    conn.close()
    return result["last"] - t0


# -- (a) a job, as the hook publishes it -------------------------------------------------------------------

def tunnel_addresses(hosts: list[str]) -> dict[str, str]:
    """A job network endpoint per node, as their heartbeats would give the bridge."""
    return {h: f"10.9.{i // 250}.{i % 250 + 1}" for i, h in enumerate(hosts)}


def job_event(job_id: str, hosts: list[str]) -> m.JobStarted:
    return m.JobStarted.new(job_id=job_id, deadline=300.0, scheduler="slurm", owner=m.Owner(user="root", uid=0, gid=0),
                            nodes=[m.NodeAllocation(host=h, ncpus=1) for h in hosts],
                            spec={"img": "tiny", "vcpus": "1", "ram": "128M"}, ssh_authorized_keys=[KEY])


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes (all their threads) so far, s."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / tick


def run_job(url: str, publisher: Publisher, hosts: list[str], pids: dict[str, list[int]] | None = None
            ) -> tuple[float, float, dict[str, float]]:
    """(job event → every GuestReady, JobEnded → every GuestsTornDown, seconds; the CPU seconds each group of
    `pids` (the node hosts, the bridge, the broker) spent from the job event to the last GuestReady)."""
    pids = pids or {}
    job_id = f"s{uuid.uuid4().hex[:8]}"
    waiter = EventWaiter(url, [f"job.{m.routing_word(job_id)}.#"])
    try:
        cpu0 = {k: cpu_seconds(v) for k, v in pids.items()}
        t0 = time.monotonic()
        publisher.publish(job_event(job_id, hosts))
        ready = _collect(waiter, m.GuestReady, len(hosts), t0)
        cpu = {k: cpu_seconds(v) - cpu0[k] for k, v in pids.items()}
        t1 = time.monotonic()
        publisher.publish(m.JobEnded.new(job_id=job_id, deadline=120.0, scheduler="slurm", nodes=hosts))
        _collect(waiter, m.GuestsTornDown, len(hosts), t1)
        return ready, time.monotonic() - t1, cpu
    finally:
        waiter.close()


def _collect(waiter: EventWaiter, kind: type, count: int, t0: float) -> float:
    seen: set[str] = set()
    last = t0
    deadline = time.monotonic() + 600
    while len(seen) < count:
        event = waiter.next(deadline)
        if event is None:
            raise RuntimeError(f"{len(seen)} of {count} {kind.__name__} in time")
        if isinstance(event, (m.JobRejected, m.GuestFailed, m.CommandExpired)):
            raise RuntimeError(f"{type(event).__name__}: {getattr(event, 'reason', event)}")
        if isinstance(event, kind):
            seen.add(event.node)
            last = time.monotonic()
    return last - t0


def bridge_fanout(url: str, publisher: Publisher, sinks: list[str], workdir: Path) -> tuple[float, float]:
    """JobStarted → (the first, the last) of its BootGuests' copies delivered to a consumer of the nodes' queues:
    the first says when the bridge had published it, the rest is the broker's delivery."""
    s = Sink(url, [node_queue(h).name for h in sinks], len(sinks), workdir)
    t0 = time.monotonic()
    publisher.publish(job_event(f"f{uuid.uuid4().hex[:8]}", sinks))
    got = s.result()
    return got["first"] - t0, got["last"] - t0


def boot_body_size(config, hosts: list[str]) -> int:
    return len(m.encode(job_boot_command(config, "size", hosts)))


def job_boot_command(config, job_id: str, hosts: list[str], tunnels: bool = True) -> m.BootGuests:
    """The bridge's one BootGuests of a job on `hosts` (as planning makes it)."""
    from vtorque.services.scheduler_bridge.planning import boot_command, plan_guests
    from vtorque.shared.spec import validate

    job = job_event(job_id, hosts)
    return boot_command(job, plan_guests(job, validate(job.spec, config), config),
                        tunnel_addresses(hosts) if tunnels else None)


def job_bytes(config, hosts: list[str]) -> dict:
    """What the bridge sends for a job of `hosts` (plan, staging, the boot command as often as it is published)
    and what the broker delivers to the nodes' queues (each node its copy of the boot command)."""
    from vtorque.services.scheduler_bridge.planning import plan_guests
    from vtorque.shared.bus import sender_selected
    from vtorque.shared.spec import validate

    job = job_event("size", hosts)
    guests = plan_guests(job, validate(job.spec, config), config)
    boot = job_boot_command(config, "size", hosts)
    publishes = len(sender_selected([q.bindings[0] for q in topology.command_queues(boot)]))
    plan = len(m.encode(m.JobPlanned.new(job_id=job.job_id, deadline=60.0, guests=guests)))
    stage = len(m.encode(m.StageImage.new(job_id=job.job_id, deadline=60.0, image="tiny", digest="a" * 64)))
    boot_bytes = len(m.encode(boot))
    return {"plan": plan, "stage": stage, "boot": boot_bytes, "boot_publishes": publishes,
            "sent": plan + stage + publishes * boot_bytes, "delivered_to_nodes": len(hosts) * boot_bytes}


# -- (c) heartbeats ------------------------------------------------------------------------------------------

def bridge_beat_depth(broker: OwnBroker) -> int:
    """Ready + unacked in the bridge's own heartbeat queue (exclusive: only the broker's CLI sees it)."""
    out = broker.ctl("list_queues", "name", "messages_ready", "messages_unacknowledged", "--no-table-headers")
    prefix = topology.BRIDGE_NODES_Q.split("{")[0]
    return sum(int(r) + int(u) for name, r, u in (line.split() for line in out.splitlines() if line.strip())
               if name.startswith(prefix))


BURST = 4  # heartbeats per node in a burst: the broker's CLI, which tells when the queue is empty, takes ~0.4 s


def beat_burst(publisher: Publisher, broker: OwnBroker, hosts: list[str]) -> tuple[float, float]:
    """BURST fresh heartbeats per host, published at once; (publish s, publish start → bridge queue empty s)."""
    # With the job network endpoint each node's beat names: the bridge plans a job only onto nodes it knows one of.
    tunnels = tunnel_addresses(hosts)
    beats = [m.NodeHeartbeat.new(job_id="", deadline=60.0, node=h, cores=2, mem_free_mib=100_000, guests_running=0,
                                 domain_type="qemu", capabilities=["tcg"], interval=20.0, tunnel_address=tunnels[h])
             for _ in range(BURST) for h in hosts]
    t0 = time.monotonic()
    _publish_all(publisher, beats)
    published = time.monotonic() - t0
    while bridge_beat_depth(broker) > 0:
        time.sleep(0.2)
    return published, time.monotonic() - t0


def _publish_all(publisher: Publisher, messages: list) -> None:
    many = getattr(publisher, "publish_many", None)
    if many is not None:
        many(messages)
    else:
        for message in messages:
            publisher.publish(message)


# -- (d) one node, many guests -------------------------------------------------------------------------------

def per_node_growth(config, url: str, workdir: Path, counts=(1, 8, 32, 128, 256)) -> list[dict]:
    """Per operation on one node as its guests grow: a boot of one more, a heartbeat's facts, a teardown of one;
    at each count the median of REPEATS (the teardown of the newest guest, then its boot again as a new job)."""
    cfg = many_nodes.node_config(config, "grow0000", 0, workdir / "grow", 28200, max(counts) + 8)
    guests = many_nodes.InstantGuests()
    worker = node_service.NodeWorker(cfg, Publisher(url), hypervisor=many_nodes.InstantHypervisor(
        guests, str(workdir)), store=node_service.ImageStore(config.images.store),
        segments=many_nodes.instant_segments(workdir))
    rows, jobs = [], []
    node_facts(worker)  # once before: its first call probes QEMU's devices (vRDMA), once per process
    with many_nodes.instant_host(guests):
        for k in range(max(counts)):
            jobs.append(f"g{k}")
            worker.on_boot_guests(_one_guest_boot(config, jobs[-1], cfg.node.name))
            if k + 1 not in counts:
                continue
            facts, boots, downs = [], [], []
            for i in range(REPEATS):
                t0 = time.monotonic()
                beat = node_facts(worker)
                facts.append(time.monotonic() - t0)
                assert beat.guests_running == k + 1, beat.guests_running
                t0 = time.monotonic()
                worker.teardown_job(jobs.pop())
                downs.append(time.monotonic() - t0)
                jobs.append(f"g{k}r{i}")
                plan = _one_guest_boot(config, jobs[-1], cfg.node.name)
                t0 = time.monotonic()
                worker.on_boot_guests(plan)
                boots.append(time.monotonic() - t0)
            rows.append({"guests": k + 1, "boot_s": median(boots), "facts_s": median(facts),
                         "teardown_s": median(downs)})
        while jobs:
            worker.teardown_job(jobs.pop())
    return rows


def per_node_job_size(config, url: str, workdir: Path, sizes=(1, 64, 256, 1024)) -> list[dict]:
    """What one node spends on its guest of a job of n nodes (the job's one command names all n nodes; the node
    expands all n peers from it, checks them and writes them into the guest's hosts file): decoding the command,
    and its whole boot. Per node O(n); the bench's one process pays it for every node, a cluster's nodes each
    once, side by side."""
    rows = []
    guests = many_nodes.InstantGuests()
    with many_nodes.instant_host(guests):
        for n in sizes:
            cfg = many_nodes.node_config(config, f"size{n:04d}", 0, workdir / "size", 28400 + n % 7 * 8, 8)
            worker = node_service.NodeWorker(cfg, Publisher(url), hypervisor=many_nodes.InstantHypervisor(
                guests, str(workdir)), store=node_service.ImageStore(config.images.store),
                segments=many_nodes.instant_segments(workdir))
            hosts = [cfg.node.name] + [f"peer{i:04d}" for i in range(n - 1)]
            samples = []
            for k in range(REPEATS + 1):  # the first: this worker's first boot (its libvirt threads start)
                command = job_boot_command(config, f"z{n}k{k}", hosts)
                body = m.encode(command)
                t0, c0 = time.monotonic(), time.process_time()
                decoded = m.decode(body)
                decode = time.monotonic() - t0
                t0 = time.monotonic()
                worker.on_boot_guests(decoded)
                samples.append((decode, time.monotonic() - t0, time.process_time() - c0))
                worker.teardown_job(command.job_id)
            rest = samples[1:]
            rows.append({"nodes": n, "bytes": len(body), "decode_s": median([d for d, _, _ in rest]),
                         "boot_s": median([b for _, b, _ in rest]), "cpu_s": median([c for _, _, c in rest]),
                         "first_boot_s": samples[0][1]})
    return rows


REPEATS = 5  # boots per job size in (d), after the first


def _one_guest_boot(config, job_id: str, host: str) -> m.BootGuests:
    return job_boot_command(config, job_id, [host], tunnels=False)


# -- the run ------------------------------------------------------------------------------------------------

def start_nodes(procs: list, config_path: Path, env: dict, args, log: Path) -> None:
    """`args.node_procs` node host processes, each with its share of the nodes (node0000… in order): a cluster's
    nodes work side by side, and one Python process uses one core. Guests' ports from 24,000, 4 per node: below
    Linux's ephemeral range (32768-60999), where this run's own client sockets would take them."""
    t0 = time.monotonic()
    share = -(-args.nodes // args.node_procs)
    hosts = []
    for first in range(0, args.nodes, share):
        count = min(share, args.nodes - first)
        part = log.with_suffix(f".{first}.log")
        hosts.append((part, subprocess.Popen(
            [PY, str(HERE / "many_nodes.py"), str(config_path), "node", str(count), "24000", str(first)],
            env=env, stdout=subprocess.PIPE, stderr=open(part, "w"), text=True)))
        procs.append(hosts[-1][1])
    for part, proc in hosts:
        started = json.loads(proc.stdout.readline() or "{}")
        if "ready" not in started:
            raise RuntimeError(f"node host failed:\n{part.read_text()[-3000:]}")
    print(f"{args.nodes} node identities in {len(hosts)} processes consuming after {time.monotonic() - t0:.1f} s",
          flush=True)


def median(values):
    return statistics.median(values) if values else float("nan")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=1024)
    parser.add_argument("--heartbeat", type=float, default=10.0, help="the nodes' heartbeat interval, s")
    parser.add_argument("--node-procs", type=int, default=os.cpu_count() or 1,
                        help="node host processes sharing the nodes (default: one per CPU)")
    parser.add_argument("--skip-jobs", action="store_true",
                        help="no node host: only (b), (c)'s burst and (d) (e.g. to measure an older commit)")
    parser.add_argument("--sink", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sink:
        return sink(args.sink[0], args.sink[1], int(args.sink[2]))
    sizes = [s for s in SIZES if s <= args.nodes]
    root = Path(tempfile.mkdtemp(prefix="vtorque-scale-"))
    os.chmod(root, 0o711)
    procs: list[subprocess.Popen] = []
    try:
        broker = OwnBroker(root)
        try:
            url = broker.url
            config_path = write_site(root, url, args.heartbeat)
            config = load_config(str(config_path), env={})
            env = dict(os.environ, VTORQUE_CONFIG=str(config_path))
            with kombu.Connection(url) as conn:
                declare_topology(conn.channel())
            bridge_log = root / "bridge.log"
            procs.append(subprocess.Popen([str(Path(PY).parent / "vtorque"), "run", "bridge"], env=env,
                                          stdout=open(bridge_log, "w"), stderr=subprocess.STDOUT))
            wait_for_line(bridge_log, "consuming", procs[-1], 60)
            publisher = Publisher(url)
            print(
                f"machine: {platform.node()}, {os.cpu_count()} CPUs, {platform.platform()}; "
                f"RabbitMQ {broker.ctl('eval', 'rabbit_misc:version().').strip()} (a node of this run's own)",
                flush=True,
            )

            growth = per_node_growth(config, url, root)
            print("(d) one node, per operation:", json.dumps(growth), flush=True)
            by_size = per_node_job_size(config, url, root)
            print("(d) one node, its guest of a job of n nodes:", json.dumps(by_size), flush=True)

            raw_names = raw_setup(url, args.nodes)
            sink_hosts = [f"sink{i:04d}" for i in range(args.nodes)]
            with kombu.Connection(url) as conn:  # node queues nobody serves: the bridge's fan-out alone
                channel = conn.channel()
                for host in sink_hosts:
                    node_queue(host)(channel).declare()
            boot_size = boot_body_size(config, sink_hosts)
            per_job = job_bytes(config, sink_hosts)
            print(f"bytes of a job of {args.nodes} nodes:", json.dumps(per_job), flush=True)

            nodes_log = root / "nodes.log"
            hosts = [f"node{i:04d}" for i in range(args.nodes)]
            depths: list[int] = []
            if args.skip_jobs:
                sizes = []
            else:
                start_nodes(procs, config_path, env, args, nodes_log)
                for _ in range(10):  # (c) steady state: the nodes beat every args.heartbeat s
                    depths.append(bridge_beat_depth(broker))
                    time.sleep(2)
                print(f"(c) bridge heartbeat queue depth while {args.nodes} nodes beat every {args.heartbeat} s:",
                      depths, flush=True)

            pids = {"nodes": [p.pid for p in procs[1:]], "bridge": [procs[0].pid], "broker": broker.beam_pids()}
            rounds = []
            for r in range(args.rounds):
                row: dict = {"load1": os.getloadavg()[0]}
                small = b"x" * 1024
                big = b"x" * boot_size
                row["raw_confirm"] = raw_round(url, raw_names, small, "confirm", root)
                row["raw_none"] = raw_round(url, raw_names, small, "none", root)
                row["raw_batch"] = raw_round(url, raw_names, small, "batch", root)
                row["raw_big_none"] = raw_round(url, raw_names, big, "none", root)
                row["raw_big_batch"] = raw_round(url, raw_names, big, "batch", root)
                row["raw_big_bcc"] = raw_round(url, raw_names, big, "bcc", root)
                row["raw_small_bcc"] = raw_round(url, raw_names, small, "bcc", root)
                row["beats_publish"], row["beats_drained"] = beat_burst(publisher, broker, sink_hosts)
                row["bridge_first"], row["bridge"] = bridge_fanout(url, publisher, sink_hosts, root)
                for size in sizes:
                    row[f"job{size}"], row[f"down{size}"], cpu = run_job(url, publisher, hosts[:size], pids)
                    row.update({f"cpu_{k}{size}": v for k, v in cpu.items()})
                rounds.append(row)
                print(f"round {r + 1}:", json.dumps({k: round(v, 3) for k, v in row.items()}), flush=True)
            report(rounds, sizes, growth, boot_size, depths, args, by_size)
            print(f"\nbytes of a job of {args.nodes} nodes: {json.dumps(per_job)}")
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
            broker.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


def report(rounds, sizes, growth, boot_size, depths, args, by_size) -> None:
    n = args.nodes
    print(f"\nrounds: {len(rounds)}; BootGuests body for {n} nodes: {boot_size} bytes")
    print("| what | " + " | ".join(f"round {i + 1}" for i in range(len(rounds))) + " | median |")
    print("|---|" + "---|" * (len(rounds) + 1))

    def line(label, key, scale=1.0):
        vals = [r[key] * scale for r in rounds]
        print(f"| {label} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | **{median(vals):.3f}** |")

    line("load average (1 min) at the round's start", "load1")
    for size in sizes:
        line(f"job of {size} node(s): event → all GuestReady, s", f"job{size}")
    for size in sizes:
        line(f"job of {size} node(s): the node hosts' CPU from event to ready, ms per node", f"cpu_nodes{size}",
             1e3 / size)
    for size in sizes:
        line(f"job of {size} node(s): the broker's CPU from event to ready, s", f"cpu_broker{size}")
    for size in sizes:
        line(f"job of {size} node(s): the bridge's CPU from event to ready, s", f"cpu_bridge{size}")
    for size in sizes:
        line(f"teardown of {size} node(s): JobEnded → all GuestsTornDown, s", f"down{size}")
    line(f"raw: {n} × 1 KiB, a confirm per message, s", "raw_confirm")
    line(f"raw: {n} × 1 KiB, no confirms, s", "raw_none")
    line(f"raw: {n} × 1 KiB, confirms awaited once, s", "raw_batch")
    line(f"raw: {n} × {boot_size} B, no confirms, s", "raw_big_none")
    line(f"raw: {n} × {boot_size} B, confirms awaited once, s", "raw_big_batch")
    line(f"raw: 1 × {boot_size} B, BCC to {n} queues, s", "raw_big_bcc")
    line(f"raw: 1 × 1 KiB, BCC to {n} queues, s", "raw_small_bcc")
    line(f"bridge: JobStarted → its BootGuests delivered from the first of {n} node queues, s", "bridge_first")
    line(f"bridge: JobStarted → its BootGuests delivered from the last of {n} node queues, s", "bridge")
    for label, key in (
        ("1 KiB none", "raw_none"),
        ("1 KiB batch", "raw_batch"),
        ("same bytes, batch", "raw_big_batch"),
        ("same body, one BCC publish", "raw_big_bcc"),
    ):
        ratios = [r[key] / r["bridge"] for r in rounds]
        print(
            f"| bridge ÷ raw ({label}) | " + " | ".join(f"{v:.2f}" for v in ratios) + f" | **{median(ratios):.2f}** |"
        )
    line(f"heartbeats: {BURST * n} published at once, s", "beats_publish")
    line(f"heartbeats: {BURST * n} published → bridge's queue empty, s", "beats_drained")
    rates = [BURST * n / r["beats_drained"] for r in rounds]
    print("| heartbeats consumed by the bridge, per s | " + " | ".join(f"{v:.0f}" for v in rates)
          + f" | **{median(rates):.0f}** |")
    print(f"\n(c) bridge heartbeat queue depth, every 2 s, {n} nodes beating every {args.heartbeat} s: {depths}")
    print(f"\n(d) one node (median of {REPEATS}) | boot of one more guest, ms | heartbeat facts, ms | "
          "teardown of one guest, ms |")
    print("|---|---|---|---|")
    for row in growth:
        print(f"| {row['guests']} guests | {row['boot_s'] * 1e3:.1f} | {row['facts_s'] * 1e3:.1f} | "
              f"{row['teardown_s'] * 1e3:.1f} |")
    print(f"\n(d) one node, its guest of a job of n nodes (median of {REPEATS}) | BootGuests bytes | decode, ms | "
          "boot, ms | CPU of decode + boot, ms | the worker's first boot, ms |")
    print("|---|---|---|---|---|---|")
    for row in by_size:
        print(f"| {row['nodes']} nodes | {row['bytes']} | {row['decode_s'] * 1e3:.1f} | {row['boot_s'] * 1e3:.1f} | "
              f"{row['cpu_s'] * 1e3:.1f} | {row['first_boot_s'] * 1e3:.1f} |")


if __name__ == "__main__":
    sys.exit(main())
