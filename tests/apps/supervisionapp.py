"""Handlers for tests/test_supervision.py, in the Redis at $TESTAPP_REDIS_URL."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import redis


def spawn_and_hang(message: bytes) -> None:
    """Start a subprocess, record its pid, then hang where no signal reaches Python."""
    child = subprocess.Popen(["sleep", "120"])
    client = redis.Redis.from_url(os.environ["TESTAPP_REDIS_URL"])
    client.rpush("subprocesses", child.pid)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM, signal.SIGTERM})
    time.sleep(120)
