"""A few numbers a worker shares with its manager through shared memory.

The manager needs to know how long the current message has run (to kill a handler stuck
in C code) without asking the worker: a dead or stuck worker cannot answer. An anonymous
shared mapping made before `fork` costs the worker two memory writes per message and no
system call.
"""

from __future__ import annotations

import mmap
import struct
import time

_LAYOUT = struct.Struct("dQQ")  # busy_since (monotonic seconds, 0 = idle), handled, failed
_PID = struct.Struct("q")  # written by the manager: the live worker's pid, 0 when none
_PID_OFFSET = _LAYOUT.size


class Scoreboard:
    def __init__(self) -> None:
        self._map = mmap.mmap(-1, _LAYOUT.size + _PID.size, flags=mmap.MAP_SHARED)

    def busy(self) -> None:
        """Mark the start of a message."""
        _, handled, failed = _LAYOUT.unpack_from(self._map)
        _LAYOUT.pack_into(self._map, 0, time.monotonic(), handled, failed)

    def idle(self, failed: bool) -> None:
        """Mark the end of a message and count it."""
        _, handled, failures = _LAYOUT.unpack_from(self._map)
        _LAYOUT.pack_into(self._map, 0, 0.0, handled + 1, failures + int(failed))

    def reset(self) -> None:
        """Clear everything: the slot has no worker. The manager calls it before a fork."""
        _LAYOUT.pack_into(self._map, 0, 0.0, 0, 0)
        _PID.pack_into(self._map, _PID_OFFSET, 0)

    def set_pid(self, pid: int) -> None:
        _PID.pack_into(self._map, _PID_OFFSET, pid)

    @property
    def pid(self) -> int:
        return int(_PID.unpack_from(self._map, _PID_OFFSET)[0])

    def busy_for(self) -> float:
        """Seconds the current message has been running; 0 when idle."""
        since: float = _LAYOUT.unpack_from(self._map)[0]
        return time.monotonic() - since if since else 0.0

    @property
    def handled(self) -> int:
        return int(_LAYOUT.unpack_from(self._map)[1])

    @property
    def failed(self) -> int:
        return int(_LAYOUT.unpack_from(self._map)[2])
