"""Warm images: a catalog image booted once with no job identity, ready, and saved (libvirt save) on this node.

A job's guest of the same shape is then restored from it instead of booted (warm_boot.py): about 1 s instead of
5-6 s for the test guest under TCG (../shared/reference/warm-start-restore.md).

What holds, and why:
- Tied to the image digest and the guest's shape: the key is the sha256 of the domain XML a guest of that shape
  gets (domain.py, with every per-job part left out: name, owner, pinning, job network), so anything that
  changes the devices (vCPUs, RAM, machine, a code change to the XML) changes the key and the old image is
  simply not found; a new digest likewise. `vtorque images warm` (or the node worker) makes the new one.
- Root-only: `<warm_dir>/<digest16>-<key>/` (0700 in a 0700 root, both root's, checked before each use) holds
  the save file, the saved guest's disk overlay and warm.json (written last: no warm.json, no warm image).
- Never from a guest a user touched: the build boots a fresh overlay of the base with a seed that names no user
  and no key (VT_WARM=1); its sshd is not even started before the save; nothing ever saves a job's guest.
- Evicted with the image: a warm image holds no lease on its base image; once the store has evicted the base,
  `find` and `sweep` remove the warm image (its overlay's backing file is gone).
- The build's guest runs in the node's guest directory (QEMU must reach its files; the warm root is closed to
  it), as `vt-warm-<key>` with no vtorque metadata: reconciliation removes a leftover of a build that died.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from hashlib import sha256
from pathlib import Path

import msgspec

from vtorque.shared import messages as m
from vtorque.shared.config import Config, ImageEntry
from vtorque.shared.image_store import ImageStore
from vtorque.shared.logs import log

from . import disks, guest_link, trust
from .domain import IDENTITY_SOCKET, USER_NET_MAC, BootSource, GuestDisks, GuestMetadata, domain_xml
from .hypervisor import Hypervisor, HypervisorError
from .identity_channel import WARM_READY, ChannelError, IdentityChannel
from .readiness import GUEST_FAILED, BootFailed, console_tail

LOG = logging.getLogger("vtorque.node_worker.warm")
FORMAT = 1  # of warm.json and the key; a change makes every older warm image unfound
WARM_GUEST_PREFIX = "vt-warm-"
SAVE_FILE = "warm.save"
OVERLAY = "root.qcow2"
META = "warm.json"
SETTLE = 0.2  # seconds between the guest's WARM-READY and the save: its init is back in its channel loop


class WarmError(Exception):
    pass


@dataclass(frozen=True)
class WarmImage:
    dir: Path
    key: str
    digest: str
    saved_dir: str  # the built guest's directory: every path of the saved XML starts with it
    meta: dict

    @property
    def save(self) -> Path:
        return self.dir / SAVE_FILE

    @property
    def overlay(self) -> Path:
        return self.dir / OVERLAY


def why_not_warm(guest: m.GuestPlan) -> str | None:
    """Why this guest cannot come from a warm image (cold boot then), or None. A warm image has the root disk,
    seed and identity channel only, in the node's shared guest directory."""
    if guest.disk:
        return "the guest has a data disk"
    if guest.vrdma:
        return "the guest has vRDMA"
    if guest.iocm_max_cores:
        return "the guest has IOcm I/O threads"
    if guest.fs_type == "ramdisk":
        return "the guest's disks are in node memory (fs_type=ramdisk)"
    if guest.distro == "osv":
        return "OSv guests take no identity after a restore"
    if guest.user_metadata:
        # cloud-init applies them on a first boot; a restored copy had its first boot without them.
        return "the user's own cloud-init keys need a first boot"
    return None


def identity_free_seed(name: str) -> dict[str, bytes]:
    """The seed a warm image is booted with (and a pooled guest restored with): VT_WARM=1 and no identity. For a
    cloud image: no user at all (cloud-init's default user would be in every copy) and one ssh host key type
    (the guest's agent replaces it after each restore: tests/guest/cloud/vtorque-agent)."""
    return {"meta-data": f'{{"instance-id": "{name}"}}\n'.encode(),
            "user-data": b'#cloud-config\n{"users": [], "ssh_genkeytypes": ["ed25519"]}\n',
            "vtorque.env": b"VT_WARM=1\n"}


def warm_plan(name: str, image: str, entry: ImageEntry, node: str, vcpus: int, ram_mib: int,
              arch: str = "x86_64") -> m.GuestPlan:
    """The guest a warm image is made from: the shape, and no identity at all."""
    return m.GuestPlan(name=name, node=node, index=0, image=image, image_digest=entry.sha256, vcpus=vcpus,
                       ram_mib=ram_mib, cores=None, owner=m.Owner(user="root", uid=0, gid=0), ssh_authorized_keys=[],
                       arch=arch)


def shape_key(guest: m.GuestPlan, boot: BootSource, domain_type: str) -> str:
    """The warm image key of `guest`'s shape: what its devices are, none of who it is."""
    canonical = msgspec.structs.replace(
        guest, name="vt-warm", node="", index=0, image="", cores=None, emulator_cores=None, io_cores=None,
        owner=m.Owner(user="root", uid=0, gid=0), ssh_authorized_keys=[], user_metadata={}, end_by=None)
    # Pure in these: worked out once per shape in a process, not once per boot (an XML built, parsed and
    # written again, 1.5 ms of every cold boot: docs/benchmarks.md, scale).
    memo = (msgspec.json.encode(canonical), boot, domain_type)
    key = _shape_keys.get(memo)
    if key is None:
        key = _shape_key(canonical, guest.image_digest, boot, domain_type)
        if len(_shape_keys) >= 256:
            _shape_keys.clear()
        _shape_keys[memo] = key
    return key


_shape_keys: dict[tuple[bytes, BootSource, str], str] = {}


def _shape_key(canonical: m.GuestPlan, digest: str, boot: BootSource, domain_type: str) -> str:
    place = "/warm"
    files = GuestDisks(overlay=f"{place}/{OVERLAY}", seed=f"{place}/seed.iso", console_log=f"{place}/console.log")
    xml = domain_xml(canonical, files, boot, _no_meta(), domain_type, identity_channel=True)
    return sha256(f"{FORMAT}\n{digest}\n{without_metadata(xml)}".encode()).hexdigest()[:24]


def without_metadata(xml: str) -> str:
    """The domain XML without vtorque's metadata: a domain nobody lists as a job's guest (hypervisor.py)."""
    root = ET.fromstring(xml)
    for meta in root.findall("metadata"):
        root.remove(meta)
    return ET.tostring(root, encoding="unicode")


def _no_meta() -> GuestMetadata:
    return GuestMetadata(job_id="", owner="", deadline=datetime(2000, 1, 1, tzinfo=UTC), index=0)


# -- where warm images live -----------------------------------------------------------------------------------

def root_of(config: Config) -> Path:
    return Path(config.node.warm_dir or Path(config.state_dir) / "warm")


def _root(config: Config) -> Path:
    """The warm root, made if missing, checked root's (no one else may write on the way) and made 0700."""
    try:
        root = trust.secure_dir(root_of(config), 0o700)
    except trust.UnsafeDir as exc:
        raise WarmError(f"warm images not kept: {exc}") from None
    os.chmod(root, 0o700)
    return root


def image_dir(config: Config, digest: str, key: str) -> Path:
    return root_of(config) / f"{digest[:16]}-{key}"


def _load(path: Path) -> WarmImage | None:
    """The warm image in `path`, when it is complete and root's alone; None otherwise."""
    try:
        st = os.lstat(path)
        if not (os.path.isdir(path) and not os.path.islink(path)) or st.st_uid != 0 or st.st_mode & 0o077:
            return None
        meta = json.loads(disks.read_small(path, META) or "null")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            return None
        for name in (SAVE_FILE, OVERLAY):
            fst = os.lstat(path / name)
            if not os.path.isfile(path / name) or os.path.islink(path / name) or fst.st_uid != 0 \
                    or fst.st_mode & 0o077:
                return None
        return WarmImage(dir=path, key=str(meta["key"]), digest=str(meta["digest"]),
                         saved_dir=str(meta["saved_dir"]), meta=meta)
    except (OSError, ValueError, KeyError):
        return None


def find(config: Config, store: ImageStore, digest: str, key: str) -> WarmImage | None:
    """The warm image of this digest and shape, if this node has one whose base is still in the store."""
    if trust.is_safe_dir(root_of(config)) is not None:
        return None  # no warm root (never made), or one that is not root's alone: never read
    path = image_dir(config, digest, key)
    if not path.exists():
        return None
    image = _load(path)
    if image is None or image.digest != digest or image.key != key:
        return None
    if not store.has(digest):
        remove(image.dir)  # evicted with its image
        return None
    return image


def listing(config: Config) -> list[WarmImage]:
    root = root_of(config)
    if trust.is_safe_dir(root) is not None:
        return []
    found = (_load(root / name) for name in sorted(os.listdir(root)) if not name.startswith("."))
    return [image for image in found if image is not None]


def sweep(config: Config, store: ImageStore, keep_digests: set[str] | None = None) -> list[str]:
    """Remove the warm images whose base image left the store (or, given `keep_digests`, whose digest is not
    one of them: an image taken out of the catalog); the names removed."""
    gone = []
    for image in listing(config):
        if not store.has(image.digest) or (keep_digests is not None and image.digest not in keep_digests):
            remove(image.dir)
            gone.append(image.dir.name)
    return gone


def remove(path: Path) -> None:
    log(LOG, logging.INFO, "warm image removed", warm_image=path.name)
    shutil.rmtree(path, ignore_errors=True)


def rebuild_wanted(config: Config, image: str, digest: str, key: str) -> bool:
    """Whether this node keeps warm images of `image` (the operator made one: of an older digest, or another
    shape) but has none of this digest and shape: then the node worker makes it, once it is idle."""
    return any(w.meta.get("image") == image and (w.digest, w.key) != (digest, key) for w in listing(config))


# -- making one -------------------------------------------------------------------------------------------------

def build(config: Config, hv: Hypervisor, store: ImageStore, image: str, vcpus: int, ram_mib: int,
          domain_type: str, progress: Callable[[str], None] = lambda _s: None, timeout: float = 300.0,
          force: bool = False) -> WarmImage:
    """Boot `image` once in this shape with no identity, wait for its WARM-READY, save it; the warm image.
    An existing one of the same digest and shape is kept unless `force`. Raises WarmError."""
    entry = config.images.catalog.get(image)
    if entry is None:
        raise WarmError(f"no image {image!r} in the catalog")
    if not store.has(entry.sha256):
        raise WarmError(f"image {image} is not in this node's store ({store.root}): `vtorque images pull {image}`")
    boot = BootSource(entry.kernel, entry.initrd, entry.cmdline)
    key = shape_key(warm_plan("vt-warm", image, entry, config.node.node_name(), vcpus, ram_mib), boot,
                    domain_type)
    root = _root(config)
    final = image_dir(config, entry.sha256, key)
    lock_fd = os.open(root / f".{key}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with open(lock_fd, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build of a shape at a time on a node (a CLI and a worker)
        old = _load(final) if final.exists() else None
        if old is not None and not force:
            progress(f"warm image {final.name} is current")
            return old
        return _build_locked(config, hv, store, image, entry, boot, key, vcpus, ram_mib, domain_type, final,
                             progress, timeout)


def _build_locked(config: Config, hv: Hypervisor, store: ImageStore, image: str, entry: ImageEntry,
                  boot: BootSource, key: str, vcpus: int, ram_mib: int, domain_type: str, final: Path,
                  progress: Callable[[str], None], timeout: float) -> WarmImage:
    started = time.monotonic()
    deadline = started + timeout
    node = config.node.node_name()
    plan = warm_plan(WARM_GUEST_PREFIX + key[:16], image, entry, node, vcpus, ram_mib)
    work = final.with_name(f".{final.name}.{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    os.mkdir(work, 0o700)
    guest_root = config.node.guest_dir
    hv.remove(plan.name)  # a leftover of a build that died
    disks.remove(guest_root, plan.name, store=config.images.store)
    try:
        progress(f"preparing {plan.name}: overlay on {entry.sha256[:12]}…, a seed with no identity")
        seed = identity_free_seed(plan.name)
        files = disks.prepare(guest_root, plan.name, "warm", store.path(entry.sha256), entry.format, seed,
                              store=config.images.store, node=node)
        gdir = Path(files.overlay).parent
        guest_link.start(gdir, 0, USER_NET_MAC)
        xml = without_metadata(domain_xml(plan, files, boot, _no_meta(), domain_type, identity_channel=True))
        dom = hv.define(xml)
        hv.start(dom)
        progress(f"booting {plan.name} ({vcpus} vCPUs, {ram_mib} MiB, {domain_type})")
        _wait_warm_ready(gdir, files.console_log, hv, plan.name, deadline)
        booted = time.monotonic()
        progress(f"ready after {booted - started:.1f}s; saving")
        time.sleep(SETTLE)
        try:
            dom.save(str(work / SAVE_FILE))
        except Exception as exc:  # noqa: BLE001 - libvirt's error, said in one line
            raise WarmError(f"libvirt save failed: {exc}") from None
        saved = time.monotonic()
        hv.remove(plan.name)  # saved: QEMU is gone; the definition goes too
        os.chmod(work / SAVE_FILE, 0o600)
        shutil.copyfile(files.overlay, work / OVERLAY)  # its disk as it was at the save
        os.chmod(work / OVERLAY, 0o600)
        save_bytes = (work / SAVE_FILE).stat().st_size
        meta = {"format": FORMAT, "image": image, "digest": entry.sha256, "key": key, "vcpus": vcpus,
                "ram_mib": ram_mib, "domain_type": domain_type, "node": node, "saved_dir": str(gdir),
                "created": time.time(), "boot_s": round(booted - started, 3), "save_s": round(saved - booted, 3),
                "save_bytes": save_bytes}
        tmp = work / f".{META}"
        tmp.write_text(json.dumps(meta))
        os.chmod(tmp, 0o600)
        os.rename(tmp, work / META)
        if final.exists():
            shutil.rmtree(final)
        os.rename(work, final)
        progress(f"saved {save_bytes / 2**20:.0f} MiB in {saved - booted:.1f}s: {final}")
        log(LOG, logging.INFO, "warm image made", warm_image=final.name, image=image, boot_s=meta["boot_s"],
            save_s=meta["save_s"])
        image_made = _load(final)
        if image_made is None:
            raise WarmError(f"{final}: made but not readable back")
        return image_made
    except (BootFailed, ChannelError, HypervisorError, disks.DiskError, guest_link.LinkError, OSError) as exc:
        raise WarmError(f"warm image of {image} not made: {exc}") from None
    finally:
        try:
            hv.remove(plan.name)
        except HypervisorError as exc:
            log(LOG, logging.WARNING, "warm build's guest not removed", guest=plan.name, error=str(exc))
        disks.remove(guest_root, plan.name, store=config.images.store)
        shutil.rmtree(work, ignore_errors=True)


def _wait_warm_ready(gdir: Path, console: str, hv: Hypervisor, name: str, deadline: float) -> None:
    """The guest's WARM-READY on its channel; a guest that fails or cannot do warm mode says so in time."""
    with IdentityChannel.open(gdir / IDENTITY_SOCKET, deadline) as channel:
        while True:
            try:
                channel.expect(WARM_READY, min(deadline, time.monotonic() + 1.0))
                return
            except ChannelError:
                time.sleep(0.1)
                if time.monotonic() >= deadline:
                    raise BootFailed("the guest never said WARM-READY: does its init support warm start "
                                     "(tests/guest/vtorque-init)?", False, console_tail(console)) from None
            if GUEST_FAILED.decode() in console_tail(console) or not hv.is_active(name):
                raise BootFailed("the guest failed while booting for its warm image", False, console_tail(console))


# -- the operator's command (`vtorque images warm` runs this module: the cli imports no service) ---------------

def main(argv: list[str] | None = None) -> int:
    import argparse

    from vtorque.shared.config import ConfigError, load_config, refresh_catalog
    from vtorque.shared.domain_type import detect_domain_type
    from vtorque.shared.spec import parse_size_mib

    parser = argparse.ArgumentParser(prog="vtorque images warm")
    sub = parser.add_subparsers(dest="what", required=True)
    make = sub.add_parser("build")
    make.add_argument("image")
    make.add_argument("--vcpus", type=int)
    make.add_argument("--ram")
    make.add_argument("--force", action="store_true")
    make.add_argument("--timeout", type=float, default=300.0)
    sub.add_parser("list")
    sub.add_parser("sweep")
    args = parser.parse_args(argv)
    try:
        config = load_config()
    except ConfigError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    refresh_catalog(config)
    store = ImageStore(config.images.store)
    if args.what == "list":
        images = listing(config)
        if not images:
            print(f"no warm images on this node ({root_of(config)})")
        for image in images:
            meta = image.meta
            when = datetime.fromtimestamp(meta.get("created", 0)).strftime("%Y-%m-%d %H:%M")
            print(f"{meta.get('image', '?'):12} {meta.get('vcpus')} vCPU {meta.get('ram_mib')} MiB  "
                  f"{meta.get('save_bytes', 0) / 2**20:.0f}M  made {when}  {image.dir}")
        return 0
    gone = sweep(config, store, {e.sha256 for e in config.images.catalog.values()})
    if args.what == "sweep":
        print(f"removed {len(gone)} warm image(s) of images no longer in the catalog or the store" if gone
              else "no warm image to remove")
        return 0
    try:
        ram_mib = parse_size_mib(args.ram or config.spec.default_ram)
    except ValueError:
        print(f"Error: --ram {args.ram}: a size as in a spec (512M, 2G)", file=sys.stderr)
        return 2
    started = time.monotonic()

    def progress(text: str) -> None:
        print(f"[{time.monotonic() - started:5.1f}s] {text}", file=sys.stderr, flush=True)

    try:
        made = build(config, Hypervisor(config.node.libvirt_uri), store, args.image,
                     args.vcpus or config.spec.default_vcpus, ram_mib, detect_domain_type(config.node.domain_type),
                     progress=progress, timeout=args.timeout, force=args.force)
    except WarmError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.image}: warm image {made.dir.name} ({made.meta['vcpus']} vCPU, {made.meta['ram_mib']} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
