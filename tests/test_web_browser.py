"""The status page in a real headless Chromium, against `rqworkers run` on two nodes and a
real redis-server: counts, live workers, an escaped `<script>` dead letter, requeue.

Skipped only where no Chromium is installed (`.ci/run` installs Debian's).
"""

from __future__ import annotations

import datetime
import json
import re
import signal
import urllib.request
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest
import redis

from rqworkers.store.keys import Keys
from rqworkers.store.queue import DeadLetters
from tests.browser import INSTALL, chromium, chromium_path
from tests.support import RedisServer, Service, free_port, wait_for

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

TOKEN = "browser-test-token-0123"
SCRIPT = b"raise:<script>alert(1)</script>"
IMAGE = b'raise:<img src=x onerror="alert(2)">\x00\xff'
HOSTILE = '<img src=x onerror="alert(3)">'  # a group's name, from a payload
WAIT_MS = 20_000  # every on-page condition: the page refreshes every 2 s, leases last 3 s


@pytest.fixture
def browser() -> Iterator[Browser]:
    path = chromium_path()
    if path is None:
        pytest.skip(f"no Chromium browser is installed here: {INSTALL}")
    with chromium(path) as launched:
        yield launched


def test_the_page_shows_the_service_live_and_acts_only_with_the_token(
    browser: Browser, service: Callable[..., Service], redis_server: RedisServer
) -> None:
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)
    port, down = free_port(), free_port()  # `down`: a host where nothing listens
    defaults = {"handler": "testapp:handle", "max_requests": 0}
    web1 = service(
        [
            {"queue": "orders", "processes": 2, "max_attempts": 3, "retry_delay": 300.0},
            {"queue": "slow"},
            {"queue": "mail", "max_attempts": 1},
            {"queue": "elsewhere", "host": f"redis://127.0.0.1:{down}/0"},
        ],
        manager=_manager("web-1", metrics_address=f"127.0.0.1:{port}", dashboard_token=TOKEN),
        defaults=defaults,
    )
    service([{"queue": "orders"}], manager=_manager("web-2"), defaults=defaults)
    client = redis_server.client()
    dialogs: list[str] = []
    page = browser.new_page()
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    wait_for(lambda: _answers(f"http://127.0.0.1:{port}/api/session"), timeout=15,
             what="the status page to be served")  # fmt: skip
    page.goto(f"http://127.0.0.1:{port}/")
    page.evaluate("window.notReloaded = true")

    # Workers of both nodes appear; the unreachable host is shown as such.
    for worker in ("web-1/orders-1", "web-1/orders-2", "web-1/slow-1", "web-1/mail-1",
                   "web-2/orders-1"):  # fmt: skip
        expect(page.locator(f'#workers tr[data-worker="{worker}"]')).to_have_count(1)
    expect(page.locator('#queues tr[data-queue="elsewhere"]')).to_have_class("unreachable")
    expect(page.locator('#queues tr[data-queue="elsewhere"]')).to_contain_text("unreachable")

    # SIGTTIN: one more worker per pair appears; SIGTTOU: they disappear, in place.
    web1.signal(signal.SIGTTIN)
    for worker in ("web-1/orders-3", "web-1/slow-2", "web-1/mail-2"):
        expect(page.locator(f'#workers tr[data-worker="{worker}"]')).to_have_count(1)
    web1.signal(signal.SIGTTOU)
    for worker in ("web-1/orders-3", "web-1/slow-2", "web-1/mail-2"):
        expect(page.locator(f'#workers tr[data-worker="{worker}"]')).to_have_count(0)
    expect(page.locator("#workers tbody tr")).to_have_count(5)

    # A known state: the counts on the page are these.
    client.lpush("orders", b"raise:retry me later")
    client.lpush("slow", *[f"sleep:60:{n}".encode() for n in range(4)])
    client.lpush("mail", SCRIPT, IMAGE)
    expected = {
        "orders": {"waiting": 0, "in_flight": 0, "retrying": 1, "dead": 0},
        "slow": {"waiting": 3, "in_flight": 1, "retrying": 0, "dead": 0},
        "mail": {"waiting": 0, "in_flight": 0, "retrying": 0, "dead": 2},
    }
    for queue, counts in expected.items():
        for column, value in counts.items():
            cell = page.locator(f'#queues tr[data-queue="{queue}"] td.{column}')
            expect(cell).to_have_text(str(value))
    assert _redis_counts(client) == expected
    expect(page.locator('#workers tr[data-worker="web-1/slow-1"] td.state')).to_have_text("busy")

    # Dead letters: markup in a payload is text; nothing runs, no element is made from it.
    page.select_option("#dead-queue", value=f"{redis_server.url} mail")
    previews = page.locator("#dead td.preview")
    expect(previews).to_have_count(2)
    expect(previews.nth(0)).to_have_text(repr(IMAGE))  # newest first
    expect(previews.nth(1)).to_have_text(repr(SCRIPT))
    expect(page.locator("#dead td.reason").first).to_contain_text("ValueError: boom from testapp")
    assert page.locator("#dead script, #dead img").count() == 0
    assert dialogs == []

    # Without the token: no action on the page, and the API refuses with 403.
    expect(page.locator("#dead-actions")).to_be_hidden()
    key = page.locator("#dead tr[data-index='1'] input").get_attribute("data-key")
    refused = _post_json(page, "api/dead/requeue", {"queue": "mail", "letters": [
        {"index": 1, "key": key}]})  # fmt: skip
    assert refused == 403
    started = client.lrange("started", 0, -1)
    assert started.count(SCRIPT) == 1

    # With it: log in through the form, pick the `<script>` letter, requeue it. It runs
    # again (and, as it always fails, is dead-lettered again).
    page.fill("#login input[name=token]", TOKEN)
    page.click("#login button")
    expect(page.locator("#logout")).to_be_visible()
    expect(page.locator("#dead-actions")).to_be_visible()
    assert TOKEN not in page.content()
    page.check("#dead tr[data-index='1'] input")
    page.click("#requeue")
    expect(page.locator("#dead-message")).to_have_text("requeued 1 of 1")
    wait_for(lambda: client.lrange("started", 0, -1).count(SCRIPT) == 2, timeout=10,
             what="the requeued dead letter to run again")  # fmt: skip
    assert page.evaluate("document.cookie") == ""  # HttpOnly: no script can read the session
    # A logged-in browser still cannot be made to act without the page's CSRF token.
    assert _post_json(page, "api/dead/purge", {"queue": "mail", "letters": [
        {"index": 0, "key": key}]}) == 403  # fmt: skip
    assert client.llen(Keys("mail").dead) == 2
    assert dialogs == [] and page.evaluate("window.notReloaded") is True


def test_one_name_one_clock_one_count_and_a_chart_at_once(
    browser: Browser, service: Callable[..., Service], redis_server: RedisServer
) -> None:
    """Issue 18 §8, as a reviewer met it: a worker named one way in the workers table and
    another in the dead letters; a local clock beside UTC dead letters; an empty chart
    until the page's second refresh; a queue's dead count other than its pager's."""
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)
    port = _page_with_a_dead_letter(service, redis_server, b"raise:poison")
    client = redis_server.client()

    def history() -> list[dict[str, float]]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/history", timeout=5) as r:
            return list(json.load(r)["points"])

    wait_for(history, timeout=20, what="the server's first point")  # the worker seen
    client.lpush("mail", *[f"ok:{n}".encode() for n in range(20)])
    wait_for(lambda: any(p["ok"] > 0 for p in history()), timeout=20,
             what="the server's history to show the work")  # fmt: skip
    # Far from UTC, so that a local clock cannot pass for a UTC one.
    page = browser.new_context(timezone_id="Pacific/Kiritimati").new_page()
    injected: list[int] = []

    def dead_letters_meanwhile(route: Any) -> None:
        # Two letters die between the page's status read and its dead-letter read.
        if not injected:
            injected.append(client.lpush(Keys("mail").dead, b"late 1", b"late 2"))
        route.continue_()

    page.route("**/api/dead?*", dead_letters_meanwhile)
    page.goto(f"http://127.0.0.1:{port}/")
    expect(page.locator("#refreshed")).to_contain_text("updated")
    # The first refresh already draws the past minutes (green: the succeeded line).
    drawn = page.evaluate("""() => {
        const canvas = document.getElementById("chart");
        const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
        let green = 0;
        for (let i = 0; i < data.length; i += 4) {
            if (data[i] === 0x22 && data[i + 1] === 0xaa && data[i + 2] === 0x77) green++;
        }
        return green;
    }""")
    assert drawn > 0, "the chart is empty on the first refresh"

    # One time zone, named: the clock is UTC, as the dead letters' times are.
    clock = page.locator("#refreshed").inner_text()
    assert re.fullmatch(r"updated \d\d:\d\d:\d\d UTC", clock), clock
    shown = datetime.datetime.strptime(clock.split()[1], "%H:%M:%S").time()
    now = datetime.datetime.now(datetime.UTC)
    gap = abs((now - now.replace(hour=shown.hour, minute=shown.minute, second=shown.second))
              .total_seconds())  # fmt: skip
    assert min(gap, 86400 - gap) < 30, (clock, now)
    poison = DeadLetters(client, "mail").get(2)
    assert poison is not None and poison.info is not None and poison.payload == b"raise:poison"
    at = datetime.datetime.fromtimestamp(float(poison.info["at"]), datetime.UTC)
    expect(page.locator("#dead tr[data-index='2'] td.at")).to_have_text(
        at.strftime("%Y-%m-%d %H:%M:%S"))  # fmt: skip
    expect(page.locator("#dead thead")).to_contain_text("time (UTC)")

    # One count: the pager's total is the queue's dead count, though two letters died
    # between the two reads.
    expect(page.locator("#dead-count")).to_contain_text("of 3")
    counts = page.evaluate("""() => [
        document.querySelector('#queues tr[data-queue="mail"] td.dead').textContent,
        document.getElementById("dead-count").textContent]""")
    assert counts[0] == "3" and "of 3" in counts[1], counts

    # One name: the worker that dead-lettered `poison` as the workers table shows it.
    letter = page.locator("#dead tr[data-index='2']")
    expect(letter.locator("td.worker")).to_have_text("mail-1")
    expect(letter.locator("td.node")).to_have_text("web-1")
    worker = page.locator('#workers tr[data-worker="web-1/mail-1"]')
    expect(worker.locator("td.name")).to_have_text("mail-1")
    expect(worker.locator("td.node")).to_have_text("web-1")
    assert injected


def _manager(node: str, **extra: Any) -> dict[str, Any]:
    return {"node": node, "check_interval": 0.2, "shutdown_timeout": 5.0, "lease_ttl": 3.0,
            **extra}  # fmt: skip


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _page_with_a_dead_letter(
    service: Callable[..., Service], redis_server: RedisServer, payload: bytes, **manager: Any
) -> int:
    """The port of a served status page (with the token) whose queue `mail` holds one
    dead letter, made by `payload` (a `raise:...` of testapp)."""
    port = free_port()
    service([{"queue": "mail", "max_attempts": 1}],
            manager=_manager("web-1", metrics_address=f"127.0.0.1:{port}",
                             dashboard_token=TOKEN, **manager),
            defaults={"handler": "testapp:handle"})  # fmt: skip
    client = redis_server.client()
    client.lpush("mail", payload)
    wait_for(lambda: client.llen(Keys("mail").dead) == 1, timeout=15, what="a dead letter")
    wait_for(lambda: _answers(f"http://127.0.0.1:{port}/api/session"), timeout=15,
             what="the status page to be served")  # fmt: skip
    return port


def _redis_counts(client: redis.Redis) -> dict[str, dict[str, int]]:
    counts = {}
    for queue in ("orders", "slow", "mail"):
        in_flight = sum(client.llen(key) for key in client.keys(Keys(queue, "*").processing))
        counts[queue] = {"waiting": client.llen(queue), "in_flight": in_flight,
                         "retrying": client.zcard(Keys(queue).retry),
                         "dead": client.llen(Keys(queue).dead)}  # fmt: skip
    return counts


def _post_json(page: Page, path: str, body: dict[str, Any]) -> int:
    """POST from the page itself, as a script on it (or a forged request) would."""
    return int(page.evaluate(
        """([path, body]) => fetch(path, {method: "POST", body,
               headers: {"Content-Type": "application/json"}}).then((r) => r.status)""",
        [path, json.dumps(body)],
    ))  # fmt: skip


EVIL = "evil.test"  # a name the hostile page owns; Chromium resolves it to 127.0.0.1
ATTACKER = "http://attacker.test"  # another site, served by the test itself
# Chromium's own guard against public pages reaching private addresses, switched off: the
# server must hold without it (other browsers have none, older Chromium neither).
NO_PNA = [
    "--disable-features=BlockInsecurePrivateNetworkRequests,LocalNetworkAccessChecks,"
    "PrivateNetworkAccessSendPreflights,PrivateNetworkAccessRespectPreflightResults"
]


def test_a_page_of_another_origin_can_neither_read_nor_log_out(
    service: Callable[..., Service], redis_server: RedisServer
) -> None:
    """DNS rebinding: a page of evil.test whose name now points at 127.0.0.1 reads
    `/api/dead` as its own origin unless the server refuses names not its own. And a form
    of another site posting to `/logout` must not end the operator's session."""
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)
    path = chromium_path()
    if path is None:
        pytest.skip(f"no Chromium browser is installed here: {INSTALL}")
    port = _page_with_a_dead_letter(service, redis_server, b"raise:card 4111-1111-1111-1111")
    read = """(path) => fetch(path).then(async (r) => [r.status, await r.text()])"""
    with chromium(path, [f"--host-resolver-rules=MAP {EVIL} 127.0.0.1", *NO_PNA]) as browser:
        context = browser.new_context()  # the operator's: one cookie jar for two tabs
        operator = context.new_page()
        operator.goto(f"http://127.0.0.1:{port}/")
        status, body = operator.evaluate(read, "api/dead?queue=mail")
        assert status == 200 and "4111" in body  # the operator's own page reads it

        hostile = browser.new_page()
        hostile.route(f"http://{EVIL}:{port}/attack",
                      lambda route: route.fulfill(content_type="text/html",
                                                  body="<p>nothing to see</p>"))  # fmt: skip
        hostile.goto(f"http://{EVIL}:{port}/attack")
        status, body = hostile.evaluate(read, "/api/dead?queue=mail")
        assert status == 421 and "4111" not in body
        response = hostile.goto(f"http://{EVIL}:{port}/")
        assert response is not None and response.status == 421

        # Logged in, the operator is not logged out by a form of another site.
        operator.fill("#login input[name=token]", TOKEN)
        operator.click("#login button")
        expect(operator.locator("#logout")).to_be_visible()
        form = (f'<form method="post" action="http://127.0.0.1:{port}/logout"></form>'
                "<script>document.forms[0].submit()</script>")  # fmt: skip
        attacker = context.new_page()
        attacker.route(f"{ATTACKER}/", lambda route: route.fulfill(content_type="text/html",
                                                                    body=form))  # fmt: skip
        attacker.goto(f"{ATTACKER}/")
        attacker.wait_for_url(f"http://127.0.0.1:{port}/**")  # the form was posted
        session = operator.evaluate("fetch('api/session').then((r) => r.json())")
        assert session["authenticated"] is True
        # The page's own button still logs out (it sends the CSRF token).
        operator.click("#logout button")
        expect(operator.locator("#login")).to_be_visible()
        session = operator.evaluate("fetch('api/session').then((r) => r.json())")
        assert session["authenticated"] is False


def test_private_dead_letters_show_only_after_login(
    browser: Browser, service: Callable[..., Service], redis_server: RedisServer
) -> None:
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)
    port = _page_with_a_dead_letter(
        service, redis_server, b"raise:private matter", dashboard_private=True
    )
    page = browser.new_page()
    page.goto(f"http://127.0.0.1:{port}/")
    expect(page.locator("#private")).to_be_visible()
    expect(page.locator("#dead-count")).to_contain_text("log in first")
    expect(page.locator('#queues tr[data-queue="mail"] td.dead')).to_have_text("1")
    assert "private matter" not in page.content()
    page.fill("#login input[name=token]", TOKEN)
    page.click("#login button")
    expect(page.locator("#private")).to_be_hidden()
    expect(page.locator("#dead td.preview")).to_have_text(repr(b"raise:private matter"))


def test_a_page_of_another_origin_cannot_lock_the_operator_out(
    service: Callable[..., Service], redis_server: RedisServer
) -> None:
    """Forms of another site posting wrong tokens to /login used to empty the throttle's
    bucket for 127.0.0.1, so the operator's own login got 429 afterwards. Chromium marks
    those posts (`Origin`, `Sec-Fetch-Site: cross-site`): refused before they are counted."""
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)
    path = chromium_path()
    if path is None:
        pytest.skip(f"no Chromium browser is installed here: {INSTALL}")
    port = free_port()
    service([{"queue": "mail"}],
            manager=_manager("web-1", metrics_address=f"127.0.0.1:{port}",
                             dashboard_token=TOKEN),
            defaults={"handler": "testapp:handle"})  # fmt: skip
    wait_for(lambda: _answers(f"http://127.0.0.1:{port}/api/session"), timeout=15,
             what="the status page to be served")  # fmt: skip
    frames = "".join(f'<iframe name="f{n}"></iframe><form target="f{n}" method="post" '
                     f'action="http://127.0.0.1:{port}/login"><input name="token" '
                     f'value="wrong-guess-{n}-wrong"></form>' for n in range(8))  # fmt: skip
    attack = frames + "<script>for (const f of document.forms) f.submit()</script>"
    with chromium(path, NO_PNA) as browser:
        attacker = browser.new_page()
        attacker.route(f"{ATTACKER}/", lambda route: route.fulfill(content_type="text/html",
                                                                    body=attack))  # fmt: skip
        posted: list[int] = []
        attacker.on("response", lambda r: posted.append(r.status) if "/login" in r.url else None)
        attacker.goto(f"{ATTACKER}/")
        wait_for(lambda: (attacker.wait_for_timeout(50), len(posted) == 8)[1], timeout=15,
                 what="the eight forms to be posted")  # fmt: skip
        assert posted == [403] * 8, posted
        operator = browser.new_page()
        operator.goto(f"http://127.0.0.1:{port}/")
        operator.fill("#login input[name=token]", TOKEN)
        operator.click("#login button")
        expect(operator.locator("#logout")).to_be_visible()


def test_a_limit_that_holds_a_queue_back_is_plain_and_pause_resume_act_from_the_page(
    browser: Browser, service: Callable[..., Service], redis_server: RedisServer
) -> None:
    """Issue 19: from the page alone, an operator sees which limit holds a queue back and
    how many messages wait on it, and pauses and resumes it (with the token only)."""
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)
    port = free_port()
    service([{"queue": "pay", "concurrency": 2, "max_running": 1},
             {"queue": "mail", "rate_limit": "1/h"},
             {"queue": "tenants", "handler": "testapp:measure_json", "concurrency": 2,
              "group_by": "kwargs.tenant", "group_max_running": 1}],
            manager=_manager("web-1", metrics_address=f"127.0.0.1:{port}",
                             dashboard_token=TOKEN),
            defaults={"handler": "testapp:handle"})  # fmt: skip
    client = redis_server.client()
    client.lpush("pay", *[f"sleep:30:{n}".encode() for n in range(3)])
    client.lpush("mail", b"sleep:0:first", b"sleep:0:second")
    tenants = [("acme", n) for n in range(3)] + [(HOSTILE, n) for n in range(2)]
    client.lpush("tenants", *[json.dumps({"kwargs": {"tenant": t}, "seconds": 30, "n": n})
                              for t, n in tenants])  # fmt: skip
    wait_for(lambda: _answers(f"http://127.0.0.1:{port}/api/session"), timeout=15,
             what="the status page to be served")  # fmt: skip
    page = browser.new_page()
    page.goto(f"http://127.0.0.1:{port}/")
    row = page.locator('#queues tr[data-queue="pay"]')
    line = page.locator(f'#queues tr.flow-detail.held[data-flow-of="{redis_server.url} pay"]')
    expect(line).to_have_text("held back by max_running (1/1 running): 2 waiting")
    mail = page.locator(f'#queues tr.flow-detail.held[data-flow-of="{redis_server.url} mail"]')
    expect(mail).to_have_text("held back by rate_limit (1/1 started in the last hour): 1 waiting")
    expect(page.locator('#queues tr[data-queue="mail"] td.started')).to_have_text("1/1")
    expect(row).to_have_class("held")
    expect(row.locator("td.running")).to_have_text("1/1")
    expect(row.locator("button.pause")).to_be_hidden()  # not logged in

    page.fill("#login input[name=token]", TOKEN)
    page.click("#login button")
    row.locator("button.pause").click()
    expect(page.locator("#flow-message")).to_have_text("pay paused")
    badge = row.locator(".badge.paused")
    expect(badge).to_have_text("PAUSED")
    who = re.compile(r"paused by the status page \(127\.0\.0\.1\) since [-\d]+ [:\d]+ UTC")
    expect(badge).to_have_attribute("title", who)
    expect(line).to_contain_text("held back by the pause (by the status page (127.0.0.1) since ")
    expect(line).to_contain_text("and max_running (1/1 running): 2 waiting")
    assert client.exists(Keys("pay").paused)

    row.locator("button.resume").click()
    expect(page.locator("#flow-message")).to_have_text("pay resumed")
    expect(badge).to_have_count(0)
    expect(line).to_have_text("held back by max_running (1/1 running): 2 waiting")
    assert not client.exists(Keys("pay").paused)

    # Groups: the busiest, each name shown as text, and the one at its limit says so.
    groups = page.locator(f'#queues tr.flow-detail[data-flow-of="{redis_server.url} tenants"] '
                          "table.groups tbody tr")  # fmt: skip
    expect(groups).to_have_count(2)
    full = "held back by group_max_running (1/1 running)"
    age = re.compile(r"\d+s")
    expect(groups.nth(0).locator("td")).to_have_text(["acme", "2", "1", age, full])
    expect(groups.nth(1).locator("td")).to_have_text([HOSTILE, "1", "1", age, full])
    expect(groups.nth(0)).to_have_class("held")
    expect(page.locator("#queues table.groups th").first).to_have_text(
        "busiest groups (group_max_running 1)"
    )
    assert page.locator("#queues img").count() == 0
