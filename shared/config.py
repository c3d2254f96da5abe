"""Site configuration: one TOML file (/etc/vtorque/vtorque.toml) plus VTORQUE_* overrides, decoded strictly.

An override names its key path with double underscores: VTORQUE_BROKER__URL sets [broker] url. Any error
names the key, e.g. "vtorque.toml: spec.max_vcpus: Expected `int`, got `str`".
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import msgspec

DEFAULT_PATH = "/etc/vtorque/vtorque.toml"
IMAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ConfigError(Exception):
    pass


class _Section(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


class BrokerConfig(_Section):
    url: str = "amqp://127.0.0.1:5672//"
    # "user:password" on one line; kept out of the main file so the file can stay world-readable for vsub.
    credentials_file: str | None = None
    # One file per broker user, <dir>/<user>.credentials (`vtorque broker setup`): each part of vtorque picks its
    # own (load_config(role=...)); it wins over credentials_file.
    credentials_dir: str | None = None
    heartbeat: int = 30
    connect_timeout: float = 5.0
    # Start of vtorque's broker user names (vtorque-bridge, vtorque-node-<host>, ...; `vtorque broker setup`).
    # A consumer running as one of them dead-letters a message its sender may not send (shared/topology.py).
    user_prefix: str = "vtorque-"
    # amqps: the CA that signed the broker's certificate (default: the system's trust store)
    ca_file: str | None = None
    # The nodes of a RabbitMQ cluster, "host:port" each: every part connects to the first that answers and
    # fails over to the next (url still gives scheme, vhost and credentials; its own host is then unused).
    # List the host's nearest node first to spread connections over the cluster.
    hosts: list[str] = []

    def connection_url(self) -> str:
        """The URL every part connects with: credentials from their file, and for amqps the CA to verify the
        broker with (shared/broker_tls.py reads it back). With `hosts`, one URL per node joined by ';' (kombu's
        failover form; shared/hook_channel.py gives pika the same list)."""
        url = self._with_credentials()
        if self.hosts:
            if url.startswith("amqps://"):
                # one server_hostname per connection in kombu: a certificate would have to name every node
                raise ConfigError("broker.hosts: amqps with several broker nodes is not supported yet")
            parts = urllib.parse.urlsplit(url)
            creds = parts.netloc.rpartition("@")[0]
            for host in self.hosts:
                if not re.fullmatch(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:]+\](:[0-9]{1,5})?", host):
                    raise ConfigError(f"broker.hosts: {host!r}: expected host or host:port")
            return ";".join(parts._replace(netloc=f"{creds}@{h}" if creds else h).geturl() for h in self.hosts)
        if self.ca_file and url.startswith("amqps://"):
            url += ("&" if "?" in url else "?") + "cafile=" + urllib.parse.quote(self.ca_file)
        return url

    def _with_credentials(self) -> str:
        if not self.credentials_file:
            return self.url
        try:
            creds = Path(self.credentials_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"broker.credentials_file: cannot read {self.credentials_file}: {exc.strerror}") from exc
        if ":" not in creds:
            raise ConfigError("broker.credentials_file: expected one line 'user:password'")
        scheme, _, rest = self.url.partition("://")
        rest = rest.split("@", 1)[-1]
        return f"{scheme}://{creds}@{rest}"


class TracingConfig(_Section):
    # OTLP/HTTP base endpoint (e.g. http://jaeger:4318); unset: spans go to OTLP-JSON files under `dir`.
    otlp_endpoint: str | None = None
    dir: str = "/var/lib/vtorque/traces"
    # Jaeger's query service (e.g. http://jaeger:16686): `vtorque trace`/`status` read traces there when set.
    query_endpoint: str | None = None
    # Seconds between metric exports (OTLP /v1/metrics, or <dir>/<service>.<uid>.metrics.jsonl without endpoint).
    metrics_interval: float = 15.0


class ImageEntry(_Section):
    source: str
    sha256: str
    format: Literal["qcow2", "raw"] = "qcow2"
    distro: str | None = None
    # Direct kernel boot (the test guest); cloud images boot from their own disk and leave these unset.
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    # `format` is what guests' overlays back onto; a source in another format (or compress = true, qcow2 only)
    # is converted by the stager with qemu-img after its sha256 (always of the source's bytes) was checked.
    source_format: Literal["qcow2", "raw"] | None = None
    compress: bool = False
    size: int | None = None  # bytes of the source, when known: progress totals and room made before a copy


class ImagesConfig(_Section):
    store: str = "/var/lib/vtorque/images"
    catalog: dict[str, ImageEntry] = {}
    # More catalog entries, written by `vtorque images add/update/remove` (same [images.catalog.NAME] tables;
    # an entry there replaces one of the same name here). Relative to this file's directory; default
    # images.toml beside it. Running services re-read it when it changes.
    catalog_file: str | None = None
    store_budget: str | None = None  # e.g. "200G": least recently used images beyond it are evicted
    http_timeout: float = 30.0  # seconds for an http(s) source to connect, and for each read
    http_retries: int = 5  # retries in a row of a dropped download (each resumes where it stopped)
    progress_interval: float = 1.0  # seconds between ImageStagingProgress events of one staging
    concurrent_stagings: int = 4  # StageImage commands one stager process works on at once


class SchedulerConfig(_Section):
    """The site's one resource manager and its client binaries, named once (shared/scheduler.py uses them).

    Every binary is called by absolute path: a hook's PATH is /bin:/usr/bin, and on a host with
    slurm-wlm-torque the first `qsub`/`qstat` on PATH is Slurm's even on a Torque site."""

    kind: Literal["torque", "slurm"] = "torque"
    # Where the client binaries live; default /usr/local/bin for Torque (its `make install`), /usr/bin for Slurm.
    bin_dir: str | None = None
    # One binary elsewhere: its absolute path (e.g. qsub = "/opt/torque/bin/qsub").
    qsub: str | None = None
    qstat: str | None = None
    qdel: str | None = None
    qsig: str | None = None
    squeue: str | None = None
    scontrol: str | None = None
    scancel: str | None = None
    timeout: float = 10.0  # seconds for one query of the scheduler
    # The bridge plans a job only once the scheduler confirms its event (job, owner, nodes): the hooks' hosts
    # are trusted no more than that. Off only on a test site with no scheduler to ask.
    verify_jobs: bool = True

    def binary(self, name: str) -> str:
        explicit = getattr(self, name, None) if name in type(self).__struct_fields__ else None
        if explicit:
            return explicit
        default = "/usr/local/bin" if self.kind == "torque" else "/usr/bin"
        return os.path.join(self.bin_dir or default, name)


class PrefetchConfig(_Section):
    """`vtorque run prefetch`: watches the scheduler's queue and stages a VM job's image before it starts."""

    torque_home: str = "/var/spool/torque"  # server_priv/accounting/YYYYMMDD and server_priv/jobs/<id>.SC
    slurm_state_dir: str | None = None  # slurmctld's StateSaveLocation (job scripts); else scontrol
    poll_interval: float = 1.0
    state_file: str | None = None  # default <state_dir>/prefetch/<scheduler>.json
    deadline: float = 3600.0  # seconds a prefetch StageImage stays worth doing


class SpecConfig(_Section):
    """Defaults and limits for the -vm keys (see shared/spec.py KEYS_TABLE)."""

    default_img: str | None = None
    default_distro: str = "debian"
    default_vcpus: int = 1
    max_vcpus: int = 64
    default_ram: str = "512M"
    min_ram: str = "64M"
    max_ram: str = "256G"
    default_vcpu_pinning: bool = True
    max_vms_per_node: int = 8
    vrdma_enabled: bool = True
    iocm_enabled: bool = True
    default_iocm_min_cores: int = 1
    default_iocm_max_cores: int = 2
    max_iocm_cores: int = 4
    default_fs_type: Literal["ramdisk", "sharedfs"] = "sharedfs"
    max_disk: str = "100G"
    # fs_type=ramdisk: how far a guest's root disk may grow in node memory. With its data disk (or max_disk for
    # the owner's own image) it is the size of the guest's own tmpfs, and what the job's memory must hold.
    ramdisk_root_max: str = "1G"
    # What a node keeps for itself; vsub raises ppn/mem so the VMs fit beside it.
    host_reserve_cores: int = 1
    host_reserve_ram: str = "2G"
    max_cores_per_node: int = 1024
    max_ram_per_node: str = "64T"
    # Directories besides the owner's home where -vm files (vm_prologue, disk images, metadata) may live.
    user_dirs: list[str] = []
    # qsub arguments that make a VM job own its nodes on this site (Torque: ["-n"]; Moab: ["-l",
    # "naccesspolicy=singlejob"]); empty: nodes may be shared.
    exclusive_args: list[str] = []
    # vRDMA backends a vrdma=true job must get (any of them); empty: the best each node has. E.g.
    # ["sriov-vf", "skvm-virtio-rdma"] on a site where shared memory on one node is not enough.
    vrdma_require: list[Literal["sriov-vf", "skvm-virtio-rdma", "pvrdma", "ivshmem"]] = []
    # The bridge plans only onto nodes whose node worker sent a fresh heartbeat with what the spec needs.
    check_node_capabilities: bool = True
    # Checkpoint across a requeue (-vm checkpoint=, services/node_worker/checkpoint.py): whether users may ask,
    # what a job gets when it does not say ("off", "requeue", or an interval such as "1h": the site's choice for
    # every VM job), and the shortest interval a job may ask for (each periodic checkpoint stops the guests for
    # the seconds its save and restore take).
    checkpoint_enabled: bool = True
    default_checkpoint: str = "off"
    min_checkpoint_interval: str = "10m"


class GuestMount(_Section):
    """A site file system every job guest mounts (cloud-init `mounts`); {user} and {home} are the job owner's."""

    source: str  # e.g. "nfs.example.org:/export/home/{user}"
    target: str  # e.g. "{home}" or "/scratch"
    fstype: str = "nfs"
    options: str = "defaults,nofail,_netdev"


class NodeConfig(_Section):
    name: str | None = None  # default: short host name, as the scheduler names nodes
    libvirt_uri: str = "qemu:///system"
    domain_type: Literal["auto", "kvm", "qemu"] = "auto"
    guest_dir: str = "/var/lib/vtorque/guests"  # fs_type=sharedfs: a directory on shared scratch on clusters
    ramdisk_dir: str = "/dev/shm/vtorque/guests"  # fs_type=ramdisk: node-local memory
    # Home and scratch inside the guests, as the site serves them (vTorque's VM_NFS_HOME / VM_NFS_WS).
    guest_mounts: list[GuestMount] = []
    # The job network (services/node_worker/job_segment.py): the node's VXLAN endpoint, its address on the
    # cluster network (loopback on one test host, where a job's guests share one bridge); the UDP port, below
    # 1024 so no user can bind it first; and the guests' MTU on it (the cluster network's less VXLAN's 50 bytes).
    job_network_localaddr: str = "127.0.0.1"
    job_network_port: int = 789
    job_network_mtu: int = 1450
    # Reconciliation (services/node_worker/reconcile.py): how often, and whom to ask whether a job still runs.
    reconcile_interval: float = 30.0
    # Guests for a job owned by root or a system account (uid < 1000): refused unless the site allows it
    # (a one-machine test site where root submits, as the single-host stack).
    allow_system_owners: bool = False
    boot_timeout: float = 180.0
    ssh_port_min: int = 22000
    ssh_port_max: int = 22999
    # Seconds between NodeHeartbeat events (what `vtorque nodes` shows); a node silent for 3 of them is stale.
    heartbeat_interval: float = 10.0
    # vRDMA backends this node may give guests, best first (services/node_worker/vrdma.py); drop one to
    # forbid it here.
    vrdma_backends: list[Literal["sriov-vf", "skvm-virtio-rdma", "pvrdma", "ivshmem"]] = msgspec.field(
        default_factory=lambda: ["sriov-vf", "skvm-virtio-rdma", "pvrdma", "ivshmem"])
    # IOcm controller (services/node_worker/iocm.py): seconds between samples of the guests' I/O; a guest gets
    # one more I/O core after iocm_widen_samples samples in a row above iocm_widen_mib_s per active core, and
    # one fewer after iocm_narrow_samples samples in a row where one core fewer would carry less than
    # iocm_narrow_mib_s each. 0 < narrow < widen keeps a steady load from flapping.
    iocm_interval: float = 2.0
    iocm_widen_mib_s: float = 64.0
    iocm_narrow_mib_s: float = 16.0
    iocm_widen_samples: int = 2
    iocm_narrow_samples: int = 5
    # The scheduler's cgroup of a job, per controller, under job_cgroup_root/<controller>/: the node worker moves
    # each guest's QEMU there (services/node_worker/job_cgroup.py), so the scheduler accounts it to the job, holds
    # it to the job's memory limit and kills it when the job ends. {job}, {uid} (the owner's) and {node} are
    # filled in; never cpuset. Empty (the default): guests stay in libvirt's cgroups, for a scheduler without
    # cgroups (the single-host stack's). Slurm's and Torque's layouts: docs/admin-guide.md.
    job_cgroup: dict[str, str] = {}
    job_cgroup_root: str = "/sys/fs/cgroup"
    # Warm images (services/node_worker/warm.py, `vtorque images warm`): saved booted guests a job's guest of the
    # same image and shape is restored from instead of booted. Root's alone (0700); "" = <state_dir>/warm.
    warm_dir: str = ""
    # The warm pool (services/node_worker/warm_pool.py): this many single-use guests per warm image kept restored
    # and paused ahead of demand, taken by a job at its prologue; 0 = none. Their RAM is held while they wait.
    warm_pool: int = 0
    # A job the scheduler suspends (scontrol suspend, qsig -s suspend; services/node_worker/suspend.py): its guests
    # here are paused in memory ("pause": virDomainSuspend, resumed in milliseconds) or saved to disk ("save":
    # virDomainSave, the node's memory freed, restored on resume), within one reconcile_interval either way.
    suspend: Literal["pause", "save"] = "pause"
    # Where saved guests' memory goes (the owner's data): root's alone (0700, files 0600); "" = <state_dir>/suspended.
    # On a local disk with room for the RAM of every guest the node may run.
    suspend_dir: str = ""
    # Checkpoints of jobs that asked for them (-vm checkpoint=, services/node_worker/checkpoint.py): each guest's
    # memory and disks, the owner's data, root's alone (0700, files 0600), by job and guest rank, not by node: a
    # requeued job may start on another node, so on a cluster a directory every compute node sees (root-owned,
    # no root squash). "" = <state_dir>/checkpoints. Room for the RAM + written disk of every checkpointed guest.
    checkpoint_dir: str = ""
    # Live migration (`vtorque migrate`, services/node_worker/migrate.py): the target node's libvirt as this
    # node's libvirtd reaches it (peer to peer; {node} is the target's name; TLS with the hosts' certificates,
    # never plain TCP), whether QEMU's own stream (memory and disk blocks) is TLS too, the longest a guest's move
    # may take (then it is cancelled: the guest runs on here), and the longest pause libvirt may make for the last
    # copy (milliseconds; 0: libvirt's default, 300 ms).
    migration_uri: str = "qemu+tls://{node}/system"
    migration_tls: bool = True
    migration_timeout: float = 300.0
    migration_max_downtime_ms: int = 0

    def node_name(self) -> str:
        return self.name or socket.gethostname().split(".")[0]


class HooksConfig(_Section):
    # Seconds the prologue waits for all guests; keep it under the scheduler's own prologue timeout.
    prologue_timeout: float = 240.0
    epilogue_timeout: float = 60.0
    broker_attempts: int = 3
    # Infrastructure failures requeue a job at most this many times, then it is aborted with the reason.
    max_requeues: int = 2
    # Both prologues (Torque's, Slurm's PrologSlurmctld) fail the job early (infrastructure: bounded requeue) when a
    # node of the job has no node worker consuming its queue after this many seconds (one restarting gets them),
    # instead of waiting out the whole deadline. On Torque, `[torque] node_worker_grace`, where set, wins.
    node_worker_grace: float = 5.0


class TorqueConfig(_Section):
    """Torque's side (hooks/torque/, `vtorque install-hooks`); see docs/admin-guide.md."""

    # TORQUE_HOME; a hook installed in <home>/mom_priv finds it from its own path first.
    home: str = "/var/spool/torque"
    # Seconds kept free below Torque's own prologue kill ($prologalarm - 10 s) for start-up and the answer.
    prologue_margin: float = 15.0
    # The prologue fails the job early (infrastructure: bounded requeue) when a node of the job has no node
    # worker consuming its queue after `[hooks] node_worker_grace` seconds, instead of waiting out the whole deadline.
    require_node_workers: bool = True
    # Torque's own spelling of that grace, kept as documented: where set, it is the Torque prologue's (unset: the
    # [hooks] one, which both schedulers' prologues read).
    node_worker_grace: float | None = None

    def grace(self, hooks: HooksConfig) -> float:
        """The Torque prologue's node worker grace: this section's where set, else `[hooks] node_worker_grace`."""
        return self.node_worker_grace if self.node_worker_grace is not None else hooks.node_worker_grace
    # The hooks' own structured log (the job's .o/.e never reach the user when the prologue aborts).
    log_file: str = "/var/log/vtorque/torque-hooks.log"


class Config(_Section):
    state_dir: str = "/var/lib/vtorque"
    log_level: str = "INFO"
    broker: BrokerConfig = msgspec.field(default_factory=BrokerConfig)
    tracing: TracingConfig = msgspec.field(default_factory=TracingConfig)
    images: ImagesConfig = msgspec.field(default_factory=ImagesConfig)
    spec: SpecConfig = msgspec.field(default_factory=SpecConfig)
    node: NodeConfig = msgspec.field(default_factory=NodeConfig)
    hooks: HooksConfig = msgspec.field(default_factory=HooksConfig)
    torque: TorqueConfig = msgspec.field(default_factory=TorqueConfig)
    prefetch: PrefetchConfig = msgspec.field(default_factory=PrefetchConfig)
    scheduler: SchedulerConfig = msgspec.field(default_factory=SchedulerConfig)

    def job_dir(self, job_id: str) -> Path:
        """Where a node keeps what the job's launcher reads (its guests' addresses)."""
        from vtorque.shared.messages import routing_word  # the one escaping of job ids into a single name

        return Path(self.state_dir) / "jobs" / routing_word(job_id)


def config_path(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return env.get("VTORQUE_CONFIG", DEFAULT_PATH)


def load_config(path: str | None = None, env: Mapping[str, str] | None = None, role: str | None = None) -> Config:
    """The site's config; `role` (hook, bridge, stager, node, prefetch; default operator) picks that part's
    broker credentials out of `broker.credentials_dir`."""
    config = _load_config(path, env)
    if config.broker.credentials_dir:
        from vtorque.shared.topology import broker_user

        node = config.node.node_name() if role == "node" else None
        user = broker_user(role or "operator", node, config.broker.user_prefix)  # type: ignore[arg-type]
        config.broker.credentials_file = os.path.join(config.broker.credentials_dir, f"{user}.credentials")
    return config


def _load_config(path: str | None, env: Mapping[str, str] | None) -> Config:
    env = os.environ if env is None else env
    path = path or config_path(env)
    data: dict = {}
    name = os.path.basename(path)
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        if "VTORQUE_CONFIG" in env or path != DEFAULT_PATH:
            raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    _apply_env(data, env)
    _refuse_moved_keys(data, name)
    file_entries = _merge_catalog_file(data, path)
    catalog = data.get("images", {}).get("catalog", {}) if isinstance(data.get("images"), dict) else {}
    for image, entry in (catalog.items() if isinstance(catalog, dict) else ()):
        # msgspec reports a bad dict value as `catalog[...]`: check each entry alone to name it.
        try:
            msgspec.convert(entry, ImageEntry, strict=False)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"{name}: images.catalog.{image}.{_explain(exc)}".replace(".(top): ", ": ")) from None
    try:
        config = msgspec.convert(data, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{name}: {_explain(exc)}") from None
    for image in config.images.catalog:
        if not IMAGE_NAME.match(image):
            raise ConfigError(f"{name}: images.catalog.{image}: an image name is letters, digits, '.', '_', '-'")
    for image, entry in config.images.catalog.items():
        if not re.fullmatch(r"[0-9a-f]{64}", entry.sha256):
            raise ConfigError(f"{name}: images.catalog.{image}.sha256: expected 64 lowercase hex digits")
    if config.images.catalog_file:
        _remember_catalog_file(config, file_entries)
    return config


# -- the writable catalog file (images.toml) ------------------------------------------------------------------

_catalog_files: dict[str, tuple[tuple, dict[str, ImageEntry]]] = {}


def _catalog_stamp(path: str) -> tuple:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return ()
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def read_catalog_file(path: str) -> dict[str, ImageEntry]:
    """The entries of a catalog file (no file: none), each checked; errors name the file and the entry."""
    name = os.path.basename(path)
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    images = data.pop("images", {})
    if data or not isinstance(images, dict) or set(images) - {"catalog"}:
        raise ConfigError(f"{name}: holds only [images.catalog.NAME] tables")
    entries = {}
    for image, entry in (images.get("catalog") or {}).items():
        if not IMAGE_NAME.match(image):
            raise ConfigError(f"{name}: images.catalog.{image}: an image name is letters, digits, '.', '_', '-'")
        try:
            entries[image] = msgspec.convert(entry, ImageEntry, strict=False)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"{name}: images.catalog.{image}.{_explain(exc)}".replace(".(top): ", ": ")) from None
        if not re.fullmatch(r"[0-9a-f]{64}", entries[image].sha256):
            raise ConfigError(f"{name}: images.catalog.{image}.sha256: expected 64 lowercase hex digits")
    return entries


def _merge_catalog_file(data: dict, config_file: str) -> dict[str, ImageEntry]:
    images = data.setdefault("images", {})
    if not isinstance(images, dict):
        return {}
    where = images.get("catalog_file") or "images.toml"
    if not isinstance(where, str):
        return {}
    path = os.path.join(os.path.dirname(os.path.abspath(config_file)), where)
    images["catalog_file"] = path
    entries = read_catalog_file(path)
    if entries:
        catalog = images.setdefault("catalog", {})
        if isinstance(catalog, dict):
            catalog.update({image: msgspec.to_builtins(entry) for image, entry in entries.items()})
    return entries


def _remember_catalog_file(config: Config, entries: dict[str, ImageEntry]) -> None:
    path = config.images.catalog_file
    assert path is not None  # called only when the config names one
    _catalog_files[path] = (_catalog_stamp(path), {n: config.images.catalog[n] for n in entries})


def refresh_catalog(config: Config) -> bool:
    """Re-read the catalog file if it changed since `config` was loaded (a running service learns of
    `vtorque images add/update/remove` without a restart); True when the catalog changed. A broken file
    leaves the catalog as it was."""
    path = config.images.catalog_file
    if not path:
        return False
    stamp = _catalog_stamp(path)
    old_stamp, old_entries = _catalog_files.get(path, ((), {}))
    if stamp == old_stamp:
        return False
    try:
        entries = read_catalog_file(path)
    except ConfigError:
        return False
    catalog = config.images.catalog
    for image, entry in old_entries.items():
        if image not in entries and catalog.get(image) is entry:
            del catalog[image]
    catalog.update(entries)
    _catalog_files[path] = (stamp, dict(entries))
    return True


# Keys that named the scheduler in three places before [scheduler] named it once.
_MOVED = {("prefetch", "scheduler"): "scheduler.kind", ("node", "scheduler"): "scheduler.kind",
          ("torque", "qstat"): "scheduler.qstat", ("torque", "qstat_timeout"): "scheduler.timeout"}


def _refuse_moved_keys(data: dict, name: str) -> None:
    for (section, key), new in _MOVED.items():
        if isinstance(data.get(section), dict) and key in data[section]:
            raise ConfigError(f"{name}: {section}.{key}: moved to {new}")


def _apply_env(data: dict, env: Mapping[str, str]) -> None:
    """VTORQUE_<SECTION>__<KEY> and VTORQUE_<TOP_LEVEL_KEY> override the file; other VTORQUE_* names
    (VTORQUE_CONFIG, VTORQUE_PYTHON used by the hook entry points, ...) are not configuration."""
    top_level = set(Config.__struct_fields__)
    for key, value in env.items():
        if not key.startswith("VTORQUE_"):
            continue
        path = key[len("VTORQUE_"):].lower().split("__")
        if len(path) == 1 and path[0] not in top_level:
            continue
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{key}: {'.'.join(path[:-1])} is not a section")
            node = child
        node[path[-1]] = value


def _explain(exc: msgspec.ValidationError) -> str:
    text = str(exc)
    m = re.match(r"(?s)(.*?) - at `\$(.*)`$", text)
    message, where = m.groups() if m else (text, "")
    where = re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", where).lstrip(".")
    unknown = re.match(r"Object contains unknown field `(.+)`", message)
    if unknown:
        return f"{'.'.join(filter(None, [where, unknown.group(1)]))}: unknown key"
    missing = re.match(r"Object missing required field `(.+)`", message)
    if missing:
        return f"{'.'.join(filter(None, [where, missing.group(1)]))}: required key missing"
    return f"{where or '(top)'}: {message}"
