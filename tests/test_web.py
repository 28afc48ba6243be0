"""The status page's server side: token, sessions, CSRF, the shared read, the API.

Against a real redis-server and the real HTTP server of `metrics.serve`, in this process
(the browser test, `test_web_browser.py`, runs the whole service).
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from rqworkers import config, metrics
from rqworkers.errors import ConfigError
from rqworkers.queue import ReliableQueue
from rqworkers.web import Site
from rqworkers.web.auth import COOKIE, Gate
from rqworkers.web.cache import SharedReads
from rqworkers.web.site import CSP, letter_key
from tests.support import RedisServer, Service, free_port, wait_for, write_config

TOKEN = "s3cret-token-for-tests"
STATIC = Path(__file__).resolve().parent.parent / "rqworkers" / "web" / "static"


# -- config -------------------------------------------------------------------------------


def _load(tmp_path: Path, manager: dict[str, Any]) -> config.Config:
    path = write_config(tmp_path / "c.toml", "redis://127.0.0.1:1/0",
                        [{"queue": "q1", "handler": "m:f"}], manager=manager)  # fmt: skip
    return config.load(path)


def test_the_token_is_checked_and_never_shown(tmp_path: Path) -> None:
    cfg = _load(tmp_path, {"dashboard_token": TOKEN})
    assert TOKEN not in repr(cfg) and TOKEN not in str(cfg.manager)
    assert TOKEN not in json.dumps(cfg.manager.model_dump(mode="json"))
    secret = tmp_path / "token"
    secret.write_text("x" * 20 + "\n")
    assert _load(tmp_path, {"dashboard_token_file": str(secret)}).manager.dashboard_token is None
    refused = {
        "dashboard_token: must hold at least 16 characters": {"dashboard_token": "short"},
        "not both": {"dashboard_token": TOKEN, "dashboard_token_file": str(secret)},
        "cannot read": {"dashboard_token_file": str(tmp_path / "missing")},
    }
    for problem, manager in refused.items():
        with pytest.raises(ConfigError, match=problem) as caught:
            _load(tmp_path, manager)
        assert TOKEN not in str(caught.value)


# -- sessions and CSRF --------------------------------------------------------------------


def test_sessions_expire_resist_tampering_and_end_when_the_token_changes() -> None:
    token, now = [TOKEN], [1000.0]
    gate = Gate(lambda: token[0], clock=lambda: now[0])
    cookie = gate.new_session()
    assert TOKEN not in cookie
    headers = {"Cookie": f"{COOKIE}={cookie}"}
    identity = gate.identify(headers)
    assert identity.authenticated and identity.session
    csrf = identity.csrf(TOKEN)
    assert gate.csrf_ok(identity, csrf)
    assert not gate.csrf_ok(identity, None) and not gate.csrf_ok(identity, "0" * 64)
    session, _, mac = cookie.rpartition(".")
    nonce, _, expires = session.partition(".")
    longer = f"{nonce}.{int(expires) + 10**6}.{mac}"
    assert not gate.identify({"Cookie": f"{COOKIE}={longer}"}).authenticated
    now[0] += 13 * 3600
    assert not gate.identify(headers).authenticated
    now[0] = 1000.0
    token[0] = "another-token-of-16+"
    assert not gate.identify(headers).authenticated


def test_a_bearer_header_needs_no_csrf_token_and_no_token_means_no_actions() -> None:
    gate = Gate(lambda: TOKEN)
    bearer = gate.identify({"Authorization": f"Bearer {TOKEN}"})
    assert bearer.authenticated and gate.csrf_ok(bearer, None)
    assert not gate.identify({"Authorization": "Bearer wrong-token-wrong-token"}).authenticated
    off = Gate(lambda: None)
    assert not off.actions_enabled and not off.token_matches("")
    assert not off.identify({"Authorization": f"Bearer {TOKEN}"}).authenticated


def test_concurrent_readers_share_one_read_per_ttl() -> None:
    reads = SharedReads[int](ttl=0.5)
    calls: list[float] = []

    def slow_read() -> int:
        calls.append(time.monotonic())
        time.sleep(0.1)  # so that every other thread arrives while it runs
        return len(calls)

    barrier = threading.Barrier(20)
    results: list[int] = []

    def reader() -> None:
        barrier.wait()
        results.append(reads.get("status", slow_read))

    threads = [threading.Thread(target=reader) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [1] * 20 and reads.reads == 1
    time.sleep(0.5)
    assert reads.get("status", slow_read) == 2


# -- the page's own files -----------------------------------------------------------------


def test_the_page_has_no_inline_code_and_builds_no_html_from_data() -> None:
    html = (STATIC / "index.html").read_text()
    assert re.findall(r"<script(?![^>]*\bsrc=)", html) == []
    assert re.findall(r"\son[a-z]+=|\sstyle=", html) == []
    assert re.findall(r"(src|href)=\"(https?:)?//", html) == []  # nothing from elsewhere
    script = (STATIC / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script


# -- the HTTP API, against a real Redis ---------------------------------------------------


@dataclass
class Server:
    port: int
    redis: redis.Redis
    site: Site | None = None  # when it runs in this process

    def call(
        self, method: str, path: str, body: bytes | dict[str, Any] | None = None, **headers: str
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        if isinstance(body, dict):
            body = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request(
                method, path, body, {k.replace("_", "-"): v for k, v in headers.items()}
            )
            response = connection.getresponse()
            return response.status, response.headers, response.read()
        finally:
            connection.close()

    def json(self, path: str, **headers: str) -> Any:
        status, _, body = self.call("GET", path, **headers)
        assert status == 200, body
        return json.loads(body)


@pytest.fixture
def web(tmp_path: Path, redis_server: RedisServer) -> Iterator[Callable[..., Server]]:
    """The page's server on a free loopback port, for a config with queues q1, q2, q3."""
    started: list[tuple[Any, Site]] = []

    def start(**manager: Any) -> Server:
        workers = [{"queue": q, "handler": "testapp:handle"} for q in ("q1", "q2", "q3")]
        path = write_config(tmp_path / f"web{len(started)}.toml", redis_server.url, workers,
                            manager={"node": "web-1", **manager})  # fmt: skip
        site = Site(config.load(path))
        port = free_port()
        collector = metrics.Metrics((), dict, time.time(), lambda pid: 0)
        server = metrics.serve(f"127.0.0.1:{port}", collector, lambda: (True, {}), site.handle)
        started.append((server, site))
        return Server(port, redis_server.client(), site)

    try:
        yield start
    finally:
        for server, site in started:
            server.shutdown()
            server.server_close()
            site.close()


def dead_letter(client: redis.Redis, queue: str, payload: bytes, reason: str) -> None:
    """Dead-letter `payload` the way a worker does."""
    client.lpush(queue, payload)
    worker = ReliableQueue(client, queue, "test:1")
    worker.replay(None)  # a new process takes the list over, as every worker starts
    [delivery] = worker.take([], 1).deliveries
    assert delivery.payload == payload
    assert worker.dead_letter(delivery, {"reason": reason, "attempts": 3})


def test_status_is_the_status_command_json_read_once_for_many_browsers(
    web: Callable[..., Server],
) -> None:
    server = web()
    server.redis.lpush("q1", b"a", b"b")
    first = server.json("/api/status")
    assert [(p["queue"], p["snapshot"]["waiting"]) for p in first] == [
        ("q1", 2),
        ("q2", 0),
        ("q3", 0),
    ]
    time.sleep(1.0)  # past the cached second
    server.redis.config_resetstat()
    barrier = threading.Barrier(25)
    statuses: list[int] = []

    def browser() -> None:
        barrier.wait()
        statuses.append(server.call("GET", "/api/status")[0])

    threads = [threading.Thread(target=browser) for _ in range(25)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    took = time.monotonic() - started
    assert statuses == [200] * 25
    # The first request, then one read per started second of the burst (one, unless this
    # machine is very busy), whatever the number of browsers.
    assert server.site is not None
    reads = server.site.status_reads.reads - 1
    assert 1 <= reads <= math.ceil(took), f"{reads} reads in {took:.2f}s"
    stats = server.redis.info("commandstats")
    # A status read is one SSCAN of the worker registry and one ZCARD per queue.
    assert stats["cmdstat_sscan"]["calls"] == 3 * reads
    assert stats["cmdstat_zcard"]["calls"] == 3 * reads


def test_dead_letters_are_paged_with_binary_safe_previews(web: Callable[..., Server]) -> None:
    server = web()
    payloads = [b"<script>alert(1)</script>", b"\x00\xff\xfe binary", b"x" * 500]
    for payload in payloads:
        dead_letter(server.redis, "q2", payload, "ValueError: cannot parse")
    page = server.json("/api/dead?queue=q2&start=1&limit=1")
    assert page["total"] == 3 and page["start"] == 1
    [letter] = page["letters"]
    assert letter["preview"] == repr(b"\x00\xff\xfe binary")
    assert letter["size"] == 10 and letter["key"] == letter_key(payloads[1])
    assert (
        letter["info"]["reason"] == "ValueError: cannot parse" and letter["info"]["attempts"] == 3
    )
    status, _, raw = server.call("GET", "/api/dead?queue=q2&limit=5")
    assert status == 200
    assert b"<script>" not in raw and b"\\u003cscript\\u003e" in raw  # escaped even in JSON
    assert json.loads(raw)["letters"][0]["preview"] == repr(payloads[2][:60]) + "…"
    assert server.call("GET", "/api/dead?queue=nope")[0] == 404
    server.redis.set("q1:dead", b"not a list")
    status, _, raw = server.call("GET", "/api/dead?queue=q1")
    assert status == 503 and b"WRONGTYPE" in raw  # an error reply, said as such
    assert server.call("GET", "/api/dead?queue=q2&limit=1000")[0] == 400


def test_every_response_carries_the_security_headers(web: Callable[..., Server]) -> None:
    server = web()
    for method, path in [("GET", "/"), ("GET", "/static/app.js"), ("GET", "/api/status"),
                         ("POST", "/api/dead/purge"), ("GET", "/api/dead/purge")]:  # fmt: skip
        _, headers, _ = server.call(method, path)
        assert headers["Content-Security-Policy"] == CSP, path
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["X-Frame-Options"] == "DENY"
    assert server.call("GET", "/api/dead/purge")[0] == 405
    assert server.call("GET", "/metrics")[0] == 200
    assert server.call("GET", "/nothing")[0] == 404


def test_without_a_token_the_page_is_read_only(web: Callable[..., Server]) -> None:
    server = web()
    dead_letter(server.redis, "q1", b"poison", "boom")
    key = letter_key(b"poison")
    assert server.json("/api/session")["actions"] is False
    requeue = {"queue": "q1", "letters": [{"index": 0, "key": key}]}
    for path, body in [("/api/dead/requeue", requeue), ("/login", b"token=anything")]:
        status, _, reply = server.call("POST", path, body, Authorization=f"Bearer {TOKEN}")
        assert status == 403 and b"read-only" in reply
    assert server.redis.llen("q1:dead") == 1


def test_actions_need_the_token_and_a_csrf_token_and_act_by_value(
    web: Callable[..., Server], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    secret = tmp_path / "token"
    secret.write_text(TOKEN + "\n")
    server = web(dashboard_token_file=str(secret))
    for payload in (b"first", b"second", b"third"):  # index 0 is the newest: third
        dead_letter(server.redis, "q3", payload, "boom")
    letters = server.json("/api/dead?queue=q3")["letters"]
    second = [{"index": 1, "key": letters[1]["key"]}]
    requeue = {"queue": "q3", "letters": second}

    assert server.call("POST", "/api/dead/requeue", requeue)[0] == 403  # nobody
    status, _, _ = server.call("POST", "/login", b"token=not-the-token-at-all")
    assert status == 403
    status, headers, _ = server.call("POST", "/login", f"token={TOKEN}".encode())
    assert status == 303 and headers["Location"] == "./"
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
    session = cookie.split(";")[0]
    assert server.call("POST", "/api/dead/requeue", requeue, Cookie=session)[0] == 403  # no CSRF
    csrf = server.json("/api/session", Cookie=session)["csrf"]
    as_form = json.dumps(requeue).encode()
    status, _, _ = server.call("POST", "/api/dead/requeue", as_form, Cookie=session,
                               X_CSRF_Token=csrf, Content_Type="text/plain")  # fmt: skip
    assert status == 415  # a cross-site form cannot send JSON

    # Another letter dead-lettered meanwhile shifts the indexes: nothing is done.
    dead_letter(server.redis, "q3", b"fourth", "boom")
    status, _, reply = server.call("POST", "/api/dead/requeue", requeue, Cookie=session,
                                   X_CSRF_Token=csrf)  # fmt: skip
    assert status == 409 and server.redis.llen("q3:dead") == 4
    requeue["letters"] = [{"index": 2, "key": letters[1]["key"]}]
    status, _, reply = server.call("POST", "/api/dead/requeue", requeue, Cookie=session,
                                   X_CSRF_Token=csrf)  # fmt: skip
    assert status == 200 and json.loads(reply) == {"action": "requeue", "asked": 1, "done": 1}
    assert server.redis.lrange("q3", 0, -1) == [b"second"]
    assert server.redis.lrange("q3:dead", 0, -1) == [b"fourth", b"third", b"first"]

    # The file is read at each check: a new token locks out old sessions and the old token.
    secret.write_text("a-brand-new-token-here\n")
    purge = {"queue": "q3", "letters": [{"index": 0, "key": letter_key(b"fourth")}]}
    assert (
        server.call("POST", "/api/dead/purge", purge, Cookie=session, X_CSRF_Token=csrf)[0] == 403
    )
    assert server.call("POST", "/api/dead/purge", purge, Authorization=f"Bearer {TOKEN}")[0] == 403
    status, _, _ = server.call("POST", "/api/dead/purge", purge,
                               Authorization="Bearer a-brand-new-token-here")  # fmt: skip
    assert status == 200 and server.redis.lrange("q3:dead", 0, -1) == [b"third", b"first"]
    assert TOKEN not in caplog.text and "a-brand-new-token-here" not in caplog.text
    assert "dashboard: requeue of 1 dead letter(s) of q3" in caplog.text


def test_an_unreachable_host_is_a_503_not_a_hang(web: Callable[..., Server],
                                                  redis_server: RedisServer) -> None:  # fmt: skip
    server = web()
    redis_server.stop()
    started = time.monotonic()
    status, _, reply = server.call("GET", "/api/dead?queue=q1")
    assert status == 503 and b"redis" in reply
    assert all(
        p["error"] and p["error"].startswith("unreachable") for p in server.json("/api/status")
    )
    assert time.monotonic() - started < 10


def test_a_reload_that_changes_the_token_applies_it(
    service: Callable[..., Service], redis_server: RedisServer
) -> None:
    port = free_port()
    workers = [{"queue": "q1", "handler": "testapp:handle"}]
    manager = {"check_interval": 0.2, "metrics_address": f"127.0.0.1:{port}"}
    svc = service(workers, manager={**manager, "dashboard_token": TOKEN})
    page = Server(port, redis_server.client())

    def authorized(token: str) -> bool | None:
        """Whether the service takes `token` (None: not serving right now)."""
        try:
            status, _, _ = page.call("POST", "/api/dead/purge", {"queue": "q1", "letters": []},
                                     Authorization=f"Bearer {token}")  # fmt: skip
        except OSError:
            return None
        return {400: True, 403: False}[status]  # 400: past the token, the empty list refused

    wait_for(lambda: authorized(TOKEN), timeout=15, what="the page to take the first token")
    write_config(svc.config_path, redis_server.url, workers,
                 manager={**manager, "dashboard_token": "the-second-token-0123"})  # fmt: skip
    svc.signal(signal.SIGHUP)
    wait_for(lambda: authorized("the-second-token-0123"), timeout=15, what="the new token")
    assert authorized(TOKEN) is False
