"""Which node workers are alive and what they offer: their NodeHeartbeat events, kept for a minute in the
durable queue `vtorque.nodes` (each expires there on its own), read without acknowledging so they stay for
the next reader. Used by `vtorque nodes`/`doctor` and by the bridge to plan only onto capable nodes."""

from __future__ import annotations

import msgspec
from kombu import Queue

from vtorque.shared import messages as m
from vtorque.shared import topology
from vtorque.shared.bus import connect, declare_topology, ensure_queue, table_queue

NODES_QUEUE = topology.NODES_Q
TTL_INTERVALS = 3


def nodes_queue() -> Queue:
    """Classic, durable, bounded (shared/topology.py): old heartbeats expire on their own, it never grows."""
    return table_queue(NODES_QUEUE)


def is_stale(beat: m.NodeHeartbeat, now=None) -> bool:
    """A node that missed three beats in a row."""
    age = ((now or m.utcnow()) - beat.created_at).total_seconds()
    return age > TTL_INTERVALS * beat.interval


def latest_per_node(beats: list) -> list:
    latest: dict = {}
    for beat in beats:
        if beat.node not in latest or beat.created_at > latest[beat.node].created_at:
            latest[beat.node] = beat
    return [latest[n] for n in sorted(latest)]


# The queue's own bound (topology.py x-max-length): a reader never takes more than it can hold.
MAX_READ = 100_000


def read_heartbeats(url: str, timeout: float = 5.0) -> list:
    """Every heartbeat in the vtorque.nodes queue, taken without acknowledging (so they stay for others).

    Read until the broker has nothing more for this channel: what it took stays unacknowledged, so it is never
    given to it again. The same heartbeat twice (one message id) is normal, not the end: a publisher that
    heard no confirm sends again (shared/bus.py), and the first copy often got in. Stopping at the first
    repeat read an old copy as the end of the queue and missed every newer heartbeat behind it until the
    copy expired, a minute: after a broker node's link came back, every node looked dead for that long and a
    bridge started meanwhile refused jobs (the rig, fault tests c and d)."""
    beats = []
    conn = connect(url, timeout=timeout)
    try:
        channel = conn.channel()
        queue = nodes_queue()
        declare_topology(channel)
        ensure_queue(channel, queue)
        bound = queue(channel)
        seen: set[str] = set()
        for _ in range(MAX_READ):
            raw = bound.get(no_ack=False)
            if raw is None:
                break
            try:
                msg = m.decode(raw.body)
            except (msgspec.DecodeError, msgspec.ValidationError):
                raw.ack()  # not a heartbeat anyone can read: drop it
                continue
            if msg.message_id in seen:
                continue
            seen.add(msg.message_id)
            if isinstance(msg, m.NodeHeartbeat):
                beats.append(msg)
    finally:
        conn.release()  # the unacknowledged heartbeats go back to the queue
    return beats
