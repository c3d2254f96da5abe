"""The node's hypervisor through libvirt: define, start, find, and destroy vtorque's domains.

Every call has a deadline: it runs in a small pool of the hypervisor's own and the caller waits at most
`timeout` seconds (a wedged libvirtd, or a QEMU stuck opening a file, must not wedge the node worker). A call
that timed out raises HypervisorError; its thread is left to finish or hang on its own.
"""

from __future__ import annotations

import concurrent.futures
import os
import queue
import select
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import libvirt

from .domain import parse_metadata

libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors are raised as exceptions; stop stderr spam


class HypervisorError(Exception):
    pass


T = TypeVar("T")
QUERY_TIMEOUT = 30.0  # lookups, listings, XML
CHANGE_TIMEOUT = 60.0  # define, destroy, undefine
START_TIMEOUT = 120.0  # QEMU's start (TCG on a loaded 2-core box takes seconds)
POOL_THREADS = 4
QEMU_RUN_DIR = Path("/run/libvirt/qemu")  # qemu:///system's <name>.pid of each running domain
KILL_WAIT = 5.0  # s for a SIGKILLed QEMU to exit (the kernel frees its memory; milliseconds)


class Hypervisor:
    def __init__(self, uri: str, query_timeout: float = QUERY_TIMEOUT, change_timeout: float = CHANGE_TIMEOUT,
                 start_timeout: float = START_TIMEOUT, qemu_run_dir: Path | None = None):
        self.uri = uri
        # Where this host's libvirtd keeps its QEMUs' pid files: only for the local system QEMU driver.
        self.qemu_run_dir = qemu_run_dir if qemu_run_dir is not None else (
            QEMU_RUN_DIR if uri in ("qemu:///system", "qemu+unix:///system") else None)
        self._local = threading.local()
        self.query_timeout, self.change_timeout, self.start_timeout = query_timeout, change_timeout, start_timeout
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._threads_lock = threading.Lock()
        # A domain's vtorque metadata, by UUID: written once at define (domain.py) and never changed after, so
        # parsing each domain's XML once is enough. Re-reading every domain's XML on each listing made boots,
        # teardowns and heartbeats O(guests on the node) (13-25 ms at 128 guests on the test driver; issue 12).
        self._meta: dict[str, dict[str, str]] = {}
        self._meta_lock = threading.Lock()

    def _timed(self, what: str, timeout: float, fn: Callable[..., T], *args) -> T:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._ensure_threads()
        self._calls.put((future, fn, args))
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise HypervisorError(f"libvirt did not answer {what} within {timeout:.0f}s") from None

    def timed(self, what: str, fn: Callable[..., T], *args, timeout: float | None = None) -> T:
        """Any other libvirt call a part of the node worker makes on a domain it holds (IOcm's counters and
        pinning, a restore's steps), with the same deadline as the calls above: the query deadline unless told."""
        return self._timed(what, self.query_timeout if timeout is None else timeout, fn, *args)

    def metadata_changed(self, dom) -> None:
        """A domain whose vtorque metadata was set after its define (a pooled guest claimed by a job): read it
        again now, so listings see the job's metadata and not the cached empty one."""
        meta = parse_metadata(self.timed("the domain's XML", dom.XMLDesc, 0))
        key = self.timed("the domain's UUID", dom.UUIDString)
        with self._meta_lock:
            self._meta[key] = meta

    def _ensure_threads(self) -> None:
        # Daemon threads of our own (not an executor's, which the interpreter joins at exit: a hung libvirt
        # call must not hang the process's exit either). Each keeps its own connection (self.conn).
        with self._threads_lock:
            if len(self._threads) >= POOL_THREADS:
                return
            thread = threading.Thread(target=self._serve, name=f"libvirt-{len(self._threads)}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self) -> None:
        while True:
            future, fn, args = self._calls.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                future.set_exception(exc)

    @property
    def conn(self) -> libvirt.virConnect:
        conn = getattr(self._local, "conn", None)
        if conn is None or not conn.isAlive():
            try:
                conn = libvirt.open(self.uri)
            except libvirt.libvirtError as exc:
                raise HypervisorError(f"cannot connect to {self.uri}: {exc.get_error_message()}") from None
            self._local.conn = conn
        return conn

    def lookup(self, name: str) -> libvirt.virDomain | None:
        return self._timed(f"lookup {name}", self.query_timeout, self._lookup, name)

    def _lookup(self, name: str) -> libvirt.virDomain | None:
        try:
            return self.conn.lookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise HypervisorError(exc.get_error_message()) from None

    def define(self, xml: str) -> libvirt.virDomain:
        return self._timed("define", self.change_timeout, self._define, xml)

    def _define(self, xml: str) -> libvirt.virDomain:
        try:
            return self.conn.defineXML(xml)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"define failed: {exc.get_error_message()}") from None

    def start(self, dom: libvirt.virDomain, paused: bool = False) -> None:
        """`paused`: QEMU is up but runs no guest instruction until `resume` (job_cgroup.py moves it first)."""
        self._timed("start", self.start_timeout, self._start, dom, paused)

    def resume(self, dom: libvirt.virDomain) -> None:
        def run() -> None:
            try:
                dom.resume()
            except libvirt.libvirtError as exc:
                raise HypervisorError(f"resume failed: {exc.get_error_message()}") from None
        self._timed("resume", self.change_timeout, run)

    def xml(self, dom: libvirt.virDomain) -> str:
        def get() -> str:
            try:
                return dom.XMLDesc(0)
            except libvirt.libvirtError as exc:
                raise HypervisorError(exc.get_error_message()) from None
        return self._timed("the domain's XML", self.query_timeout, get)

    def _start(self, dom: libvirt.virDomain, paused: bool = False) -> None:
        try:
            dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED if paused else 0)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"start failed: {exc.get_error_message()}") from None

    def is_active(self, name: str) -> bool:
        return self._timed(f"is {name} active", self.query_timeout, self._is_active, name)

    def _is_active(self, name: str) -> bool:
        dom = self._lookup(name)
        try:
            return bool(dom and dom.isActive())
        except libvirt.libvirtError:
            return False

    def kill(self, name: str, wait: float = KILL_WAIT) -> bool:
        """Stop the domain's QEMU at once: SIGKILL, then wait until it has exited. True once it has (an exited
        QEMU runs no guest instruction and holds no file, memory or socket; libvirt's destroy and undefine may
        follow later); False when that cannot be done here (no local system QEMU driver, no pid file, a pid
        that is not this domain's QEMU, or it did not exit in `wait` s): then `remove` is the way.

        Why not libvirt's destroy alone: it sends SIGTERM, then looks every 200 ms whether the process is still
        there, and a QEMU that exited counts as there until its parent reaps it. QEMU is daemonised, so that is
        PID 1: here (a microVM's init) a zombie QEMU lived 1.8-2.0 s, and the job stayed in Slurm's queue that
        long after its script ended. The pid is checked through a pidfd (the process the check saw is the one
        signalled, never a recycled pid) against QEMU's `-name guest=<name>,` argument."""
        if self.qemu_run_dir is None:
            return False
        try:
            pid = int((self.qemu_run_dir / f"{name}.pid").read_text().strip())
            fd = os.pidfd_open(pid)
        except (OSError, ValueError):
            return False
        try:
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                return False
            if not any(a.startswith(f"guest={name},".encode()) or a == f"guest={name}".encode() for a in argv):
                return False
            try:
                signal.pidfd_send_signal(fd, 0)  # still the process whose argv was read: its pid is not reused
            except OSError:
                return False
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            except ProcessLookupError:
                return True  # this QEMU exited meanwhile
            except OSError:
                return False
            poller = select.poll()
            poller.register(fd, select.POLLIN)  # readable once the process has exited, reaped or not
            return bool(poller.poll(wait * 1000))
        finally:
            os.close(fd)

    def remove(self, name: str) -> bool:
        """Destroy and undefine; True if there was a domain. Safe to call twice."""
        return self._timed(f"remove {name}", 2 * self.change_timeout, self._remove, name)

    def _remove(self, name: str) -> bool:
        dom = self._lookup(name)
        if dom is None:
            return False
        try:
            if dom.isActive():
                dom.destroy()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() not in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
                raise HypervisorError(f"destroy {name} failed: {exc.get_error_message()}") from None
        try:
            dom.undefine()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise HypervisorError(f"undefine {name} failed: {exc.get_error_message()}") from None
        return True

    def vtorque_domains(self) -> dict[str, dict[str, str]]:
        """Every domain carrying vtorque metadata: name → metadata."""
        return self._timed("list domains", self.query_timeout, self._vtorque_domains)

    def _vtorque_domains(self) -> dict[str, dict[str, str]]:
        found, listed = {}, set()
        for dom in self.conn.listAllDomains():
            try:
                key = dom.UUIDString()
                with self._meta_lock:
                    meta = self._meta.get(key)
                if meta is None:
                    meta = parse_metadata(dom.XMLDesc(0))
                    with self._meta_lock:
                        self._meta[key] = meta
                name = dom.name()
            except libvirt.libvirtError:
                continue  # it went away while we looked
            listed.add(key)
            if meta:
                found[name] = meta
        with self._meta_lock:  # undefined since: a UUID is never reused for another domain of ours
            for key in set(self._meta) - listed:
                del self._meta[key]
        return found

    def unavailable(self) -> str:
        """Why libvirt does not answer now, or "" when it does (a fresh connection is made if the last died)."""
        try:
            self._timed("version", self.query_timeout, lambda: self.conn.getLibVersion())
        except (HypervisorError, libvirt.libvirtError) as exc:
            return str(exc) or type(exc).__name__
        return ""

    def active_names(self) -> set[str]:
        """Names of the running domains, in one call (not an is_active round trip per domain)."""
        return self._timed("list running domains", self.query_timeout, lambda: {
            dom.name() for dom in self.conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)})
