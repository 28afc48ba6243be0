"""What `rqworkers check` and `rqworkers run` verify before any worker starts."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any, cast

import redis

from rqworkers.client import tasks
from rqworkers.common import files, process
from rqworkers.common.text import a
from rqworkers.config import (
    Config,
    PairSettings,
    key_collisions,
    max_processes,
    metrics_endpoint,
    server_spelling,
)
from rqworkers.store import connections
from rqworkers.store.connections import Client, redact
from rqworkers.store.keys import REPLIES, Keys
from rqworkers.store.outage import REDIS_ERRORS
from rqworkers.worker import handlers

# What a PING may raise: a cluster client raises more than redis.RedisError.
_FAILURES: tuple[type[Exception], ...] = (*REDIS_ERRORS, redis.RedisError)
_IDENTITY_FAILURES: tuple[type[Exception], ...] = (*_FAILURES, KeyError, TypeError, ValueError)


def handler_problems(config: Config) -> list[str]:
    """One line per handler (or task allow-list) that cannot be imported, naming its queue;
    and the `otel` extra, when `[telemetry] tracing` is on, if it cannot be imported."""
    problems = tracing_problems(config)
    for pair in config.pairs:
        if pair.tasks is not None:
            problem = tasks.verify(pair.tasks)
            what = f"tasks {list(pair.tasks)!r}"
        else:
            problem = handlers.verify(pair.handler or "")
            what = f"handler {pair.handler!r}"
        if not problem and (pair.group_max_running or pair.group_rate_limit):
            problem = _group_problem(pair)
        if problem:
            problems.append(f"{what} of queue {pair.queue!r}: {problem}")
    return problems


def _group_problem(pair: PairSettings) -> str | None:
    """Group limits need groups: a `group_by` field, or a handler class's `group()`."""
    if pair.group_by or (pair.handler and handlers.names_groups(pair.handler)):
        return None
    return (
        "group_max_running and group_rate_limit need groups: set group_by (the JSON field "
        "that names each message's group), or give the handler class a group(message) method "
        "(a plain def, not async)"
    )


def tracing_problems(config: Config) -> list[str]:
    """Why a worker could not export its spans: with `[telemetry] tracing = true`, the
    `otel` extra must import (checked by importing it: a broken install counts too), and the
    OTEL_* variables must name an exporter it has."""
    if not config.telemetry.tracing:
        return []
    try:
        from rqworkers.worker import tracing
    except ImportError as exc:
        return [
            f"telemetry.tracing: tracing is on but OpenTelemetry cannot be imported ({exc}): "
            "install the extra, pip install 'rqworkers[otel]', or set tracing = false"
        ]
    return [f"telemetry.tracing: {problem}" for problem in tracing.problems()]


def handler_problems_isolated(config: Config) -> list[str]:
    """`handler_problems`, run in a throwaway child so user modules never load in the manager.

    An import that hangs, or a fork that fails, is a problem too, never a hang or a crash.
    """
    try:
        text = process.call_in_child(lambda: json.dumps(handler_problems(config)))
    except OSError as exc:  # TimeoutError included
        return [f"checking handlers failed: {exc}"]
    try:
        result = json.loads(text)
    except json.JSONDecodeError:
        return [f"checking handlers failed: {text}"]
    return [str(line) for line in result]


def queue_problems(config: Config) -> list[str]:
    """One line per queue that cannot work on its host: a cluster queue without a {hash tag}.

    `config.load` already refuses these; listed here too for configs built in code.
    """
    problems = []
    for pair in config.pairs:
        problem = connections.queue_problem(pair.url, pair.queue)
        if problem:
            problems.append(f"redis at {redact(pair.url)}: {problem}")
    return problems


def host_problems(
    config: Config, timeout: float = 3.0, identities: dict[str, object] | None = None
) -> list[str]:
    """One line per problem a worker would meet on a Redis: no PING, a key of a queue that
    holds the wrong type, a command the user may not run. Passwords are never shown.

    A cluster must have all its slots served; a Sentinel URL must lead to its master (that
    PING is the master's answer); TLS must verify; the credentials must be accepted.
    `identities`, if given, receives each reachable URL's `server_identity`.
    """
    problems = []
    for url in sorted({pair.url for pair in config.pairs}):
        try:
            client = connections.connect(url, timeout=timeout)
        except (OSError, ValueError) as exc:  # an unreadable password_file, say
            problems.append(f"redis at {redact(url)}: {type(exc).__name__}: {exc}")
            continue
        try:
            client.ping()
            if identities is not None:
                identities[url] = server_identity(client, url)
            for pair in config.pairs:
                if pair.url == url:
                    keys = Keys.of(pair.queue, f"{config.node}:1")
                    replies = pair.tasks is not None
                    problems.extend(_prefixed(pair, key_type_problems(client, keys)))
                    problems.extend(_prefixed(pair, permission_problems(client, keys, replies)))
        except _FAILURES as exc:
            problems.append(f"redis at {redact(url)}: {type(exc).__name__}: {exc}")
        finally:
            client.close()
    return problems


def server_identity(client: Client, url: str) -> object:
    """What tells one server (and database) from another whatever the URL's spelling:
    `127.0.0.1` and `localhost`, a port written or left out, a Sentinel and the master's own
    address. The server's `run_id` and the database; for a cluster, its nodes' ids. None if
    the server does not say (INFO denied to this user, say)."""
    try:
        if isinstance(client, redis.RedisCluster):
            nodes: object = client.cluster_nodes()
            ids = frozenset(str(n["node_id"]) for n in cast(dict[str, Any], nodes).values())
            return ("cluster", ids)
        info: object = client.info("server")
        db = client.connection_pool.connection_kwargs.get("db", 0)
        return (str(cast(dict[str, Any], info)["run_id"]), int(db))
    except _IDENTITY_FAILURES:
        return None


def collision_problems(config: Config, identities: dict[str, object]) -> list[str]:
    """`config.key_collisions` across URLs that name the same server (see `server_identity`):
    `jobs` on one spelling and `jobs:dead` on another would take each other's keys. (Those
    on one URL never get here: `load` refuses them.)"""
    return key_collisions(dict(enumerate(config.pairs)), lambda pair: identities.get(pair.url))


def start_collision_problems(config: Config, timeout: float = 3.0) -> tuple[list[str], list[str]]:
    """`collision_problems` as `run` and a reload find them: each server known by its
    identity if it answers within `timeout`, else by its URL's `server_spelling`, so that
    a Redis down at start never keeps the service from starting. Returns the problems,
    and one line per URL whose identity could not be checked."""
    identities: dict[str, object] = {}
    unchecked = []
    for url in sorted({pair.url for pair in config.pairs}):
        identity = None
        try:
            client = connections.connect(url, timeout=timeout)
        except (OSError, ValueError):  # an unreadable password_file: the workers say so
            client = None
        if client is not None:
            try:
                identity = server_identity(client, url)
            finally:
                client.close()
        if identity is None:
            identity = ("spelling", server_spelling(url))
            unchecked.append(
                f"redis at {redact(url)}: cannot tell which server it is now (unreachable, or "
                "INFO refused): its queues are told from others' by the URL's spelling only"
            )
        identities[url] = identity
    return collision_problems(config, identities), unchecked


def _prefixed(pair: PairSettings, lines: list[str]) -> list[str]:
    return [f"queue {pair.queue!r} on {pair.endpoint}: {line}" for line in lines]


def _key_types(keys: Keys) -> dict[str, str]:
    """What each shared key of a queue must be, if it exists (`store.keys`). A worker's own
    keys are left to the worker: `check` does not know every worker id."""
    return keys.types(per_worker=False)


def key_type_problems(client: Client, keys: Keys) -> list[str]:
    """One line per key of the queue that exists with another type than the workers use:
    each would fail every command on it with WRONGTYPE."""
    problems = []
    for key, wanted in _key_types(keys).items():
        try:
            found = _text(client.type(key))
        except redis.exceptions.NoPermissionError:
            continue  # `permission_problems` names it
        if found not in ("none", wanted):
            problems.append(
                f"key {key!r} is {a(found)}, not {a(wanted)}: workers would fail on it with "
                "WRONGTYPE; rename or delete it, or choose another queue name"
            )
    return problems


# What a worker and its keeper run on a queue's keys, as ACL DRYRUN arguments (declared
# with each key in `store.keys`). Not BRPOPLPUSH: only servers without BLMOVE use it, and
# those have no DRYRUN either.
def _worker_commands(keys: Keys, replies: bool = False) -> list[list[str]]:
    every_key = list(keys.names().values())
    reply = tasks.reply_prefix(keys.queue) + "check"  # one of a task pair's replies
    reply_commands = REPLIES.probes({REPLIES.name: reply})
    return [
        *(reply_commands if replies else []),
        # A script that does not exist: NOSCRIPT if allowed, so probing it changes nothing.
        ["EVALSHA", "0" * 40, str(len(every_key)), *every_key],
        ["SCRIPT", "LOAD", "return 0"],
        *keys.commands(),
    ]


def permission_problems(client: Client, keys: Keys, replies: bool = False) -> list[str]:
    """One line per reason the Redis user may not run what a worker runs on these keys
    (and, with `replies`, on the queue's reply lists), naming the commands it stops. A PING
    alone passes a user who then waits forever at run time for EVALSHA.

    Asked with ACL DRYRUN (Redis 7+) where the user may run it; otherwise probed with
    forms that change nothing (`_harmless`).
    """
    commands = _worker_commands(keys, replies)
    try:
        user = _command(client, "ACL", "WHOAMI")
        verdicts = [_command(client, "ACL", "DRYRUN", user, *c) for c in commands]
    except redis.ResponseError:  # no ACL DRYRUN here, or not for this user: probe instead
        verdicts = [_probe(client, c) for c in _harmless(commands, keys)]
        commands = _harmless(commands, keys)
    denied: dict[str, list[str]] = {}
    for command, verdict in zip(commands, verdicts, strict=True):
        if verdict != "OK":
            name = " ".join(command[:2]) if command[0] == "SCRIPT" else command[0]
            denied.setdefault(verdict, []).append(name)
    return [
        f"the Redis user may not run {', '.join(dict.fromkeys(names))} as workers do: {why}"
        for why, names in denied.items()
    ]


def _harmless(commands: list[list[str]], keys: Keys) -> list[list[str]]:
    """The probes that change nothing: EVALSHA of no script (on every real key), SCRIPT
    LOAD of `return 0`, the reads, and no-op writes on a key of the queue that no one uses
    (DEL of it, SET ... XX of it, BLMOVE from it). SADD cannot be probed so."""
    unused = f"{keys.queue}:check:unused"
    reads = {"EVALSHA", "SCRIPT", "HMGET", "LRANGE", "ZRANGE", "SSCAN", "EXISTS", "LLEN",
             "ZCARD"}  # fmt: skip
    return [
        *(c for c in commands if c[0] in reads),
        ["DEL", unused],
        ["SET", unused, "v", "XX", "PX", "1000"],
        ["BLMOVE", unused, unused, "RIGHT", "LEFT", "0.01"],
    ]


def _probe(client: Client, command: list[str]) -> str:
    """`OK` if Redis let the user run `command`, else its refusal."""
    try:
        _command(client, *command)
    except redis.ResponseError as exc:
        # NOSCRIPT: it was allowed. An unknown command (BLMOVE before Redis 6.2) is one
        # workers do not use there: they fall back to BRPOPLPUSH.
        if not str(exc).startswith(("No matching script", "unknown command")):
            return str(exc)
    return "OK"


def _command(client: Client, *args: str) -> str:
    """A raw command's reply as text: redis-py has no typed method for ACL DRYRUN."""
    return _text(client.execute_command(*args))  # type: ignore[no-untyped-call]


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def metrics_problems(config: Config, port: int | None = None) -> list[str]:
    """Why the keeper could not serve /metrics on `[manager] metrics_address`, if it could
    not: found by binding it as the keeper will (IPv4, SO_REUSEADDR), then letting go.
    `port` 0 tests only that the host is an address of this machine."""
    address = config.manager.metrics_address
    if not address:
        return []
    host, configured = metrics_endpoint(address)
    port = configured if port is None else port
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        why = exc.strerror or str(exc)
        return [f"manager.metrics_address: cannot listen on {host}:{port or configured}: {why}"]
    return []


def start_problems(config: Config) -> list[str]:
    """What `run` would refuse at start for a value of the config, found by `check` without
    taking anything a running manager holds: the metrics host must be an address of this
    machine (its port may be in use by that manager); the pid file and the log file must be
    regular files that can be written, and the pid file no symbolic link (see `pidfile`)."""
    paths = {"manager.pid_file": config.manager.pid_file, "logging.file": config.logging.file}
    return (
        process_problems(config)
        + metrics_problems(config, port=0)
        + [
            f"{field}: {path}: {problem}"
            for field, path in paths.items()
            if path
            and (problem := writable_file_problem(path, pid_file=field == "manager.pid_file"))
        ]
    )


def process_problems(config: Config) -> list[str]:
    """One line per pair that wants more processes than this machine runs usefully."""
    ceiling = max_processes()
    return [
        f"workers: queue {pair.queue!r} on {pair.endpoint}: processes = {pair.processes} is "
        f"more than this machine can run usefully (at most {ceiling}: 32 per CPU core)"
        for pair in config.pairs
        if pair.processes > ceiling
    ]


def writable_file_problem(path: str, pid_file: bool = False) -> str | None:
    """Why `path` cannot be opened for writing (or created) as a regular file, or None. For
    a `pid_file`, a link in its place is a problem too (see `pidfile`)."""
    problem = files.problem(path, follow=not pid_file, ours=pid_file)
    if problem:
        return problem
    where = Path(path) if os.path.lexists(path) else Path(path).parent
    if not where.is_dir() and where == Path(path).parent:
        return f"directory {str(where)!r} does not exist"
    if not os.access(where, os.W_OK):
        return f"{str(where)!r} is not writable"
    return None
