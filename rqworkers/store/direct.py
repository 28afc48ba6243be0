"""Lua scripts run on one connection a worker keeps, past redis-py's per-command machinery.

A worker's hot path is one script call per batch. Through `Redis.evalsha` (or a registered
`Script`) each call also checks a connection out of the pool and back in (a `poll` system
call to see that it holds no stale data), looks up response callbacks and dispatches
redis-py's observability events: a sizeable part of a round trip to a local Redis. At
prefetch 1 that is the difference between trailing a plain pipelined consumer and matching
it (measured in bench/RESULTS.md, "A kept connection").

So a worker keeps one connection out of its client's pool for its life and sends EVALSHA
on it directly, and the fast path's native commands (see store/fast.py) the same way. It
packs them itself too (`Packer`): redis-py's packing of a take's 21 arguments cost 13 us
a call, as much as Redis spends on a take of 10 messages.
Errors are the same as through the client: the connection raises
redis-py's exceptions and drops its socket after any failure, so the next call reconnects
(through Sentinel, to the current master). A cluster client has no single connection to
keep: it runs scripts the ordinary way.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import redis
from redis.exceptions import NoScriptError
from redis.utils import HIREDIS_AVAILABLE

from rqworkers.store.connections import Client

PackCommand = Callable[[tuple[bytes, ...]], bytes]
pack_command: PackCommand | None = None  # without hiredis, `Packer` writes the protocol itself
if HIREDIS_AVAILABLE:  # a hiredis redis-py uses (3.2 on): older ones may have no pack_command
    import hiredis

    pack_command = cast(PackCommand, hiredis.pack_command)

Call = Callable[..., Any]  # call(*args) with the script's keys bound
STALE_AFTER = 0.05  # seconds idle after which a kept connection is checked before use


class Packer:
    """Commands in the Redis protocol, as redis-py's connection packs them, for less: the
    arguments are encoded as its `Encoder` would (bytes as they are; str, int and float
    as text; anything else by the encoder itself, with its errors), and a command's
    constant head is encoded once (`head`)."""

    def __init__(self, client: redis.Redis) -> None:
        encoder = client.get_encoder()
        self._encode = cast(Callable[[Any], bytes | bytearray], encoder.encode)
        # Text is the client's encoding's: a host URL's `?encoding=` reaches redis-py, and
        # keys encoded otherwise here than by the client's own commands are other keys.
        # redis-py's default, UTF-8 and strict, is encoded here; any other by the encoder.
        self._utf8 = (encoder.encoding, encoder.encoding_errors) == ("utf-8", "strict")

    def encoded(self, value: Any) -> bytes:
        kind = type(value)
        if kind is bytes:
            return value  # type: ignore[no-any-return]
        if kind is str and self._utf8:
            return value.encode()  # type: ignore[no-any-return]
        if kind is int or kind is float:
            return repr(value).encode()
        encoded = self._encode(value)
        # hiredis packs bytes and memoryviews, not the bytearray the encoder passes on
        return bytes(encoded) if isinstance(encoded, bytearray) else encoded

    def head(self, *args: Any) -> tuple[bytes, ...]:
        return tuple(self.encoded(arg) for arg in args)

    def pack(self, head: tuple[bytes, ...], args: Sequence[Any]) -> bytes:
        """One command: the encoded `head`, then `args`."""
        encoded = self.encoded
        command = head + tuple([arg if type(arg) is bytes else encoded(arg) for arg in args])
        if pack_command is not None:
            return pack_command(command)
        return _resp(command)

    def pack_all(self, commands: Sequence[Sequence[Any]]) -> bytes:
        return b"".join(self.pack((), command) for command in commands)


def _resp(command: tuple[bytes, ...]) -> bytes:
    """`command` in the Redis protocol, without hiredis."""
    parts = [b"*%d\r\n" % len(command)]
    for arg in command:
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


class ScriptRunner:
    """Runs Lua scripts by EVALSHA on one kept connection, loading each one on NOSCRIPT
    (a restarted or failed-over server has an empty script cache)."""

    def __init__(self, client: redis.Redis) -> None:
        self._pool = client.connection_pool
        self._packer = Packer(client)
        self._connection: Any = None
        self._used = 0.0  # monotonic time of the last reply

    def bind(self, source: str, keys: Sequence[str]) -> Call:
        encoded = source.encode()
        sha = hashlib.sha1(encoded).hexdigest()
        head = self._packer.head("EVALSHA", sha, len(keys), *keys)
        load = self._packer.head("SCRIPT", "LOAD", encoded)

        def call(*args: Any) -> Any:
            try:
                return self._run(self._packer.pack(head, args))
            except NoScriptError:
                self._run(self._packer.pack(load, ()))
                return self._run(self._packer.pack(head, args))

        return call

    def send_all(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Send `commands` in one write and read their replies, in order; an error reply is
        returned in its place (a `redis.ResponseError`), not raised, as a pipeline's are."""
        connection = self._ready()
        try:
            connection.send_packed_command([self._packer.pack_all(commands)])
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(connection.read_response())
                except redis.ResponseError as exc:  # the connection is in step
                    replies.append(exc)
        except BaseException:
            connection.disconnect()  # as in `_run`: a reply may still come
            raise
        self._used = time.monotonic()
        return replies

    def _ready(self) -> Any:
        """The kept connection, connected and holding nothing unread."""
        connection = self._connection
        if connection is None:  # kept for this process's life: never given back
            connection = self._connection = self._pool.get_connection()
        # A no-op while connected. After a failure, the connection's own `connect` (not the
        # one sending would call) is what asks Sentinel where the master is now.
        connection.connect()
        if time.monotonic() - self._used > STALE_AFTER and _stale(connection):
            # The server closed it (a restart while this worker waited elsewhere). Checked
            # as the pool checks a connection it hands out, but only after a pause: back
            # to back, a system call per call would be pure cost.
            connection.disconnect()
            connection.connect()
        return connection

    def _run(self, packed: bytes) -> Any:
        """Send one packed command and read its reply."""
        connection = self._ready()
        try:
            connection.send_packed_command([packed])
            reply = connection.read_response()
        except redis.ResponseError:
            raise  # an error reply: the connection is in step
        except BaseException:
            # A timeout, a lost connection, an exception from a signal handler between the
            # send and the read: the reply may still come, and must not be read as the
            # next command's. (A Sentinel connection does not drop itself on errors.)
            connection.disconnect()
            raise
        self._used = time.monotonic()
        return reply


def _stale(connection: Any) -> bool:
    """True if an idle connection has something to read: the server's close, or a reply
    nobody read."""
    try:
        return bool(connection.can_read())
    except redis.ConnectionError:  # the parser found the server's close
        return True


class PooledRunner:
    """Runs scripts and commands the ordinary way, through the client and its pool (or a
    cluster client's nodes): for a passing caller, or a client with no connection to keep."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def bind(self, source: str, keys: Sequence[str]) -> Call:
        registered = self._client.register_script(source)
        key_list = list(keys)
        return lambda *args: registered(keys=key_list, args=args)

    def send_all(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """As `ScriptRunner.send_all`, in a pipeline (no transaction)."""
        pipe = self._client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return list(pipe.execute(raise_on_error=False))


def runner_for(client: Client, keep_connection: bool) -> ScriptRunner | PooledRunner:
    """What runs a queue's scripts and native commands: with `keep_connection`, on a
    connection kept for good (for a worker's own queue, not for a keeper's passing
    reclaim), if `client` has one to keep."""
    if keep_connection and isinstance(client, redis.Redis):
        return ScriptRunner(client)
    return PooledRunner(client)


def script_caller(client: Client, keep_connection: bool) -> Callable[[str, Sequence[str]], Call]:
    """`bind(source, keys)`: a callable running a script with `keys` (see `runner_for`)."""
    return runner_for(client, keep_connection).bind
