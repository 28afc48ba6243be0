from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import APPS, REPO, RedisServer, Service, write_config


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


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
