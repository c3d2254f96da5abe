"""A consumer process for the bus tests: the real ServiceRunner with an idempotent handler.

Usage: bus_consumer.py URL NODE EFFECTS_DIR [hang]
The handler records its effect once per command (keyed by job id, as real handlers key theirs); with
`hang`, it then blocks forever before returning, so the test can kill the process before the ack.
"""

import os
import sys
import time

from vtorque.shared import messages as m
from vtorque.shared.bus import ServiceRunner, node_queue

url, node, effects, mode = sys.argv[1], sys.argv[2], sys.argv[3], (sys.argv[4] if len(sys.argv) > 4 else "")


def handle(cmd: m.TeardownGuests) -> None:
    marker = os.path.join(effects, cmd.job_id)
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        with open(os.path.join(effects, "log"), "a") as log:
            log.write(f"{os.getpid()} already-done {cmd.job_id}\n")
    else:
        os.close(fd)
        with open(os.path.join(effects, "log"), "a") as log:
            log.write(f"{os.getpid()} applied {cmd.job_id}\n")
    if mode == "hang":
        while True:
            time.sleep(1)


runner = ServiceRunner(url, [node_queue(node)], {m.TeardownGuests: handle}, heartbeat=10)
print("ready", flush=True)
runner.run()
