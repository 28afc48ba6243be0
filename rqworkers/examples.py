"""Example handlers that ship with rqworkers, used by the example config and docker-compose."""

from __future__ import annotations

import logging

log = logging.getLogger("rqworkers.examples")


def log_message(message: bytes) -> None:
    """Log the first bytes of every message: enough to see the service working."""
    log.info("received %d bytes: %r", len(message), message[:80])


class Counter:
    """A class handler: `setup` once per process, `handle` per message, `teardown` at exit.

    It refuses every payload that starts with `bad` (ValueError), so that retries and dead
    letters can be seen with the example config: the dead-letter walkthrough of
    docs/operating.md pushes such payloads.
    """

    def setup(self) -> None:
        self.count = 0

    def handle(self, message: bytes) -> int:
        if message.startswith(b"bad"):
            raise ValueError(f"cannot parse {message[:80]!r}")
        self.count += 1
        log.info("message %d of this process: %r", self.count, message[:80])
        return self.count

    def teardown(self) -> None:
        log.info("handled %d messages in this process", self.count)


def square(x: int) -> int:
    """An example task (README, docs/tasks.md): `tasks = ["rqworkers.examples:square"]`."""
    return x * x
