"""A real headless Chromium for tests and screenshots: Debian's `chromium`, driven by
Playwright without any browser download.

Every process the browser and Playwright's driver start is killed by pid on the way out,
even when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:
    from playwright.sync_api import Browser

INSTALL = "apt-get install chromium (as .ci/run does)"


def chromium_path() -> str | None:
    """The system's Chromium: $CHROMIUM if set, else `chromium` or `chromium-browser`."""
    names = (
        [os.environ["CHROMIUM"]] if os.environ.get("CHROMIUM") else ["chromium", "chromium-browser"]
    )
    return next((path for name in names if (path := shutil.which(name))), None)


@contextlib.contextmanager
def chromium(path: str, args: Sequence[str] = ()) -> Iterator[Browser]:
    """`args`: more Chromium switches, such as `--host-resolver-rules`."""
    from playwright.sync_api import sync_playwright

    me = psutil.Process()
    before = {child.pid for child in me.children()}
    driver = sync_playwright().start()
    # Playwright's driver: the child that starting it added. The browser runs under it.
    drivers = [child for child in me.children() if child.pid not in before]
    spawned = set(drivers)

    def note_descendants() -> None:
        for process in drivers:
            with contextlib.suppress(psutil.Error):
                spawned.update(process.children(recursive=True))

    try:
        browser = driver.chromium.launch(executable_path=path, args=list(args))
        note_descendants()
        try:
            yield browser
        finally:
            note_descendants()
            browser.close()
    finally:
        driver.stop()
        for process in spawned:
            with contextlib.suppress(psutil.Error):
                process.kill()
