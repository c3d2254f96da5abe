"""The job's own network: one L2 segment per job that every guest of the job joins, whatever node it is on.
Pure: names, addresses and MACs follow from the job id and the guest's rank, so the bridge and every node
worker agree without asking each other."""

from __future__ import annotations

import hashlib

from vtorque.shared import messages as m

JOB_NETWORK_PREFIX = 16


def job_network(job_id: str) -> m.JobNetwork:
    """A multicast group and port of the job's own, from its id: admin-scoped 239.0.0.0/8, so 2^24 groups ×
    20,000 ports make two running jobs sharing a segment a negligible chance."""
    digest = hashlib.sha256(job_id.encode()).digest()
    return m.JobNetwork(group=f"239.{digest[0]}.{digest[1]}.{digest[2] or 1}",
                        port=40000 + int.from_bytes(digest[3:5], "big") % 20000, prefix=JOB_NETWORK_PREFIX)


def guest_address(index: int) -> str:
    """Rank i on the job network: 10.254.0.1, 10.254.0.2, … (inside the guests only; never a host address)."""
    return f"10.254.{index // 250}.{index % 250 + 1}"


def guest_mac(job_id: str, index: int) -> str:
    tag = hashlib.sha256(job_id.encode()).digest()[0]
    return f"52:54:00:{tag:02x}:{index >> 8 & 0xff:02x}:{index & 0xff:02x}"


