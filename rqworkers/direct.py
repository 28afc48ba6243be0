"""Lua scripts run on one connection a worker keeps, past redis-py's per-command machinery.

A worker's hot path is one script call per batch. Through `Redis.evalsha` (or a registered
`Script`) each call also checks a connection out of the pool and back in (a `poll` system
call to see that it holds no stale data), looks up response callbacks and dispatches
redis-py's observability events: about 30 µs a call on this project's bench machine, next
to a 75 µs round trip. At prefetch 1 that is the difference between trailing a plain
pipelined consumer and matching it (bench/RESULTS.md).

So a worker keeps one connection out of its client's pool for its life and sends EVALSHA
on it directly. Errors are the same as through the client: the connection raises
redis-py's exceptions and drops its socket after any failure, so the next call reconnects
(through Sentinel, to the current master). A cluster client has no single connection to
keep: it runs scripts the ordinary way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import redis
from redis.exceptions import NoScriptError

from rqworkers.connections import Client

Call = Callable[..., Any]  # call(*args) with the script's keys bound


class ScriptRunner:
    """Runs Lua scripts by EVALSHA on one kept connection, loading each one on NOSCRIPT
    (a restarted or failed-over server has an empty script cache)."""

    def __init__(self, client: redis.Redis) -> None:
        self._pool = client.connection_pool
        self._connection: Any = None

    def bind(self, source: str, keys: Sequence[str]) -> Call:
        encoded = source.encode()
        sha = hashlib.sha1(encoded).hexdigest()
        head = ("EVALSHA", sha, len(keys), *keys)

        def call(*args: Any) -> Any:
            try:
                return self._run(*head, *args)
            except NoScriptError:
                self._run("SCRIPT", "LOAD", encoded)
                return self._run(*head, *args)

        return call

    def _run(self, *command: Any) -> Any:
        connection = self._connection
        if connection is None:  # kept for this process's life: never given back
            connection = self._connection = self._pool.get_connection()
        connection.send_command(*command)
        return connection.read_response()


def script_caller(client: Client, keep_connection: bool) -> Callable[[str, Sequence[str]], Call]:
    """`bind(source, keys)`: a callable running a script with `keys`; with
    `keep_connection`, on a connection kept for good (for a worker's own queue, not for
    a keeper's passing reclaim), if `client` has one to keep."""
    if keep_connection and isinstance(client, redis.Redis):
        return ScriptRunner(client).bind

    def bind(source: str, keys: Sequence[str]) -> Call:
        registered = client.register_script(source)
        key_list = list(keys)
        return lambda *args: registered(keys=key_list, args=args)

    return bind
