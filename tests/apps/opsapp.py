"""Handlers for the operator-facing tests: setups that fail or hang, handlers that exit.

Each records `done` (payload) in the Redis at $TESTAPP_REDIS_URL once a message succeeds.
"""

from __future__ import annotations

import ast
import json
import os
import sys
import time

import redis


def _done(message: bytes) -> None:
    redis.Redis.from_url(os.environ["TESTAPP_REDIS_URL"]).rpush("done", message)


def handle(message: bytes) -> None:
    """`os_exit` and `sys_exit` leave the process in mid-message; anything else succeeds."""
    if message == b"os_exit":
        os._exit(0)
    if message == b"sys_exit":
        sys.exit(0)
    _done(message)


def _read_settings(settings: dict[str, str]) -> str:
    return settings["id"]  # the line a traceback must point at


class FailingSetup:
    """A handler whose setup() fails on every start, as with a missing setting."""

    def setup(self) -> None:
        _read_settings({})

    def handle(self, message: bytes) -> None:
        _done(message)


class HangingSetup:
    """A handler whose setup() never returns, as with a database that never answers."""

    def setup(self) -> None:
        time.sleep(600)

    def handle(self, message: bytes) -> None:
        _done(message)


def say(message: bytes) -> None:
    """Raise an exception whose message is the payload: control characters, newlines and all,
    as a handler quoting user data in its errors does."""
    raise ValueError(message.decode("utf-8", "replace"))


def parse(message: bytes) -> None:
    """Compile the payload's `text` under its `filename`, and add its `note` to the error, as
    a handler compiling users' templates does: a SyntaxError's traceback shows the file name
    and the source line, and each line of a note, as lines of their own."""
    fields = json.loads(message)
    try:
        ast.parse(fields["text"], filename=fields["filename"])
    except SyntaxError as exc:
        exc.add_note(fields["note"])
        raise
