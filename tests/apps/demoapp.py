"""Handlers that behave like an application's, for the status page's screenshots
(`python -m tests.screenshots`): JSON jobs that take a while and sometimes fail."""

from __future__ import annotations

import json
import random
import time


def handle(message: bytes) -> None:
    job = json.loads(message)  # a payload that is not JSON fails, as it would in an app
    time.sleep(float(job.get("seconds", random.uniform(0.002, 0.02))))
    if job.get("fail"):
        raise RuntimeError(job["fail"])
