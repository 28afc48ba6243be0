"""The Lua scripts behind the queue operations, with their keys, arguments and replies named.

A script runs atomically in Redis, so every move is all-or-nothing, and each costs one
round trip. Every script touches only keys of one queue: with a `{hash tag}` in the queue
name they all live in one Redis Cluster slot.

Each script is a file in `lua/`, whose header comment (up to the first blank line) declares
its KEYS and ARGV by name (`-- KEYS: a, b` and `-- ARGV: c, d, rest...`) and says what it
returns. The loader here reads those names, and puts before the script's body a prologue
that binds them to `local`s, then the constants Python shares with the Lua (`PREFIX`,
`KEPT_TWIN_RECORDS`, `LEVEL_BAND`) and the libraries (`lua/envelope.lua`, the envelope's
format; `lua/levels.lua`, priority levels in the retry set; `lua/flow.lua`, waking waiting
workers; `lua/take_core.lua`, what the two takes share), each only if the body reads it.
A caller names
its arguments (`Script.argv`) and keys (`queue.Keys.of_script`) by the same names, so the
order is written once, in the header; each script's reply is read by the decoder declared
beside it here.

The elements of a private list are *envelopes*, `rqw1:<id>:<attempts>:<payload>` (see
`queue.py` for the invariant): `id` makes every delivery unique, even of identical
payloads, so a settling operation sent twice (after a lost reply) can never remove a twin;
`attempts` counts this message's deliveries that ended without a result. A take may leave
fresh messages without them, as a *segment* whose place names each (lua/envelope.lua), which
every other script first gives its envelopes. Shared and dead lists hold payloads as
producers sent them.

Writes are ordered so that a script refused by an out-of-memory Redis stops before it has
lost anything: a message is pushed to its destination before it is removed from its
source, and acks (which free memory) go first.

Out of memory: a Redis over `maxmemory` with `noeviction` refuses every write that may
grow memory, so the workers could not drain the very queue that fills it. A script that
only moves messages (each costs at most its envelope's few dozen bytes more where it lands,
and its ack frees the whole message) starts with `#!lua flags=allow-oom` (Redis 7.0+), and
runs all the same. One that writes something new of any size, such as a dead letter's
record with its traceback, does not: it waits for memory like any outage. Redis before 7.0
reads no flags; there every script waits (see `legacy_source` and `queue.bind_script`).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Generic, NamedTuple, TypeVar

PREFIX = "rqw1:"
# How many older copies' records a dead letter's record keeps (see lua/dead_letter.lua).
KEPT_TWIN_RECORDS = 100
# The width of a priority level's band of scores in the retry set (see lua/levels.lua):
# epoch milliseconds below it (until the year 2286) fit, and nine bands stay exact in a double.
LEVEL_BAND = 10**13
# The tails `<n>:0:` of the first fresh envelopes a take makes (ids ending in n, attempts 0;
# see lua/take_core.lua): Lua formats a number with sprintf, which cost a busy take about a
# sixth of its Redis time per message; strings in a script are made once, when it loads.
# Bound as a function that builds the table: a take of a few messages (1.2 us a call) does
# not build it.
FRESH_TAILS = tuple(f"{n}:0:" for n in range(1, 101))
# Bound to locals of the same names before every script that reads them.
CONSTANTS: dict[str, str | int | tuple[str, ...]] = {
    "PREFIX": PREFIX,
    "KEPT_TWIN_RECORDS": KEPT_TWIN_RECORDS,
    "LEVEL_BAND": LEVEL_BAND,
    "FRESH_TAILS": FRESH_TAILS,
}

R = TypeVar("R")


def new_nudge_token() -> str:
    """A fresh nudge token (see lua/envelope.lua), kept as the queue's if it has none yet:
    128 random bits behind the envelope prefix, so that a worker's fast path (see fast.py)
    knows a nudge it took by its first bytes, as it knows a look-alike envelope."""
    return f"{PREFIX}nudge:{secrets.token_hex(16)}"


@dataclass(frozen=True)
class Script(Generic[R]):
    """A script of `lua/`: its KEYS and ARGV bound to named locals at its top, and `decode`,
    which reads its reply into a typed result."""

    name: str  # its file in lua/
    keys: tuple[str, ...]
    args: tuple[str, ...]
    rest: str | None  # the name of its variadic ARGV, after `args`; None if it takes none
    flags: tuple[str, ...]  # Redis 7 script flags, such as allow-oom
    body: str  # the file after its header
    decode: Callable[[Any], R]
    constants: tuple[str, ...] = ()  # the names of CONSTANTS it (or its libraries) reads
    libraries: tuple[str, ...] = ()  # the files of LIBRARIES it calls
    _names: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = frozenset((*self.args, self.rest) if self.rest else self.args)
        object.__setattr__(self, "_names", names)

    @property
    def source(self) -> str:
        """The script, with its flags declared in a shebang line if it has any."""
        if not self.flags:
            return self.legacy_source
        return f"#!lua flags={','.join(self.flags)}\n{self.legacy_source}"

    @property
    def legacy_source(self) -> str:
        """The script without a shebang line, for a Redis before 7.0 (which reads none)."""
        lines = [_bind(self.keys, "KEYS"), _bind(self.args, "ARGV")]
        if self.rest:
            lines.append(f"local REST = {len(self.args) + 1}  -- where {self.rest} start")
        lines += [f"local {name} = {_literal(CONSTANTS[name])}" for name in self.constants]
        lines += [LIBRARIES[name].body for name in self.libraries]
        lines.append(self.body)
        return "\n".join(line for line in lines if line)

    @property
    def bound(self) -> tuple[str, ...]:
        """The names the prologue binds before the body: what a linter must take as known."""
        rest = ("REST",) if self.rest else ()
        library = [f for name in self.libraries for f in LIBRARIES[name].names]
        return (*self.keys, *self.args, *rest, *self.constants, *library)

    def argv(self, **values: Any) -> list[Any]:
        """ARGV from the arguments by their names in the header, in its order; the
        variadic ones (a sequence, under the name `rest`; none if left out) last."""
        given = values.keys()
        if given != self._names and given | {self.rest} != self._names:
            missing, unknown = set(self.args) - given, given - self._names
            raise TypeError(
                f"{self.name}: missing ARGV {sorted(missing)}, unknown {sorted(unknown)}"
            )
        argv = [values[name] for name in self.args]
        if self.rest:
            argv += values.get(self.rest, ())
        return argv


def _bind(names: tuple[str, ...], table: str) -> str:
    if not names:
        return ""
    values = ", ".join(f"{table}[{i}]" for i in range(1, len(names) + 1))
    return f"local {', '.join(names)} = {values}"


def _literal(value: str | int | tuple[str, ...]) -> str:
    if isinstance(value, int):
        return str(value)
    if isinstance(value, tuple):  # a function that returns it as a Lua table (a sequence)
        return "function() return {" + ", ".join(_literal(item) for item in value) + "} end"
    if not re.fullmatch(r"[\w:.-]*", value):
        raise ValueError(f"{value!r} would need escaping in Lua")
    return f"'{value}'"


def _split(name: str, text: str) -> tuple[list[str], str]:
    """A file's header comment, as lines, and its body: they part at the first blank line.
    The header is for readers and for `load`; Redis gets the body (a task reply is sent as
    EVAL, whole, every time)."""
    header, _, body = text.partition("\n\n")
    if not all(line.startswith("--") for line in header.splitlines()):
        raise ValueError(f"lua/{name}: no header comment ending at a blank line")
    return header.splitlines(), body


def _words(code: str) -> set[str]:
    return set(re.findall(r"\w+", code))


_LUA = resources.files("rqworkers.store").joinpath("lua")


class Library(NamedTuple):
    """A file of `lua/` that defines functions for scripts: put before a script's body if
    the body calls one of them."""

    body: str
    functions: tuple[str, ...]
    variables: tuple[str, ...]  # its top-level locals, which the script's body may change

    @classmethod
    def read(cls, name: str) -> Library:
        body = _split(name, _LUA.joinpath(name).read_text(encoding="utf-8"))[1]
        functions = re.findall(r"^local function (\w+)", body, re.MULTILINE)
        shared = re.findall(r"^local (?!function )(\w+(?:, \w+)*)", body, re.MULTILINE)
        variables = [n for group in shared for n in group.split(", ")]
        return cls(body, tuple(functions), tuple(variables))

    @property
    def names(self) -> tuple[str, ...]:
        return self.functions + self.variables


# In the order they are put before a body: one may call those before it.
LIBRARIES = {
    name: Library.read(name) for name in ("envelope.lua", "levels.lua", "flow.lua", "take_core.lua")
}
_NAMES = re.compile(r"[a-z_][a-z0-9_]*")
_VARIADIC = re.compile(r"[a-z_][a-z0-9_]*\.\.\.")  # the last of ARGV may be `name...`
_SHEBANG = re.compile(r"#!lua flags=([a-z-]+(?:,[a-z-]+)*)")


def _header(name: str, lines: list[str], label: str) -> list[str]:
    """The names a script's header declares on its `-- KEYS:` or `-- ARGV:` line; a line
    ending in a comma goes on in the next (`--   more, names`)."""
    found = [i for i, line in enumerate(lines) if line.startswith(f"-- {label}: ")]
    if len(found) != 1:
        raise ValueError(f"lua/{name}: no single '-- {label}: ' line in its header")
    at = found[0]
    text = lines[at].removeprefix(f"-- {label}: ")
    while text.endswith(",") and at + 1 < len(lines):
        at += 1
        text += " " + lines[at].removeprefix("--").strip()
    *names, last = text.split(", ")
    last_ok = _NAMES.fullmatch(last) or (label == "ARGV" and _VARIADIC.fullmatch(last))
    if not last_ok or not all(_NAMES.fullmatch(n) for n in names):
        raise ValueError(f"lua/{name}: {lines[found[0]]!r} is not a list of names")
    return [*names, last]


def load(name: str, decode: Callable[[Any], R]) -> Script[R]:
    """The script in `lua/<name>`, its names read from its header (see the module doc)."""
    text = _LUA.joinpath(name).read_text(encoding="utf-8")
    flags: tuple[str, ...] = ()
    if text.startswith("#!"):
        shebang, text = text.split("\n", 1)
        match = _SHEBANG.fullmatch(shebang)
        if not match:
            raise ValueError(f"lua/{name}: {shebang!r} is not '#!lua flags=a,b'")
        flags = tuple(match[1].split(","))
    header, body = _split(name, text)
    if not any(line.startswith("-- Returns") for line in header):
        raise ValueError(f"lua/{name}: its header says nothing of what it returns")
    args = _header(name, header, "ARGV")
    rest = args.pop().removesuffix("...") if args[-1].endswith("...") else None
    keys = tuple(_header(name, header, "KEYS"))
    words = _words(body)
    libraries: tuple[str, ...] = ()
    while True:  # a library may call another: what it calls is put before it
        found = tuple(n for n, lib in LIBRARIES.items() if not words.isdisjoint(lib.functions))
        if found == libraries:
            break
        libraries = found
        for library in libraries:
            words |= _words(LIBRARIES[library].body)
    constants = tuple(c for c in CONSTANTS if c in words)
    names = {n for library in libraries for n in LIBRARIES[library].names}
    shadowed = names & {*keys, *args, rest or ""}
    if shadowed:  # a library, bound after them, would hide them from the body
        raise ValueError(f"lua/{name}: {sorted(shadowed)} are names of its libraries")
    return Script(name, keys, tuple(args), rest, flags, body, decode, constants, libraries)


# -- the scripts, and their replies ------------------------------------------------------------


class Held(NamedTuple):
    """Why a take brought less than asked, when the pause or a flow limit did it."""

    reason: str  # "paused", "full" (no `max_running` permit free) or "rate"
    wait: float | None  # for "rate": seconds until the next start is allowed


class TakeReply(NamedTuple):
    """TAKE's reply (see lua/take.lua)."""

    superseded: bool  # this process no longer owns the private list: nothing was done
    missing_acks: int  # -1: acks sent as a trim were not where claimed, and were not removed
    # Epoch seconds; None if no retry waits, or the take was full. Below 0: the retry set's
    # first score is a priority level's (see lua/levels.lua), not in due order, and
    # `queue.ReliableQueue.take` reads the soonest due time from the bands.
    next_due: float | None
    attempts: list[int]  # of each new delivery
    payloads: list[bytes]  # of each new delivery, in take order
    held: Held | None = None  # what held the take back, if anything did
    groups: list[str] = []  # with groups: each new delivery's group (hex)  # noqa: RUF012
    # Whether the private list's bottom is a segment (lua/envelope.lua) after the call; None
    # if the call did not look.
    segment: bool | None = None


SUPERSEDED = -2  # what TAKE answers a process that no longer owns the private list


def _held(text: bytes) -> Held | None:
    if not text:
        return None
    reason, _, ms = text.decode().partition(":")
    return Held(reason, int(ms) / 1000 if ms else None)


def _take_reply(reply: list[Any]) -> TakeReply:
    if reply[0] == SUPERSEDED:
        return TakeReply(True, 0, None, [], [])
    payloads = reply[6:]
    # Attempts are listed only when some deliveries have them (retries, given back).
    attempts = [int(n) for n in reply[2].split(b",")] if reply[2] else [0] * len(payloads)
    next_due = float(reply[1]) if reply[1] else None
    groups = json.loads(reply[4]) if reply[4] else []
    segment = reply[5] == b"1" if reply[5] else None
    return TakeReply(
        False, int(reply[0]), next_due, attempts, payloads, _held(reply[3]), groups, segment
    )


def _envelopes(reply: list[bytes]) -> list[bytes]:
    return list(reply)


def _moved_unless_leased(reply: int) -> int | None:
    """How many moved, or None if the lease was alive (-1)."""
    return None if int(reply) < 0 else int(reply)


class TakenOver(NamedTuple):
    """TAKE_OVER's reply: how many moved (None if a reclaim found the lease alive), and
    the envelopes a replay added to the private list, oldest first."""

    moved: int | None
    envelopes: list[bytes]


def _taken_over(reply: list[Any]) -> TakenOver:
    moved = int(reply[0])
    return TakenOver(None if moved < 0 else moved, list(reply[1:]))


def _previous(reply: bytes | None) -> bytes | None:
    return reply


def _nothing(reply: None) -> None:
    return None


TAKE = load("take.lua", _take_reply)
TAKE_FLOW = load("take_flow.lua", _take_reply)
REPLAY = load("replay.lua", _envelopes)
GIVE_BACK = load("give_back.lua", int)
RETRY_LATER = load("retry_later.lua", bool)
LEASE = load("lease.lua", _previous)
DEAD_LETTER = load("dead_letter.lua", bool)
RECLAIM = load("reclaim.lua", _moved_unless_leased)
TAKE_OVER = load("take_over.lua", _taken_over)
DEAD_TAKE = load("dead_take.lua", int)
REPLY = load("reply.lua", _nothing)
SORT = load("sort.lua", int)
UNGROUP = load("ungroup.lua", int)
DELAY = load("delay.lua", int)
RUN_NOW = load("run_now.lua", int)
FIRE = load("fire.lua", int)
PUSH_ONCE = load("push_once.lua", bool)
RELEASE = load("release.lua", bool)
