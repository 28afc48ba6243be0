"""What `rqworkers check` and `rqworkers run` verify before any worker starts."""

from __future__ import annotations

import json

import redis

from rqworkers import connections, handlers, process, tasks
from rqworkers.config import Config, redact

# What a PING may raise: a cluster client raises more than redis.RedisError.
_FAILURES: tuple[type[Exception], ...] = (*connections.TRANSIENT_ERRORS, redis.RedisError)


def handler_problems(config: Config) -> list[str]:
    """One line per handler (or task allow-list) that cannot be imported, naming its queue."""
    problems = []
    for pair in config.pairs:
        if pair.tasks is not None:
            problem = tasks.verify(pair.tasks)
            what = f"tasks {list(pair.tasks)!r}"
        else:
            problem = handlers.verify(pair.handler or "")
            what = f"handler {pair.handler!r}"
        if problem:
            problems.append(f"{what} of queue {pair.queue!r}: {problem}")
    return problems


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


def host_problems(config: Config, timeout: float = 3.0) -> list[str]:
    """One line per Redis that does not answer PING. Passwords are never shown.

    A cluster must have all its slots served; a Sentinel URL must lead to its master (that
    PING is the master's answer); TLS must verify; the credentials must be accepted.
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
        except _FAILURES as exc:
            problems.append(f"redis at {redact(url)}: {type(exc).__name__}: {exc}")
        finally:
            client.close()
    return problems
