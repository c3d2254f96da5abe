"""What root checks itself before it acts on a command (issue 11, "root acts only on what it has checked").

Anyone who can publish to a node's queue could have written a BootGuests or TeardownGuests, so the node worker
trusts nothing in one: the spec is validated again against this node's site limits (shared/spec.py, the same
`validate` the bridge calls), the user's cloud-init keys again (shared/spec.py `validate_user_metadata`, as the
prologue does), the owner against the password database, names and ids against a strict grammar; and every
path root uses is derived here from its own configured directories, each created by root and checked (no
symlink followed, no group/other write, owned by root).

Pure checks (`check_boot`, `check_teardown`, the grammars) raise `Refused`; `secure_dir` does the I/O of the
directory checks.
"""

from __future__ import annotations

import errno
import os
import pwd
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from vtorque.shared import messages as m
from vtorque.shared.config import IMAGE_NAME, Config
from vtorque.shared.job_boot import Malformed, NodeBoot, expand, guest_counts
from vtorque.shared.job_network import VNI_MAX, VNI_MIN
from vtorque.shared.spec import SpecError, checkpoint_text, validate, validate_user_metadata

from .job_segment import check_endpoint

# Domain and guest directory names: what messages.domain_name makes (vt-<job>-<node>-<k>, only [A-Za-z0-9_-]).
GUEST_NAME = re.compile(r"^vt-[A-Za-z0-9_-]{1,120}$")
# Torque (12.server, 12[3].server) and Slurm (123, 123_4) job ids; no '/', no '..', bounded.
JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\[\]-]{0,127}$")
NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
USER_NAME = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}\$?$", re.IGNORECASE)
DIGEST = re.compile(r"^[0-9a-f]{64}$")
SSH_KEY = re.compile(r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)|sk-ssh-ed25519@openssh\.com|"
                     r"sk-ecdsa-sha2-nistp256@openssh\.com) [A-Za-z0-9+/]{16,16384}={0,3}( [\x20-\x7e]{0,200})?$")
MIN_OWNER_UID = 1000  # below: system accounts (Debian's and most distributions' UID_MIN)
NOBODY_UID = 65534
MAX_GUESTS = 256  # on one node
MAX_PEERS = MAX_GUESTS * 64  # in the whole job (and nodes of a job), as guest indexes are bounded
MAX_KEYS = 32
MAX_CORE = 65535


class Refused(Exception):
    """A command root will not act on; the message names what and why (one line)."""


def _show(value: object, limit: int = 80) -> str:
    text = str(value)
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
    return text if len(text) <= limit else text[:limit] + f"…({len(text)} chars)"


def check_job_id(job_id: str) -> str:
    if not isinstance(job_id, str) or not JOB_ID.match(job_id) or ".." in job_id:
        raise Refused(f"job id {_show(job_id)!r} is not a job id (letters, digits, . _ - [ ], at most 128, "
                      f"no '..')")
    return job_id


def check_guest_name(name: str) -> str:
    if not isinstance(name, str) or not GUEST_NAME.match(name):
        raise Refused(f"guest name {_show(name)!r} is not a vtorque guest name (vt- then letters, digits, _ -; "
                      f"no '/' or '.')")
    return name


def allow_system_owners(config: Config) -> bool:
    # [node] allow_system_owners (shared/config.py); getattr: a config object of an older shape still works.
    return bool(getattr(config.node, "allow_system_owners", False))


@dataclass(frozen=True)
class OwnerAccount:
    """The job owner as this node's password database has it (never as the message says)."""

    user: str
    uid: int
    gid: int
    home: str


def check_owner(owner: m.Owner, config: Config) -> OwnerAccount:
    if not USER_NAME.match(owner.user or ""):
        raise Refused(f"owner {_show(owner.user)!r} is not a user name")
    try:
        pw = pwd.getpwnam(owner.user)
    except KeyError:
        raise Refused(f"owner {owner.user} is unknown on this node") from None
    if pw.pw_uid != owner.uid:
        raise Refused(f"owner {owner.user} has uid {pw.pw_uid} on this node, not {owner.uid}")
    if owner.gid != pw.pw_gid and owner.gid not in os.getgrouplist(pw.pw_name, pw.pw_gid):
        # A job may run under a secondary group of the owner's (qsub -W group_list), never under another.
        raise Refused(f"owner {owner.user} is not in group {owner.gid} on this node (primary gid {pw.pw_gid})")
    if (pw.pw_uid < MIN_OWNER_UID or pw.pw_uid == NOBODY_UID) and not allow_system_owners(config):
        what = ("root" if pw.pw_uid == 0 else "the overflow account nobody" if pw.pw_uid == NOBODY_UID
                else f"a system account (uid {pw.pw_uid} < {MIN_OWNER_UID})")
        raise Refused(f"owner {owner.user} is {what}: this site does not run guests for it "
                      f"([node] allow_system_owners)")
    if owner.gid == 0 and not allow_system_owners(config):
        raise Refused(f"owner {owner.user}: group 0 (root) for a job: this site does not allow it "
                      f"([node] allow_system_owners)")
    if not pw.pw_dir.startswith("/") or pw.pw_dir == "/":
        if not allow_system_owners(config):
            raise Refused(f"owner {owner.user} has no home directory of its own ({_show(pw.pw_dir)})")
    return OwnerAccount(pw.pw_name, pw.pw_uid, owner.gid, pw.pw_dir)


def spec_options(guest: m.GuestPlan, vms_on_node: int) -> dict[str, str]:
    """The plan of one guest as `-vm` options, so shared/spec.py `validate` can judge it as it judges a user's."""
    opts = {"img": guest.image, "distro": guest.distro, "arch": guest.arch, "vcpus": str(guest.vcpus),
            "ram": f"{guest.ram_mib}M", "vms_per_node": str(vms_on_node),
            "vcpu_pinning": "true" if guest.cores else "false", "vrdma": str(guest.vrdma).lower(),
            "fs_type": guest.fs_type, "checkpoint": checkpoint_text(guest.checkpoint)}
    if guest.iocm_max_cores:
        opts |= {"iocm": "true", "iocm_min_cores": str(guest.iocm_min_cores),
                 "iocm_max_cores": str(guest.iocm_max_cores)}
    elif guest.iocm_min_cores:
        opts |= {"iocm": "false", "iocm_min_cores": str(guest.iocm_min_cores)}  # refused: only with iocm=true
    if guest.disk:
        if guest.disk.image is not None and guest.disk.size_mib is not None:
            raise Refused("disk: both a size and an image")
        if guest.disk.image is not None:
            opts["disk"] = guest.disk.image
        elif guest.disk.size_mib is not None:
            opts["disk"] = f"{guest.disk.size_mib}M"
    return opts


def _cores(key: str, cores: list[int] | None, most: int) -> None:
    if cores is None:
        return
    if len(cores) > most or any(not isinstance(c, int) or not 0 <= c <= MAX_CORE for c in cores):
        raise Refused(f"{key}: {_show(cores)} is not a list of at most {most} host cores")


def check_guest(guest: m.GuestPlan, cmd_job: str, vms_on_node: int, config: Config) -> None:
    check_guest_name(guest.name)
    # The name is the job's own (messages.domain_name): a command cannot name another job's guest, whose
    # directory a fresh boot would otherwise clear as a leftover.
    prefix = m.domain_name(cmd_job, guest.node, 0)[:-1]
    if not (guest.name.startswith(prefix) and guest.name[len(prefix):].isdigit()
            and len(guest.name) - len(prefix) <= 4):
        raise Refused(f"guest name {_show(guest.name)!r} is not one of job {_show(cmd_job)}'s on {guest.node} "
                      f"({prefix}<k>)")
    if not NODE_NAME.fullmatch(guest.node):
        raise Refused(f"node {_show(guest.node)!r} is not a node name")
    if not IMAGE_NAME.match(guest.image) or not DIGEST.match(guest.image_digest):
        raise Refused(f"image {_show(guest.image)!r} / digest {_show(guest.image_digest)!r} malformed")
    if not 0 <= guest.index < MAX_PEERS:
        raise Refused(f"guest index {guest.index} out of range")
    try:
        spec = validate(spec_options(guest, vms_on_node), config)
        metadata = validate_user_metadata(guest.user_metadata)
    except SpecError as exc:
        raise Refused(f"guest {guest.name}: {exc}") from None
    if (spec.vcpus, spec.ram_mib, spec.checkpoint) != (guest.vcpus, guest.ram_mib, guest.checkpoint) \
            or spec.distro != guest.distro:
        raise Refused(f"guest {guest.name}: the plan differs from its own spec")  # e.g. distro case games
    if metadata != guest.user_metadata:
        raise Refused(f"guest {guest.name}: metadata changed by validation")
    _cores("cores", guest.cores, guest.vcpus)
    _cores("emulator_cores", guest.emulator_cores, config.spec.max_cores_per_node)
    _cores("io_cores", guest.io_cores, config.spec.max_iocm_cores)
    if not guest.ssh_authorized_keys or len(guest.ssh_authorized_keys) > MAX_KEYS or not all(
            isinstance(k, str) and SSH_KEY.match(k) for k in guest.ssh_authorized_keys):
        raise Refused(f"guest {guest.name}: ssh_authorized_keys must be 1..{MAX_KEYS} single-line public keys")


def check_boot(cmd: m.BootGuests, node: str, config: Config) -> tuple[NodeBoot, dict[str, OwnerAccount]]:
    """This node's part of a job's BootGuests (shared/job_boot.py expand), every value of it checked: its
    guests, the job's peers and network; with each guest's name → the owner's account. Raises Refused."""
    check_job_id(cmd.job_id)
    # Bounded before anything is expanded: a hostile command's sizes never become this node's memory.
    if len(cmd.nodes) > MAX_PEERS or len(cmd.node_cores) > MAX_PEERS:
        raise Refused(f"{len(cmd.nodes)} nodes: at most {MAX_PEERS}")
    for name in cmd.nodes:
        if not isinstance(name, str) or not NODE_NAME.fullmatch(name):
            raise Refused(f"node {_show(name)!r} is not a node name")
    try:
        counts = guest_counts(cmd)
        if any(not 1 <= c <= MAX_GUESTS for c in counts) or sum(counts) > MAX_PEERS:
            raise Refused(f"{max(counts, default=0)} guests on a node / {sum(counts)} in the job: 1..{MAX_GUESTS}"
                          f" / at most {MAX_PEERS}")
        boot = expand(cmd, node)
    except Malformed as exc:
        raise Refused(str(exc)) from None
    names = [g.name for g in boot.guests]
    if len(set(names)) != len(names):
        raise Refused("a guest name appears twice")
    # The job's guests share one owner by construction (the command says it once): checked once.
    account = check_owner(cmd.guest.owner, config)
    for guest in boot.guests:
        check_guest(guest, cmd.job_id, len(boot.guests), config)
    for peer in boot.peers:
        check_guest_name(peer.name)
        if not 1 <= peer.vcpus <= config.spec.max_vcpus:
            raise Refused(f"peer {peer.name}: vcpus {peer.vcpus} out of range")
    if boot.network is not None:
        check_network(boot, node, config)
    return boot, {name: account for name in names}


def check_network(boot: NodeBoot, node: str, config: Config) -> None:
    """The job network of a BootGuests: a VNI of vtorque's range, and an endpoint for exactly the job's nodes,
    each an address this node may send the job's frames to."""
    net = boot.network
    assert net is not None
    if not VNI_MIN <= net.vni <= VNI_MAX or not 8 <= net.prefix <= 30:
        raise Refused(f"network: VNI must be {VNI_MIN}..{VNI_MAX} and prefix 8..30")
    nodes = {p.node for p in boot.peers}
    if set(net.endpoints) != nodes:
        raise Refused("network: its endpoints must name exactly the job's nodes")
    local = config.node.job_network_localaddr
    for peer_node, address in net.endpoints.items():
        why = None if peer_node == node else check_endpoint(address, local)
        if why:
            raise Refused(f"network: endpoint of node {peer_node} {_show(address)!r} {why}")


def check_teardown(cmd: m.TeardownGuests) -> None:
    check_job_id(cmd.job_id)


# -- directories root uses -------------------------------------------------------------------------------------

class UnsafeDir(Refused):
    pass


def _check_component(path: str, st: os.stat_result, last: bool) -> None:
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeDir(f"{path} is not a directory (a symlink is not followed)")
    if st.st_uid != 0:
        raise UnsafeDir(f"{path} is owned by uid {st.st_uid}, not root: refusing to use it")
    writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    # A sticky world-writable parent (/tmp, /dev/shm) is safe for the root-owned entry below it: nobody else
    # may rename or remove that entry. The directory root itself uses must be writable by root alone.
    if writable and (last or not st.st_mode & stat.S_ISVTX):
        raise UnsafeDir(f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}): "
                        f"refusing to use it")


def secure_dir(path: str | os.PathLike, mode: int = 0o711, create: bool = True) -> Path:
    """`path`, an absolute directory each of whose components is a real directory (no symlink), owned by root,
    writable by root alone (a sticky parent such as /tmp or /dev/shm excepted); missing components are made by
    root with `mode`. Raises UnsafeDir naming the first component that is not so."""
    text = os.path.normpath(os.fspath(path))
    if not text.startswith("/"):
        raise UnsafeDir(f"{text} is not an absolute path")
    parts = [p for p in text.split("/") if p]
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _check_component("/", os.fstat(fd), not parts)
        here = ""
        for i, part in enumerate(parts):
            here += "/" + part
            last = i == len(parts) - 1
            try:
                child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise UnsafeDir(f"{here} does not exist") from None
                try:
                    os.mkdir(part, mode, dir_fd=fd)
                except FileExistsError:
                    pass  # made meanwhile: checked below like any other
                try:
                    child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                except OSError as exc:
                    raise UnsafeDir(f"{here}: {exc.strerror}") from None
                st = os.fstat(child)
                if st.st_uid == 0 and stat.S_IMODE(st.st_mode) != mode and not st.st_mode & stat.S_ISVTX:
                    os.fchmod(child, mode)  # the umask narrowed it
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafeDir(f"{here} is not a directory (a symlink is not followed)") from None
                raise UnsafeDir(f"{here}: {exc.strerror}") from None
            os.close(fd)
            fd = child
            _check_component(here, os.fstat(fd), last)
    finally:
        os.close(fd)
    return Path(text)


def is_safe_dir(path: str | os.PathLike) -> str | None:
    """None when `path` exists and is safe for root (see secure_dir), else why not; creates nothing."""
    try:
        secure_dir(path, create=False)
    except UnsafeDir as exc:
        return str(exc)
    return None


def own_entry(root: Path, name: str) -> os.stat_result | None:
    """The lstat of root/name when it is a directory root made (root-owned, not a symlink), else None."""
    try:
        st = os.lstat(root / name)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0:
        return None
    return st
