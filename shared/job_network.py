"""The job's own network: one L2 segment per job that every guest of the job joins, whatever node it is on.
Pure: the segment's identifier, names, addresses and MACs follow from the job id and the guest's rank, so the
bridge and every node worker agree without asking each other. The segment itself (a VXLAN segment bridged to
the guests' taps on each node) is made by the node worker (services/node_worker/job_segment.py)."""

from __future__ import annotations

import functools
import hashlib
import re

from vtorque.shared import messages as m

JOB_NETWORK_PREFIX = 16
# VXLAN network identifiers vtorque uses: 24 bits, the first 4,096 left to the site's own segments.
VNI_MIN = 4096
VNI_MAX = (1 << 24) - 1
_JOB_NUMBER = re.compile(r"(\d{1,18})(\.[A-Za-z0-9.-]*)?")


def job_vni(job_id: str) -> int:
    """The job's VXLAN segment. A scheduler numbers its jobs, and no two jobs it runs at once share a number
    (Slurm's `123`, Torque's `123.server`), so the number gives a VNI no other running job has, until the
    numbering wraps 16.7 million jobs later. Any other form (an array element `123[4].server`) is hashed. Either
    way a node worker refuses a VNI that another job holds on it (job_segment.py): a clash fails a job, it never
    joins two."""
    number = _JOB_NUMBER.fullmatch(job_id)
    n = int(number.group(1)) if number else int.from_bytes(hashlib.sha256(job_id.encode()).digest()[:8], "big")
    return VNI_MIN + n % (VNI_MAX - VNI_MIN + 1)


def job_network(job_id: str, endpoints: dict[str, str]) -> m.JobNetwork:
    """The job's segment: its VNI, and the VXLAN endpoint (the node's own address on the cluster network, from
    its heartbeats) of every node of the job, so each node sends the job's frames to the job's nodes only."""
    return m.JobNetwork(vni=job_vni(job_id), prefix=JOB_NETWORK_PREFIX, endpoints=dict(sorted(endpoints.items())))


def guest_address(index: int) -> str:
    """Rank i on the job network: 10.254.0.1, 10.254.0.2, … (inside the guests only; never a host address)."""
    return f"10.254.{index // 250}.{index % 250 + 1}"


def guest_mac(job_id: str, index: int) -> str:
    tag = _job_tag(job_id)
    return f"52:54:00:{tag:02x}:{index >> 8 & 0xff:02x}:{index & 0xff:02x}"


@functools.lru_cache(maxsize=256)
def _job_tag(job_id: str) -> int:
    # Once per job, not once per guest: a node of a 1,024-node job names every remote guest's MAC.
    return hashlib.sha256(job_id.encode()).digest()[0]
