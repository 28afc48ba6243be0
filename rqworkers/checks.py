"""What `rqworkers check` and `rqworkers run` verify before any worker starts."""

from __future__ import annotations

import json

import redis

from rqworkers import handlers, process
from rqworkers.config import Config, redact


def handler_problems(config: Config) -> list[str]:
    """One line per handler that cannot be imported, naming its queue."""
    problems = []
    for pair in config.pairs:
        problem = handlers.verify(pair.handler)
        if problem:
            problems.append(f"handler {pair.handler!r} of queue {pair.queue!r}: {problem}")
    return problems


def handler_problems_isolated(config: Config) -> list[str]:
    """`handler_problems`, run in a throwaway child so user modules never load in the manager."""
    text = process.call_in_child(lambda: json.dumps(handler_problems(config)))
    try:
        result = json.loads(text)
    except json.JSONDecodeError:
        return [f"checking handlers failed: {text}"]
    return [str(line) for line in result]


def host_problems(config: Config, timeout: float = 3.0) -> list[str]:
    """One line per Redis that does not answer PING. Passwords are never shown."""
    problems = []
    for url in sorted({pair.url for pair in config.pairs}):
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            client.ping()
        except redis.RedisError as exc:
            problems.append(f"redis at {redact(url)}: {type(exc).__name__}: {exc}")
        finally:
            client.close()
    return problems
