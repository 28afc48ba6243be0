"""Key patterns in Redis's glob syntax, matched and compared as Redis matches keys: by byte.

`*` any bytes, `?` one byte, `[abc]`, `[a-z]`, `[^...]` one byte of a set (or not of it),
`\\x` the byte `x` itself. A pattern is read into one byte set per position (`*` is None),
which makes two questions exact and cheap: does a key match, and can two patterns ever
match the same key (`overlap`, a walk over pairs of positions). The second is how `check`
proves that an operator's `reply_keys` can never reach another queue's keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

_ANY = frozenset(range(256))
Step = frozenset[int] | None  # the bytes one position takes; None: `*`, any run of bytes


@dataclass(frozen=True)
class Glob:
    text: str
    steps: tuple[Step, ...]

    @classmethod
    def parse(cls, text: str) -> Glob:
        """The pattern `text`; `ValueError`, saying why, if it is not a whole pattern."""
        if not text:
            raise ValueError("an empty pattern matches no key")
        try:
            data = text.encode()
        except UnicodeEncodeError:
            raise ValueError(f"{text!r} is not valid UTF-8") from None
        steps: list[Step] = []
        i = 0
        while i < len(data):
            byte = data[i]
            if byte == ord("*"):
                if not steps or steps[-1] is not None:
                    steps.append(None)
                i += 1
            elif byte == ord("?"):
                steps.append(_ANY)
                i += 1
            elif byte == ord("["):
                chosen, i = _byte_set(data, i + 1, text)
                steps.append(chosen)
            elif byte == ord("\\"):
                if i + 1 == len(data):
                    raise ValueError(f"{text!r} ends with a lone backslash")
                steps.append(frozenset((data[i + 1],)))
                i += 2
            else:
                steps.append(frozenset((byte,)))
                i += 1
        return cls(text, tuple(steps))

    @classmethod
    def literal(cls, key: str, then_anything: bool = False) -> Glob:
        """The pattern matching exactly `key` (followed by anything, if `then_anything`)."""
        anything: tuple[Step, ...] = (None,) if then_anything else ()
        return cls(key + "*" * then_anything, (*_steps(key.encode()), *anything))

    def matches(self, key: str) -> bool:
        """Whether `key` matches; a key that is not valid UTF-8 never does."""
        try:
            data = key.encode()
        except UnicodeEncodeError:
            return False
        return self._regex.fullmatch(data) is not None

    @cached_property
    def _regex(self) -> re.Pattern[bytes]:
        """For `fullmatch`, in time linear in the key (times the pattern's length): a key is
        a producer's `reply_to`, and `.*` after `.*` backtracks in time that grows with the
        key's square, in C code no timeout reaches. So, as `fnmatch` does, each `*` but the
        last takes the first place where the steps after it fit, and never another (an
        atomic group): an earlier fit always leaves more room for what follows."""
        segments: list[list[frozenset[int]]] = [[]]  # the steps between two `*`
        for step in self.steps:
            if step is None:
                segments.append([])
            else:
                segments[-1].append(step)
        parts = [b"".join(map(_byte_class, segment)) for segment in segments]
        if len(parts) == 1:  # no `*`
            return re.compile(parts[0], re.DOTALL)
        head, *middle, tail = parts
        found = b"".join(b"(?>.*?" + part + b")" for part in middle)
        return re.compile(head + found + b".*" + tail, re.DOTALL)

    def overlaps(self, other: Glob) -> bool:
        """Whether some key matches both patterns."""
        a, b = self.steps, other.steps
        seen = {(0, 0)}
        todo = [(0, 0)]
        while todo:
            i, j = todo.pop()
            if i == len(a) and j == len(b):
                return True
            moves = []
            if i < len(a) and a[i] is None:
                moves.append((i + 1, j))  # a's `*` ends here
            if j < len(b) and b[j] is None:
                moves.append((i, j + 1))
            if i < len(a) and j < len(b) and _taken(a[i]) & _taken(b[j]):
                # one byte both take: a `*` stays where it is, any other step moves on
                moves.append((i + (a[i] is not None), j + (b[j] is not None)))
            for state in moves:
                if state not in seen:
                    seen.add(state)
                    todo.append(state)
        return False

    def within(self, prefix: str) -> bool:
        """Whether every key this pattern matches starts with `prefix`: it then matches
        none of the keys that end early or leave `prefix` at some byte."""
        data = prefix.encode()
        for n in range(len(data)):
            early = _steps(data[:n])
            astray = (*early, _ANY - {data[n]}, None)
            if self.overlaps(Glob("", early)) or self.overlaps(Glob("", astray)):
                return False
        return True


def _byte_class(step: frozenset[int]) -> bytes:
    if not step:
        return b"(?!)"  # `[]`: no byte at all
    return b"[" + b"".join(b"\\x%02x" % byte for byte in sorted(step)) + b"]"


def _taken(step: Step) -> frozenset[int]:
    return _ANY if step is None else step


def _steps(data: bytes) -> tuple[Step, ...]:
    return tuple(frozenset((byte,)) for byte in data)


def _byte_set(data: bytes, i: int, text: str) -> tuple[frozenset[int], int]:
    """The set of `[...]` whose body starts at `i`, and the index just past its `]`."""
    negate = i < len(data) and data[i] == ord("^")
    i += negate
    chosen: set[int] = set()
    while True:
        if i >= len(data):
            raise ValueError(f"{text!r} has a '[' without its ']'")
        byte = data[i]
        if byte == ord("]"):
            break
        if byte == ord("\\") and i + 1 < len(data):
            chosen.add(data[i + 1])
            i += 2
        elif i + 2 < len(data) and data[i + 1] == ord("-"):
            if data[i + 2] == ord("]"):  # Redis reads `[a-]` as the range a to `]`
                raise ValueError(f"{text!r}: write a dash at the end of a [set] as \\-")
            low, high = sorted((byte, data[i + 2]))
            chosen.update(range(low, high + 1))
            i += 3
        else:
            chosen.add(byte)
            i += 1
    return frozenset(_ANY - chosen if negate else chosen), i + 1
