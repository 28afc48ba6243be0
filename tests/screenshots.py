"""Screenshots of the status page under a realistic load, for `docs/`.

    python -m tests.screenshots [docs]

Starts a redis-server, two managers with different node names (`web-1` serves the page),
four queues fed by a producer at a few hundred messages a second, some of which fail into
retries and dead letters, and one of which falls behind on its `max_running`; waits for
the chart to fill, then saves PNGs. Every process is killed at the end, as in the tests.
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

from playwright.sync_api import Error as BrowserError
from playwright.sync_api import Page

from tests.browser import INSTALL, chromium, chromium_path
from tests.support import APPS, REPO, RedisServer, Service, free_port, wait_for, write_config

TOKEN = "screenshot-token-0123456789"
LOAD_SECONDS = 80.0
RATES = {"orders": 60, "emails": 25, "thumbnails": 4, "billing": 8}  # messages a second


def job(queue: str, n: int) -> bytes:
    """A payload like an application's; about one billing job in twelve fails for good."""
    body: dict[str, object] = {"id": n}
    if queue == "orders":
        body.update(sku=f"SKU-{random.randint(1000, 9999)}", qty=random.randint(1, 5))
    elif queue == "emails":
        body.update(to=f"user{n}@example.com", template="receipt")
    elif queue == "thumbnails":
        body.update(image=f"uploads/{n}.jpg", seconds=random.uniform(0.2, 0.9))
    else:
        body.update(invoice=10_000 + n, amount=random.randint(5, 500))
        if n % 12 == 0:
            body["fail"] = f"invoice {10_000 + n}: card declined by the payment gateway"
    return json.dumps(body).encode()


def produce(redis_server: RedisServer, stop: threading.Event) -> None:
    client = redis_server.client()
    n = 0
    while not stop.is_set():
        for queue, rate in RATES.items():
            count = max(1, round(rate * random.uniform(0.6, 1.4) / 4))
            client.lpush(queue, *[job(queue, n + i) for i in range(count)])
            n += count
        stop.wait(0.25)


def start_node(
    node: str, redis_server: RedisServer, workdir: Path, manager: dict[str, object]
) -> Service:
    workers = [
        {"queue": "orders", "processes": 2 if node == "web-1" else 1},
        {"queue": "emails"},
        # Slower than it is fed: the page shows it held back by its limit.
        {"queue": "thumbnails", "processes": 2, "max_running": 2},
        *([{"queue": "billing", "max_attempts": 3, "retry_delay": 2.0}] if node == "web-1" else []),
    ]
    path = write_config(workdir / f"{node}.toml", redis_server.url, workers,
                        manager={"node": node, "lease_ttl": 10.0, **manager},
                        defaults={"handler": "demoapp:handle"})  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(APPS), str(REPO)])}
    return Service(path, workdir, env).start()


def shoot(page: Page, path: Path) -> None:
    page.screenshot(path=str(path), full_page=True)
    print(f"saved {path}")


def main(out: Path) -> None:
    browser_path = chromium_path()
    if browser_path is None:
        sys.exit(f"no Chromium: {INSTALL}")
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        redis_server = RedisServer(workdir / "redis")
        services: list[Service] = []
        stop = threading.Event()
        try:
            redis_server.start()
            page_settings = {"metrics_address": f"127.0.0.1:{port}", "dashboard_token": TOKEN}
            services.append(start_node("web-1", redis_server, workdir, page_settings))
            services.append(start_node("web-2", redis_server, workdir, {}))
            client = redis_server.client()
            client.lpush("emails", b"<script>alert(1)</script>", b"\x89PNG\r\n\x1a\n\x00\x00")
            producer = threading.Thread(target=produce, args=(redis_server, stop))
            producer.start()
            with chromium(browser_path) as browser:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                wait_for(lambda: _serving(page, port), timeout=20, what="the page")
                page.fill("#login input[name=token]", TOKEN)
                page.click("#login button")
                page.wait_for_selector("#logout", state="visible")
                time.sleep(LOAD_SECONDS)  # the chart shows what the server sampled meanwhile
                page.select_option("#dead-queue", value=f"{redis_server.url} billing")
                page.wait_for_selector("#dead td.preview")
                page.check("#dead tr[data-index='1'] input")
                shoot(page, out / "status-page.png")
                page.select_option("#dead-queue", value=f"{redis_server.url} emails")
                page.wait_for_selector("#dead tr[data-index='1'] td.preview")
                page.locator("#dead").screenshot(path=str(out / "status-page-dead-letters.png"))
                print(f"saved {out / 'status-page-dead-letters.png'}")
        finally:
            stop.set()
            for service in services:
                service.cleanup()
            redis_server.stop()


def _serving(page: Page, port: int) -> bool:
    try:
        page.goto(f"http://127.0.0.1:{port}/")
    except BrowserError:  # not serving yet
        return False
    return True


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs"))
