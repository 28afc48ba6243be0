"""What open status pages cost Redis: `python -m tests.web_cost [seconds] [pages...]`.

Runs `rqworkers run` (four queues, six workers) on a real redis-server, opens N pages in
a headless Chromium for a while, and counts the status reads they caused. Each status
read opens one new connection to each host (`status.collect`), while workers and the
keeper keep theirs: so new connections, minus those with no page open, are status reads.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from tests.browser import INSTALL, chromium, chromium_path
from tests.support import APPS, REPO, RedisServer, Service, free_port, wait_for, write_config


def main(seconds: float, counts: list[int]) -> None:
    browser_path = chromium_path()
    if browser_path is None:
        sys.exit(f"no Chromium: {INSTALL}")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        redis_server = RedisServer(workdir / "redis")
        service = None
        try:
            redis_server.start()
            workers = [{"queue": q, "handler": "testapp:handle"} for q in ("a", "b", "c")]
            workers.append({"queue": "d", "handler": "testapp:handle", "processes": 3})
            path = write_config(workdir / "c.toml", redis_server.url, workers,
                                manager={"metrics_address": f"127.0.0.1:{port}"})  # fmt: skip
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(APPS), str(REPO)])}
            env["TESTAPP_REDIS_URL"] = redis_server.url
            service = Service(path, workdir, env).start()
            client = redis_server.client()
            wait_for(lambda: len(service.workers()) == 6, timeout=20, what="six workers")
            with chromium(browser_path) as browser:
                for count in [0, *counts]:
                    pages = [browser.new_page() for _ in range(count)]
                    for page in pages:
                        page.goto(f"http://127.0.0.1:{port}/")
                    client.config_resetstat()
                    time.sleep(seconds)
                    reads = client.info("stats")["total_connections_received"]
                    print(f"{count:3d} page(s) open for {seconds:.0f} s: {reads} status reads "
                          f"({reads / seconds:.2f} a second)")  # fmt: skip
                    for page in pages:
                        page.close()
        finally:
            if service is not None:
                service.cleanup()
            redis_server.stop()


if __name__ == "__main__":
    args = sys.argv[1:]
    main(float(args[0]) if args else 20.0, [int(a) for a in args[1:]] or [1, 10])
