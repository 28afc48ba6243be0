"""A few numbers a worker shares with its manager through shared memory.

The manager needs to know how long the current message has run (to kill a handler stuck
in C code) and how many in-flight messages had reached the handler when a worker died,
without asking the worker: a dead or stuck worker cannot answer. An anonymous shared
mapping made before `fork` costs the worker a few memory writes per message and no system
call.
"""

from __future__ import annotations

import mmap
import struct
import time

_FLOAT = struct.Struct("d")
_INT = struct.Struct("q")
# Offsets of the fields, each 8 bytes.
_BUSY_SINCE = 0  # monotonic seconds when the current message started; 0 when idle
_HANDLED = 8  # messages handled by this worker
_FAILED = 16  # of which failed
_STARTED = 24  # in-flight messages that reached the handler and are not settled in Redis
_PID = 32  # written by the manager: the live worker's pid, 0 when none
_SIZE = 40


class Scoreboard:
    def __init__(self) -> None:
        self._map = mmap.mmap(-1, _SIZE, flags=mmap.MAP_SHARED)

    def _get(self, offset: int) -> int:
        return int(_INT.unpack_from(self._map, offset)[0])

    def _add(self, offset: int, amount: int) -> None:
        _INT.pack_into(self._map, offset, self._get(offset) + amount)

    # -- written by the worker --------------------------------------------------------------

    def busy(self) -> None:
        """A message reaches the handler."""
        _FLOAT.pack_into(self._map, _BUSY_SINCE, time.monotonic())
        self._add(_STARTED, 1)

    def idle(self, failed: bool) -> None:
        """The handler is done with it (the message may not be settled in Redis yet)."""
        _FLOAT.pack_into(self._map, _BUSY_SINCE, 0.0)
        self._add(_HANDLED, 1)
        if failed:
            self._add(_FAILED, 1)

    def settled(self, count: int) -> None:
        """`count` started messages left the private list (acked, retried, dead-lettered)."""
        self._add(_STARTED, -count)

    # -- written by the manager -------------------------------------------------------------

    def reset(self) -> None:
        """Clear everything: the slot has no worker. The manager calls it before a fork."""
        self._map[:] = bytes(_SIZE)

    def set_pid(self, pid: int) -> None:
        _INT.pack_into(self._map, _PID, pid)

    # -- read by anyone ---------------------------------------------------------------------

    def busy_for(self) -> float:
        """Seconds the current message has been running; 0 when idle."""
        since: float = _FLOAT.unpack_from(self._map, _BUSY_SINCE)[0]
        return time.monotonic() - since if since else 0.0

    @property
    def handled(self) -> int:
        return self._get(_HANDLED)

    @property
    def failed(self) -> int:
        return self._get(_FAILED)

    @property
    def started(self) -> int:
        return max(0, self._get(_STARTED))

    @property
    def pid(self) -> int:
        return self._get(_PID)
