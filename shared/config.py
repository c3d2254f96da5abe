"""Site configuration: one TOML file (/etc/vtorque/vtorque.toml) plus VTORQUE_* overrides, decoded strictly.

An override names its key path with double underscores: VTORQUE_BROKER__URL sets [broker] url. Any error
names the key, e.g. "vtorque.toml: spec.max_vcpus: Expected `int`, got `str`".
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Literal, Mapping

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
    heartbeat: int = 30
    connect_timeout: float = 5.0

    def connection_url(self) -> str:
        if not self.credentials_file:
            return self.url
        try:
            creds = Path(self.credentials_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"broker.credentials_file: cannot read {self.credentials_file}: {exc.strerror}")
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


class ImagesConfig(_Section):
    store: str = "/var/lib/vtorque/images"
    catalog: dict[str, ImageEntry] = {}


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


class NodeConfig(_Section):
    name: str | None = None  # default: short host name, as the scheduler names nodes
    libvirt_uri: str = "qemu:///system"
    domain_type: Literal["auto", "kvm", "qemu"] = "auto"
    guest_dir: str = "/var/lib/vtorque/guests"  # fs_type=sharedfs: a directory on shared scratch on clusters
    ramdisk_dir: str = "/dev/shm/vtorque/guests"  # fs_type=ramdisk: node-local memory
    boot_timeout: float = 180.0
    ssh_port_min: int = 22000
    ssh_port_max: int = 22999
    # Seconds between NodeHeartbeat events (what `vtorque nodes` shows); a node silent for 3 of them is stale.
    heartbeat_interval: float = 10.0

    def node_name(self) -> str:
        return self.name or socket.gethostname().split(".")[0]


class HooksConfig(_Section):
    # Seconds the prologue waits for all guests; keep it under the scheduler's own prologue timeout.
    prologue_timeout: float = 240.0
    epilogue_timeout: float = 60.0
    broker_attempts: int = 3
    # Infrastructure failures requeue a job at most this many times, then it is aborted with the reason.
    max_requeues: int = 2


class TorqueConfig(_Section):
    """Torque's side (hooks/torque.py, `vtorque install-hooks`); see docs/admin-guide.md."""

    # TORQUE_HOME; a hook installed in <home>/mom_priv finds it from its own path first.
    home: str = "/var/spool/torque"
    # Seconds kept free below Torque's own prologue kill ($prologalarm - 10 s) for start-up and the answer.
    prologue_margin: float = 15.0
    # `qstat -f JOBID` gives exec_host (the job's cores); PATH in a hook is only /bin:/usr/bin.
    qstat: str = "qstat"
    qstat_timeout: float = 5.0
    # The prologue fails the job early (infrastructure: bounded requeue) when a node of the job has no node
    # worker consuming its queue after this many seconds, instead of waiting out the whole deadline.
    require_node_workers: bool = True
    node_worker_grace: float = 5.0
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

    def job_dir(self, job_id: str) -> Path:
        """Where a node keeps what the job's launcher reads (its guests' addresses)."""
        return Path(self.state_dir) / "jobs" / re.sub(r"[^A-Za-z0-9_-]", lambda c: f"%{ord(c.group()):02X}", job_id)


def config_path(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return env.get("VTORQUE_CONFIG", DEFAULT_PATH)


def load_config(path: str | None = None, env: Mapping[str, str] | None = None) -> Config:
    env = os.environ if env is None else env
    path = path or config_path(env)
    data: dict = {}
    name = os.path.basename(path)
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        if "VTORQUE_CONFIG" in env or path != DEFAULT_PATH:
            raise ConfigError(f"{path}: no such file")
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}")
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}")
    _apply_env(data, env)
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
    return config


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
