"""Words for operators: counts that read as English ("1 host", "2 hosts"), and text from
users' data made safe to print."""

from __future__ import annotations

_IRREGULAR = {"delivery": "deliveries", "was": "were", "is": "are"}


def plural(count: int, noun: str) -> str:
    """`"1 delivery"`, `"3 deliveries"`, `"0 hosts"`: the count with its noun agreeing."""
    if count == 1:
        return f"{count} {noun}"
    return f"{count} {_IRREGULAR.get(noun, noun + 's')}"


def a(noun: str) -> str:
    """`"an int"`, `"a str"`: the noun with its indefinite article (by its first letter)."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def printable(text: str, keep_newlines: bool = False) -> str:
    """`text` safe to show on a terminal or a log line: every control character escaped as
    Python writes it (`\\n`, `\\x1b`, `\\u202e`), so that data from a message, an exception or
    a payload can neither drive the terminal nor forge a line of its own. `keep_newlines`
    keeps the line breaks of a text meant to span lines (a traceback)."""
    if text.isprintable():
        return text
    return "".join(
        char if char.isprintable() or (keep_newlines and char == "\n") else repr(char)[1:-1]
        for char in text
    )


QUOTE_MARK = "  | "  # starts every line that came from elsewhere: no line of ours does


def quoted(text: str) -> str:
    """A text of several lines that came from elsewhere (a traceback kept in Redis), made
    `printable` and each line marked `  | `, so that no line in it passes for one of ours."""
    lines = printable(text.rstrip("\n"), keep_newlines=True).split("\n")
    return "".join(f"{QUOTE_MARK}{line}\n" for line in lines)
