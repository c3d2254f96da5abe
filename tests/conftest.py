"""What every test run shares: the skip policy, and isolation from the machine and from a running stack.

- Skip policy: a test that skips or xfails fails the session unless its node id is on tests/skip_allowlist.txt
  with the reason it may (a skip that hides a gap leaves CI green otherwise).
- A broker of the tests' own: a RabbitMQ vhost and a user with rights on that vhost only, made with rabbitmqctl
  for the session and deleted after it. The single-host stack's bridge, stager and node worker consume the
  default vhost "/"; nothing a test publishes can reach them, and nothing they publish reaches a test.
- A site of the test's own (`test_site`): a config file with the test broker, a node name that is never this
  host's, and every state directory under a temporary root.
- Fake hosts: the hardware a test assumes (core count, NUMA nodes, sKVM's IOcm interface, RDMA devices, QEMU's
  device list) set up as a sysfs tree of its own and injected, so no outcome depends on this machine's size.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import stat
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

# -- skip policy --------------------------------------------------------------------------------------------

ALLOWLIST = TESTS / "skip_allowlist.txt"


def load_allowlist(path: Path) -> dict[str, str]:
    """{node id: why} from lines `NODEID  # why`; an entry without a reason is refused."""
    entries: dict[str, str] = {}
    if not path.exists():
        return entries
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        nodeid, _, why = line.partition(" # ")
        if not why.strip() or not nodeid.strip():
            raise pytest.UsageError(f"{path}:{number}: an entry is 'NODEID  # why it may skip', got {raw!r}")
        entries[nodeid.strip()] = why.strip()
    return entries


class SkipPolicy:
    """Collects every skip and xfail; the session fails when one of them is not allowed."""

    def __init__(self, allowlist: dict[str, str], source: Path):
        self.allowlist, self.source = allowlist, source
        self.refused: dict[str, str] = {}  # node id -> what happened
        self.allowed: dict[str, str] = {}

    def _allows(self, nodeid: str) -> bool:
        # An entry without parameters covers every parametrisation of the test.
        return nodeid in self.allowlist or nodeid.split("[", 1)[0] in self.allowlist

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report) -> None:
        if hasattr(report, "wasxfail"):
            what = f"xfail: {report.wasxfail or 'no reason'}"
        elif report.skipped:
            longrepr = report.longrepr
            reason = str(longrepr[2] if isinstance(longrepr, tuple) else longrepr)
            what = f"skip: {reason.removeprefix('Skipped: ')}"
        else:
            return
        (self.allowed if self._allows(report.nodeid) else self.refused).setdefault(report.nodeid, what)

    @pytest.hookimpl
    def pytest_collectreport(self, report) -> None:
        """A whole module skipped at import (pytest.importorskip, skip(allow_module_level=True))."""
        if report.skipped:
            self.pytest_runtest_logreport(report)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session) -> None:
        if self.refused and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    @pytest.hookimpl
    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.allowed:
            terminalreporter.section(f"skips allowed by {self.source.name}")
            for nodeid, what in self.allowed.items():
                why = self.allowlist.get(nodeid) or self.allowlist.get(nodeid.split("[", 1)[0])
                terminalreporter.line(f"{nodeid}: {what} ({why})")
        if self.refused:
            terminalreporter.section("skips not allowed (the session fails)", red=True)
            for nodeid, what in self.refused.items():
                terminalreporter.line(f"{nodeid}: {what}")
            terminalreporter.line(f"a skip passes only when {self.source} names the test and why it may skip")


def pytest_configure(config) -> None:
    source = Path(os.environ.get("VTORQUE_SKIP_ALLOWLIST", ALLOWLIST))
    config.pluginmanager.register(SkipPolicy(load_allowlist(source), source), "vtorque-skip-policy")


# -- a broker of the tests' own -----------------------------------------------------------------------------

BROKER_HOST, BROKER_PORT = "127.0.0.1", 5672
PREFIX = "vtorque-test-"


def rabbitmqctl(*args: str) -> str:
    tool = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    try:
        proc = subprocess.run([tool, "-q", *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"rabbitmqctl {args[0]} failed: {exc} (tests need root and RabbitMQ on this host)")
    if proc.returncode != 0:
        pytest.fail(f"rabbitmqctl {' '.join(args[:2])} failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


@dataclass
class PrivateBroker:
    """A vhost and a user with rights on it alone; `url` is what a test or a service of a test connects to."""

    vhost: str
    user: str
    password: str

    @property
    def url(self) -> str:
        return f"amqp://{self.user}:{self.password}@{BROKER_HOST}:{BROKER_PORT}/{self.vhost}"


def _remove_abandoned() -> None:
    """Vhosts and users of test sessions whose process is gone (killed before its teardown)."""
    for kind, listing in (("vhost", "list_vhosts"), ("user", "list_users")):
        for line in rabbitmqctl(listing, "--no-table-headers").splitlines():
            name = line.split()[0] if line.split() else ""
            parts = name[len(PREFIX):].split("-")
            if not name.startswith(PREFIX) or len(parts) != 2 or not parts[0].isdigit():
                continue
            try:
                os.kill(int(parts[0]), 0)
            except ProcessLookupError:
                rabbitmqctl(f"delete_{kind}", name)
            except PermissionError:
                pass


@contextlib.contextmanager
def private_broker_for(owner_pid: int | None = None):
    """A fresh PrivateBroker, deleted with all its queues afterwards. Names carry the owning pid so a later
    session removes what a killed one left."""
    name = f"{PREFIX}{owner_pid or os.getpid()}-{uuid.uuid4().hex[:8]}"
    broker = PrivateBroker(vhost=name, user=name, password=secrets.token_hex(16))
    rabbitmqctl("add_vhost", broker.vhost)
    try:
        rabbitmqctl("add_user", broker.user, broker.password)
        try:
            rabbitmqctl("set_permissions", "-p", broker.vhost, broker.user, ".*", ".*", ".*")
            import kombu

            try:
                with kombu.Connection(broker.url, connect_timeout=5) as conn:
                    conn.ensure_connection(max_retries=3)
            except Exception as exc:  # noqa: BLE001
                pytest.fail(f"RabbitMQ at {BROKER_HOST}:{BROKER_PORT} refused the test broker user ({exc})")
            yield broker
        finally:
            rabbitmqctl("delete_user", broker.user)
    finally:
        rabbitmqctl("delete_vhost", broker.vhost)


@pytest.fixture(scope="session")
def private_broker():
    """A factory: `with private_broker() as b:` for a module that needs a vhost no other module shares."""
    _remove_abandoned()
    return private_broker_for


SITE_CONFIG = Path("/etc/vtorque/vtorque.toml")


def stack_vhosts() -> list[str]:
    """The vhosts a running stack may consume: the one the site config names (the single-host stack's own),
    and "/" (RabbitMQ's default, where an older stack or a default config listens)."""
    import tomllib
    from urllib.parse import unquote, urlparse

    vhosts = ["/"]
    try:
        url = tomllib.loads(SITE_CONFIG.read_text()).get("broker", {}).get("url", "")
    except (OSError, ValueError):
        url = ""
    if url:
        path = urlparse(url).path[1:]
        vhost = "/" if path in ("", "/") else unquote(path)
        if vhost not in vhosts:
            vhosts.append(vhost)
    return vhosts


def stack_node_queues() -> set[str]:
    """The node command queues on the stack's vhosts (one per real node worker there)."""
    queues = set()
    existing = set(rabbitmqctl("list_vhosts", "--no-table-headers").split())
    for vhost in stack_vhosts():
        if vhost not in existing:
            continue
        out = rabbitmqctl("list_queues", "-p", vhost, "name", "--no-table-headers")
        queues |= {f"{vhost}:{q.strip()}" for q in out.splitlines() if q.strip().startswith("vtorque.node.")}
    return queues


@contextlib.contextmanager
def stack_observer(vhost: str):
    """An AMQP URL on a stack vhost for a user of the test's own that may only make, bind and read queues named
    vtorque-test-observer-* (and read the stack's exchanges); removed afterwards."""
    name = f"{PREFIX}{os.getpid()}-obs{uuid.uuid4().hex[:6]}"
    password = secrets.token_hex(16)
    rabbitmqctl("add_user", name, password)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, name, "^vtorque-test-observer-.*", "^vtorque-test-observer-.*",
                    ".*")
        from urllib.parse import quote

        yield f"amqp://{name}:{password}@{BROKER_HOST}:{BROKER_PORT}/{quote(vhost, safe='')}"
    finally:
        rabbitmqctl("delete_user", name)


@pytest.fixture(scope="session")
def test_broker(private_broker) -> PrivateBroker:
    """The session's own vhost and user. Afterwards, a node queue that appeared on a stack vhost meanwhile fails
    the session: something published a command for a node of a test where the stack's services listen."""
    before = stack_node_queues()
    with private_broker() as broker:
        yield broker
    leaked = sorted(stack_node_queues() - before)
    if leaked:
        pytest.fail(f"node queues appeared on the stack's vhosts during this test session: {leaked} (a test "
                    f"published where the stack listens; use the broker_url/test_site fixtures of tests/conftest.py)")


@pytest.fixture
def broker_url(test_broker) -> str:
    return test_broker.url


@pytest.fixture
def node_name(test_broker) -> str:
    """A node name of this test's own (never this host's), and its command queue removed afterwards."""
    name = unique_node_name()
    yield name
    import kombu

    with kombu.Connection(test_broker.url) as conn:
        with contextlib.suppress(Exception):
            conn.channel().queue_delete(f"vtorque.node.{name}")


def unique_node_name(prefix: str = "tn") -> str:
    name = f"{prefix}{uuid.uuid4().hex[:10]}"
    assert name != os.uname().nodename.split(".")[0]
    return name


# -- the test guest -----------------------------------------------------------------------------------------

TEST_GUEST_DIR = Path(os.environ.get("VTORQUE_TEST_GUEST_DIR", "/var/cache/vtorque/testguest"))


@pytest.fixture(scope="session")
def test_guest():
    """The tiny direct-boot test guest (tests/guest/build.sh; a cached build returns at once) as a catalog
    entry, independent of the site's catalog."""
    from vtorque.shared.config import ImageEntry

    run = subprocess.run([str(TESTS / "guest/build.sh"), str(TEST_GUEST_DIR)], capture_output=True, text=True,
                         timeout=1800)
    assert run.returncode == 0, f"tests/guest/build.sh failed (exit {run.returncode}):\n{run.stderr[-3000:]}"
    sums = dict(reversed(line.split()) for line in (TEST_GUEST_DIR / "SHA256SUMS").read_text().splitlines())
    return ImageEntry(source=str(TEST_GUEST_DIR / "rootfs.qcow2"), sha256=sums["rootfs.qcow2"], format="qcow2",
                      kernel=str(TEST_GUEST_DIR / "vmlinux"), initrd=str(TEST_GUEST_DIR / "initrd.img"))


# -- a site of the test's own -------------------------------------------------------------------------------

def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


@dataclass
class TestSite:
    """A vtorque config of a test's own: its broker, node name, and every directory under `root` (mode 0711
    under /tmp: QEMU runs as libvirt-qemu and must traverse to the guests' files, which pytest's 0700 tmp
    does not allow)."""

    __test__ = False  # not a test class

    root: Path
    broker_url: str
    node: str
    catalog: dict = field(default_factory=dict)  # name -> ImageEntry
    sections: dict = field(default_factory=dict)  # extra keys: {"spec": {...}, "node": {...}, "scheduler": ...}

    @property
    def path(self) -> Path:
        return self.root / "vtorque.toml"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    def write(self) -> Path:
        import msgspec

        sections = {
            "broker": {"url": self.broker_url, "connect_timeout": 3.0},
            "tracing": {"dir": str(self.root / "traces")},
            "images": {"store": str(self.root / "images")},
            "spec": {"host_reserve_cores": 0, "host_reserve_ram": "0M"},
            # the ramdisk root too: a test never makes the real /dev/shm/vtorque
            "node": {
                "name": self.node,
                "guest_dir": str(self.root / "guests"),
                "ramdisk_dir": str(self.root / "shm/guests"),
            },
            # No scheduler answers for a test's jobs unless the test says which (see fake_scheduler).
            # The bridge's check of job events against the scheduler is off here; its own tests turn it on.
            "scheduler": {"kind": "slurm", "bin_dir": str(self.root / "no-scheduler"), "verify_jobs": False},
            "prefetch": {"slurm_state_dir": str(self.root / "slurm-state"), "torque_home": str(self.root / "torque")},
            "torque": {"home": str(self.root / "torque"), "log_file": str(self.root / "torque-hooks.log")},
        }
        from vtorque.shared.config import NodeConfig

        if "allow_system_owners" in NodeConfig.__struct_fields__:
            # The tests' guests belong to root, as on the single-host stack (services/node_worker/trust.py
            # refuses system owners unless the site allows them).
            sections["node"]["allow_system_owners"] = True
        for key, more in self.sections.items():
            if isinstance(more, dict):
                sections.setdefault(key, {}).update(more)
            else:
                sections[key] = more
        lines = [f"state_dir = {toml_value(str(self.state_dir))}", 'log_level = "INFO"', ""]
        for key, values in sections.items():
            if not isinstance(values, dict):
                lines.insert(0, f"{key} = {toml_value(values)}")
                continue
            lines.append(f"[{key}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
            lines.append("")
        for name, entry in self.catalog.items():
            lines.append(f"[images.catalog.{name}]")
            for k, v in msgspec.structs.asdict(entry).items():
                if v is not None and v != [] and v != {}:
                    lines.append(f"{k} = {toml_value(v)}")
            lines.append("")
        self.path.write_text("\n".join(lines))
        return self.path

    def config(self):
        from vtorque.shared.config import load_config

        return load_config(self.write(), env={})

    def env(self, **more) -> dict:
        """The environment of a process of this site: no VTORQUE_* of the caller's (a developer's shell may
        carry the stack's), the test config."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("VTORQUE_")}
        env.update(VTORQUE_CONFIG=str(self.write()), **more)
        return env

    def stage(self, *names: str) -> None:
        """Put catalog images into this site's store, as a stager would have."""
        from vtorque.shared.image_store import ImageStore

        for name in names or list(self.catalog):
            entry = self.catalog[name]
            ImageStore(str(self.root / "images")).stage(entry.source, entry.sha256)


def make_site_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="vtorque-test-site-", dir="/tmp"))
    root.chmod(0o711)
    for sub in ("state", "guests", "images", "traces"):
        (root / sub).mkdir(mode=0o711)
        (root / sub).chmod(0o711)
    return root


@pytest.fixture
def test_site(test_broker):
    """A site of this test's own on the session's broker; its root is removed afterwards."""
    root = make_site_root()
    site = TestSite(root=root, broker_url=test_broker.url, node=unique_node_name())
    yield site
    shutil.rmtree(root, ignore_errors=True)


def fake_scheduler(directory: Path) -> Path:
    """A `scontrol` that knows exactly the jobs a test names: `touch DIR/jobs/ID` makes ID a running job;
    any other id is "Invalid job id", as Slurm says of a job it never had."""
    jobs = directory / "jobs"
    jobs.mkdir(parents=True, exist_ok=True)
    script = directory / "scontrol"
    script.write_text(f"""#!/bin/sh
# scontrol -o show job ID: the job id is the last argument
for id; do :; done
if [ -e '{jobs}/'"$id" ]; then
    echo "JobId=$id JobName=test UserId=root(0) JobState=RUNNING Reason=None ExitCode=0:0 NodeList=(null)"
    exit 0
fi
echo "slurm_load_jobs error: Invalid job id specified" >&2
exit 1
""")
    script.chmod(0o755)
    return jobs


# -- fake hosts ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FakeHost:
    """The hardware facts the node worker reads, as a machine of this shape would show them."""

    name: str
    cores: int
    numa_nodes: int
    skvm: bool = False  # sKVM's IOcm vhost interface (/sys/class/vhost/worker/create)
    rdma: bool = False  # one ConnectX with two SR-IOV VFs and an IOMMU
    qemu_devices: tuple[str, ...] = ("e1000", "ivshmem-plain")

    def topology(self) -> dict[int, frozenset[int]]:
        per = self.cores // self.numa_nodes
        return {n: frozenset(range(n * per, (n + 1) * per)) for n in range(self.numa_nodes)}

    def build(self, root: Path) -> BuiltHost:
        sysfs = root / "sys"
        nodes = sysfs / "devices/system/node"
        for n, cpus in self.topology().items():
            (nodes / f"node{n}").mkdir(parents=True)
            (nodes / f"node{n}/cpulist").write_text(f"{min(cpus)}-{max(cpus)}\n")
        (sysfs / "devices/system/cpu").mkdir(parents=True)
        (sysfs / "devices/system/cpu/online").write_text(f"0-{self.cores - 1}\n")
        (sysfs / "kernel/iommu_groups").mkdir(parents=True)
        (sysfs / "class").mkdir(exist_ok=True)
        vhost = sysfs / "class/vhost"
        if self.skvm:
            (vhost / "worker").mkdir(parents=True)
            (vhost / "dev").mkdir(parents=True)
            (vhost / "worker/create").write_text("")
        if self.rdma:
            (sysfs / "kernel/iommu_groups/7").mkdir()
            dev = sysfs / "class/infiniband/mlx5_0"
            pci = sysfs / "devices/pci0000:00"
            for addr in ("0000:03:00.1", "0000:03:00.2"):  # VFs 0 and 1
                (pci / addr).mkdir(parents=True)
            (dev / "device/net/ens3f0").mkdir(parents=True)
            (dev / "ports/1").mkdir(parents=True)
            (dev / "device/virtfn0").symlink_to(pci / "0000:03:00.1")
            (dev / "device/virtfn1").symlink_to(pci / "0000:03:00.2")
            (root / "run").mkdir()
            (root / "run/rdmacm-mux-mlx5_0-1").write_text("")  # rdmacm-mux's socket, which pvrdma needs
        qemu = root / "qemu-system-x86_64"
        lines = "\n".join(f'name "{d}", bus PCI, desc "fake"' for d in self.qemu_devices)
        qemu.write_text(f"#!/bin/sh\ncat <<'EOF'\n{lines}\nEOF\n")
        qemu.chmod(qemu.stat().st_mode | stat.S_IXUSR)
        return BuiltHost(self, sysfs, vhost, qemu, root / "run")


@dataclass(frozen=True)
class BuiltHost:
    host: FakeHost
    sysfs: Path
    vhost: Path
    qemu: Path
    run_dir: Path

    def probe(self):
        """What vrdma.probe finds on this host (the real function, even while a fake host is injected)."""
        return _REAL_PROBE(qemu=str(self.qemu), sysfs=str(self.sysfs), run_dir=str(self.run_dir), refresh=True)

    def inject(self, monkeypatch) -> BuiltHost:
        """Make the node worker's code see this host instead of the machine it runs on."""
        from vtorque.services.node_worker import iocm, numa, vrdma

        probe = self.probe()
        monkeypatch.setattr(numa, "SYSFS", str(self.sysfs))
        monkeypatch.setattr(iocm, "SKVM_VHOST", str(self.vhost))
        monkeypatch.setattr(vrdma, "probe", lambda *a, **kw: probe)
        return self


from vtorque.services.node_worker.vrdma import probe as _REAL_PROBE  # noqa: E402 - before any injection

# The machine CI has (2 cores, one NUMA node, no sKVM, no RDMA), and a bigger one nothing here looks like.
SMALL = FakeHost("2-core-1-numa", cores=2, numa_nodes=1)
BIG = FakeHost("16-core-2-numa", cores=16, numa_nodes=2)
FAKE_HOSTS = [SMALL, BIG]


@pytest.fixture(params=FAKE_HOSTS, ids=lambda h: h.name)
def fake_host(request, tmp_path, monkeypatch) -> BuiltHost:
    """The test runs once on each fake host, injected."""
    return request.param.build(tmp_path / "host").inject(monkeypatch)


@pytest.fixture
def make_fake_host(tmp_path, monkeypatch):
    """A factory for a host of the test's choosing: make_fake_host(FakeHost(...)) builds and injects it."""
    def make(host: FakeHost) -> BuiltHost:
        return host.build(tmp_path / f"host-{uuid.uuid4().hex[:6]}").inject(monkeypatch)
    return make
