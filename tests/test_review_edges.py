"""A hostile review of issue 17 (security at the edges): what a producer, a page visitor
and the operator's own config can make the service do, tried where the earlier tests did
not look. Each test says which promise it holds the service to.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlencode

import pytest

from rqworkers import Producer
from rqworkers.client.tasks import ReplyKeys
from rqworkers.common.globs import Glob
from rqworkers.config import load
from rqworkers.errors import ConfigError
from rqworkers.ops.web.auth import COOKIE
from rqworkers.ops.web.site import letter_key
from rqworkers.store.keys import DEDUP, REPLIES, Keys
from tests.support import (
    APPS,
    RedisServer,
    Service,
    dead_info,
    internal_tracebacks,
    task_pair,
    wait_for,
    write_config,
)
from tests.test_reply_security import reply_of
from tests.test_web import TOKEN, Server, dead_letter, web  # noqa: F401 - `web` is a fixture


@pytest.fixture(autouse=True)
def apps_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(APPS))


# --- reply_keys and the queues the config schedules into --------------------------------


def test_reply_keys_that_could_reach_a_scheduled_queue_are_refused(tmp_path: Path) -> None:
    """`check` promises that `reply_keys` reach no configured queue's keys. A queue that
    `[[schedules]]` pushes into is configured too, even when another fleet consumes it:
    a glob reaching it let any producer push into it, or empty it (`result_ttl` 0.001
    expires it), through the worker's rights."""
    path = write_config(
        tmp_path / "rq.toml",
        "redis://127.0.0.1:1/0",
        [task_pair(reply_keys=["results:*", "bill*"])],
        schedules=[{"name": "nightly", "host": "local", "queue": "billing", "every": 60,
                    "payload": "run"}],
    )  # fmt: skip
    with pytest.raises(ConfigError) as info:
        load(path, environ={})
    (line,) = info.value.render().splitlines()
    assert line.startswith(f"{path}: workers[0].reply_keys[1]: 'bill*' could match keys of ")
    assert "'billing' (schedule 'nightly' pushes there)" in line


def test_reply_keys_beside_a_scheduled_queue_they_cannot_reach_pass(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "rq.toml",
        "redis://127.0.0.1:1/0",
        [task_pair(reply_keys=["results:*", "tasks:replies:done:*"])],
        schedules=[{"name": "nightly", "host": "local", "queue": "billing", "every": 60,
                    "payload": "run"},
                   {"name": "own", "host": "local", "queue": "tasks", "every": 60,
                    "task": "taskapp:add", "args": [1, 2]}],
    )  # fmt: skip
    assert load(path, environ={}).pairs[0].reply_keys == ("results:*", "tasks:replies:done:*")


# --- reply_to against every key the service owns ----------------------------------------


def test_no_key_of_a_queue_but_its_replies_can_be_a_reply_to() -> None:
    """Every key declared in store/keys.py, for this queue and for a queue whose name
    starts like it, with glob and Cluster hash-tag characters: only `<queue>:replies:*`
    passes, and what the operator's (checked) `reply_keys` add. (A queue named
    `<queue>:replies...` on the same host is refused by the config.)"""
    for queue in ("tasks", "{tasks}", "t*[a]?"):
        keys = Keys(queue, "node:1", "p1")
        replies = ReplyKeys(queue, ["results:*"])
        owned = [*keys.names().values(), keys.fast_0, keys.fast_1,
                 DEDUP.of(queue).replace("<key>", "k"), keys.group_list + "g"]  # fmt: skip
        owned += Keys(f"{queue}x", "node:1").names().values()  # a look-alike queue's
        for key in owned:
            assert replies.refusal(key), key
        for key in (REPLIES.of(queue).replace("<id>", "x"), f"{queue}:replies:", "results:1"):
            assert replies.refusal(key) is None, key
        for key in ("", "\udc80", f"{queue}:replies:\ud800"):  # empty, not UTF-8
            assert replies.refusal(key), repr(key)


# --- the page's token ---------------------------------------------------------------------


@pytest.mark.parametrize("written", [f"{TOKEN} \n", f"{TOKEN}\t\r\n", f"  {TOKEN}\n\n"])
def test_a_token_file_with_blanks_around_the_token_works_as_the_token(
    web: Callable[..., Server],  # noqa: F811 - the fixture imported above
    tmp_path: Path,
    written: str,
) -> None:
    """`check` accepts a token file with blanks around the token (it measures the token
    without them: `echo "$TOKEN " > file` and an editor's trailing tab are common), so
    the token must then work: a bearer header cannot carry outer blanks, and no one types
    them into the login form. Before, the page refused every action with a 403 that said
    "wrong token", while the log said nothing was wrong."""
    secret = tmp_path / "token"
    secret.write_text(written)
    server = web(dashboard_token_file=str(secret))
    dead_letter(server.redis, "q1", b"poison", "boom")
    purge = {"queue": "q1", "letters": [{"index": 0, "key": letter_key(b"poison")}]}
    status, _, _ = server.call("POST", "/api/dead/purge", purge, Authorization=f"Bearer {TOKEN}")
    assert status == 200 and server.redis.llen(Keys("q1").dead) == 0
    status, headers, _ = server.call("POST", "/login", urlencode({"token": TOKEN}).encode())
    assert status == 303 and COOKIE in headers.get("Set-Cookie", "")
    # Blanks are not a way around the minimum: 15 characters and blanks stay refused.
    secret.write_text(f"  {TOKEN[:15]}  \n")
    assert server.json("/api/session")["actions"] is False


# --- what a schedule pushes into ----------------------------------------------------------


@pytest.mark.parametrize("queue", ["tasks:dead", "tasks:replies:x", "tasks:processing:n:1"])
def test_a_schedule_into_a_key_of_a_configured_queue_is_refused(tmp_path: Path, queue: str) -> None:
    """The collision rule refuses a queue `jobs:dead` beside `jobs`, since it would take
    `jobs`'s dead letters. A schedule is the other end of the same mistake: each fire
    into `tasks:dead` fed the dead list, into `tasks:replies:x` forged a reply, into a
    private list ran a message twice. Refused, naming the field."""
    schedules = [{"name": "own", "host": "local", "queue": "tasks", "every": 60,
                  "payload": "fine"},
                 {"name": "bad", "host": "local", "queue": queue, "every": 60,
                  "payload": "x"}]  # fmt: skip
    path = write_config(tmp_path / "rq.toml", "redis://127.0.0.1:1/0", [task_pair()],
                        schedules=schedules)  # fmt: skip
    with pytest.raises(ConfigError) as info:
        load(path, environ={})
    (line,) = info.value.render().splitlines()
    assert line == (
        f"{path}: schedules[1].queue: {queue!r} could be a key of queue 'tasks' "
        "(workers[0]) on the same host: every key tasks:... belongs to that queue; "
        "push into the queue itself"
    )


# --- the page's paths ---------------------------------------------------------------------


def test_no_path_reaches_a_file_beside_the_page_s_own(
    web: Callable[..., Server],  # noqa: F811 - the fixture imported above
) -> None:
    """The page serves four named assets, never a path joined onto a folder: traversal,
    encoded or not, doubled slashes and a trailing slash get 404 (`//x` is read as `/x`),
    and a method the page lacks gets an answer with the security headers, never a file or
    a traceback."""
    server = web()
    for path in ["/static/../site.py", "/static/..%2fsite.py", "/static/%2e%2e/auth.py",
                 "/static/app.js/", "/static/app.js%00.py", "//etc/passwd",
                 "/static//app.js", "/static/./app.js", "/static/APP.JS",
                 "/static/app.js/../../../../etc/passwd"]:  # fmt: skip
        status, headers, body = server.call("GET", path)
        assert status == 404 and b"import" not in body, path
        assert headers["X-Content-Type-Options"] == "nosniff", path
    for method in ("PUT", "DELETE", "OPTIONS", "HEAD", "PATCH"):
        status, headers, _ = server.call(method, "/api/dead?queue=q1")
        assert status in (405, 501) and "Content-Security-Policy" in headers, method
    assert server.call("GET", "/static/app.js")[0] == 200


# --- task messages against the real service ----------------------------------------------


@pytest.mark.service
def test_hostile_task_fields_are_refused_at_once_and_odd_reply_keys_are_one_key(
    service: Callable[..., Service], redis_server: RedisServer
) -> None:
    """Fields a hostile producer can spell in ways the first tests did not: a field given
    twice (every JSON parser here reads the last; the check and the write must agree),
    `reply_to` of every JSON type, a lone surrogate, a callback that is a name the module
    imported. Each is refused before anything runs, with one attempt. And a `reply_to`
    inside the namespace is one key however it is spelled: glob characters, a Cluster
    hash tag, 64 KiB of it."""
    client = redis_server.client()
    client.lpush("victim", b"waiting")
    svc = service([task_pair(max_attempts=3)])
    hostile = [
        b'{"task": "taskapp:sleep", "args": [0, "dup"], "reply_to": "tasks:replies:ok",'
        b' "reply_to": "victim", "result_ttl": 0.001}',
        b'{"task": "taskapp:sleep", "task": "taskapp:system", "args": ["true"]}',
        b'{"task": "taskapp:sleep", "args": [0, "cb"], "on_success": "taskapp:system"}',
        b'{"task": "taskapp:sleep", "args": [0, "sur"], "reply_to": "tasks:replies:\\ud800"}',
        *(b'{"task": "taskapp:sleep", "args": [0, "t"], "reply_to": %s}' % value
          for value in (b"5", b"[]", b"{}", b"true", b'""', b'"victim"')),
    ]  # fmt: skip
    long_key = "tasks:replies:" + "x" * 65536
    odd = ["tasks:replies:*", "tasks:replies:{victim}", "tasks:replies:[a-z]?", long_key]
    valid = [json.dumps({"task": "taskapp:add", "args": [n, 1], "reply_to": key}).encode()
             for n, key in enumerate(odd)]  # fmt: skip
    Producer(redis_server.url).push("tasks", *hostile, *valid)
    for n, key in enumerate(odd):
        assert reply_of(redis_server, key)["result"] == n + 1, key[:40]
    dead = Keys("tasks").dead
    wait_for(lambda: client.llen(dead) == len(hostile), timeout=15, what="dead letters")
    for message in hostile:
        info = dead_info(redis_server, "tasks", message)
        reason = str(info["reason"])
        refused = ("task message", "reply keys", "not a function")
        assert info["attempts"] == 1 and any(r in reason for r in refused), (message, info)
    assert client.lrange("sleep:started", 0, -1) == [], "no hostile task ran"
    assert client.lrange("victim", 0, -1) == [b"waiting"] and client.pttl("victim") == -1
    assert sorted(k for k in client.scan_iter("tasks:replies:*")) == [], "each read once"
    assert internal_tracebacks(svc.output()) == []


def test_a_hostile_cookie_costs_the_keeper_no_more_than_its_length(
    web: Callable[..., Server],  # noqa: F811 - the fixture imported above
) -> None:
    """Any visitor may send a `Cookie` header, and the page reads it on every request that
    asks who is calling (`/api/session` at least). The keeper serves the page in the
    process that renews the leases, so seconds of CPU per request there are no longer only
    the page's problem. The standard library's `SimpleCookie` takes time quadratic in
    backslashes inside a quoted value on the Pythons before 3.11.10 and 3.12.6
    (CVE-2024-7592): 60 KiB of them took 6 s here. The session cookie is read as what
    it is: a name, `=`, and a value with no quotes."""
    server = web(dashboard_token=TOKEN)
    for hostile in ('rqworkers_session="' + "\\" * 60_000 + '"', 'a="' + "\\1" * 30_000 + '"'):
        began = time.monotonic()
        status, _, body = server.call("GET", "/api/session", Cookie=hostile)
        took = time.monotonic() - began
        assert status == 200 and json.loads(body)["authenticated"] is False
        assert took < 0.5, f"{took:.2f}s for a {len(hostile)}-byte cookie"
    # The real cookie still works, among others, in any order and spacing.
    status, headers, _ = server.call("POST", "/login", urlencode({"token": TOKEN}).encode())
    session = headers["Set-Cookie"].split(";")[0]
    for cookie in (session, f"theme=dark; {session}", f'a=1;{session} ; b="x"'):
        assert server.json("/api/session", Cookie=cookie)["authenticated"] is True, cookie
    forged = session[:-1] + ("0" if session[-1] != "0" else "1")
    assert server.json("/api/session", Cookie=forged)["authenticated"] is False


# --- a huge reply_to against the operator's globs -----------------------------------------


def _reference(glob: Glob) -> re.Pattern[bytes]:
    """The glob as a plain backtracking regex: right, but slow on some keys."""
    parts = [b".*" if s is None else b"[" + b"".join(b"\\x%02x" % c for c in sorted(s)) + b"]"
             if s else b"(?!)" for s in glob.steps]  # fmt: skip
    return re.compile(b"".join(parts), re.DOTALL)


@pytest.mark.parametrize(
    "pattern", ["results:*:*:done", "r*s*t", "a*b*c*d", "*", "a?*[bc]*\\*", "[^a]*a*[]"]
)
def test_a_glob_matches_in_time_linear_in_the_key_and_as_before(pattern: str) -> None:
    """A worker matches every `reply_to` against the pair's `reply_keys` before it runs
    anything, in C code that holds the GIL, where no timeout reaches. A regex of `.*`s
    backtracks: `results:*:*:done` took 2.9 s on a 30 KB key and grows with its square,
    so a producer's 1 MB `reply_to` held a worker for most of an hour. Each `*` but the
    last now takes the first place its segment fits, and never tries another."""
    glob = Glob.parse(pattern)
    keys = ["".join(p) for n in range(6) for p in itertools.product("abcdr*:", repeat=n)]
    keys = [k for k in keys if len(k) < 5] + ["results:a:b:done", "results:::done", "rst"]
    for key in keys:
        assert glob.matches(key) == bool(_reference(glob).fullmatch(key.encode())), key
    for hostile in ("results:" + ":" * 1_000_000, "r" + "s" * 1_000_000, "a" + "b" * 10**6):
        began = time.monotonic()
        glob.matches(hostile)
        assert time.monotonic() - began < 0.5, (pattern, hostile[:12])


@pytest.mark.service
def test_a_huge_reply_to_cannot_hold_a_worker(
    service: Callable[..., Service], redis_server: RedisServer
) -> None:
    svc = service([task_pair(reply_keys=["results:*:*:done"])])
    hostile = json.dumps({"task": "taskapp:add", "args": [1, 2],
                          "reply_to": "results:" + ":" * 200_000}).encode()  # fmt: skip
    after = json.dumps({"task": "taskapp:add", "args": [2, 2], "reply_to": "results:a:b:done"})
    Producer(redis_server.url).push("tasks", hostile, after.encode())
    assert reply_of(redis_server, "results:a:b:done", timeout=8)["result"] == 4
    info = dead_info(redis_server, "tasks", hostile)
    assert info["attempts"] == 1 and "reply keys" in str(info["reason"])
    assert internal_tracebacks(svc.output()) == []
