"""The node's hypervisor through libvirt: define, start, find, and destroy vtorque's domains."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import libvirt

from .domain import parse_metadata

libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors are raised as exceptions; stop stderr spam


class HypervisorError(Exception):
    pass


def detect_domain_type(configured: str) -> str:
    """'kvm' only where it boots stock guests: the PVM flavour of KVM (software nested) does not."""
    if configured != "auto":
        return configured
    if not os.path.exists("/dev/kvm") or Path("/sys/module/kvm_pvm").exists():
        return "qemu"
    return "kvm"


class Hypervisor:
    def __init__(self, uri: str):
        self.uri = uri
        self._local = threading.local()

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
        try:
            return self.conn.lookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise HypervisorError(exc.get_error_message()) from None

    def define(self, xml: str) -> libvirt.virDomain:
        try:
            return self.conn.defineXML(xml)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"define failed: {exc.get_error_message()}") from None

    def start(self, dom: libvirt.virDomain) -> None:
        try:
            dom.create()
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"start failed: {exc.get_error_message()}") from None

    def is_active(self, name: str) -> bool:
        dom = self.lookup(name)
        try:
            return bool(dom and dom.isActive())
        except libvirt.libvirtError:
            return False

    def remove(self, name: str) -> bool:
        """Destroy and undefine; True if there was a domain. Safe to call twice."""
        dom = self.lookup(name)
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
        found = {}
        for dom in self.conn.listAllDomains():
            try:
                meta = parse_metadata(dom.XMLDesc(0))
            except libvirt.libvirtError:
                continue  # it went away while we looked
            if meta:
                found[dom.name()] = meta
        return found
