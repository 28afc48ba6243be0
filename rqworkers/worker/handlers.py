"""Loading a handler from `"module:attr"` and putting functions and classes behind one face.

A function is called as `fn(message)`. A class is instantiated once per worker process and
may define `setup()`, `handle(message)`, `teardown()`, `on_success(message, result)` and
`on_failure(message, error)`. Only `handle` decides a message's fate: an exception from a
callback is logged and otherwise ignored, so a buggy callback cannot kill or stall a worker.

`handle` may be `async def`; then so may the other methods, and all of them run on one
event loop the handler owns, in a thread of its own, so that the worker's loop can wait on
it and on Redis alike.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import threading
import traceback
from collections.abc import Callable
from typing import Any

from rqworkers.common.text import a
from rqworkers.errors import HandlerError

log = logging.getLogger(__name__)

# What a run of a message must have written to Redis before that delivery's ack: a task's
# reply, as (key, seconds to keep it, the reply). It belongs to the delivery that made it,
# never to the message's bytes: twins (identical payloads) each have their own.
Reply = tuple[str, float, bytes]


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
        raise HandlerError(f"{path!r} is {a(type(target).__name__)}, not a function or class")
    if isinstance(target, type) and not callable(getattr(target, "handle", None)):
        raise HandlerError(f"class {path!r} has no handle(message) method")
    return target


class Handler:
    """One worker's handler instance. `handle` raises on failure; callbacks never raise."""

    # Defaults for subclasses that build themselves (the task handler).
    is_async = False
    _loop: asyncio.AbstractEventLoop | None = None
    _instance: Any = None

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
        self.is_async = inspect.iscoroutinefunction(self.handle)
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop async methods run on, started in a thread at first use."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            thread = threading.Thread(target=self._loop.run_forever, name="loop", daemon=True)
            thread.start()
        return self._loop

    def grouper(self) -> Callable[[bytes], str] | None:
        """`group(message)` of a class handler that names each raw message's group, made
        safe: its exception, or an answer that is not a string (None included), is the
        default group ''. None if the handler names no groups. An async handler's plain
        `group()` names them too (it is called in the worker's own thread, before a take);
        an `async def group()` does not (`names_groups` says so to `check`)."""
        method = self.method("group")
        if method is None or inspect.iscoroutinefunction(method):
            return None

        def group(message: bytes) -> str:
            try:
                name = method(message)
            except Exception:
                log.exception("handler %s.group() raised; the message joins the default group",
                              self.path)  # fmt: skip
                return ""
            return name if isinstance(name, str) else ""

        return group

    def method(self, name: str) -> Callable[..., Any] | None:
        """The instance's `name` method (setup, on_success...), if it has one."""
        method = getattr(self._instance, name, None)
        return method if callable(method) else None

    def _call(self, method: Callable[..., Any], *args: Any) -> Any:
        """`method(*args)`, awaited on the handler's loop if it returns an awaitable."""
        result = method(*args)
        if inspect.isawaitable(result):
            return asyncio.run_coroutine_threadsafe(awaited(result), self.loop).result()
        return result

    def setup(self) -> None:
        """Run the class's `setup()`. Its failure is the worker's startup failure: it raises."""
        method = self.method("setup")
        if method is not None:
            self._call(method)

    def teardown(self) -> None:
        self._callback("teardown")

    def on_success(self, message: bytes, result: Any) -> None:
        self._callback("on_success", message, result)

    def on_failure(self, message: bytes, error: BaseException) -> None:
        self._callback("on_failure", message, error)

    def on_dead_letter(self, message: bytes, reason: str, error: BaseException | None) -> None:
        """After `message` reached the dead list for good: its final outcome."""
        self._callback("on_dead_letter", message, reason, error)

    def _callback(self, name: str, *args: Any) -> None:
        method = self.method(name)
        if method is None:
            return
        try:
            self._call(method, *args)
        except Exception:
            log.exception("handler %s.%s() raised; ignored", self.path, name)

    def run(self, message: bytes) -> tuple[Any, Reply | None]:
        """What the worker's loops call: `handle(message)`'s result, and the reply that
        must reach Redis before this delivery's ack (`write_replies`), if any. Returned,
        not kept here: the worker holds it with the delivery that ran, until its ack."""
        return self.handle(message), None

    def write_replies(self, replies: list[Reply]) -> list[Exception | None]:
        """Write `replies`, those of deliveries about to be acked, ahead of their acks. For
        each, in order: None once written, else why it was not (its delivery fails instead
        of being acked). A Redis that does not answer raises: they all go again."""
        return [None] * len(replies)  # `run` makes none

    def own_timeout(self, message: bytes) -> float | None:
        """A message's own time limit, if the message names one (task messages do)."""
        return None

    def close(self) -> None:
        """Stop the event loop, if one was started (after `teardown`)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)


async def awaited(awaitable: Any) -> Any:
    return await awaitable


def startup_failure(exc: Exception) -> tuple[str, str]:
    """Why a handler could not start, for the log: `Type: message`, then the traceback
    (of the import's cause, for a module that fails to import), or "" where the message
    says it all (a path that names nothing callable)."""
    cause = exc.__cause__ if isinstance(exc, HandlerError) else exc
    if cause is None:
        return str(exc), ""
    lines = traceback.format_exception(cause)
    summary = str(exc) if isinstance(exc, HandlerError) else f"{type(exc).__name__}: {exc}"
    return summary, "\n" + "".join(lines).rstrip()


def verify(path: str) -> str | None:
    """The problem with `path`, or None if it imports. For `check` and `run`'s start."""
    try:
        resolve(path)
    except HandlerError as exc:
        return str(exc)
    return None


def names_groups(path: str) -> bool:
    """Whether the handler at `path` is a class with a `group(message)` method, a plain
    one: the worker calls it before each take, where nothing could await it."""
    try:
        target = resolve(path)
    except HandlerError:
        return False
    group = getattr(target, "group", None)
    return isinstance(target, type) and callable(group) and not inspect.iscoroutinefunction(group)
