"""Fixtures shared by every test file, and the `service` marker.

A test is marked `service` when it starts rqworkers processes: `rqworkers run` or any other
command run as a subprocess. `scripts/test --fast` leaves those out (`-m "not slow and not
service"`). The marker is set here for every test that uses a fixture in SERVICE_FIXTURES;
a test that runs the command line itself (`run_cli`, `Service(...).start()`, its file's own
helper) is marked by hand. So that a forgotten mark cannot hide, a test not marked `service`
that starts `python -m rqworkers`, the `rqworkers` script or a `bench` program fails, saying
so (see `_refuse_unmarked_starts`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis

from tests.support import APPS, REPO, RedisServer, Service, write_config

# Fixtures that start `rqworkers run`: conftest's and test_connections.py's `service`, and
# test_cli.py's `services`. A test using one, directly or through another fixture, is marked.
SERVICE_FIXTURES = frozenset({"service", "services"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SERVICE_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.service)


_starts_allowed = True  # outside a test (collection, the session's end): not ours to judge


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    global _starts_allowed
    _starts_allowed = item.get_closest_marker("service") is not None
    try:
        return (yield)
    finally:
        _starts_allowed = True


def _refuse_unmarked_starts(event: str, args: tuple[Any, ...]) -> None:
    """An audit hook: a subprocess that runs rqworkers, started by a test not marked
    `service`, is refused with advice instead of slipping into `scripts/test --fast`."""
    if event != "subprocess.Popen" or _starts_allowed:
        return
    argv = args[1]
    words = [argv] if isinstance(argv, (str, bytes, os.PathLike)) else list(argv)
    words = [os.fsdecode(word) for word in words]
    module = words[words.index("-m") + 1] if "-m" in words[:-1] else ""
    if (
        module == "rqworkers"
        or module.startswith("bench.")
        or (words and Path(words[0]).name == "rqworkers")
    ):
        raise RuntimeError(
            f"this test starts rqworkers ({' '.join(words[:4])} ...) but is not marked "
            "`service`: add @pytest.mark.service (see tests/conftest.py)"
        )


sys.addaudithook(_refuse_unmarked_starts)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.discard()  # the test is over: no need to wait for a graceful shutdown


@pytest.fixture
def service(tmp_path: Path, redis_server: RedisServer) -> Iterator[Callable[..., Service]]:
    """Start `rqworkers run` with the given workers; every process is killed at teardown."""
    started: list[Service] = []

    def start(workers: list[dict[str, Any]], **sections: Any) -> Service:
        sections.setdefault("manager", {"check_interval": 0.2, "shutdown_timeout": 10.0})
        path = write_config(
            tmp_path / f"rqworkers{len(started)}.toml", redis_server.url, workers, **sections
        )
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(APPS), str(REPO)])
        env["TESTAPP_REDIS_URL"] = redis_server.url
        svc = Service(path, tmp_path, env).start()
        started.append(svc)
        return svc

    try:
        yield start
    finally:
        for svc in started:
            svc.cleanup()


@pytest.fixture(params=["fakeredis", "redis-server"])
def client(request: pytest.FixtureRequest) -> Iterator[redis.Redis]:
    """A client of fakeredis (a fresh server per test) and, as a second case, of a real
    redis-server: the contract tests run the same test on both."""
    if request.param == "fakeredis":
        conn = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    else:
        conn = request.getfixturevalue("redis_server").client()
    try:
        yield conn
    finally:
        conn.close()
