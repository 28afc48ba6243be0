"""Task messages: the JSON format, the allow-list that guards imports, and the replies.

A task message is one JSON object, UTF-8, that any language can produce and read:

    {"v": 1, "task": "myapp.jobs:add", "args": [1, 2], "kwargs": {}, "id": "…",
     "timeout": 10, "reply_to": "jobs:replies:…", "result_ttl": 3600,
     "on_success": "myapp.jobs:notify", "on_failure": "myapp.jobs:alert",
     "trace": {"traceparent": "00-…-…-01", "tracestate": "…"}}

Only `task` is required. `trace` is the sender's OpenTelemetry context (`tracecontext`):
one that is malformed is ignored, never a reason to refuse the task.

A message this worker cannot read (not JSON, not an object, a
missing or mistyped field, an unknown field, a newer version) raises `Refused` with the
reason: it can never succeed, so it is dead-lettered at once instead of retried. "JSON" is
what every parser reads (RFC 8259): UTF-8 only, and no `NaN` or `Infinity`, which Python's
`json` would otherwise read and write but other languages' parsers refuse.

The allow-list is a security boundary, not a convenience: a task message names code to run,
and anyone who can push to the queue writes task messages. The worker therefore imports
only modules the allow-list names, checked on the string before any import, so that
`os:system` or `builtins:eval` can never be reached, even by attribute tricks.

`reply_to` is a boundary too: the worker pushes the reply with its own Redis rights, so a
message could otherwise make it write into any key (another queue, a dead list, another
caller's replies). A worker writes replies only into its queue's reply namespace,
`<queue>:replies:*`, and into the `reply_keys` globs its operator added (`ReplyKeys`);
`check` proves that those reach no configured queue's keys.

This module is pure (no Redis): the worker side is `taskhandler`, the client side
`producer` and `executor`.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import math
import re
import secrets
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

from rqworkers.client import tracecontext
from rqworkers.common.globs import Glob
from rqworkers.errors import MessageTimeout, Refused, RqworkersError
from rqworkers.store.keys import REPLIES

VERSION = 1  # the "v" field; a message without one is version 1
DEFAULT_RESULT_TTL = 3600.0  # seconds a reply is kept when the message does not say
_FOREVER = 10.0**9  # seconds; above it (or infinite) a timeout or TTL is a mistake

_NAME = r"[^\W\d]\w*"
_PATH_RE = re.compile(rf"^{_NAME}(?:\.{_NAME})*:{_NAME}$")
_PATTERN_RE = re.compile(rf"^{_NAME}(?:\.{_NAME})*:(?:\*|{_NAME})$")
_FIELDS = (
    "v", "task", "args", "kwargs", "id", "timeout", "reply_to", "result_ttl",
    "on_success", "on_failure", "trace",
)  # fmt: skip

# Why a task failed for good, as `TaskError.reason` and a reply's "reason".
RAISED = "raised"  # the function raised on its last attempt
TIMEOUT = "timeout"  # it ran past its timeout on its last attempt
DEAD_LETTERED = "dead-lettered"  # its deliveries ran out without a result (worker lost...)
REFUSED = "refused"  # malformed, not allowed or nonexistent: never run


@dataclass(frozen=True)
class Task:
    """A valid task message, read or about to be sent."""

    task: str
    args: list[Any]
    kwargs: dict[str, Any]
    id: str
    timeout: float | None = None  # seconds; the pair's `timeout` caps it
    reply_to: str | None = None
    result_ttl: float = DEFAULT_RESULT_TTL  # seconds
    on_success: str | None = None
    on_failure: str | None = None
    trace: dict[str, str] | None = None  # the sender's trace context (`tracecontext`)


class TaskError(RqworkersError):
    """A task that failed for good, as its caller sees it.

    `reason` is one of `raised`, `timeout`, `dead-lettered`, `refused`; `type` and
    `message` name the exception (or the dead-letter cause), `traceback` is its text ("" if
    there was no exception in the worker).
    """

    def __init__(
        self, reason: str, type: str, message: str, traceback: str = "", task_id: str = ""
    ) -> None:
        super().__init__(f"{reason}: {type}: {message}" if type else f"{reason}: {message}")
        self.reason = reason
        self.type = type
        self.message = message
        self.traceback = traceback
        self.task_id = task_id

    def __reduce__(self) -> tuple[type[TaskError], tuple[str, str, str, str, str]]:
        return TaskError, (self.reason, self.type, self.message, self.traceback, self.task_id)

    @classmethod
    def from_dead_letter(
        cls, task_id: str, reason: str, error: BaseException | None, timeout: float | None = None
    ) -> TaskError:
        """How a dead-lettered task failed: `error` is what its last attempt raised, if any.

        `reason` is the worker's dead-letter reason; `timeout` the seconds the task was given.
        """
        if isinstance(error, Refused):
            return cls(REFUSED, "Refused", str(error), task_id=task_id)
        if isinstance(error, MessageTimeout):
            timeout = error.seconds or timeout
            text = f"timeout after {timeout:g}s" if timeout else reason
            return cls(TIMEOUT, "MessageTimeout", text, _traceback(error), task_id)
        if isinstance(error, Exception):
            return cls(RAISED, type(error).__name__, str(error), _traceback(error), task_id)
        return cls(DEAD_LETTERED, "", reason, task_id=task_id)


def _traceback(error: BaseException) -> str:
    """The exception's traceback from the task's code on: the worker's frames say nothing."""
    frames = error.__traceback__
    while frames is not None and frames.tb_next is not None and _ours(frames.tb_frame):
        frames = frames.tb_next
    return "".join(traceback.format_exception(type(error), error, frames))


def _ours(frame: FrameType) -> bool:
    return str(frame.f_globals.get("__name__", "")).startswith("rqworkers.")


# --- the message -------------------------------------------------------------------------


def encode(task: Task) -> bytes:
    """The message's bytes, version field first; `ValueError` for what a worker would
    refuse, `TypeError` for arguments that are not JSON."""
    fields: dict[str, Any] = {"v": VERSION, "task": task.task, "id": task.id}
    if task.args:
        fields["args"] = task.args
    if task.kwargs:
        fields["kwargs"] = task.kwargs
    for name in ("timeout", "reply_to", "on_success", "on_failure"):
        if getattr(task, name) is not None:
            fields[name] = getattr(task, name)
    if task.reply_to is not None:
        fields["result_ttl"] = task.result_ttl
    trace = tracecontext.read(task.trace)
    if trace is not None:
        fields["trace"] = trace
    try:
        validate(fields, task.id)
    except Refused as exc:
        raise ValueError(str(exc)) from None
    return _to_json(fields, "the task message", separators=(",", ":"), ensure_ascii=False)


def parse(message: bytes) -> Task:
    """The task in `message`; `Refused`, naming the problem, if it is not a valid one."""
    try:
        fields = decode_json(message)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise Refused(f"not a task message: not valid JSON ({_short(exc)})") from None
    return validate(fields, _default_id(message))


def decode_json(data: bytes | str) -> Any:
    """`data` read as JSON as every parser reads it: `ValueError` saying why not.

    Bytes must be UTF-8, without a byte-order mark (`json.loads` would guess UTF-16 or
    UTF-32 too). `NaN`, `Infinity` and a number beyond a double's range (`1e400`, which
    Python reads as infinity) are refused: a reply could not carry them back as JSON.
    """
    if isinstance(data, bytes):
        try:
            data = data.decode()
        except UnicodeDecodeError as exc:
            raise ValueError(f"not UTF-8: {exc.reason} at byte {exc.start}") from None
    if "\0" in data:  # never in JSON text (raw control characters are not allowed)
        raise ValueError(f"a NUL byte at {data.index(chr(0))}: UTF-16 or UTF-32, not UTF-8?")
    if data.startswith("\ufeff"):
        raise ValueError("a byte-order mark: JSON text starts without one")
    return _DECODER.decode(data)


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise ValueError(f"the number {shown} is out of range")
    return value


_DECODER = json.JSONDecoder(parse_constant=_constant, parse_float=_finite)  # made once


def _to_json(value: Any, what: str, **style: Any) -> bytes:
    """`value` as UTF-8 JSON that every parser reads; `TypeError` saying why not: a type
    JSON lacks, a circular reference, NaN or an infinity, a lone surrogate, nesting deeper
    than the encoder's recursion goes."""
    try:
        return json.dumps(value, allow_nan=False, **style).encode()
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
        raise TypeError(f"{what} cannot be encoded as JSON: {exc}") from None
    except RecursionError:
        raise TypeError(f"{what} cannot be encoded as JSON: nested too deeply") from None


@dataclass(frozen=True)
class ReplyAddress:
    id: str
    key: str
    ttl: float  # seconds


def reply_address(message: bytes) -> ReplyAddress | None:
    """Where the reply to `message` goes, read leniently: a message refused for a bad field
    still gets its failure reply, so that its caller does not wait forever."""
    try:
        fields = json.loads(message)
    except (ValueError, RecursionError):
        return None
    if not isinstance(fields, dict) or not isinstance(fields.get("reply_to"), str):
        return None
    task_id = fields.get("id")
    if not isinstance(task_id, str) or not task_id:
        task_id = _default_id(message)
    try:
        ttl = _seconds(fields, "result_ttl") or DEFAULT_RESULT_TTL
    except Refused:
        ttl = DEFAULT_RESULT_TTL
    return ReplyAddress(task_id, fields["reply_to"], ttl) if fields["reply_to"] else None


_LABEL = 200  # characters of a task's name or id a span keeps; a longer one is left out


@dataclass(frozen=True)
class Label:
    """What a worker's span says of a task message: each part None if it is not valid."""

    task: str | None
    id: str | None
    trace: dict[str, str] | None


def label(message: bytes) -> Label | None:
    """`message`'s task, id and trace context, read leniently (a span names even a message
    that will be refused); None for what is not a JSON object."""
    try:
        fields = json.loads(message)
    except (ValueError, RecursionError):
        return None
    if not isinstance(fields, dict):
        return None
    task, task_id = fields.get("task"), fields.get("id")
    return Label(
        task if isinstance(task, str) and len(task) <= _LABEL and _PATH_RE.match(task) else None,
        task_id if isinstance(task_id, str) and 0 < len(task_id) <= _LABEL else None,
        tracecontext.read(fields.get("trace")),
    )


def _default_id(message: bytes) -> str:
    # Derived from the bytes, so that every retry of a message replies under the same id.
    return hashlib.sha1(message).hexdigest()[:20]


def validate(fields: object, default_id: str) -> Task:
    """A `Task` from decoded JSON, or `Refused` with the first problem found."""
    if not isinstance(fields, dict):
        raise Refused(f"not a task message: a JSON {_json_type(fields)}, not an object")
    unknown = [name for name in fields if name not in _FIELDS]
    if unknown:
        raise Refused(f"task message has unknown field(s): {', '.join(map(repr, unknown))}")
    version = fields.get("v", VERSION)
    if version != VERSION or isinstance(version, bool):
        raise Refused(f"task message version {version!r} is not supported (this worker reads 1)")
    if "task" not in fields:
        raise Refused("task message has no 'task' field")
    args = fields.get("args", [])
    if not isinstance(args, list):
        raise Refused(f"task message 'args' must be a list, not a JSON {_json_type(args)}")
    kwargs = fields.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise Refused(f"task message 'kwargs' must be an object, not a JSON {_json_type(kwargs)}")
    task_id = fields.get("id", default_id)
    if not isinstance(task_id, str) or not task_id:
        raise Refused("task message 'id' must be a non-empty string")
    reply_to = fields.get("reply_to")
    if reply_to is not None and (not isinstance(reply_to, str) or not _utf8(reply_to)):
        raise Refused("task message 'reply_to' must be a non-empty string (a list key)")
    if fields.get("task") is None:
        raise Refused("task message 'task' must be 'module:function', not null")
    return Task(
        task=_path(fields, "task"),
        args=args,
        kwargs=kwargs,
        id=task_id,
        timeout=_seconds(fields, "timeout"),
        reply_to=reply_to,
        result_ttl=_seconds(fields, "result_ttl") or DEFAULT_RESULT_TTL,
        on_success=_path(fields, "on_success"),
        on_failure=_path(fields, "on_failure"),
        trace=tracecontext.read(fields.get("trace")),
    )


def _utf8(text: str) -> bool:
    """Whether `text` is non-empty and can be sent as UTF-8 (JSON allows lone surrogates)."""
    try:
        return bool(text.encode())
    except UnicodeEncodeError:
        return False


def _path(fields: Mapping[str, Any], name: str) -> Any:
    value = fields.get(name)
    if value is not None and not (isinstance(value, str) and _PATH_RE.match(value)):
        raise Refused(f"task message {name!r} must be 'module:function', not {_preview(value)}")
    return value


def _seconds(fields: Mapping[str, Any], name: str) -> float | None:
    value = fields.get(name)
    if value is None:
        return None
    try:
        return seconds(value, f"task message {name!r}")
    except ValueError as exc:
        raise Refused(str(exc)) from None


def seconds(value: object, name: str) -> float:
    """`value` as a duration: a number of seconds above 0 and below 10**9 (so never NaN
    nor infinite: a longer one is a mistake). `ValueError` naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < _FOREVER:
        raise ValueError(
            f"{name} must be a positive number of seconds below {_FOREVER:.0f}, "
            f"not {_preview(value)}"
        )
    return float(value)


def milliseconds(ttl: float) -> int:
    """A TTL in seconds, for PEXPIRE: at least 1 ms (0 would delete the key at once)."""
    return max(1, int(ttl * 1000))


def _json_type(value: object) -> str:
    names = {list: "array", dict: "object", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _preview(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _short(exc: BaseException) -> str:
    return _preview(str(exc) or type(exc).__name__).strip("'\"")


def path_of(function: Callable[..., Any] | str) -> str:
    """`"module:function"` for a module-level function, as a worker will import it.

    `ValueError` for what a worker cannot import by name: a lambda, a nested function, a
    method, or a function of a script run as `__main__` (not with `python -m`).
    """
    if isinstance(function, str):
        if not _PATH_RE.match(function):
            raise ValueError(f"{function!r} is not of the form 'module:function'")
        return function
    module = getattr(function, "__module__", None)
    name = getattr(function, "__qualname__", "")
    if module == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name if spec is not None else None
        if module is None:
            raise ValueError(
                f"{name} is defined in the script being run: a worker cannot import it; "
                "move it to a module (or run the script with python -m)"
            )
    if not module or not _PATH_RE.match(f"{module}:{name}"):
        raise ValueError(f"{function!r} is not a module-level function a worker can import")
    return f"{module}:{name}"


# --- the allow-list ----------------------------------------------------------------------


def pattern_problem(pattern: str) -> str | None:
    """What is wrong with an allow-list entry, or None. For the config's validation."""
    if _PATTERN_RE.match(pattern):
        return None
    return f"{pattern!r} is not of the form 'module:function' or 'module:*'"


class AllowList:
    """Which `module:function` names a task pair may run, and the functions themselves.

    `module:*` allows the public functions *defined* in that module (not names it imported,
    such as `from os import system`, nor classes); `module:name` allows that one callable.
    A name is checked as a string before anything is imported, and only modules named
    here are ever imported.
    """

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple(patterns)
        for pattern in self.patterns:
            problem = pattern_problem(pattern)
            if problem:
                raise ValueError(problem)
        self.names = {p for p in self.patterns if not p.endswith(":*")}
        self.wildcards = {p.partition(":")[0] for p in self.patterns if p.endswith(":*")}
        self.modules = sorted({p.partition(":")[0] for p in self.patterns})
        self._found: dict[str, Callable[..., Any]] = {}

    def permits(self, path: str) -> bool:
        """Whether `path` may run, judged on the string alone (nothing is imported)."""
        if path in self.names:
            return True
        module, _, name = path.partition(":")
        return module in self.wildcards and not name.startswith("_") and bool(_PATH_RE.match(path))

    def resolve(self, path: str) -> Callable[..., Any]:
        """The function `path` names; `Refused` if it is not allowed or does not exist."""
        found = self._found.get(path)
        if found is not None:
            return found
        if not self.permits(path):
            raise Refused(f"task {path!r} is not in this queue's allow-list")
        module_name, _, name = path.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            raise Refused(f"task {path!r}: cannot import {module_name!r}: {_short(exc)}") from None
        target: Any = vars(module).get(name)  # its own namespace: no module __getattr__ hooks
        if target is None:
            raise Refused(f"task {path!r} does not exist: {module_name!r} has no {name!r}")
        if path not in self.names and not (
            inspect.isfunction(target) and target.__module__ == module_name
        ):
            raise Refused(f"task {path!r} is not a function defined in {module_name!r}")
        if not callable(target):
            raise Refused(f"task {path!r} is a {type(target).__name__}, not a function")
        function: Callable[..., Any] = target
        self._found[path] = function
        return function

    def problems(self) -> list[str]:
        """Every module that does not import and every named function that is missing."""
        found: list[str] = []
        broken = set()
        for module_name in self.modules:
            try:
                importlib.import_module(module_name)
            except Exception as exc:  # any import-time failure of user code is a problem
                broken.add(module_name)
                found.append(f"cannot import {module_name!r}: {type(exc).__name__}: {exc}")
        for path in sorted(self.names):
            if path.partition(":")[0] not in broken:
                try:
                    self.resolve(path)
                except Refused as exc:
                    found.append(str(exc))
        return found


def verify(patterns: Sequence[str]) -> str | None:
    """The problems of an allow-list in one line, or None. For `check` and `run`'s start."""
    problems = AllowList(patterns).problems()
    return "; ".join(problems) or None


# --- where replies go --------------------------------------------------------------------


def reply_prefix(queue: str) -> str:
    """How every key of `queue`'s own reply namespace starts."""
    return REPLIES.of(queue).removesuffix("<id>")


def new_reply_key(queue: str) -> str:
    """A reply list of `queue` no one can guess (128 random bits): only who reads the
    message that names it can send a task's result there."""
    return reply_prefix(queue) + secrets.token_hex(16)


def reaches_queue(pattern: str, queue: str) -> bool:
    """Whether the glob `pattern` could match `queue` or any key under `<queue>:`."""
    glob = Glob.parse(pattern)
    return glob.overlaps(Glob.literal(queue)) or glob.overlaps(Glob.literal(f"{queue}:", True))


def reaches_own_keys(pattern: str, queue: str) -> bool:
    """Whether the glob `pattern` could match a key of `queue` that is not a reply list."""
    return reaches_queue(pattern, queue) and not Glob.parse(pattern).within(reply_prefix(queue))


class ReplyKeys:
    """The keys a worker of `queue` may push replies onto: its reply namespace, and the
    operator's `reply_keys` globs (which `config` checks against every queue's keys)."""

    def __init__(self, queue: str, patterns: Iterable[str] = ()) -> None:
        self.prefix = reply_prefix(queue)
        self.globs = tuple(Glob.parse(pattern) for pattern in patterns)

    def permits(self, key: str) -> bool:
        if not _utf8(key):
            return False
        return key.startswith(self.prefix) or any(glob.matches(key) for glob in self.globs)

    def refusal(self, key: str) -> str | None:
        """Why a message may not name `key` as its `reply_to`, or None."""
        if self.permits(key):
            return None
        allowed = ", ".join([f"{self.prefix}*", *(glob.text for glob in self.globs)])
        return f"reply_to {_preview(key)} is not one of this queue's reply keys ({allowed})"


# --- replies -----------------------------------------------------------------------------


def success_reply(task_id: str, result: Any) -> bytes:
    """The reply of a task that returned `result`; `TypeError` if that is not JSON."""
    fields = {"v": VERSION, "id": task_id, "ok": True, "result": result}
    return _to_json(fields, "the task's return value")


def failure_reply(error: TaskError) -> bytes:
    fields = {
        "v": VERSION,
        "id": error.task_id,
        "ok": False,
        "reason": error.reason,
        "type": error.type,
        "message": error.message,
        "traceback": error.traceback,
    }
    return _to_json(fields, "a failure reply")


def read_reply(data: bytes) -> tuple[str, Any, TaskError | None]:
    """`(task id, result, None)` for a success, `(task id, None, error)` for a failure.

    `ValueError` if `data` is not a reply (an executor drops those with a log line).
    """
    try:
        fields = json.loads(data)
    except (ValueError, RecursionError):  # anyone who may push to the list may push junk
        raise ValueError("not a task reply") from None
    if not isinstance(fields, dict) or not isinstance(fields.get("id"), str):
        raise ValueError("not a task reply")
    if fields.get("ok"):
        return fields["id"], fields.get("result"), None
    error = TaskError(
        str(fields.get("reason", DEAD_LETTERED)),
        str(fields.get("type", "")),
        str(fields.get("message", "")),
        str(fields.get("traceback", "")),
        fields["id"],
    )
    return fields["id"], None, error
