"""Which libvirt domain type this host runs guests with: the node worker defines its domains so, and
`vtorque doctor` says which one a node will use."""

from __future__ import annotations

import os
from pathlib import Path


def detect_domain_type(configured: str) -> str:
    """'kvm' only where it boots stock guests: the PVM flavour of KVM (software nested) does not."""
    if configured != "auto":
        return configured
    if not os.path.exists("/dev/kvm") or Path("/sys/module/kvm_pvm").exists():
        return "qemu"
    return "kvm"
