"""The vault's clock: real time plus an offset that tests move forward.

Everything the vault stamps or schedules (created and updated dates, nbf and exp checks, deletion and
purge dates, rotation) reads this clock; tokens and TLS certificates stay on real time, so moving it
never breaks authentication. The store catches up with a moved clock when it is next asked, not
through timer threads.
"""

from __future__ import annotations

import math
import threading
import time
from datetime import timedelta

# The clock may not be moved past this (the year 9000): later dates break the calendar's arithmetic.
MAX_CLOCK = 221_845_392_000


def valid_offset(offset: object) -> bool:
    """Whether ``offset`` is one a clock can have: a finite number of seconds, not behind real time, and
    not past MAX_CLOCK."""
    return (
        isinstance(offset, (int, float))
        and not isinstance(offset, bool)
        and math.isfinite(offset)
        and 0 <= offset <= MAX_CLOCK - time.time()
    )


class Clock:
    def __init__(self, offset: float = 0.0) -> None:
        self._offset = offset
        self._lock = threading.Lock()

    @property
    def offset(self) -> float:
        """Seconds the vault's time is ahead of real time."""
        return self._offset

    def now(self) -> float:
        """The vault's time, as Unix seconds."""
        return time.time() + self._offset

    def advance(
        self,
        delta: timedelta | None = None,
        *,
        days: float = 0,
        hours: float = 0,
        minutes: float = 0,
        seconds: float = 0,
    ) -> float:
        """Move the vault's time forward, e.g. ``advance(days=30)``; returns the new offset.
        Time never goes back, nor past the year 9000: either raises ValueError."""
        step = (delta or timedelta()) + timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
        with self._lock:
            self._offset = self._moved(step)
            return self._offset

    def _moved(self, step: timedelta) -> float:
        """The offset after a move by ``step``; ValueError for one the clock refuses."""
        if step < timedelta():
            raise ValueError("the vault's clock only moves forward")
        offset = self._offset + step.total_seconds()
        if time.time() + offset > MAX_CLOCK:
            raise ValueError("the vault's clock cannot move past the year 9000")
        return offset

    def reset(self) -> None:
        """Back to real time."""
        with self._lock:
            self._offset = 0.0
