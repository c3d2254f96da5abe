"""`vtorque doctor`: is this host able to run vtorque? One line per check, non-zero exit if any failed.

A check is a function (config) -> Check, listed in CHECKS; add yours there (the hook checks belong here too).
Each check does its own I/O and never raises: whatever goes wrong is its answer.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Callable

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok, warn, fail
    detail: str


def check_broker(config) -> Check:
    """The broker answers with the credentials the services use (broker.credentials_file)."""
    from vtorque.shared.bus import connect
    from vtorque.shared.config import ConfigError

    try:
        url = config.broker.connection_url()
    except ConfigError as exc:
        return Check("broker", FAIL, str(exc))
    try:
        conn = connect(url, timeout=config.broker.connect_timeout)
    except Exception as exc:  # noqa: BLE001 - any failure to connect is the answer
        return Check("broker", FAIL, f"{config.broker.url}: {exc}")
    try:
        props = conn.connection.server_properties or {}
        version = props.get("version", b"?")
        version = version.decode() if isinstance(version, bytes) else str(version)
    finally:
        conn.release()
    return Check("broker", OK, f"{config.broker.url} (RabbitMQ {version})")


def check_libvirt(config) -> Check:
    try:
        import libvirt
    except ImportError:
        return Check("libvirt", FAIL, "python3-libvirt is not installed")
    try:
        conn = libvirt.open(config.node.libvirt_uri)
    except libvirt.libvirtError as exc:
        return Check("libvirt", FAIL, f"{config.node.libvirt_uri}: {exc.get_error_message()}")
    try:
        v = conn.getLibVersion()
        return Check("libvirt", OK, f"{config.node.libvirt_uri} (libvirt {v // 1000000}.{v // 1000 % 1000}.{v % 1000})")
    finally:
        conn.close()


def check_accel(config) -> Check:
    """KVM or TCG: either works; TCG (software emulation) boots guests several times slower."""
    from vtorque.services.node_worker.hypervisor import detect_domain_type

    kind = detect_domain_type(config.node.domain_type)
    if kind == "kvm":
        return Check("accel", OK, "KVM (/dev/kvm)")
    why = ("node.domain_type = qemu" if config.node.domain_type == "qemu"
           else "no /dev/kvm" if not os.path.exists("/dev/kvm") else "KVM is the PVM flavour (no stock guests)")
    return Check("accel", WARN, f"TCG software emulation ({why}): guests boot several times slower")


def check_image_store(config) -> Check:
    store = config.images.store
    try:
        os.makedirs(store, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=store, prefix=".doctor-"):
            pass
    except OSError as exc:
        return Check("image store", FAIL, f"{store}: not writable ({exc.strerror})")
    free = shutil.disk_usage(store).free
    status = OK if free > 2 * 2**30 else WARN
    return Check("image store", status, f"{store} writable, {free / 2**30:.1f} GiB free")


def skew_bounds(age_s: float, interval_s: float) -> tuple[float, float]:
    """A heartbeat read `age_s` after its created_at was sent at most `interval_s` before we read it (the node
    beats every interval), so the node's clock runs ahead of ours by between -age_s and interval_s - age_s."""
    return -age_s, interval_s - age_s


def check_clock(config, max_skew: float = 2.0) -> Check:
    """NTP sync here (timedatectl), and the other nodes' clocks from their heartbeats' timestamps."""
    from vtorque.shared.node_registry import is_stale, latest_per_node, read_heartbeats
    from vtorque.shared.messages import utcnow

    notes, status = [], OK
    if shutil.which("timedatectl"):
        got = subprocess.run(["timedatectl", "show", "-p", "NTPSynchronized", "--value"], capture_output=True,
                             text=True, timeout=5, check=False)
        synced = got.stdout.strip()
        if synced == "yes":
            notes.append("NTP synchronized")
        elif synced == "no":
            notes.append("NTP not synchronized")
            status = WARN
    try:
        beats = latest_per_node(read_heartbeats(config.broker.connection_url(), timeout=config.broker.connect_timeout))
    except Exception as exc:  # noqa: BLE001
        return Check("clock", WARN, "; ".join(notes + [f"no heartbeats to compare with: {exc}"]))
    now = utcnow()
    off = []
    for beat in beats:
        if is_stale(beat, now) and (now - beat.created_at).total_seconds() > 0:
            continue  # silent node (or far behind): `vtorque nodes` shows it stale
        low, high = skew_bounds((now - beat.created_at).total_seconds(), beat.interval)
        # Only "ahead" is provable: an old heartbeat may as well come from a node that just stopped.
        if low > max_skew:
            off.append(f"{beat.node} ahead by ≥{low:.1f}s")
    if off:
        return Check("clock", FAIL, "; ".join(notes + off))
    notes.append(f"no node's heartbeat is from the future (checked {len(beats)}; a clock behind shows as stale "
                 "in `vtorque nodes`)")
    return Check("clock", status, "; ".join(notes))


def check_torque_hooks(config) -> Check:
    """Torque hooks on this node: owner, mode, chaining, $prologalarm (cli/install_hooks.py)."""
    from vtorque.cli.install_hooks import check_torque_hooks as check

    return check(config)


CHECKS: list[Callable] = [check_broker, check_libvirt, check_accel, check_image_store, check_clock,
                          check_torque_hooks]


def check_name(check: Callable) -> str:
    """The name `--check` takes: the function's name without check_, underscores as spaces."""
    return check.__name__.removeprefix("check_").replace("_", " ")


def run_checks(config, checks: list[Callable] | None = None) -> list[Check]:
    results = []
    for check in checks or CHECKS:
        try:
            results.append(check(config))
        except Exception as exc:  # noqa: BLE001 - a broken check is a failed check, not a crash of the others
            results.append(Check(check_name(check), FAIL, f"check crashed: {exc!r}"))
    return results


def render(results: list[Check]) -> str:
    mark = {OK: "ok  ", WARN: "warn", FAIL: "FAIL"}
    return "\n".join(f"{mark.get(r.status, r.status)}  {r.name:<12} {r.detail}" for r in results)
