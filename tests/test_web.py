"""The status page's server side: token, sessions, CSRF, the shared read, the API.

Against a real redis-server and the real HTTP server of `metrics.serve`, in this process
(the browser test, `test_web_browser.py`, runs the whole service).
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import logging
import math
import os
import re
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import redis

from rqworkers import config
from rqworkers.errors import ConfigError
from rqworkers.ops import metrics
from rqworkers.ops import status as status_report
from rqworkers.ops.web import Site, auth
from rqworkers.ops.web import server as web_server
from rqworkers.ops.web.auth import COOKIE, Gate
from rqworkers.ops.web.cache import SharedReads
from rqworkers.ops.web.history import History
from rqworkers.ops.web.server import CSP
from rqworkers.ops.web.site import MAX_HOSTS_LOGGED, letter_key
from rqworkers.store.keys import Keys
from rqworkers.store.queue import ReliableQueue, renew_leases
from tests.support import RedisServer, Service, free_port, wait_for, write_config

TOKEN = "s3cret-token-for-tests"
STATIC = Path(__file__).resolve().parent.parent / "rqworkers" / "ops" / "web" / "static"


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

    def start(limits: dict[str, dict[str, Any]] | None = None, **manager: Any) -> Server:
        """`limits`: more settings of some queues (`{"q1": {"max_running": 2}}`)."""
        workers = [{"queue": q, "handler": "testapp:handle", **(limits or {}).get(q, {})}
                   for q in ("q1", "q2", "q3")]  # fmt: skip
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
    server.redis.set(Keys("q1").dead, b"not a list")
    status, _, raw = server.call("GET", "/api/dead?queue=q1")
    assert status == 500 and b"WRONGTYPE" in raw  # a lasting error: said as such, not "retry"
    assert server.call("GET", "/api/dead?queue=q2&limit=1000")[0] == 400


def _publish(client: redis.Redis, queue: str, worker_id: str, **status: Any) -> None:
    """A live worker's lease, as a keeper renews it: its status is the value."""
    value = {"name": f"{queue}-1", "node": "web-1", "pid": 4242, "at": time.time(), **status}
    renew_leases(client, {(queue, worker_id): json.dumps(value)}, 30.0)


def test_a_dead_letter_names_its_worker_as_the_workers_table_does(
    web: Callable[..., Server],
) -> None:
    """Records hold the worker's id (`web-1:1`); the workers table, the logs and `ps` its
    name (`q1-1`) and node: the page must not call one worker two names."""
    server = web()
    client = server.redis
    client.lpush("q1", b"poison")
    queue = ReliableQueue(client, "q1", "web-1:1")
    queue.replay(None)
    [delivery] = queue.take([], 1).deliveries
    assert queue.dead_letter(delivery, {"reason": "boom", "attempts": 3})
    dead_letter(client, "q1", b"by a worker gone since", "boom")  # worker `test:1`, no lease
    _publish(client, "q1", "web-1:1")
    [row] = [w for p in server.json("/api/status") if p["queue"] == "q1"
             for w in p["snapshot"]["workers"]]  # fmt: skip
    page = server.json("/api/dead?queue=q1")
    gone, live = page["letters"]
    assert live["info"]["worker"] == "web-1:1"  # the record itself is shown unchanged
    assert live["worker"] == {"id": "web-1:1", "name": row["name"], "node": row["node"]}
    assert (row["name"], row["node"]) == ("q1-1", "web-1")
    assert gone["worker"] == {"id": "test:1", "name": None, "node": None}


def test_the_chart_s_history_is_kept_by_the_server(web: Callable[..., Server]) -> None:
    """A page just opened draws the last minutes at once: `/api/history` has them, sampled
    by the server whether a page is open or not."""
    server = web()
    assert server.site is not None
    history, now = server.site.history, [1000.0]
    history.clock = lambda: now[0]
    assert server.json("/api/history")["points"] == []
    for step, (succeeded, failed) in enumerate([(10, 0), (40, 3), (40, 3), (7, 1)]):
        _publish(server.redis, "q2", "web-1:1", succeeded=succeeded, failed=failed,
                 pid=4242 if step < 3 else 4343)  # fmt: skip
        server.site.status_reads.forget()
        now[0] += 3.0
        history.sample()
    reply = server.json("/api/history")
    assert reply["every"] == 3.0 and reply["keep"] == 300.0
    # 30 succeeded and 3 failed in 3 s; nothing; a new process (pid) counted from zero.
    assert reply["points"] == [
        {"t": 1006.0, "ok": 10.0, "failed": 1.0},
        {"t": 1009.0, "ok": 0.0, "failed": 0.0},
        {"t": 1012.0, "ok": 7 / 3, "failed": 1 / 3},
    ]


def test_the_history_is_bounded_and_survives_a_failing_read() -> None:
    def status(n: int) -> list[dict[str, Any]]:
        worker = {"worker_id": "n:1", "pid": 1, "succeeded": n, "failed": 0}
        return [{"host": "h", "queue": "q", "snapshot": {"workers": [worker]}}]

    reads = iter([status(n) for n in range(500)])
    history = History(lambda: next(reads), every=3.0, keep=300.0)
    for _ in range(500):
        history.sample()
    points = history.as_json()["points"]
    assert len(points) == 100 and all(p["ok"] > 0 for p in points)

    tries: list[float] = []

    def broken() -> list[dict[str, Any]]:
        tries.append(time.monotonic())
        raise redis.ConnectionError("down")

    failing = History(broken, every=0.01)
    failing.start()
    wait_for(lambda: len(tries) >= 3, timeout=5, what="the sampler to try again after errors")
    assert failing._thread is not None and failing._thread.is_alive()
    failing.stop()
    assert not failing._thread.is_alive()


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
    assert server.redis.llen(Keys("q1").dead) == 1


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
    assert status == 409 and server.redis.llen(Keys("q3").dead) == 4
    requeue["letters"] = [{"index": 2, "key": letters[1]["key"]}]
    status, _, reply = server.call("POST", "/api/dead/requeue", requeue, Cookie=session,
                                   X_CSRF_Token=csrf)  # fmt: skip
    assert status == 200 and json.loads(reply) == {"action": "requeue", "asked": 1, "done": 1}
    assert server.redis.lrange("q3", 0, -1) == [b"second"]
    assert server.redis.lrange(Keys("q3").dead, 0, -1) == [b"fourth", b"third", b"first"]

    # The file is read at each check: a new token locks out old sessions and the old token.
    secret.write_text("a-brand-new-token-here\n")
    purge = {"queue": "q3", "letters": [{"index": 0, "key": letter_key(b"fourth")}]}
    assert (
        server.call("POST", "/api/dead/purge", purge, Cookie=session, X_CSRF_Token=csrf)[0] == 403
    )
    assert server.call("POST", "/api/dead/purge", purge, Authorization=f"Bearer {TOKEN}")[0] == 403
    status, _, _ = server.call("POST", "/api/dead/purge", purge,
                               Authorization="Bearer a-brand-new-token-here")  # fmt: skip
    assert status == 200 and server.redis.lrange(Keys("q3").dead, 0, -1) == [b"third", b"first"]
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
        # 400: past the token, the empty list refused. 429: the old keeper's throttle.
        return {400: True, 403: False, 429: False}[status]

    wait_for(lambda: authorized(TOKEN), timeout=15, what="the page to take the first token")
    write_config(svc.config_path, redis_server.url, workers,
                 manager={**manager, "dashboard_token": "the-second-token-0123"})  # fmt: skip
    svc.signal(signal.SIGHUP)
    wait_for(lambda: authorized("the-second-token-0123"), timeout=15, what="the new token")
    assert authorized(TOKEN) is False


# -- issue 17: fail closed, answer only our own names, bounded server ---------------------


def _forged_cookie(key: str) -> tuple[str, str]:
    """A session cookie and CSRF token made offline with `key` as the HMAC key."""
    session = f"forged.{int(time.time()) + 3600}"

    def mac(purpose: str, value: str) -> str:
        return hmac.new(key.encode(), f"{purpose}|{value}".encode(), hashlib.sha256).hexdigest()

    return f"{COOKIE}={session}.{mac('session', session)}", mac("csrf", session)


def test_a_token_file_spoiled_while_running_turns_every_action_off(
    web: Callable[..., Server], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = tmp_path / "token"
    secret.write_text(TOKEN + "\n")
    server = web(dashboard_token_file=str(secret))
    dead_letter(server.redis, "q1", b"poison", "boom")
    purge = {"queue": "q1", "letters": [{"index": 0, "key": letter_key(b"poison")}]}
    caplog.clear()

    def refused_everything(content: str) -> None:
        for token in {"", content}:
            form = urlencode({"token": token}).encode()
            status, headers, _ = server.call("POST", "/login", form)
            assert status == 403 and "Set-Cookie" not in headers, repr(content)
            if token and token == token.strip():  # what a header can carry
                bearer = f"Bearer {token}"
                assert server.call("POST", "/api/dead/purge", purge, Authorization=bearer)[0] == 403
            cookie, csrf = _forged_cookie(token)
            forged = server.call("POST", "/api/dead/purge", purge, Cookie=cookie, X_CSRF_Token=csrf)
            assert forged[0] == 403, repr(content)
        assert server.json("/api/session")["actions"] is False
        assert server.redis.llen(Keys("q1").dead) == 1

    for content in ("", "ab", " " * 20, "\n"):  # emptied, shortened, blanked
        secret.write_text(content)
        refused_everything(content)
    problems = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(problems) == 1 and "must hold at least 16 characters" in problems[0], problems

    # Swapped for something that is not a token file: refused at once, never a hang.
    secret.unlink()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for target in ("/dev/zero", fifo):
        secret.unlink(missing_ok=True)
        secret.symlink_to(target)
        refused_everything("")
    other = tmp_path / "other"
    other.write_text(TOKEN)
    os.chmod(other, 0o666)
    secret.unlink()
    secret.symlink_to(other)  # a token another local user could have written
    refused_everything(TOKEN)
    if os.geteuid() == 0:  # only root can give a file away
        os.chmod(other, 0o600)
        os.chown(other, 65534, 65534)
        refused_everything(TOKEN)
    problems = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("not a regular file" in p for p in problems)
    assert any("writable by others" in p for p in problems)
    assert len(problems) == len(set(problems)), problems  # once per change, not per request

    # Put right again: the actions come back, and the log says so.
    secret.unlink()
    secret.write_text(TOKEN + "\n")
    status, _, _ = server.call("POST", "/api/dead/purge", purge, Authorization=f"Bearer {TOKEN}")
    assert status == 200 and server.redis.llen(Keys("q1").dead) == 0
    assert "the token is usable again" in caplog.text
    assert TOKEN not in caplog.text


def test_a_token_file_must_be_a_private_regular_file(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    shared = tmp_path / "shared"
    shared.write_text(TOKEN)
    os.chmod(shared, 0o664)
    huge = tmp_path / "huge"
    huge.write_text(TOKEN * 1000)
    open_folder = tmp_path / "open"
    open_folder.mkdir()
    (open_folder / "token").write_text(TOKEN)
    os.chmod(open_folder, 0o777)  # anyone may replace the file in it
    cases = [(fifo, "not a regular file"), ("/dev/zero", "not a regular file"),
             (shared, "writable by others"), (huge, "larger than 4096 bytes"),
             (tmp_path / "missing", "cannot read"),
             (open_folder / "token", "in a folder others can write to")]  # fmt: skip
    if os.geteuid() == 0:  # a symlink planted by another user, in a sticky folder
        good = tmp_path / "good"
        good.write_text(TOKEN)
        sticky = _sticky_folder_with_a_link_of_nobody(tmp_path, "token", good)
        cases.append((sticky / "token", "a symlink owned by uid 65534"))
        (sticky / "mine").symlink_to(good)
        assert _load(tmp_path, {"dashboard_token_file": str(sticky / "mine")})
    for path, problem in cases:
        with pytest.raises(ConfigError, match=problem) as caught:
            _load(tmp_path, {"dashboard_token_file": str(path)})
        assert "manager" in str(caught.value) and "c.toml" in str(caught.value)


def _sticky_folder_with_a_link_of_nobody(tmp_path: Path, name: str, target: Path) -> Path:
    """A sticky folder (as /tmp) holding `name`, a link to `target` that uid 65534 owns:
    planted by another user (the caller runs as root)."""
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    (sticky / name).symlink_to(target)
    os.lchown(sticky / name, 65534, 65534)
    return sticky


def test_a_token_file_others_can_reach_and_swap_is_refused(tmp_path: Path) -> None:
    """Every link on the way to the file, and every folder holding one (or the file, or a
    folder on the way), is checked: a private link into a folder anyone can write is a
    token anyone can choose (they put their own file, or link, in its place)."""
    secrets = tmp_path / "sec"
    secrets.mkdir(mode=0o700)
    world = tmp_path / "ww"
    world.mkdir()
    os.chmod(world, 0o777)  # not sticky: anyone may replace what it holds
    (world / "tok").write_text(TOKEN)
    os.chmod(world / "tok", 0o600)
    (world / "dir").mkdir(mode=0o700)
    (world / "dir" / "tok").write_text(TOKEN)
    (secrets / "direct").symlink_to(world / "tok")
    (secrets / "hop").symlink_to(world / "tok")
    (secrets / "twice").symlink_to(secrets / "hop")  # the second link leads into ww/
    (secrets / "down").symlink_to(world / "dir" / "tok")  # ww/ holds the folder dir/
    (secrets / "relative").symlink_to("../ww/tok")
    (secrets / "loop").symlink_to(secrets / "loop2")
    (secrets / "loop2").symlink_to(secrets / "loop")
    swappable = re.escape(f"in a folder others can write to (and not sticky): {world}")
    cases = [(secrets / name, swappable) for name in ("direct", "twice", "down", "relative")]
    cases.append((secrets / "loop", "more than 40 symlinks"))
    if os.geteuid() == 0:  # another user's link in the middle, or another user's file
        good = secrets / "good"
        good.write_text(TOKEN)
        sticky = _sticky_folder_with_a_link_of_nobody(tmp_path, "theirs", good)
        (secrets / "via").symlink_to(sticky / "theirs")
        theirs = re.escape(f"{sticky}/theirs is a symlink owned by uid 65534")
        cases.append((secrets / "via", theirs))
        given = secrets / "given"
        given.write_text(TOKEN)
        os.chown(given, 65534, 65534)
        cases.append((given, "the file is owned by uid 65534, not this user or root"))
        theirs_folder = tmp_path / "bob"  # another user's folder: they may swap its files
        theirs_folder.mkdir(mode=0o755)
        (theirs_folder / "tok").write_text(TOKEN)
        os.chown(theirs_folder, 65534, 65534)
        cases.append((theirs_folder / "tok", "in a folder owned by uid 65534"))
        (secrets / "to-given").symlink_to(given)
        cases.append((secrets / "to-given", re.escape(f"the file ({given}) is owned by uid 65534")))
    for path, problem in cases:
        with pytest.raises(ConfigError, match=problem) as caught:
            _load(tmp_path, {"dashboard_token_file": str(path)})
        assert "manager" in str(caught.value), caught.value
    # Sticky (as /tmp) and private folders, and links of our own, are fine, at any depth.
    os.chmod(world, 0o1777)
    for name in ("direct", "twice", "down", "relative"):
        cfg = _load(tmp_path, {"dashboard_token_file": str(secrets / name)})
        assert config.read_token_file(str(cfg.manager.dashboard_token_file)) == TOKEN


def test_a_token_folder_opened_to_others_while_running_turns_the_actions_off(
    web: Callable[..., Server], tmp_path: Path
) -> None:
    """The reproduction: sec/token -> ww/tok, and ww/ becomes writable by anyone. Another
    user could now put their own token there; the page must stop taking any."""
    world = tmp_path / "ww"
    world.mkdir(mode=0o755)
    (world / "tok").write_text(TOKEN)
    os.chmod(world / "tok", 0o600)
    secrets = tmp_path / "sec"
    secrets.mkdir(mode=0o700)
    (secrets / "token").symlink_to(world / "tok")
    server = web(dashboard_token_file=str(secrets / "token"))
    assert server.call("POST", "/login", f"token={TOKEN}".encode())[0] == 303
    os.chmod(world, 0o777)
    status, headers, body = server.call("POST", "/login", f"token={TOKEN}".encode())
    assert status == 403 and "Set-Cookie" not in headers and b"actions are off" in body
    assert server.json("/api/session")["actions"] is False
    os.chmod(world, 0o755)
    assert server.call("POST", "/login", f"token={TOKEN}".encode())[0] == 303


def _raw(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send `data` as is and read the whole answer (the server closes after it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_the_page_answers_only_its_own_names(
    web: Callable[..., Server], caplog: pytest.LogCaptureFixture
) -> None:
    server = web(dashboard_hosts=["Status.Example.com", "10.1.2.3"])
    dead_letter(server.redis, "q1", b"secret payload", "boom")
    port = server.port
    # DNS rebinding: a page of evil.example, its name now pointing at 127.0.0.1.
    for path in ("/api/dead?queue=q1", "/api/status", "/api/session", "/", "/static/app.js"):
        status, headers, body = server.call("GET", path, Host=f"evil.example:{port}")
        assert status == 421 and b"secret" not in body, path
        assert headers["Content-Security-Policy"] == CSP
    assert server.call("POST", "/login", f"token={TOKEN}".encode(), Host="evil.example")[0] == 421
    refused = [f"localhost:{port + 1}", "localhost", "127.0.0.1.evil.example", "[::2]",
               f"status.example.com.evil:{port}", "", f"127.0.0.1:{port}@evil", "[::1]",
               f"::1:{port}", f"[::1]x:{port}"]  # fmt: skip
    for host in refused:
        assert server.call("GET", "/api/dead?queue=q1", Host=host)[0] == 421, host
    allowed = [f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", f"LOCALHOST:{port}",
               "status.example.com", "status.example.com:443", "10.1.2.3:8080"]  # fmt: skip
    for host in allowed:
        status, _, body = server.call("GET", "/api/dead?queue=q1", Host=host)
        assert status == 200 and b"secret payload" in body, host
    # No Host at all, or two of them: refused too.
    assert _raw(port, b"GET /api/dead?queue=q1 HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 421")
    two = f"GET /api/status HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nHost: evil.example\r\n\r\n"
    assert _raw(port, two.encode()).startswith(b"HTTP/1.0 421")

    # The absolute form of a request line names the server too: it must be the Host.
    def absolute(target: str) -> bytes:
        return _raw(port, f"GET {target} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())

    for target in ("http://evil.example/api/dead?queue=q1", f"ftp://127.0.0.1:{port}/api/dead"):
        answer = absolute(target)
        assert answer.startswith(b"HTTP/1.0 400") and b"secret" not in answer, target
    assert b"secret payload" in absolute(f"http://127.0.0.1:{port}/api/dead?queue=q1")
    # Scrapers and probes may use any name.
    assert server.call("GET", "/metrics", Host="evil.example")[0] == 200
    assert server.call("GET", "/healthz", Host="evil.example")[0] == 200
    warnings = [r.getMessage() for r in caplog.records if "evil.example:" in r.getMessage()]
    assert len(warnings) == 1 and "dashboard_hosts" in warnings[0]  # once per name
    for n in range(MAX_HOSTS_LOGGED + 20):  # a flood of names: the log and memory stay bounded
        assert server.call("GET", "/api/status", Host=f"n{n}.evil.example")[0] == 421
    assert server.site is not None and len(server.site._hosts_denied) == MAX_HOSTS_LOGGED


def test_dashboard_hosts_and_private_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"manager.*'bad name' is not a host name"):
        _load(tmp_path, {"dashboard_hosts": ["ok.example", "bad name"]})
    with pytest.raises(ConfigError, match="dashboard_hosts"):
        _load(tmp_path, {"dashboard_hosts": "ok.example"})
    # The whole text must be a host name: no trailing newline, no empty or broken address.
    bad_names = ["a.com\n", "[:]", "[]", "[::1", "[a.com]", "1.2.3", "999.1.2.3", "a..b",
                 "-a.com", "a.com:80", "a_b.com", ""]  # fmt: skip
    for bad in bad_names:
        with pytest.raises(ConfigError, match=r"dashboard_hosts: .* is not a host name"):
            _load(tmp_path, {"dashboard_hosts": [bad]})
    with pytest.raises(ConfigError):  # writes c.toml, where a basic string holds a newline
        _load(tmp_path, {"dashboard_hosts": ["PLACE HOLDER"]})
    newline = tmp_path / "newline.toml"
    newline.write_text((tmp_path / "c.toml").read_text().replace("'PLACE HOLDER'", '"a.com\\n"'))
    with pytest.raises(ConfigError, match=r"dashboard_hosts: 'a\.com\\n' is not a host name"):
        config.load(newline)
    assert not config.host_name_ok("a.com\n")
    good = ["status.example.com", "status.example.com.", "10.0.0.5", "[::1]", "[2001:db8::5]"]
    assert _load(tmp_path, {"dashboard_hosts": good}).manager.dashboard_hosts == tuple(good)
    with pytest.raises(ConfigError, match="dashboard_private needs dashboard_token"):
        _load(tmp_path, {"dashboard_private": True})
    cfg = _load(tmp_path, {"dashboard_hosts": ["A.example", "[::1]"], "dashboard_private": True,
                           "dashboard_token": TOKEN})  # fmt: skip
    assert cfg.manager.dashboard_hosts == ("a.example", "[::1]") and cfg.manager.dashboard_private


def test_private_dead_letters_need_the_token_to_be_read(web: Callable[..., Server]) -> None:
    server = web(dashboard_token=TOKEN, dashboard_private=True)
    dead_letter(server.redis, "q1", b"private payload", "boom")
    status, _, body = server.call("GET", "/api/dead?queue=q1")
    assert status == 403 and b"private payload" not in body and b"log in" in body
    assert server.json("/api/session")["private"] is True
    wrong = "Bearer wrong-wrong-wrong"
    assert server.call("GET", "/api/dead?queue=q1", Authorization=wrong)[0] == 403
    page = server.json("/api/dead?queue=q1", Authorization=f"Bearer {TOKEN}")
    assert page["letters"][0]["preview"] == repr(b"private payload")
    _, headers, _ = server.call("POST", "/login", f"token={TOKEN}".encode())
    session = headers["Set-Cookie"].split(";")[0]
    assert server.json("/api/dead?queue=q1", Cookie=session)["total"] == 1
    status = server.call("GET", "/api/status")[0]
    assert status == 200  # counts stay public; contents do not


def test_logout_needs_the_page_s_csrf_token(web: Callable[..., Server]) -> None:
    server = web(dashboard_token=TOKEN)
    _, headers, _ = server.call("POST", "/login", f"token={TOKEN}".encode())
    session = headers["Set-Cookie"].split(";")[0]
    # A form of another origin: the browser sends no cookie (SameSite) and no CSRF token.
    for forged in ({}, {"Cookie": session}, {"Cookie": session, "X_CSRF_Token": "0" * 64}):
        status, headers, _ = server.call("POST", "/logout", b"", **forged)
        assert status == 403 and "Set-Cookie" not in headers, forged
    csrf = server.json("/api/session", Cookie=session)["csrf"]
    status, headers, _ = server.call("POST", "/logout", b"", Cookie=session, X_CSRF_Token=csrf)
    assert status == 303 and "Max-Age=0" in headers["Set-Cookie"]


def test_wrong_tokens_are_throttled_per_client_address(
    web: Callable[..., Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth, "LOGIN_REFILL", 1.5)  # seconds, not the real 5: a faster test
    server = web(dashboard_token=TOKEN)
    for _ in range(auth.LOGIN_BURST - 1):
        assert server.call("POST", "/login", b"token=wrong-wrong-wrong-wrong")[0] == 403
    bearer = {"Authorization": "Bearer wrong-wrong-wrong-wrong"}
    assert server.call("GET", "/api/session", **bearer)[0] == 200  # a guess too, and counted
    started = time.monotonic()
    status, headers, body = server.call("POST", "/login", f"token={TOKEN}".encode())
    assert status == 429 and "Set-Cookie" not in headers and b"try again" in body
    assert 1 <= int(headers["Retry-After"]) <= math.ceil(auth.LOGIN_REFILL)
    assert server.call("POST", "/api/dead/purge", {}, Authorization=f"Bearer {TOKEN}")[0] == 429
    wait_for(lambda: server.call("POST", "/login", f"token={TOKEN}".encode())[0] == 303,
             timeout=auth.LOGIN_REFILL + 5, what="the bucket to refill")  # fmt: skip
    assert time.monotonic() - started >= auth.LOGIN_REFILL / 2


def test_the_throttle_refills_counts_each_address_and_stays_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [0.0]
    throttle = auth.Throttle(clock=lambda: now[0])
    for _ in range(auth.LOGIN_BURST):
        assert throttle.attempt("10.0.0.1") == 0
    assert throttle.attempt("10.0.0.1") == auth.LOGIN_REFILL
    assert throttle.attempt("10.0.0.2") == 0  # each address its own bucket
    now[0] += auth.LOGIN_REFILL
    assert throttle.attempt("10.0.0.1") == 0
    assert throttle.attempt("10.0.0.1") > 0
    throttle.refund("10.0.0.2")  # a right token costs nothing
    assert "10.0.0.2" not in throttle._buckets
    # Parallel guesses: charged as they pass, so no more pass than the bucket holds.
    barrier = threading.Barrier(50)
    passed: list[bool] = []

    def guess() -> None:
        barrier.wait()
        passed.append(throttle.attempt("10.0.0.3") == 0)

    threads = [threading.Thread(target=guess) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert passed.count(True) == auth.LOGIN_BURST
    monkeypatch.setattr(auth, "GLOBAL_BURST", 10**6)  # here, only the per-address buckets
    monkeypatch.setattr(auth, "MAX_CLIENTS", 50)
    for n in range(500):
        throttle.attempt(f"192.0.2.{n}")
    assert len(throttle._buckets) <= 50


def _from(server: Server, source: str, method: str, path: str, body: bytes, **headers: str) -> int:
    """The status of a request sent from the loopback address `source` (any of 127/8)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10,
                                            source_address=(source, 0))  # fmt: skip
    try:
        connection.request(method, path, body, {k.replace("_", "-"): v for k, v in headers.items()})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def test_posts_from_another_origin_are_refused_before_any_guess_is_counted(
    web: Callable[..., Server],
) -> None:
    """A form of another site posting wrong tokens to /login used to spend the operator's
    guesses: afterwards the right token got 429. Now such posts are refused (403) before
    the throttle, and a script without browser headers (curl) is still served."""
    server = web(dashboard_token=TOKEN)
    dead_letter(server.redis, "q1", b"poison", "boom")
    own = f"http://127.0.0.1:{server.port}"
    foreign = [{"Origin": "http://attacker.test"}, {"Origin": "null"},
               {"Origin": f"http://127.0.0.1:{server.port + 1}"}, {"Origin": f"{own}.evil"},
               {"Origin": own, "Sec_Fetch_Site": "cross-site"},
               {"Sec_Fetch_Site": "same-site"}, {"Sec_Fetch_Site": "bogus"}]  # fmt: skip
    for _ in range(3):
        for headers in foreign:
            status, _, body = server.call("POST", "/login", b"token=wrong-wrong-wrong", **headers)
            assert status == 403 and b"another origin" in body, headers
    purge = {"queue": "q1", "letters": [{"index": 0, "key": letter_key(b"poison")}]}
    bearer = f"Bearer {TOKEN}"
    for headers in foreign:
        status, _, body = server.call("POST", "/api/dead/purge", purge, Authorization=bearer,
                                      **headers)  # fmt: skip
        assert status == 403 and b"another origin" in body, headers
    assert server.redis.llen(Keys("q1").dead) == 1
    # The page's own origin, a typed address, and curl: served, and the right token works.
    for headers in ({"Origin": own, "Sec_Fetch_Site": "same-origin"}, {"Sec_Fetch_Site": "none"},
                    {}):  # fmt: skip
        status, reply, _ = server.call("POST", "/login", f"token={TOKEN}".encode(), **headers)
        assert status == 303 and COOKIE in reply["Set-Cookie"], headers
    assert server.call("POST", "/api/dead/purge", purge, Authorization=bearer)[0] == 200
    assert server.redis.llen(Keys("q1").dead) == 0


def test_a_listed_host_name_is_an_origin_of_ours(web: Callable[..., Server]) -> None:
    """Behind a proxy the browser's origin is the proxy's name: listed, it is ours."""
    server = web(dashboard_token=TOKEN, dashboard_hosts=["status.example.com"])
    form = f"token={TOKEN}".encode()
    ok = server.call("POST", "/login", form, Host="status.example.com",
                     Origin="https://status.example.com")  # fmt: skip
    assert ok[0] == 303
    assert server.call("POST", "/login", form, Origin="https://other.example.com")[0] == 403
    # A browser that says the post came from its own page (the proxy's origin): trusted,
    # since no page can set that header; an old browser's `Origin` alone must be ours.
    proxied = server.call("POST", "/login", form, Origin="https://proxy.example.net",
                          Sec_Fetch_Site="same-origin")  # fmt: skip
    assert proxied[0] == 303


def test_guesses_from_many_addresses_share_one_bound(
    web: Callable[..., Server], caplog: pytest.LogCaptureFixture
) -> None:
    """Rotating source addresses over 127/8 used to give 5 guesses per address: 5,000 in
    5 s. All addresses together now get `GLOBAL_BURST` and then 1 every `GLOBAL_REFILL`
    seconds; and the refusals are logged as a few summary lines, not one line each."""
    server = web(dashboard_token=TOKEN)
    caplog.set_level(logging.WARNING, logger="rqworkers.ops.web")
    started = time.monotonic()
    statuses = [_from(server, f"127.0.{2 + n // 250}.{n % 250}", "POST", "/login",
                      b"token=wrong-wrong-wrong") for n in range(300)]  # fmt: skip
    elapsed = time.monotonic() - started
    answered = len(statuses) - statuses.count(429)
    assert set(statuses) <= {403, 429}
    assert answered <= auth.GLOBAL_BURST + elapsed / auth.GLOBAL_REFILL + 1, (answered, elapsed)
    lines = [r.getMessage() for r in caplog.records if "refused a login" in r.getMessage()]
    assert 1 <= len(lines) <= 1 + elapsed / auth.LOG_EVERY + 1, lines


def test_the_global_bucket_refills_and_refused_logins_are_summarised(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    now = [0.0]
    throttle = auth.Throttle(clock=lambda: now[0])
    passed = sum(throttle.attempt(f"10.1.{n // 250}.{n % 250}") == 0 for n in range(1000))
    assert passed == auth.GLOBAL_BURST  # a thousand addresses, one shared bound
    assert throttle.attempt("10.9.9.9") == pytest.approx(auth.GLOBAL_REFILL)
    now[0] += auth.GLOBAL_REFILL
    assert throttle.attempt("10.9.9.9") == 0 and throttle.attempt("10.9.9.8") > 0
    throttle.refund("10.9.9.9")  # a right token gives its guess back to everyone too
    assert throttle.attempt("10.9.9.8") == 0
    assert len(throttle._buckets) <= auth.GLOBAL_BURST + 3  # only the charged are kept

    quiet = auth.QuietLog(clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="rqworkers.ops.web")
    for n in range(500):
        quiet.note("a login", f"10.2.0.{n % 7}", "wrong token")
    now[0] += auth.LOG_EVERY
    quiet.note("a login", "10.2.0.9", "wrong token")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "and 499 more refused from 7 address(es)" in lines[1]


def test_hostile_bodies_get_a_400_never_a_traceback(
    web: Callable[..., Server], capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    server = web(dashboard_token=TOKEN)
    dead_letter(server.redis, "q1", b"poison", "boom")
    key = letter_key(b"poison")
    bearer = {"Authorization": f"Bearer {TOKEN}", "Content_Type": "application/json"}
    bodies = [
        b"[" * 30_000 + b"]" * 30_000,
        b'{"queue": "q1", "letters": ' + b"[" * 30_000 + b"]" * 30_000 + b"}",
        b'{"queue": "q1", "letters": [{"index": 1e400, "key": "%s"}]}' % key.encode(),
        b'{"queue": "q1", "letters": [{"index": NaN, "key": "x"}]}',
        b'{"queue": "q1", "letters": [{"index": ' + b"9" * 5000 + b', "key": "x"}]}',
        b'{"queue": "q1", "letters": [{"index": "0", "key": "%s"}]}' % key.encode(),
        b'{"queue": "q1", "letters": [{"index": true, "key": "%s"}]}' % key.encode(),
        b'{"queue": "q1", "letters": [{"index": 0, "key": 7}]}',
        b'{"queue": ["q1"], "letters": [{"index": 0, "key": "x"}]}',
        b'{"queue": "q1", "letters": {"index": 0}}',
        b'["letters"]',
        b"\xff\xfe\x00",
    ]
    for body in bodies:
        status, _, reply = server.call("POST", "/api/dead/purge", body, **bearer)
        assert status in (400, 404), (body[:60], status, reply)
        assert b"error" in reply
    assert server.redis.llen(Keys("q1").dead) == 1
    assert "Traceback" not in capfd.readouterr().err
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_error_pages_carry_the_security_headers(web: Callable[..., Server]) -> None:
    server = web()
    host = f"Host: 127.0.0.1:{server.port}\r\n"
    requests = {
        "501": f"HEAD / HTTP/1.0\r\n{host}\r\n",
        "501 ": f"BREW /api/status HTTP/1.0\r\n{host}\r\n",
        "400": "GET / x HTTP/1.0\r\n\r\n",
        "414": "GET /" + "a" * 70_000 + " HTTP/1.0\r\n\r\n",
        "431": f"GET / HTTP/1.0\r\n{host}X-Big: {'b' * 70_000}\r\n\r\n",
        "431 ": f"GET / HTTP/1.0\r\n{host}" + "X-N: 1\r\n" * 200 + "\r\n",
        "501  ": f"POST /login HTTP/1.1\r\n{host}Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "404": f"GET /nothing HTTP/1.0\r\n{host}\r\n",
    }
    for code, request in requests.items():
        answer = _raw(server.port, request.encode())
        head = answer.split(b"\r\n\r\n")[0].decode()
        assert head.split()[1] == code.strip(), (code, head[:200])
        assert f"Content-Security-Policy: {CSP}" in head, code
        assert "X-Frame-Options: DENY" in head and "X-Content-Type-Options: nosniff" in head


def test_idle_slow_and_surplus_connections_are_bounded(
    web: Callable[..., Server], monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    monkeypatch.setattr(web_server, "IDLE_SECONDS", 1.0)
    monkeypatch.setattr(web_server.Handler, "timeout", 1.0)
    monkeypatch.setattr(web_server, "REQUEST_SECONDS", 2.0)
    server = web()
    threads = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(100)]
    try:
        # 100 silent connections: at most MAX_CONNECTIONS threads; the others get a 503.
        wait_for(lambda: threading.active_count() - threads >= web_server.MAX_CONNECTIONS,
                 timeout=10, what="the server to take its share")  # fmt: skip
        assert threading.active_count() - threads <= web_server.MAX_CONNECTIONS
        refused = 0
        for sock in idle[web_server.MAX_CONNECTIONS :]:
            sock.settimeout(5)
            refused += sock.recv(100).startswith(b"HTTP/1.0 503")
        assert refused == 100 - web_server.MAX_CONNECTIONS
        # The silent ones are dropped after IDLE_SECONDS; then the page answers again.
        started = time.monotonic()
        for sock in idle[: web_server.MAX_CONNECTIONS]:
            sock.settimeout(5)
            assert sock.recv(100) == b""  # closed by the server
        assert time.monotonic() - started < 4
        wait_for(lambda: server.call("GET", "/api/status")[0] == 200, timeout=5,
                 what="the page to answer again")  # fmt: skip
    finally:
        for sock in idle:
            sock.close()

    # Slowloris: a byte every half second keeps under the idle timeout, not the deadline.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as slow:
        slow.sendall(b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        started = time.monotonic()
        with pytest.raises(OSError):
            while time.monotonic() - started < 8:
                slow.sendall(b"a")
                time.sleep(0.5)  # the attack's own pace, not a wait for a condition
        assert time.monotonic() - started < 4

    # Clients that go away early: a body cut short by a reset, a reply nobody reads.
    for path, body in [("/api/dead/purge", b"x" * 10), ("/static/app.js", b"")]:
        for _ in range(5):
            sock = socket.create_connection(("127.0.0.1", server.port))
            head = f"POST {path} HTTP/1.0\r\nHost: 127.0.0.1:{server.port}\r\n"
            head += f"Content-Length: {1000 if body else 0}\r\n\r\n"
            sock.sendall(head.encode() + body)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # a reset, not a goodbye
    # Huge headers: cut off at MAX_REQUEST_BYTES, not buffered up to 6.4 MB.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as huge:
        huge.sendall(b"GET /api/status HTTP/1.0\r\n")
        with pytest.raises(OSError):  # reset before the 100 lines http.server would take
            for _ in range(100):
                huge.sendall(b"X-Big: " + b"b" * 60_000 + b"\r\n")
    assert server.call("GET", "/api/status")[0] == 200
    assert "Traceback" not in capfd.readouterr().err
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# -- issue 19: flow control on the page ---------------------------------------------------


def test_status_says_what_each_limit_holds_back(web: Callable[..., Server]) -> None:
    """`/api/status` carries each queue's pause and limits, how much of each is in use, the
    messages held back and by what: all the page needs to make a limit plain."""
    server = web(limits={"q1": {"max_running": 2, "rate_limit": "10/s"},
                         "q2": {"rate_limit": "3/m"}})  # fmt: skip
    client = server.redis
    client.lpush("q1", b"a", b"b", b"c")
    client.hset(Keys("q1").permits, mapping={"web-1:1": 1, "web-2:1": 1})  # 2 of 2 in use
    now_ms = int(time.time() * 1000)
    client.zadd(Keys("q1").starts, {"s1": now_ms - 500, "s2": now_ms, "old": now_ms - 5000})
    client.zadd(Keys("q2").starts, {f"s{n}": now_ms - n * 1000 for n in range(3)})  # 3 of 3
    client.lpush("q2", b"d")
    client.lpush("q3", b"e")
    snapshots = {p["queue"]: p["snapshot"] for p in server.json("/api/status")}
    assert snapshots["q1"]["flow"] == {
        "paused": None,
        "running": 2,
        "max_running": 2,
        "started": 2,
        "rate_limit": "10/s",
        "rate_starts": 10,
        "groups": [],
        "grouped_waiting": 0,
        "groups_full": False,
        "groups_held_by": [],
        "group_max_running": 0,
        "group_rate_limit": "",
        "held_by": ["max_running"],
    }
    assert snapshots["q1"]["held_back"] == 3
    assert snapshots["q2"]["flow"]["held_by"] == ["rate_limit"]
    assert snapshots["q2"]["flow"]["started"] == 3 and snapshots["q2"]["held_back"] == 1
    assert snapshots["q3"]["flow"]["held_by"] == [] and snapshots["q3"]["held_back"] == 0
    client.hset(Keys("q1").permits, "web-2:1", 0)  # a permit given back: nothing held
    server.site.status_reads.forget()  # type: ignore[union-attr]
    q1 = next(p for p in server.json("/api/status") if p["queue"] == "q1")["snapshot"]
    assert q1["flow"]["held_by"] == [] and q1["held_back"] == 0


def test_pause_and_resume_from_the_page_need_the_token(
    web: Callable[..., Server], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="rqworkers.ops.web")
    client = web().redis  # no token: read-only
    for path in ("/api/pause", "/api/resume"):
        status, _, reply = web().call("POST", path, {"queue": "q1"},
                                      Authorization=f"Bearer {TOKEN}")  # fmt: skip
        assert status == 403 and b"read-only" in reply
    server = web(dashboard_token=TOKEN)
    body = {"queue": "q1"}
    assert server.call("POST", "/api/pause", body)[0] == 403  # nobody
    assert "refused POST /api/pause from 127.0.0.1: no valid token" in caplog.text
    _, headers, _ = server.call("POST", "/login", f"token={TOKEN}".encode())
    session = headers["Set-Cookie"].split(";")[0]
    assert server.call("POST", "/api/pause", body, Cookie=session)[0] == 403  # no CSRF token
    foreign = {"Authorization": f"Bearer {TOKEN}", "Origin": "http://attacker.test"}
    assert server.call("POST", "/api/pause", body, **foreign)[0] == 403
    csrf = server.json("/api/session", Cookie=session)["csrf"]
    as_page = {"Cookie": session, "X_CSRF_Token": csrf}
    as_form = json.dumps(body).encode()  # what a form of another site could send
    status, _, _ = server.call("POST", "/api/pause", as_form, Content_Type="text/plain", **as_page)
    assert status == 415
    assert client.get(Keys("q1").paused) is None

    status, _, reply = server.call("POST", "/api/pause", body, **as_page)
    assert status == 200
    host = server.json("/api/status")[0]["host"]  # as the page names it
    assert json.loads(reply) == {"action": "pause", "host": host, "queue": "q1", "done": True}
    record = json.loads(client.get(Keys("q1").paused) or b"{}")
    assert record["by"] == "the status page (127.0.0.1)" and record["at"] > time.time() - 10
    paused = next(p for p in server.json("/api/status") if p["queue"] == "q1")  # at once
    assert paused["snapshot"]["flow"]["paused"] == record
    assert json.loads(server.call("POST", "/api/pause", body, **as_page)[2])["done"] is False
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    status, _, reply = server.call("POST", "/api/resume", {"queue": "q1", "host": host}, **bearer)
    assert status == 200 and json.loads(reply)["done"] is True
    assert client.get(Keys("q1").paused) is None and client.llen(Keys("q1").wake) > 0
    assert json.loads(server.call("POST", "/api/resume", body, **bearer)[2])["done"] is False
    assert "dashboard: pause of q1 on redis://" in caplog.text
    assert TOKEN not in caplog.text


def test_a_bad_pause_request_is_a_400_or_404_and_pauses_nothing(
    web: Callable[..., Server], capfd: pytest.CaptureFixture[str]
) -> None:
    server = web(dashboard_token=TOKEN)
    bearer = {"Authorization": f"Bearer {TOKEN}", "Content_Type": "application/json"}
    bad = [b"", b"not json", b"[]", b'"q1"', b"{}", b'{"queue": 7}', b'{"queue": ["q1"]}',
           b'{"queue": "q1", "host": ["x"]}', b'{"queue": "q1", "host": 7}',
           b'{"queue": {"$ne": 1}}', b"[" * 30_000 + b"]" * 30_000]  # fmt: skip
    for body in bad:
        status, _, reply = server.call("POST", "/api/pause", body, **bearer)
        assert status == 400 and b"error" in reply, (body[:40], status, reply)
    for body in (b'{"queue": "nope"}', b'{"queue": "q1", "host": "redis://elsewhere:6379/0"}',
                 b'{"queue": "q1:paused"}'):  # fmt: skip
        status, _, reply = server.call("POST", "/api/pause", body, **bearer)
        assert status == 404 and b"no queue" in reply, body
    assert server.call("GET", "/api/pause")[0] == 405
    assert not server.redis.keys("*paused*")
    assert "Traceback" not in capfd.readouterr().err


def test_a_pause_record_written_by_hand_cannot_break_the_page_or_status(
    web: Callable[..., Server],
) -> None:
    """The pause is a key any Redis client can write: whatever it holds, the queue shows
    as paused, `/api/status` stays JSON a browser parses (no `NaN`), and `status` prints."""
    server = web()
    assert server.site is not None
    records = [b'{"by": "x", "at": NaN}', b'{"by": "x", "at": 1e300}', b'{"by": "x", "at": -1}',
               b'{"by": ["x"], "at": "noon"}', b'{"by": "x", "at": Infinity}', b"[1]",
               b"\xff\xfe", b"", b'{"by": "<b>x</b>", "at": 1765000000.5}']  # fmt: skip
    for record in records:
        server.redis.set(Keys("q1").paused, record)
        server.site.status_reads.forget()
        status, _, raw = server.call("GET", "/api/status")
        assert status == 200
        pairs = json.loads(raw, parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
        paused = pairs[0]["snapshot"]["flow"]["paused"]
        assert paused is not None and pairs[0]["snapshot"]["flow"]["held_by"] == ["paused"]
        assert isinstance(paused["by"], str), record
        assert paused["at"] is None or 0 <= paused["at"] < 1e11, record
        assert "PAUSED by " in status_report.as_text(status_report.collect(server.site.config))
    assert paused == {"by": "<b>x</b>", "at": 1765000000.5}
    # A worker's lease, as well: its value is published status, any client's to write.
    lease = b'{"name": "q1-1", "at": NaN, "rss": Infinity, "since": [-Infinity]}'
    server.redis.sadd(Keys("q1").registry, "web-1:1")
    server.redis.set(Keys("q1", "web-1:1").lease, lease)
    server.site.status_reads.forget()
    [worker] = json.loads(server.call("GET", "/api/status")[2],
                          parse_constant=lambda name: pytest.fail(f"{name} in JSON")
                          )[0]["snapshot"]["workers"]  # fmt: skip
    assert (worker["name"], worker["at"], worker["rss"], worker["since"]) == ("q1-1", None, None,
                                                                               [None])  # fmt: skip
