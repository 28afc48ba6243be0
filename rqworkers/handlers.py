"""Loading a handler from `"module:attr"` and putting functions and classes behind one face.

A function is called as `fn(message)`. A class is instantiated once per worker process and
may define `setup()`, `handle(message)`, `teardown()`, `on_success(message, result)` and
`on_failure(message, error)`. Only `handle` decides a message's fate: an exception from a
callback is logged and otherwise ignored, so a buggy callback cannot kill or stall a worker.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any

from rqworkers.errors import HandlerError

log = logging.getLogger(__name__)


def resolve(path: str) -> Any:
    """Import `module:attr` (attr may be dotted) and return the object it names."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise HandlerError(f"{path!r} is not of the form module:attribute")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of user code is a handler problem
        raise HandlerError(f"cannot import {module_name!r}: {type(exc).__name__}: {exc}") from exc
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise HandlerError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not callable(target):
        raise HandlerError(f"{path!r} is a {type(target).__name__}, not a function or class")
    if isinstance(target, type) and not callable(getattr(target, "handle", None)):
        raise HandlerError(f"class {path!r} has no handle(message) method")
    return target


class Handler:
    """One worker's handler instance. `handle` raises on failure; callbacks never raise."""

    def __init__(self, path: str) -> None:
        target = resolve(path)
        self.path = path
        self._instance: Any = target() if isinstance(target, type) else None
        self.handle: Callable[[bytes], Any] = (
            self._instance.handle if self._instance is not None else target
        )
        # Known once, so that the per-message path skips arming a timer for nothing.
        self.has_callbacks = any(
            callable(getattr(self._instance, name, None)) for name in ("on_success", "on_failure")
        )

    def setup(self) -> None:
        """Run the class's `setup()`. Its failure is the worker's startup failure: it raises."""
        method = getattr(self._instance, "setup", None)
        if method is not None:
            method()

    def teardown(self) -> None:
        self._callback("teardown")

    def on_success(self, message: bytes, result: Any) -> None:
        self._callback("on_success", message, result)

    def on_failure(self, message: bytes, error: BaseException) -> None:
        self._callback("on_failure", message, error)

    def on_dead_letter(self, message: bytes, reason: str, error: BaseException | None) -> None:
        """After the message went to the dead list, whatever the cause. Nothing by default."""

    def _callback(self, name: str, *args: Any) -> None:
        method = getattr(self._instance, name, None)
        if method is None:
            return
        try:
            method(*args)
        except Exception:
            log.exception("handler %s.%s() raised; ignored", self.path, name)


def verify(path: str) -> str | None:
    """The problem with `path`, or None if it imports. For `check` and `run`'s start."""
    try:
        resolve(path)
    except HandlerError as exc:
        return str(exc)
    return None
