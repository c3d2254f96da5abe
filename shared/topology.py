"""The broker topology, in one table: every exchange and queue, what each queue is bound to, which service
publishes each message type and which consumes it.

Everything else derives from this table: the kombu queues of shared/bus.py, each service's queues, the broker
users' permissions (`broker_permissions`), the consumers' sender checks (`may_publish`) and the contract
document. No queue name or routing pattern is typed anywhere else. Pure data and functions: no kombu, no pika
(the hooks import it without loading either).

Routing keys: events go to the topic exchange `vtorque.events` as `job.<job>.<event>`, `image.<digest>.<event>`
or `node.<host>.<event>` (each a single word: shared/messages.py routing_word); commands go to the direct
exchange `vtorque.commands` with the routing key of their queue (`stager`, `node.<host>`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from vtorque.shared import messages as m

NAMESPACE = "vtorque."  # every exchange and queue below starts with it (the set-up user may make only those)
EVENTS = "vtorque.events"
COMMANDS = "vtorque.commands"
DEAD = "vtorque.dead"
DEAD_QUEUE = "vtorque.dead"
# Commands go through a topic exchange too (their routing keys hold no wildcards, so it routes like a direct
# one) because the broker checks topic permissions only on topic exchanges: a node's user may then send
# `stager` commands but never `node.<host>` ones.
EXCHANGES: dict[str, str] = {EVENTS: "topic", COMMANDS: "topic", DEAD: "fanout"}

# The publishing parts of vtorque. Each runs as a broker user of its own (docs/security.md): `node` is one
# user per node (`vtorque-node-<host>`), the others one user per role.
Role = Literal["hook", "prefetch", "bridge", "stager", "node", "operator"]
ROLES: tuple[Role, ...] = ("hook", "prefetch", "bridge", "stager", "node", "operator")

# The queues' names (templates hold {node} or {tag}); code refers to these, never to the strings.
BRIDGE_Q, BRIDGE_PREFETCH_Q, BRIDGE_NODES_Q = "vtorque.bridge", "vtorque.bridge.prefetch", "vtorque.bridge.nodes.{tag}"
STAGER_Q, STAGER_CANCEL_Q = "vtorque.stager", "vtorque.stager.cancel"
NODE_Q, NODES_Q = "vtorque.node.{node}", "vtorque.nodes"
HOOK_Q, WAIT_Q, PULL_Q = "vtorque.hook.{tag}", "vtorque.wait.{tag}", "vtorque.pull.{tag}"
MIGRATION_Q, MIGRATE_WAIT_Q = "vtorque.migration.{tag}", "vtorque.migrating.{tag}"

QUORUM_ARGS = {"x-queue-type": "quorum", "x-dead-letter-exchange": DEAD, "x-delivery-limit": 10}
CLASSIC_ARGS = {"x-dead-letter-exchange": DEAD}


class _Keep(dict):
    """str.format_map that leaves a placeholder it was not given as it is."""

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


@dataclass(frozen=True)
class QueueSpec:
    """One queue (a template when its name holds `{node}` or `{tag}`)."""

    name: str
    consumer: Role
    exchange: str
    bindings: tuple[str, ...]  # routing keys (topic patterns on vtorque.events)
    kind: Literal["quorum", "classic", "private"]  # private: exclusive, auto-delete, one process's own
    arguments: dict = field(default_factory=dict)
    why: str = ""
    readers: tuple[Role, ...] = ()  # other roles that read it without consuming (basic.get, no ack)

    def render(self, **names: str) -> QueueSpec:
        """This queue for one node / one waiter: `{node}` and `{tag}` filled in, in its name and bindings."""
        fill = lambda text: text.format_map(_Keep(names))  # noqa: E731
        return QueueSpec(fill(self.name), self.consumer, self.exchange, tuple(fill(b) for b in self.bindings),
                         self.kind, self.arguments, self.why, self.readers)

    @property
    def queue_arguments(self) -> dict:
        by_kind: dict[str, dict] = {"quorum": QUORUM_ARGS, "classic": CLASSIC_ARGS, "private": {}}
        merged = {**by_kind[self.kind], **self.arguments}
        return {key: value for key, value in merged.items() if value is not None}  # None: the kind's default off


QUEUES: dict[str, QueueSpec] = {q.name: q for q in (
    QueueSpec(BRIDGE_Q, "bridge", EVENTS, ("job.*.job_started", "job.*.job_ended"), "quorum",
              why="the scheduler's job events, competing bridge replicas"),
    QueueSpec(BRIDGE_PREFETCH_Q, "bridge", EVENTS, ("job.*.job_queued",), "quorum",
              why="queued VM jobs (prefetch), beside the hooks' events"),
    QueueSpec(BRIDGE_NODES_Q, "bridge", EVENTS, ("node.*.heartbeat",), "private",
              why="each bridge replica's own copy of the nodes' heartbeats (capability planning)"),
    QueueSpec(STAGER_Q, "stager", COMMANDS, ("stager",), "quorum", why="StageImage, competing stagers"),
    QueueSpec(STAGER_CANCEL_Q, "stager", EVENTS, ("job.*.job_deleted",), "quorum",
              why="deleted queued jobs: a staging nobody waits for stops"),
    # Two bindings: `node.<host>` for the bridge's and the operator's commands, `migrate.<host>` for what another
    # node's worker may send it (a live migration's): a node's broker user may publish `migrate.*` keys, never
    # `node.*` ones, so it cannot put a BootGuests into another node's queue even where no consumer checked.
    QueueSpec(NODE_Q, "node", COMMANDS, ("node.{node}", "migrate.{node}"), "classic",
              why="one node's commands (a quorum queue per node does not scale: 1,024 wedged the broker)"),
    # Quorum, not a mirrored classic queue: a heartbeat is confirmed once a majority of broker nodes has it. A
    # mirror on a broker node cut off the network held every node's heartbeat unconfirmed until the link came
    # back (20-38 s on the rig), and a bridge started meanwhile took healthy nodes for dead. No delivery limit:
    # every reader returns every heartbeat, each read counts as a delivery. No dead-letter exchange: a
    # heartbeat that expires is no dead letter (vtorque.dead filled with one per node per interval).
    QueueSpec(NODES_Q, "operator", EVENTS, ("node.*.heartbeat",), "quorum",
              {"x-message-ttl": 60_000, "x-max-length": 100_000, "x-overflow": "drop-head",
               "x-delivery-limit": None, "x-dead-letter-exchange": None},
              why="the last minute of heartbeats, read without ack by `vtorque nodes` and the bridge",
              readers=("bridge",)),
    QueueSpec(HOOK_Q, "hook", EVENTS, ("job.{job}.#", "image.{digest}.#"), "private",
              why="a hook waiting for its job's events (declared before it publishes)"),
    QueueSpec(WAIT_Q, "node", EVENTS, ("image.{digest}.#",), "private",
              why="a node worker waiting for an image's staging"),
    QueueSpec(PULL_Q, "operator", EVENTS, ("image.{digest}.#",), "private",
              why="`vtorque images pull` showing a staging's progress"),
    QueueSpec(MIGRATION_Q, "node", EVENTS, ("job.{job}.migration_prepared", "job.{job}.migration_failed"),
              "private", why="a node worker moving a guest, or taking one in, waiting for the other side"),
    QueueSpec(MIGRATE_WAIT_Q, "operator", EVENTS, ("job.{job}.guest_migrated", "job.{job}.migration_failed"),
              "private", why="`vtorque migrate` waiting for its guests' moves"),
    QueueSpec(DEAD_QUEUE, "operator", DEAD, ("",), "classic", why="dead letters, each with x-vtorque-reason"),
)}


@dataclass(frozen=True)
class Flow:
    publishers: frozenset[Role]
    route: str  # routing key template ({job}, {digest}, {node}) or the command queue's routing key
    consumers: frozenset[str]  # the queues (names as in QUEUES) it must reach, no more, no fewer


def _flow(publishers: str, route: str, consumers: str) -> Flow:
    return Flow(frozenset(publishers.split()), route, frozenset(consumers.split()))  # type: ignore[arg-type]


_HOOK, _WAIT = HOOK_Q, f"{WAIT_Q} {PULL_Q}"


# Who may publish each message type, and where it goes. CommandExpired is said by whoever dropped the command.
FLOWS: dict[type, Flow] = {
    m.JobStarted: _flow("hook", "job.{job}.job_started", f"vtorque.bridge {_HOOK}"),
    m.JobEnded: _flow("hook", "job.{job}.job_ended", f"vtorque.bridge {_HOOK}"),
    m.JobQueued: _flow("prefetch", "job.{job}.job_queued", f"vtorque.bridge.prefetch {_HOOK}"),
    m.JobDeleted: _flow("prefetch", "job.{job}.job_deleted", f"vtorque.stager.cancel {_HOOK}"),
    m.JobPlanned: _flow("bridge", "job.{job}.job_planned", _HOOK),
    m.JobRejected: _flow("bridge", "job.{job}.job_rejected", _HOOK),
    m.StageImage: _flow("bridge node operator", "stager", "vtorque.stager"),
    m.BootGuests: _flow("bridge", "node.{node}", "vtorque.node.{node}"),
    m.TeardownGuests: _flow("bridge", "node.{node}", "vtorque.node.{node}"),
    m.ImageStaged: _flow("stager", "image.{digest}.staged", f"{_HOOK} {_WAIT}"),
    m.ImageStageFailed: _flow("stager", "image.{digest}.stage_failed", f"{_HOOK} {_WAIT}"),
    m.ImageStagingProgress: _flow("stager", "image.{digest}.staging_progress", f"{_HOOK} {_WAIT}"),
    m.ImageStageCancelled: _flow("stager", "image.{digest}.stage_cancelled", f"{_HOOK} {_WAIT}"),
    m.GuestReady: _flow("node", "job.{job}.guest_ready", _HOOK),
    m.GuestFailed: _flow("node", "job.{job}.guest_failed", _HOOK),
    m.GuestsTornDown: _flow("node", "job.{job}.guests_torn_down", _HOOK),
    m.NodeHeartbeat: _flow("node", "node.{node}.heartbeat", "vtorque.bridge.nodes.{tag} vtorque.nodes"),
    m.CommandExpired: _flow("stager node", "job.{job}.command_expired", _HOOK),
    # Live migration (services/node_worker/migrate.py): the operator asks the source; the source's node worker
    # asks the target's (on the node queue's `migrate.<host>` binding: a node's user may publish there, the
    # consumer takes only these two types from a node), and tells the job's other nodes where the guest went.
    m.MigrateGuests: _flow("operator", "node.{node}", "vtorque.node.{node}"),
    m.PrepareMigration: _flow("node", "migrate.{target}", "vtorque.node.{node}"),
    m.JobGuestMoved: _flow("node", "migrate.{peer}", "vtorque.node.{node}"),
    m.MigrationPrepared: _flow("node", "job.{job}.migration_prepared", f"{_HOOK} {MIGRATION_Q}"),
    m.GuestMigrated: _flow("node", "job.{job}.guest_migrated", f"{_HOOK} {MIGRATE_WAIT_Q}"),
    m.MigrationFailed: _flow("node", "job.{job}.migration_failed", f"{_HOOK} {MIGRATION_Q} {MIGRATE_WAIT_Q}"),
}


def routing_key(event: m.Event) -> str:
    """An event's routing key from its type's route: job ids and node names escaped to one word each."""
    return FLOWS[type(event)].route.format_map(_Keep({
        "job": m.routing_word(event.job_id), "digest": getattr(event, "digest", ""),
        "node": m.routing_word(getattr(event, "node", "") or "")}))


def bindings(name: str, **names: str) -> list[str]:
    """A private waiter's routing patterns, from the table: bindings(HOOK_Q, job="7", digest=d) ==
    ["job.7.#", "image.<d>.#"]; the callers never type a pattern themselves."""
    return list(queue(name, **names).bindings)


def route(message_type: type, **names: str) -> str:
    """One message type's routing key for the given names: a waiter bound to exactly one kind of event
    (the epilogue: route(GuestsTornDown, job=word))."""
    return FLOWS[message_type].route.format_map(_Keep(names))


def queue(name: str, **names: str) -> QueueSpec:
    """A queue of the table, its template filled in: queue("vtorque.node.{node}", node="n1")."""
    return QUEUES[name].render(**names) if names else QUEUES[name]


def queues_of(role: Role) -> list[QueueSpec]:
    return [q for q in QUEUES.values() if q.consumer == role]


def command_queue(command: m.Command) -> QueueSpec:
    """The queue a command goes to (its routing key is the queue's one binding)."""
    route = FLOWS[type(command)].route
    if route == "stager":
        return queue(STAGER_Q)
    # node.{node}, or a node-to-node command's migrate.{target} / migrate.{peer}: the field its route names, and
    # its route first among the queue's bindings (the publishers take the first as the routing key)
    field = route.split("{", 1)[1].rstrip("}")
    spec = queue(NODE_Q, node=getattr(command, field))
    key = route.format_map(_Keep({field: getattr(command, field)}))
    return QueueSpec(spec.name, spec.consumer, spec.exchange, (key, *(b for b in spec.bindings if b != key)),
                     spec.kind, spec.arguments, spec.why, spec.readers)


# Commands for many nodes at once: the field that lists them. Published once with every node's routing key (its
# route's {node} filled in) in the BCC header, the broker puts one copy in each of their queues (shared/bus.py
# sender_selected): a job's BootGuests costs its n nodes' bytes once, not n times.
SENDER_SELECTED: dict[type, str] = {m.BootGuests: "nodes"}


def command_queues(command: m.Command) -> list[QueueSpec]:
    """Every queue a command goes to: its one, or for a command of SENDER_SELECTED the queue of each node it
    names."""
    field = SENDER_SELECTED.get(type(command))
    if field is None:
        return [command_queue(command)]
    return [queue(NODE_Q, node=node) for node in dict.fromkeys(getattr(command, field))]


def namespace_regex() -> str:
    """Every exchange and queue name of the table, and nothing else of the vhost, as a broker permission regex."""
    return "^" + re.escape(NAMESPACE)


def prefix(template: str) -> str:
    """The fixed start of a templated queue name: prefix(HOOK_Q) == "vtorque.hook."."""
    return template.split("{", 1)[0]


# -- what consumes what (the table read backwards) -------------------------------------------------------------

def topic_matches(pattern: str, key: str) -> bool:
    """AMQP topic matching: `*` is exactly one word, `#` zero or more."""
    words, keys = pattern.split("."), key.split(".")

    def match(i: int, j: int) -> bool:
        if i == len(words):
            return j == len(keys)
        if words[i] == "#":
            return any(match(i + 1, k) for k in range(j, len(keys) + 1))
        return j < len(keys) and words[i] in ("*", keys[j]) and match(i + 1, j + 1)

    return match(0, 0)


def consumers_of(message_type: type, sample: dict[str, str] | None = None) -> set[str]:
    """The table's queues (by their table name) that a message of this type reaches, its routing key made
    from sample names; each queue is rendered with the same names (a hook waits on its own job and image)."""
    sample = sample or {"job": "J", "digest": "D", "node": "N", "tag": "T"}
    sample = {"target": sample.get("node", "N"), "peer": sample.get("node", "N"), **sample}  # node-to-node
    key = FLOWS[message_type].route.format_map(_Keep(sample))
    exchange = COMMANDS if issubclass(message_type, m.Command) else EVENTS
    reached = set()
    for name, spec in QUEUES.items():
        if spec.exchange != exchange:
            continue
        bound = spec.render(**sample)
        if any(b == key if exchange == COMMANDS else topic_matches(b, key) for b in bound.bindings):
            reached.add(name)
    return reached


# -- who may send what (consumers check the broker-validated user_id) ------------------------------------------

USER_PREFIX = "vtorque-"


def broker_user(role: Role, node: str | None = None, prefix: str = USER_PREFIX) -> str:
    return f"{prefix}node-{node}" if role == "node" else f"{prefix}{role}"


def role_of(user: str | None, prefix: str = USER_PREFIX) -> tuple[Role | None, str | None]:
    """(role, node) of a broker user name; (None, None) for a user that is none of vtorque's."""
    if not user or not user.startswith(prefix):
        return None, None
    rest = user[len(prefix):]
    if rest.startswith("node-") and len(rest) > 5:
        return "node", rest[5:]
    return (rest, None) if rest in ROLES and rest != "node" else (None, None)


def may_publish(user: str | None, message: m.Message, prefix: str = USER_PREFIX) -> str | None:
    """None if `user` may have sent `message`; else why not (the reason a consumer dead-letters it with).
    A node's user speaks only for its own node."""
    role, node = role_of(user, prefix)
    flow = FLOWS.get(type(message))
    if flow is None:
        return f"{type(message).__name__} is in no flow of the topology table"
    if role is None:
        return f"{type(message).__name__} from broker user {user!r}, which is not one of vtorque's"
    if role not in flow.publishers:
        return f"{type(message).__name__} may be sent by {', '.join(sorted(flow.publishers))}, not by {user}"
    claimed = getattr(message, "node", None)
    if role == "node" and claimed is not None and claimed != node:
        return f"{type(message).__name__} for node {claimed} sent by {user}"
    return None


# -- broker permissions, derived --------------------------------------------------------------------------------

def _template_regex(template: str, node: str | None) -> str:
    """A queue-name or routing-key template as a regex: {node} the node's own, {tag}/{job}/{digest} one word."""
    out = ""
    for part in re.split(r"(\{[a-z]+\})", template):
        if part == "{node}":
            out += re.escape(node) if node else r"[^.]+"
        elif part == "{tag}":
            out += r"[A-Za-z0-9_%-]+(\.[A-Za-z0-9_%-]+)*"  # a queue's own suffix: <job word>.<random>
        elif part.startswith("{"):
            out += r"[^.]+"
        else:
            out += re.escape(part)
    return out


def _any(regexes: list[str]) -> str:
    regexes = sorted(set(regexes))
    return "^(" + "|".join(regexes) + ")$" if regexes else "^$"


@dataclass(frozen=True)
class Permissions:
    configure: str
    write: str
    read: str
    # per topic exchange: (routing keys it may publish with, routing keys it may bind its queues with)
    topics: dict[str, tuple[str, str]]


def broker_permissions(role: Role, node: str | None = None) -> Permissions:
    """What one broker user may do, from the table alone: declare and read its own queues, write to the
    exchanges its messages go to, publish only the routing keys of the messages it may send, bind only to
    what its queues are bound to. Exchanges and the shared durable queues are made by the administrator's
    set-up (`vtorque broker setup`); others' queues are only checked (a passive declare needs no right)."""
    own = [q for q in QUEUES.values() if q.consumer == role]
    names = [_template_regex(q.name, node) for q in own]
    sends = [t for t, f in FLOWS.items() if role in f.publishers]
    exchange_of = lambda t: COMMANDS if issubclass(t, m.Command) else EVENTS  # noqa: E731
    exchanges = {exchange_of(t) for t in sends}
    if role in ("bridge", "stager", "node"):
        exchanges.add(DEAD)  # their ServiceRunner dead-letters what it refuses, with the reason
    bound_exchanges = {q.exchange for q in own}  # queue.bind needs read on the exchange
    also_read = [_template_regex(q.name, node) for q in QUEUES.values() if role in q.readers]
    topics = {}
    for exchange in (EVENTS, COMMANDS):
        keys = [_template_regex(FLOWS[t].route, node) for t in sends if exchange_of(t) == exchange]
        # A bind regex matches the binding's key as written: the table's pattern ("job.7.#") or any narrower
        # key under it (an epilogue binds "job.7.guests_torn_down" alone).
        binds = [_template_regex(b, node).replace(r"\#", ".*").replace(r"\*", "[^.]+")
                 for q in own if q.exchange == exchange for b in q.bindings]
        topics[exchange] = (_any(keys), _any(binds))
    return Permissions(
        configure=_any(names),
        write=_any(names + [re.escape(e) for e in exchanges]),
        read=_any(names + also_read + [re.escape(e) for e in bound_exchanges]),
        topics=topics,
    )


# -- the contract document -------------------------------------------------------------------------------------

def contract_document() -> dict:
    """docs/contract.json: the messages' JSON Schema (shared/messages.py) with the channels this table gives
    them: for each message type who publishes it, on which exchange and routing key, and which queues get it;
    for each queue its kind, bindings and consumer."""
    doc = m.contract_schema()
    doc["x-vtorque-exchanges"] = dict(EXCHANGES)
    doc["x-vtorque-queues"] = {
        q.name: {"kind": q.kind, "exchange": q.exchange, "bindings": list(q.bindings), "consumer": q.consumer,
                 "readers": list(q.readers), "arguments": q.queue_arguments, "why": q.why}
        for q in QUEUES.values()}
    doc["x-vtorque-channels"] = {
        t.__name__: {"publishers": sorted(f.publishers), "exchange": COMMANDS if issubclass(t, m.Command)
                     else EVENTS, "routing_key": f.route, "consumers": sorted(f.consumers)}
        | ({"sender_selected": f"one publish, the routing key of every node in `{SENDER_SELECTED[t]}` in its BCC "
            "header"} if t in SENDER_SELECTED else {})
        for t, f in FLOWS.items()}
    return doc
