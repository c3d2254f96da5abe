"""The security suite's own fixtures: real unprivileged accounts (useradd, removed after the session), a site of
its own under /tmp (no broker: handlers are called with hand-built commands, as anyone able to publish could
build them), a tiny base image in that site's store, and snapshots of directory trees (paths, owners, modes,
hashes) to prove an attack changed nothing."""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest

from vtorque.services.node_worker.hypervisor import Hypervisor
from vtorque.services.node_worker.service import NodeWorker
from vtorque.shared import messages as m
from vtorque.shared.config import Config, ImageEntry, ImagesConfig, NodeConfig, SpecConfig
from vtorque.shared.image_store import ImageStore
from vtorque.shared.job_boot import template_of
from vtorque.shared.messages import domain_name

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG2dXW1vjFpNu2d0dw7Fqt5fLwRY7FTl1Qb4mK3xqQ9n test"


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    home: Path

    def owner(self) -> m.Owner:
        return m.Owner(user=self.name, uid=self.uid, gid=self.gid)

    def run(self, *argv: str, **kw) -> subprocess.CompletedProcess:
        """A command as this user (setgid/setuid, its own groups), as the user would run it."""
        return subprocess.run(list(argv), user=self.uid, group=self.gid, extra_groups=[], cwd=self.home,
                              capture_output=True, text=True, timeout=30, **kw)


def _useradd(name: str) -> Account:
    subprocess.run(["useradd", "-m", "-s", "/bin/sh", name], check=True, capture_output=True, timeout=30)
    pw = pwd.getpwnam(name)
    return Account(name, pw.pw_uid, pw.pw_gid, Path(pw.pw_dir))


ACCOUNT = re.compile(r"^vts[ab]([0-9]+)x[0-9a-f]{3}$")


def _remove_abandoned_accounts() -> None:
    """Accounts of sessions whose process is gone (killed before their teardown)."""
    for pw in pwd.getpwall():
        found = ACCOUNT.match(pw.pw_name)
        if not found:
            continue
        try:
            os.kill(int(found.group(1)), 0)
        except ProcessLookupError:
            subprocess.run(["userdel", "-r", pw.pw_name], capture_output=True, timeout=30)
        except PermissionError:
            pass


@pytest.fixture(scope="session")
def users():
    """Two ordinary local accounts, (attacker, victim); deleted with their homes after the session."""
    _remove_abandoned_accounts()
    tag = f"{os.getpid()}x{uuid.uuid4().hex[:3]}"
    made = []
    try:
        made.append(_useradd(f"vtsa{tag}"))
        made.append(_useradd(f"vtsb{tag}"))
        yield tuple(made)
    finally:
        for account in made:
            subprocess.run(["userdel", "-r", account.name], capture_output=True, timeout=30)


@pytest.fixture(scope="session")
def base_image(tmp_path_factory):
    """A 1 MiB raw base image and its sha256 (what a catalog entry names)."""
    path = tmp_path_factory.mktemp("base") / "tiny.raw"
    path.write_bytes(b"\0" * (1 << 20))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


class Recorder:
    """A publisher that keeps what the handler answered."""

    def __init__(self):
        self.sent: list[m.Message] = []

    def publish(self, message: m.Message) -> None:
        self.sent.append(message)

    def close(self) -> None:
        pass


@dataclass
class Site:
    root: Path
    config: Config
    worker: NodeWorker
    sent: Recorder

    @property
    def node(self) -> str:
        return self.config.node.name

    def plan(self, user: Account, job: str, **changes) -> m.GuestPlan:
        digest = self.config.images.catalog["tiny"].sha256
        guest = m.GuestPlan(name=domain_name(job, self.node, 0), node=self.node, index=0, image="tiny",
                            image_digest=digest, vcpus=1, ram_mib=128, cores=None, owner=user.owner(),
                            ssh_authorized_keys=[KEY])
        return msgspec.structs.replace(guest, **changes)

    def boot(self, job: str, *guests: m.GuestPlan, nodes: list[str] | None = None, **more) -> list[m.Message]:
        """A hand-built BootGuests (hand_built), through the wire's own decoder, handed to the node worker."""
        cmd = wire(hand_built(job, list(guests), nodes, **more))
        before = len(self.sent.sent)
        self.worker.on_boot_guests(cmd)
        return self.sent.sent[before:]

    def domains(self) -> dict[str, dict[str, str]]:
        return {n: meta for n, meta in self.worker.hv.vtorque_domains().items() if meta.get("node") == self.node}


def hand_built(job: str, guests: list[m.GuestPlan], nodes: list[str] | None = None, **fields) -> m.BootGuests:
    """A job's BootGuests as anyone able to publish to a node's queue could write it, not as the bridge makes it
    (planning.boot_command checks that what it sends expands back to its plan): the job-wide part from the first
    guest, each of `nodes` (default: the guests' nodes, in order) with the cores of its guests among `guests` (a
    node with none of them gets one unpinned guest); `fields` as given."""
    nodes = nodes if nodes is not None else list(dict.fromkeys(g.node for g in guests))
    per_node = []
    for node in nodes:
        on = [g for g in guests if g.node == node]
        per_node.append(m.NodeCores(guests=[g.cores for g in on] or [None], emulator=on[0].emulator_cores if on
                                    else None, io=on[0].io_cores if on else None))
    same = all(c == per_node[0] for c in per_node)
    return m.BootGuests.new(job_id=job, deadline=60.0, **{
        "guest": template_of(guests[0]), "nodes": nodes, "cores": per_node[0] if same and per_node else None,
        "node_cores": [] if same else per_node, "disk": guests[0].disk, **fields})


def wire(message: m.Message) -> m.Message:
    """What a consumer gets of `message` off the broker. The decoder itself refuses a job id, node or digest no
    routing key or file name could hold (shared/messages.py); the node worker must refuse such a command on its
    own too (it may come another way), so a message the decoder refused is handed on as it was built, and the
    decoder's refusal is checked here."""
    try:
        return m.decode(m.encode(message))
    except msgspec.ValidationError as exc:
        assert any(f"{f}`" in str(exc) for f in ("job_id", "node", "digest", "image_digest", "message_id")) \
            or "$.nodes[" in str(exc), exc
        return message


def make_site(base_image, entry: ImageEntry | None = None, **node) -> Site:
    """A site under /tmp with `base_image` (or `entry`, e.g. the test guest) staged as catalog image "tiny"."""
    root = Path(tempfile.mkdtemp(prefix="vtorque-sec-", dir="/tmp"))
    root.chmod(0o711)
    if entry is None:
        path, digest = base_image
        entry = ImageEntry(source=str(path), sha256=digest, format="raw")
    ImageStore(str(root / "images")).stage(entry.source, entry.sha256)
    name = f"sec{uuid.uuid4().hex[:10]}"
    config = Config(
        state_dir=str(root / "state"),
        images=ImagesConfig(store=str(root / "images"), catalog={"tiny": entry}),
        spec=SpecConfig(host_reserve_cores=0, host_reserve_ram="0M", max_vcpus=4, max_ram="1G", max_disk="1G",
                        max_vms_per_node=2),
        node=NodeConfig(name=name, **{"guest_dir": str(root / "guests"),
                                      "ramdisk_dir": str(root / "shm/vtorque/guests"), "boot_timeout": 15.0, **node}))
    sent = Recorder()
    worker = NodeWorker(config, sent, hypervisor=Hypervisor("qemu:///system"))
    return Site(root, config, worker, sent)


@pytest.fixture
def site(base_image):
    s = make_site(base_image)
    yield s
    for name in s.domains():  # only if an attack got through: nothing of it may stay
        s.worker.hv.remove(name)
    shutil.rmtree(s.root, ignore_errors=True)


def snapshot(top: Path, skip: tuple[str, ...] = ("images",)) -> dict[str, tuple]:
    """Every entry under `top` (and `top`): owner, group, mode, and content hash or link target. The image
    store (`images`, whose bookkeeping a stager's clock changes) is left out."""
    out: dict[str, tuple] = {}
    if not os.path.lexists(top):
        return out
    for here, dirs, files in os.walk(top, followlinks=False):
        if here == str(top):
            dirs[:] = [d for d in dirs if d not in skip]
            st = os.lstat(here)
            out["."] = (st.st_uid, st.st_gid, st.st_mode)
        for name in dirs + files:
            p = Path(here) / name
            st = os.lstat(p)
            rel = str(p.relative_to(top))
            if p.is_symlink():
                out[rel] = (st.st_uid, st.st_gid, st.st_mode, os.readlink(p))
            elif p.is_file():
                out[rel] = (st.st_uid, st.st_gid, st.st_mode, hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                out[rel] = (st.st_uid, st.st_gid, st.st_mode)
    return out


def file_state(path: Path) -> tuple:
    st = os.lstat(path)
    return st.st_uid, st.st_gid, st.st_mode, hashlib.sha256(path.read_bytes()).hexdigest()
