"""The clock a service decides by: a dependency passed in like its bus, hypervisor, store and scheduler.

Where time decides what a service does (a command past its deadline, a node whose heartbeat is too old, a guest
past its walltime and the reconciler's grace, how often progress is said), it asks its `clock`, so a test moves
time by hand (shared/testing.py FakeClock) instead of sleeping or patching the time module. Waits on I/O (socket
timeouts, libvirt calls, polling sleeps) keep the real clock: a fake one would only hang them.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Wall-clock seconds since the epoch (time.time)."""
        ...

    def monotonic(self) -> float:
        """Seconds that only go forward (time.monotonic): for intervals."""
        ...

    def utcnow(self) -> datetime:
        """now() as an aware UTC datetime: what a message's created_at and deadline are compared with."""
        ...


class SystemClock:
    """The machine's clock: every service's default."""

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def utcnow(self) -> datetime:
        return datetime.now(UTC)


SYSTEM_CLOCK = SystemClock()
