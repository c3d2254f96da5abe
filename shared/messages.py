"""The message contract: every body that crosses the broker, as msgspec Structs in one tagged union.

Commands ask one consumer group to act; events say what happened. Each body carries its own id, the job it
belongs to, when it was made and the absolute deadline after which nobody should act on it. Trace context
never travels in the body: it is in the AMQP headers (see shared/tracing.py).
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, ClassVar, Literal, TypeAlias, get_args

import msgspec

# What a routing key or a name on disk is made of is bounded here, at decoding: a body whose job id, node or
# digest could not be a routing word (255 bytes at most in AMQP) or a file name is refused as undecodable.
JobId = Annotated[str, msgspec.Meta(max_length=64, pattern=r"^[A-Za-z0-9._+@\[\]-]*$")]
NodeName = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
Digest = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
MessageId = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_message_id() -> str:
    return uuid.uuid4().hex


class Message(msgspec.Struct, tag_field="type", kw_only=True, forbid_unknown_fields=True, frozen=True):
    message_id: MessageId
    job_id: JobId
    created_at: datetime
    deadline: datetime

    kind: ClassVar[Literal["command", "event"]]

    @classmethod
    def new(cls, *, job_id: str, deadline: datetime | float, **fields):
        """Stamp a fresh message. `deadline` is absolute (datetime) or seconds from now (float)."""
        now = utcnow()
        if not isinstance(deadline, datetime):
            deadline = now + timedelta(seconds=float(deadline))
        return cls(message_id=new_message_id(), job_id=job_id, created_at=now, deadline=deadline, **fields)

    def expired(self, now: datetime | None = None) -> bool:
        return (now or utcnow()) >= self.deadline

    @property
    def event_name(self) -> str:
        return _snake(type(self).__name__)


class Command(Message, frozen=True):
    kind: ClassVar[Literal["command", "event"]] = "command"


class Event(Message, frozen=True):
    kind: ClassVar[Literal["command", "event"]] = "event"

    def routing_key(self) -> str:
        """Where it goes on vtorque.events: the route the topology table gives its type."""
        from vtorque.shared.topology import routing_key  # the table imports this module

        return routing_key(self)


# -- shared parts -----------------------------------------------------------------------------------------

class NodeAllocation(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    host: NodeName
    ncpus: int
    cores: list[int] | None = None  # the host cores the scheduler gave the job, when it says


class Owner(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    user: str
    uid: int
    gid: int
    group: str | None = None


class DataDisk(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    size_mib: int | None = None  # a new empty disk
    image: str | None = None  # the owner's own image file


class GuestPlan(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    name: str  # libvirt domain name, unique per job and guest
    node: NodeName
    index: int  # rank of the guest within the job, 0 runs the job script
    image: str  # catalog name
    image_digest: Digest  # sha256 hex of the verified base image
    vcpus: int
    ram_mib: int
    cores: list[int] | None
    owner: Owner
    ssh_authorized_keys: list[str]
    distro: str = "debian"
    arch: str = "x86_64"
    emulator_cores: list[int] | None = None  # QEMU's own threads, on the host reserve
    io_cores: list[int] | None = None  # IOcm: host cores for the guest's I/O threads
    iocm_min_cores: int = 0
    iocm_max_cores: int = 0
    vrdma: bool = False
    fs_type: Literal["ramdisk", "sharedfs"] = "sharedfs"
    disk: DataDisk | None = None
    user_metadata: dict[str, Any] = {}
    end_by: datetime | None = None  # the job's start + walltime, when the scheduler gave a walltime
    checkpoint: int | None = None  # -vm checkpoint=: None none, 0 on requeue, N also every N s (checkpoint.py)


class PhaseTimings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Seconds from the node worker receiving the boot command."""

    image: float
    disks: float
    define: float
    start: float
    kernel_up: float | None
    ready: float


# -- events -----------------------------------------------------------------------------------------------

class JobStarted(Event, frozen=True):
    """A job with a VM spec is about to start: the prologue is waiting for its guests."""

    scheduler: Literal["torque", "slurm"]
    owner: Owner
    nodes: list[NodeAllocation]
    spec: dict[str, str]  # as the user wrote it: validated again by the bridge
    ssh_authorized_keys: list[str]
    user_metadata: dict[str, Any] = {}  # the user's cloud-init additions (spec key `metadata`), checked again
    walltime: float | None = None  # seconds, when the scheduler's hook gives it


class JobEnded(Event, frozen=True):
    scheduler: Literal["torque", "slurm"]
    nodes: list[str]
    exit_status: int | None = None


class JobPlanned(Event, frozen=True):
    guests: list[GuestPlan]


class JobRejected(Event, frozen=True):
    """The bridge refused the job: for good, unless `retryable` (e.g. a node worker not heard from)."""

    reason: str
    retryable: bool = False


class ImageStaged(Event, frozen=True):
    image: str
    digest: Digest
    path: str
    bytes: int
    seconds: float
    cached: bool


class ImageStageFailed(Event, frozen=True):
    image: str
    digest: Digest
    reason: str


class ImageStagingProgress(Event, frozen=True):
    """How far a staging is: published by the stager that copies, about once per images.progress_interval."""

    image: str
    digest: Digest
    bytes: int  # copied (and hashed) so far
    total: int | None  # the source's size, when known
    rate: float  # bytes per second over the last interval


class ImageStageCancelled(Event, frozen=True):
    """A staging stopped because every job that wanted the image was deleted. Not a failure: node workers
    keep waiting, and a later request stages the image again."""

    image: str
    digest: Digest
    reason: str


class JobQueued(Event, frozen=True):
    """The scheduler queued a VM job (Torque accounting `Q` record, a pending Slurm job): the bridge asks for
    its image now, so staging overlaps the wait in the queue. Published by `vtorque run prefetch`."""

    scheduler: Literal["torque", "slurm"]
    spec: dict[str, str]  # the job script's vtorque-spec header, as written: the bridge validates it


class JobDeleted(Event, frozen=True):
    """The scheduler deleted or aborted a VM job (Torque `D`/`A`, a cancelled pending Slurm job): a staging
    that only it wanted stops."""

    scheduler: Literal["torque", "slurm"]
    reason: str = ""


class GuestReady(Event, frozen=True):
    guest: str
    node: NodeName
    index: int
    address: str
    ssh_port: int
    timings: PhaseTimings


class GuestFailed(Event, frozen=True):
    guest: str
    node: NodeName
    reason: str
    retryable: bool
    console_tail: str = ""


class GuestsTornDown(Event, frozen=True):
    node: NodeName
    guests: list[str]
    disks_removed: int
    # Guests the node could not remove in time (libvirt refused or hung): the epilogue says so, and the node's
    # reconciliation retries them; the answer is never withheld (a hook would wait out its deadline for nothing).
    not_removed: list[str] = []
    reason: str = ""


class CommandExpired(Event, frozen=True):
    command: str
    command_id: str


class NodeHeartbeat(Event, frozen=True):
    """A node worker is alive, and what it offers. Belongs to no job: job_id is "" and it is not traced."""

    node: NodeName
    cores: int
    mem_free_mib: int
    guests_running: int
    domain_type: Literal["kvm", "qemu"]  # qemu = TCG (software emulation)
    capabilities: list[str] = []
    interval: float = 10.0  # seconds until the next one
    # The node's VXLAN endpoint for job networks ([node] job_network_localaddr): the bridge puts it in the
    # BootGuests of a job that spans this node.
    tunnel_address: str = ""
    # Why libvirt does not answer on this node ("" when it does): the worker is alive and beats on, and its boots
    # wait for libvirt to return within their deadline.
    hypervisor_down: str = ""
    # The jobs with a guest on this node (cli/evacuate.py moves them off a node the scheduler takes out).
    jobs: list[JobId] = []


# -- commands ---------------------------------------------------------------------------------------------

class StageImage(Command, frozen=True):
    image: str
    digest: Digest


class GuestPeer(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Every guest of the job, as each guest sees the others: for its hosts file and node file. Not on the wire:
    each node worker derives the job's peers from its BootGuests (shared/job_boot.py)."""

    name: str
    index: int
    node: NodeName
    vcpus: int
    address: str  # on the job network


class JobNetwork(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The job's own L2 segment: a VXLAN segment (its VNI from the job id, shared/job_network.py) that every
    guest of the job, on any node of the job, joins with a second NIC; on each node a bridge of the job's own
    with no host address joins the guests' taps to it."""

    vni: int
    prefix: int  # guest addresses are <network address>/prefix
    # Every node of the job → its VXLAN endpoint (the node's address on the cluster network): where the job's
    # frames go, and the only senders they are taken from.
    endpoints: dict[NodeName, str] = {}


class GuestTemplate(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """What every guest of a job has in common (a GuestPlan without its name, node, rank, cores and data disk):
    said once in the job's BootGuests."""

    image: str  # catalog name
    image_digest: Digest
    vcpus: int
    ram_mib: int
    owner: Owner
    ssh_authorized_keys: list[str]
    distro: str = "debian"
    arch: str = "x86_64"
    iocm_min_cores: int = 0
    iocm_max_cores: int = 0
    vrdma: bool = False
    fs_type: Literal["ramdisk", "sharedfs"] = "sharedfs"
    user_metadata: dict[str, Any] = {}
    end_by: datetime | None = None
    checkpoint: int | None = None


class NodeCores(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """One node's guests and the host cores they get (services/scheduler_bridge/planning.py split_cores)."""

    guests: list[list[int] | None]  # one entry per guest on the node (k = 0, 1, …): its vCPUs' cores, or None
    emulator: list[int] | None = None  # QEMU's own threads, on the host reserve
    io: list[int] | None = None  # IOcm: host cores for the guests' I/O threads


class BootGuests(Command, frozen=True):
    """Boot a job's guests: one command for the whole job. The bridge publishes it once and the broker puts it
    in the queue of every node it names (sender-selected distribution, shared/bus.py); each node worker
    expands its own GuestPlans and the job's peers from it (shared/job_boot.py expand), so the job's n nodes
    cost n bytes-worth once, not n² (docs/benchmarks.md, scale). Guests are ranked node by node in `nodes`
    order, and named messages.domain_name(job, node, k)."""

    guest: GuestTemplate
    nodes: list[NodeName]
    # The guests per node and their cores: `cores` when every node has the same (the usual case), else
    # `node_cores`, one per node of `nodes`; exactly one of the two.
    cores: NodeCores | None = None
    node_cores: list[NodeCores] = []
    disk: DataDisk | None = None  # rank 0's data disk
    network: JobNetwork | None = None


class TeardownGuests(Command, frozen=True):
    node: NodeName


# -- live migration (services/node_worker/migrate.py, cli/migrate.py) -------------------------------------------

GuestName = Annotated[str, msgspec.Meta(min_length=1, max_length=160, pattern=r"^vt-[A-Za-z0-9_-]+$")]


class MigrateGuests(Command, frozen=True):
    """Move the job's running guests on `node` (the source, whose queue this is) to `target`, live: the
    operator's `vtorque migrate`. Both must be nodes the scheduler gave the job; the source checks again."""

    node: NodeName
    target: NodeName
    guests: list[GuestName] = []  # the guests to move; none: every guest of the job on the source


class PrepareMigration(Command, frozen=True):
    """From the source's node worker to the target's (routed to `target`'s queue): make ready for one guest's
    incoming migration (its directory, an empty overlay on the same base image, its seed, its ssh link, the
    job's network), then answer MigrationPrepared. libvirt copies the memory and the overlay's blocks."""

    node: NodeName  # the source, the sender
    target: NodeName
    guest: GuestName
    index: int
    owner: str  # the owner's user name: the target takes uid and gid from its own password database
    image_digest: Digest
    overlay_bytes: int  # the overlay's virtual size
    seed: bytes  # the guest's NoCloud seed (ISO 9660, read-only in the guest): libvirt does not copy it
    base_format: Literal["qcow2", "raw"] = "qcow2"
    vcpus: int = 1
    fs_type: Literal["ramdisk", "sharedfs"] = "sharedfs"
    vni: int | None = None  # the job network's, when the guest has one
    # The job network seen from the source: every other guest's MAC → the VXLAN endpoint of its node now, and
    # every endpoint of the job's nodes (for floods).
    guest_endpoints: dict[str, str] = {}
    endpoints: list[str] = []


class JobGuestMoved(Command, frozen=True):
    """From the source's node worker to every other node of the job (routed to `peer`'s queue): the guest with
    job network MAC `mac` is now behind VXLAN endpoint `endpoint` (the target's): the job's frames follow it."""

    node: NodeName  # the source, the sender
    peer: NodeName
    target: NodeName
    mac: Annotated[str, msgspec.Meta(pattern=r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")]
    endpoint: str
    vni: int


class MigrationPrepared(Event, frozen=True):
    """The target's answer to PrepareMigration: ready for the guest (reason ""), or why not."""

    node: NodeName  # the target
    source: NodeName
    guest: GuestName
    reason: str = ""
    endpoint: str = ""  # the target's VXLAN endpoint ([node] job_network_localaddr): the job's frames go there


class GuestMigrated(Event, frozen=True):
    """A guest moved from `node` (the source) to `target` and runs there; what the migration took."""

    node: NodeName
    target: NodeName
    guest: GuestName
    seconds: float  # from the start of the copy to the guest running on the target
    downtime_ms: float | None = None  # the guest paused for the last copy (libvirt's job statistics)
    memory_iterations: int | None = None  # pre-copy rounds
    memory_bytes: int | None = None  # memory sent
    disk_bytes: int | None = None  # overlay blocks sent
    remaining: int = 0  # guests of the same MigrateGuests still to move after this one


class MigrationFailed(Event, frozen=True):
    """A guest was not moved: it runs on where it was (`running_on`), or the reason says what is known."""

    node: NodeName
    target: NodeName
    guest: str
    reason: str
    running_on: str = ""
    remaining: int = 0  # guests of the same MigrateGuests still to move after this one


AnyMessage: TypeAlias = (
    JobStarted | JobEnded | JobPlanned | JobRejected | ImageStaged | ImageStageFailed | GuestReady | GuestFailed
    | GuestsTornDown | CommandExpired | StageImage | BootGuests | TeardownGuests | NodeHeartbeat
    | ImageStagingProgress | ImageStageCancelled | JobQueued | JobDeleted | MigrateGuests | PrepareMigration
    | JobGuestMoved | MigrationPrepared | GuestMigrated | MigrationFailed
)
MESSAGE_TYPES: tuple[type[Message], ...] = get_args(AnyMessage)

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(AnyMessage)


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


def decode(body: bytes) -> Message:
    """Strict: unknown types, unknown fields and wrong types all raise msgspec.ValidationError/DecodeError."""
    return _decoder.decode(body)


def contract_schema() -> dict:
    """JSON Schema of every message, generated from the Structs (docs/contract.json is this, checked in CI).

    Descriptions are normalised here (docstring indentation and line breaks folded to single spaces) so the
    document depends on the code, not on how a msgspec release formats docstrings."""
    return _normalise_descriptions(msgspec.json.schema(AnyMessage))


def _normalise_descriptions(node):
    if isinstance(node, dict):
        return {k: (" ".join(v.split()) if k in ("description", "title") and isinstance(v, str)
                    else _normalise_descriptions(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [_normalise_descriptions(v) for v in node]
    return node


def domain_name(job_id: str, node: str, index: int) -> str:
    """A guest's libvirt domain name, unique per job and guest and safe in paths: vt-<job>-<node>-<index>. The
    bridge names guests so; the node worker accepts no other name for a job's guest."""
    # Compiled once: every node worker makes the names of all the job's guests (shared/job_boot.py expand).
    return f"vt-{_UNSAFE_IN_NAME.sub('_', job_id)}-{_UNSAFE_IN_NAME.sub('_', node)}-{index}"


_UNSAFE_IN_NAME = re.compile(r"[^A-Za-z0-9_-]")


def routing_word(value: str) -> str:
    """One word of a topic routing key: Torque job ids hold dots ("1.vm"), which split words."""
    return re.sub(r"[^A-Za-z0-9_-]", lambda m: f"%{ord(m.group()):02X}", value)


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
