"""The VM spec a user writes after `-vm` (or in `#PBS -vm` lines): parsing and validation against the site
config. Pure logic: no file is read here (paths are checked for shape; vsub and the node worker check the files).

One parser (`split_pairs`, under `parse_options` for a user's `-vm` and under shared/job_script.py's header) and
one validation (`validate`; `validate_job` adds the user's cloud-init keys), called once per process at each
trust boundary: vsub for the user's sake, the hook (the job script is the user's), the bridge (the hook's host
is not trusted more than the user), the node worker (services/node_worker/trust.py: the plan is checked
against this node's limits). Every error names the key, the value and what
is allowed, on one line.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import msgspec

from vtorque.shared.config import IMAGE_NAME, Config, SpecConfig

DISTROS = ("debian", "ubuntu", "redhat", "centos", "osv")
ARCHES = ("x86_64",)
FS_TYPES = ("ramdisk", "sharedfs")
# enabled/disabled: vTorque's words for the same (its inverted 0 = true, 1 = false is not taken over).
_TRUE = {"true", "yes", "on", "1", "enabled"}
_FALSE = {"false", "no", "off", "0", "disabled"}
_SIZE = re.compile(r"^([0-9]{1,12})([KMGT]?)(i?B)?$", re.IGNORECASE)
_UNIT_KIB = {"K": 1, "M": 1024, "G": 1024**2, "T": 1024**3}
_PIN_MAP = re.compile(r"^[0-9]{1,4}(:[0-9]{1,4}){0,1023}$")
# cloud-init keys a user may add: none of them runs code as root, adds users or keys, or touches mounts.
USER_METADATA_KEYS = ("packages", "package_update", "package_upgrade", "timezone", "locale", "final_message")


class SpecError(ValueError):
    """One bad key: the message names the key, the value and what is allowed."""

    def __init__(self, key: str, value: str | None, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        shown = key if value is None else f"{key}={value}"
        super().__init__(f"-vm {_printable(shown)}: {allowed}")


def _printable(text: str) -> str:
    """One line whatever the user typed: control characters shown as escapes."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


@dataclass(frozen=True)
class Key:
    name: str
    meaning: str
    default: Callable[[SpecConfig], str]
    allowed: Callable[[SpecConfig], str]


KEYS_TABLE: tuple[Key, ...] = (
    Key(
        "img",
        "guest image, by catalog name (`vtorque images list`)",
        lambda s: s.default_img or "(required)",
        lambda s: "a catalog name",
    ),
    Key(
        "distro",
        "guest flavour: seed format and guest definition",
        lambda s: "from the image, else " + s.default_distro,
        lambda s: "|".join(DISTROS),
    ),
    Key(
        "ram",
        "memory per VM, K/M/G/T (binary), bare number = MiB",
        lambda s: s.default_ram,
        lambda s: f"{s.min_ram}..{s.max_ram}",
    ),
    Key("arch", "guest architecture", lambda s: "x86_64", lambda s: "|".join(ARCHES)),
    Key("vcpus", "vCPUs per VM", lambda s: str(s.default_vcpus), lambda s: f"1..{s.max_vcpus}"),
    Key(
        "vcpu_pinning",
        "pin vCPUs to the job's cores: true/false, or a map of the job's core indexes per vCPU, e.g. 0:1:2:3",
        lambda s: str(s.default_vcpu_pinning).lower(),
        lambda s: "bool or i:j:k…",
    ),
    Key("vms_per_node", "VMs on each node of the job", lambda s: "1", lambda s: f"1..{s.max_vms_per_node}"),
    Key(
        "vm_prologue",
        "script run as you in the first VM before the job",
        lambda s: "none",
        lambda s: "your own file under your home or an allowed directory",
    ),
    Key(
        "vm_epilogue",
        "script run as you in the first VM after the job",
        lambda s: "none",
        lambda s: "your own file under your home or an allowed directory",
    ),
    Key(
        "vrdma",
        "virtual RDMA between the job's VMs",
        lambda s: "false",
        lambda s: "bool" if s.vrdma_enabled else "false (disabled on this site)",
    ),
    Key(
        "iocm",
        "dedicated I/O cores (IOcm)",
        lambda s: "false",
        lambda s: "bool" if s.iocm_enabled else "false (disabled on this site)",
    ),
    Key(
        "iocm_min_cores",
        "IOcm: fewest I/O cores",
        lambda s: str(s.default_iocm_min_cores),
        lambda s: f"1..{s.max_iocm_cores}",
    ),
    Key(
        "iocm_max_cores",
        "IOcm: most I/O cores",
        lambda s: str(s.default_iocm_max_cores),
        lambda s: f"iocm_min_cores..{s.max_iocm_cores}",
    ),
    Key(
        "fs_type",
        "where the VM disks live: node RAM disk or shared scratch",
        lambda s: s.default_fs_type,
        lambda s: "|".join(FS_TYPES),
    ),
    Key(
        "disk",
        "extra disk for the first VM: a size to create (e.g. 10G) or your own .img/.qcow2 file",
        lambda s: "none",
        lambda s: f"size ≤ {s.max_disk} or your image file",
    ),
    Key(
        "checkpoint",
        "restart from a checkpoint of the VMs when the scheduler requeues or preempts the job: requeue, or an "
        "interval (e.g. 30m) to also checkpoint that often (for a node that fails)",
        lambda s: s.default_checkpoint,
        lambda s: f"off|requeue|interval ≥ {s.min_checkpoint_interval}" if s.checkpoint_enabled
        else "off (disabled on this site)",
    ),
    Key(
        "metadata",
        "your cloud-init YAML (keys: " + ", ".join(USER_METADATA_KEYS) + "), merged with vtorque's",
        lambda s: "none",
        lambda s: "your own .yaml file",
    ),
)
KEYS = tuple(k.name for k in KEYS_TABLE)


class DiskSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    size_mib: int | None = None  # a new empty disk of this size
    image: str | None = None  # or the user's own image file (absolute path)


class VMSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    img: str
    distro: str
    arch: str
    vcpus: int
    ram_mib: int
    vcpu_pinning: bool
    pin_map: list[int] | None  # indexes into the job's cores on a node, one per vCPU
    vms_per_node: int
    vm_prologue: str | None
    vm_epilogue: str | None
    vrdma: bool
    iocm: bool
    iocm_min_cores: int
    iocm_max_cores: int
    fs_type: str
    disk: DiskSpec | None
    metadata: str | None
    # Checkpoint across a requeue (services/node_worker/checkpoint.py): None = none; 0 = when the scheduler requeues
    # or preempts the job; N > 0 = that too, and every N seconds while it runs (a node that fails).
    checkpoint: int | None = None

    def as_options(self) -> dict[str, str]:
        """The spec again as `-vm` options, normalised: validating them gives this spec back."""
        opts = {
            "img": self.img, "distro": self.distro, "arch": self.arch, "vcpus": str(self.vcpus),
            "ram": f"{self.ram_mib}M", "vms_per_node": str(self.vms_per_node),
            "vcpu_pinning": ":".join(map(str, self.pin_map)) if self.pin_map else str(self.vcpu_pinning).lower(),
            "vrdma": str(self.vrdma).lower(), "iocm": str(self.iocm).lower(), "fs_type": self.fs_type,
        }
        if self.iocm:
            opts |= {"iocm_min_cores": str(self.iocm_min_cores), "iocm_max_cores": str(self.iocm_max_cores)}
        for key in ("vm_prologue", "vm_epilogue", "metadata"):
            if getattr(self, key):
                opts[key] = getattr(self, key)
        if self.disk:
            opts["disk"] = self.disk.image or f"{self.disk.size_mib}M"
        opts["checkpoint"] = checkpoint_text(self.checkpoint)
        return opts

    def cores_per_node(self, site: SpecConfig) -> int:
        """Host cores one node must give the job: the host reserve, every VM's vCPUs, the most I/O cores."""
        return site.host_reserve_cores + self.vcpus * self.vms_per_node + (self.iocm_max_cores if self.iocm else 0)

    def ram_mib_per_node(self, site: SpecConfig) -> int:
        """What a node must give the job: the host reserve, the VMs' RAM, and what its guests may keep in node
        memory (fs_type=ramdisk, `ramdisk_mib`): the bridge holds the guests to the job's memory, ramdisk
        included. The data disk is the first guest's only."""
        first = ramdisk_mib(self.fs_type, self.disk.size_mib if self.disk else None,
                            bool(self.disk and self.disk.image), site)
        ramdisk = first + ramdisk_mib(self.fs_type, None, False, site) * (self.vms_per_node - 1)
        return parse_size_mib(site.host_reserve_ram) + self.ram_mib * self.vms_per_node + ramdisk


def ramdisk_mib(fs_type: str, disk_mib: int | None, own_image: bool, site: SpecConfig) -> int:
    """What one guest may keep in node memory: nothing on shared storage; on a ramdisk its root disk's growth
    (ramdisk_root_max) and its data disk (a new one's size; the owner's own image up to max_disk, as copied).
    The node worker makes it the size of the guest's own tmpfs, so it is a cap as well as a count."""
    if fs_type != "ramdisk":
        return 0
    data = disk_mib or (parse_size_mib(site.max_disk) if own_image else 0)
    return parse_size_mib(site.ramdisk_root_max) + data


_INTERVAL = re.compile(r"^([0-9]{1,7})([smhd]?)$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_interval(text: str) -> int:
    """'90s', '30m', '2h', '1d', '600' (seconds) → seconds; ValueError otherwise."""
    found = _INTERVAL.match(text.strip().lower())
    if not found:
        raise ValueError(text)
    return int(found.group(1)) * _SECONDS[found.group(2) or "s"]


def checkpoint_text(value: int | None) -> str:
    """VMSpec.checkpoint as its -vm value again (what `checkpoint` parses back to it)."""
    return "off" if value is None else "requeue" if value == 0 else f"{value}s"


def _checkpoint(text: str, site: SpecConfig) -> int | None:
    low = text.strip().lower()
    if low in _FALSE or low in ("none", ""):
        return None
    if not site.checkpoint_enabled:
        raise SpecError("checkpoint", text, "checkpoints are disabled on this site")
    if low in ("requeue", "preempt") or low in _TRUE:
        return 0
    try:
        seconds = parse_interval(low)
        least = parse_interval(site.min_checkpoint_interval)
    except ValueError:
        seconds, least = -1, 0
    if seconds < max(1, least):
        raise SpecError("checkpoint", text, f"off, requeue, or an interval of at least "
                        f"{site.min_checkpoint_interval} (e.g. 30m, 2h): every so often while the job runs")
    return seconds


def split_pairs(text: str, skip_empty: bool = False) -> list[tuple[str, str]]:
    """`key=value,key=value` into its pairs, as written (no key is judged here): the one place the spec's text
    is taken apart, for a user's `-vm` (parse_options) and for the job script's header (shared/job_script.py).
    `skip_empty`: empty items (`a=1,,b=2`) are passed over, as the header always allowed."""
    pairs = []
    for item in text.split(","):
        if skip_empty and not item:
            continue
        key, sep, value = item.partition("=")
        if not key.strip():
            raise SpecError("-vm", text, "expected key=value pairs separated by commas")
        if not sep:
            raise SpecError(key.strip().lower(), None, "expected key=value")
        pairs.append((key, value))
    return pairs


def parse_options(texts: Iterable[str]) -> dict[str, str]:
    """`-vm img=x,vcpus=2` values (repeatable) into a key → value map. Keys are case-insensitive (IMG=, VCPUS=
    as vTorque took them); a key given again replaces the earlier value, as in vTorque, so the last -vm wins
    (and the command line, read after the script's `#PBS -vm` lines, wins over them)."""
    options: dict[str, str] = {}
    for text in texts:
        if not text.strip():
            raise SpecError("-vm", None, "empty spec: give key=value pairs, e.g. -vm img=NAME,vcpus=2")
        for key, value in split_pairs(text):
            key = key.strip().lower()
            if key not in KEYS:
                raise SpecError(key, value, f"unknown key; known keys: {', '.join(KEYS)}")
            options.pop(key, None)
            options[key] = value.strip()
    return options


def parse_size_mib(text: str) -> int:
    """'512M', '2G', '1T', '262144K', '512' (MiB): binary units, rounded up to whole MiB."""
    m = _SIZE.match(text.strip())
    if not m:
        raise ValueError(text)
    kib = int(m.group(1)) * _UNIT_KIB[(m.group(2) or "M").upper()]
    return -(-kib // 1024)


def parse_bool(key: str, text: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise SpecError(key, text, "true/false, yes/no, on/off, enabled/disabled or 1/0")


def _int(key: str, text: str, low: int, high: int, allowed: str | None = None) -> int:
    if not re.fullmatch(r"[0-9]{1,6}", text) or not low <= int(text) <= high:
        raise SpecError(key, text, allowed or f"a whole number from {low} to {high}")
    return int(text)


def _size(key: str, text: str, low: str, high: str) -> int:
    try:
        mib = parse_size_mib(text)
    except ValueError:
        mib = -1
    if not parse_size_mib(low) <= mib <= parse_size_mib(high):
        raise SpecError(key, text, f"a size from {low} to {high}, e.g. 512M or 2G")
    return mib


def _user_path(key: str, text: str, suffixes: tuple[str, ...] = ()) -> str:
    """Shape only: absolute, normalised, no control characters. Where it may point is checked on the host
    that can see the file (vsub as the user, the node worker as root for the owner)."""
    if not text.startswith("/") or posixpath.normpath(text) != text or "/../" in f"{text}/" or any(
            ord(c) < 32 for c in text):
        raise SpecError(key, text, "an absolute path without '..' (vsub makes relative paths absolute)")
    if suffixes and not text.endswith(suffixes):
        raise SpecError(key, text, f"a file ending in {' or '.join(suffixes)}")
    return text


def validate(options: Mapping[str, str], config: Config) -> VMSpec:
    site = config.spec
    unknown = sorted(set(options) - set(KEYS))
    if unknown:
        raise SpecError(unknown[0], options[unknown[0]], f"unknown key; known keys: {', '.join(KEYS)}")
    get = options.get

    catalog = config.images.catalog
    known = ", ".join(sorted(catalog)) or "(the catalog is empty)"
    img = get("img") or site.default_img
    if not img:
        raise SpecError("img", None, f"required: this site sets no default image ([spec] default_img); "
                        f"give -vm img=NAME, one of: {known}")
    if not IMAGE_NAME.match(img):
        raise SpecError("img", img, f"not an image name (images come from the catalog: {known})")
    if img not in catalog:
        raise SpecError("img", img, f"no such image; images: {known}")

    distro = (get("distro") or catalog[img].distro or site.default_distro).lower()
    if distro not in DISTROS:
        raise SpecError("distro", get("distro"), "|".join(DISTROS))
    arch = get("arch", "x86_64")
    if arch not in ARCHES:
        raise SpecError("arch", arch, "|".join(ARCHES))

    vcpus = _int("vcpus", get("vcpus", str(site.default_vcpus)), 1, site.max_vcpus)
    ram = _size("ram", get("ram", site.default_ram), site.min_ram, site.max_ram)
    vms = _int("vms_per_node", get("vms_per_node", "1"), 1, site.max_vms_per_node)

    pin_text = get("vcpu_pinning", str(site.default_vcpu_pinning).lower())
    pin_map = None
    if _PIN_MAP.match(pin_text) and ":" in pin_text:
        pin_map = [int(i) for i in pin_text.split(":")]
        if len(pin_map) != vcpus or len(set(pin_map)) != len(pin_map):
            raise SpecError("vcpu_pinning", pin_text, f"a map needs {vcpus} distinct core indexes, one per vCPU")
        pinning = True
    else:
        low = pin_text.lower()
        pinning = True if low == "auto" else (  # vTorque's auto: pinned
            parse_bool("vcpu_pinning", pin_text) if low in _TRUE | _FALSE else _bad_pin(pin_text))

    vrdma = parse_bool("vrdma", get("vrdma", "false"))
    if vrdma and not site.vrdma_enabled:
        raise SpecError("vrdma", get("vrdma"), "vRDMA is disabled on this site")
    iocm = parse_bool("iocm", get("iocm", "false"))
    if iocm and not site.iocm_enabled:
        raise SpecError("iocm", get("iocm"), "IOcm is disabled on this site")
    if not iocm:
        for key in ("iocm_min_cores", "iocm_max_cores"):
            if key in options:
                raise SpecError(key, options[key], "only with iocm=true")
    io_min = _int("iocm_min_cores", get("iocm_min_cores", str(site.default_iocm_min_cores)), 1, site.max_iocm_cores)
    io_max = _int("iocm_max_cores", get("iocm_max_cores", str(max(io_min, site.default_iocm_max_cores))),
                  io_min, site.max_iocm_cores,
                  f"a whole number from iocm_min_cores ({io_min}) to {site.max_iocm_cores}")

    fs_type = get("fs_type", site.default_fs_type)
    if fs_type not in FS_TYPES:
        raise SpecError("fs_type", fs_type, "|".join(FS_TYPES))

    disk = None
    if get("disk"):
        text = options["disk"]
        if text.startswith("/") or "/" in text or text.endswith((".img", ".qcow2", ".raw")):
            disk = DiskSpec(image=_user_path("disk", text, (".img", ".qcow2", ".raw")))
        else:
            disk = DiskSpec(size_mib=_size("disk", text, "1M", site.max_disk))

    scripts = {k: _user_path(k, options[k]) if get(k) else None for k in ("vm_prologue", "vm_epilogue")}
    metadata = _user_path("metadata", options["metadata"], (".yaml", ".yml", ".json")) if get("metadata") else None

    checkpoint = _checkpoint(get("checkpoint", site.default_checkpoint), site)

    spec = VMSpec(img=img, distro=distro, arch=arch, vcpus=vcpus, ram_mib=ram, vcpu_pinning=pinning,
                  pin_map=pin_map, vms_per_node=vms, vm_prologue=scripts["vm_prologue"],
                  vm_epilogue=scripts["vm_epilogue"], vrdma=vrdma, iocm=iocm,
                  iocm_min_cores=io_min if iocm else 0, iocm_max_cores=io_max if iocm else 0, fs_type=fs_type,
                  disk=disk, metadata=metadata, checkpoint=checkpoint)
    if spec.cores_per_node(site) > site.max_cores_per_node:
        raise SpecError("vcpus", str(vcpus), f"{spec.cores_per_node(site)} cores per node needed "
                        f"(vcpus × vms_per_node + host reserve {site.host_reserve_cores}"
                        f"{' + iocm_max_cores' if iocm else ''}); a node has {site.max_cores_per_node}")
    if spec.ram_mib_per_node(site) > parse_size_mib(site.max_ram_per_node):
        raise SpecError("ram", get("ram", site.default_ram), f"{spec.ram_mib_per_node(site)} MiB per node needed "
                        f"(ram × vms_per_node + host reserve {site.host_reserve_ram}); "
                        f"a node has {site.max_ram_per_node}")
    return spec


def _bad_pin(text: str) -> bool:
    raise SpecError("vcpu_pinning", text, "true/false, or a map of core indexes per vCPU such as 0:1:2:3")


def validate_job(options: Mapping[str, str], user_metadata: object, config: Config) -> tuple[VMSpec, dict]:
    """The one check of a job's spec at a trust boundary that gets it from someone else (the hook from the job
    script, the bridge from JobStarted): the spec against the site and the user's cloud-init keys. Called
    once per process; whoever needs the spec later is handed this result."""
    return validate(options, config), validate_user_metadata(user_metadata)


def validate_user_metadata(doc: object) -> dict:
    """The user's cloud-init additions: a mapping of allowed keys only (anything that runs as root, adds
    users or keys, mounts, or writes files is refused)."""
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise SpecError("metadata", None, "the file must hold a YAML mapping of cloud-init keys")
    for key in doc:
        if key not in USER_METADATA_KEYS:
            raise SpecError("metadata", None, f"cloud-init key {key!r} is not allowed "
                            f"(it could give root or break isolation); allowed: {', '.join(USER_METADATA_KEYS)}")
    if "packages" in doc and not (isinstance(doc["packages"], list) and all(
            isinstance(p, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.+:=~_-]*", p) for p in doc["packages"])):
        raise SpecError("metadata", None, "packages must be a list of package names")
    for key in ("package_update", "package_upgrade"):
        if key in doc and not isinstance(doc[key], bool):
            raise SpecError("metadata", None, f"{key} must be true or false")
    for key in ("timezone", "locale", "final_message"):
        if key in doc and not (isinstance(doc[key], str) and len(doc[key]) < 200 and "\n" not in doc[key]):
            raise SpecError("metadata", None, f"{key} must be one short line of text")
    return dict(doc)


def help_table(site: SpecConfig) -> str:
    rows = [(k.name, k.default(site), k.allowed(site), k.meaning) for k in KEYS_TABLE]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"  {'key':<{widths[0]}}  {'default':<{widths[1]}}  {'allowed':<{widths[2]}}  meaning"]
    lines += [f"  {a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d}" for a, b, c, d in rows]
    return "\n".join(lines)
