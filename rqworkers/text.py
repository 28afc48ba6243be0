"""Words for operators: counts that read as English ("1 host", "2 hosts")."""

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
