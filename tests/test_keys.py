"""The keys of a queue are declared once (`store.keys`): the documentation shows that
declaration, and every name the workers use comes from it."""

from __future__ import annotations

from pathlib import Path

from rqworkers.store.keys import DEDUP, REPLIES, Key, Keys

DOC = Path(__file__).resolve().parent.parent / "docs" / "redis-keys.md"


def _row(key: Key) -> str:
    kind = f"{key.type}, TTL {key.ttl}" if key.ttl else key.type
    # The commands' names, once each, in the order declared.
    commands = ", ".join(dict.fromkeys(f"`{command[0]}`" for command in key.commands))
    return f"| `{key.pattern}` | {kind} | {commands or '—'} | {key.meaning} |"


def table() -> str:
    """docs/redis-keys.md's table of keys, as the declaration renders it."""
    rows = [_row(key) for key in (*Keys.declared(), REPLIES, DEDUP)]
    head = ["| key | type | probed by `check` | what it holds |", "|---|---|---|---|"]
    return "\n".join([*head, *rows])


def test_the_documented_table_is_the_declaration() -> None:
    assert f"\n{table()}\n" in DOC.read_text(encoding="utf-8"), (
        f"docs/redis-keys.md: replace the table of keys with\n{table()}"
    )


def test_keys_are_named_from_the_declaration() -> None:
    keys = Keys("{jobs}", "node:1")
    assert keys.queue == "{jobs}"
    assert keys.processing == "{jobs}:processing:node:1"
    assert keys.dead_reasons == "{jobs}:dead:reasons"
    assert keys.owner == "{jobs}:owner:node:1"
    assert list(keys.names()) == [key.name for key in Keys.declared()]
    assert all(name.startswith("{jobs}") for name in keys.names().values())
    assert Keys.dead.type == "list"
    assert not Keys.retry.per_worker and Keys.lease.per_worker


def test_every_command_names_only_keys_of_the_queue() -> None:
    keys = Keys("q", "w")
    names = set(keys.names().values())
    for command in keys.commands():
        assert command[1] in names, command
