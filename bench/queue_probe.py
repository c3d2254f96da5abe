#!/opt/vtorque/venv/bin/python
"""The node queues of a big job checked before its first command (shared/bus.ensure_queues: a bridge's first job
on a connection, and a hook or CLI that commands many nodes): one passive declare per queue waited for in turn
(one round trip each, as before) against the declares sent a batch at a time and their answers read after
(`PROBE_BATCH`), on a RabbitMQ node of this run's own (bench/scale_nodes.OwnBroker), all queues existing, a new
connection per measurement. Per round: both, interleaved, and their ratio; the median of the per-round ratios.

Usage (root; the rabbitmq-server package installed): bench/queue_probe.py [--rounds 5] [--queues 1024]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import kombu  # noqa: E402
from scale_nodes import OwnBroker  # noqa: E402  bench/scale_nodes.py

from vtorque.shared import bus, topology  # noqa: E402


def one_by_one(channel, queues) -> None:
    probe = channel.connection.channel()
    for queue in queues:
        probe.queue_declare(queue.name, passive=True)
    probe.close()


def timed(url: str, probe, queues) -> float:
    with kombu.Connection(url) as conn:
        channel = conn.default_channel
        t0 = time.perf_counter()
        probe(channel, queues)
        return time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--queues", type=int, default=1024)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vtorque-bench-probe-") as tmp:
        broker = OwnBroker(Path(tmp))
        try:
            queues = [bus.kombu_queue(topology.queue(topology.NODE_Q, node=f"bench{i:05d}"))
                      for i in range(args.queues)]
            with kombu.Connection(broker.url) as conn:
                bus.declare_topology(conn.default_channel)
                for queue in queues:
                    queue(conn.default_channel).declare()
            print(f"# {platform.node()}, {os.cpu_count()} CPUs, {args.queues} node queues, batch "
                  f"{bus.PROBE_BATCH}, load {os.getloadavg()[0]:.1f}")
            print(f"{'round':>5} {'one by one s':>13} {'batched s':>10} {'ratio':>7}")
            ratios = []
            for r in range(1, args.rounds + 1):
                before = timed(broker.url, one_by_one, queues)
                after = timed(broker.url, bus.ensure_queues, queues)
                ratios.append(after / before)
                print(f"{r:>5} {before:>13.3f} {after:>10.3f} {after / before:>7.3f}")
            print(f"median of per-round ratios: {statistics.median(ratios):.3f} (load {os.getloadavg()[0]:.1f})")
        finally:
            broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
