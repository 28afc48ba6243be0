"""The loader of the Lua scripts: headers, named arguments and decoded replies."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rqworkers.store import scripts

LUA = Path(scripts.__file__).parent / "lua"
SCRIPTS = {name: s for name, s in vars(scripts).items() if isinstance(s, scripts.Script)}


def test_every_lua_file_is_a_script_or_the_library() -> None:
    loaded = {s.name for s in SCRIPTS.values()}
    assert {p.name for p in LUA.glob("*.lua")} == loaded | set(scripts.LIBRARIES)
    assert len(loaded) == len(SCRIPTS) == 18


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_name_a_header_declares_is_used_by_its_body(name: str) -> None:
    script = SCRIPTS[name]
    text = "\n".join([script.body, *(scripts.LIBRARIES[n].body for n in script.libraries)])
    code = "\n".join(line.split("--")[0] for line in text.splitlines())
    unused = [n for n in script.keys + script.args if not re.search(rf"\b{n}\b", code)]
    assert not unused
    assert bool(re.search(r"\bREST\b", code)) == (script.rest is not None), "variadic ARGV"


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_the_source_binds_keys_then_argv_by_header_order(name: str) -> None:
    script = SCRIPTS[name]
    first, second = script.legacy_source.splitlines()[:2]
    assert first == f"local {', '.join(script.keys)} = " + ", ".join(
        f"KEYS[{i}]" for i in range(1, len(script.keys) + 1)
    )
    assert second.startswith(f"local {', '.join(script.args)} = ARGV[1]")
    assert "#!lua" not in script.legacy_source
    if script.flags:
        assert script.source == f"#!lua flags={','.join(script.flags)}\n{script.legacy_source}"


def test_argv_follows_the_header_whatever_order_the_caller_names_them_in() -> None:
    argv = scripts.RETRY_LATER.argv(attempts=2, due=1.5, element=b"e", member_id="m")
    assert argv == [b"e", 1.5, "m", 2]
    acks = [b"a1", b"a2"]
    named = {"limit": 5, "now": 1.0, "idbase": "p.1.", "landed": "0", "worker_id": "w"}
    flow = {"max_running": 3, "running": 1, "rate": 10, "window": 1000}
    groups = {"group_by": "", "sorter": "", "group_max": 0, "group_rate": 0, "group_window": 0,
              "group_prefix": "q:group:", "starts_prefix": "q:group_starts:",
              "mine": "{}"}  # fmt: skip
    flow |= groups
    head = [5, 1.0, "p.1.", "0", "w", 0, "1", 3, 1, 10, 1000, "", "", 0, 0, 0, "q:group:",
            "q:group_starts:", "{}"]  # fmt: skip
    assert scripts.TAKE_FLOW.argv(**named, trim=0, segments="1", acks=acks, **flow) == [
        *head, *acks
    ]  # fmt: skip
    assert scripts.TAKE_FLOW.argv(**flow, segments="1", **named, trim=0) == head, "no acks"
    plain = scripts.TAKE.argv(**named, trim=0, look="0", segments="0", acks=acks)
    assert plain == [5, 1.0, "p.1.", "0", "w", 0, "0", "0", *acks]


@pytest.mark.parametrize(
    ("arguments", "complaint"),
    [
        ({"value": "v", "ttl": 1, "worker_id": "w"}, r"missing ARGV \['register'\]"),
        (
            {"value": "v", "ttl": 1, "worker_id": "w", "register": "1", "rest": []},
            r"unknown \['rest'\]",
        ),
    ],
)
def test_argv_refuses_a_name_missing_or_unknown(
    arguments: dict[str, object], complaint: str
) -> None:
    with pytest.raises(TypeError, match=complaint):
        scripts.LEASE.argv(**arguments)


def test_the_take_reply_is_decoded_by_name() -> None:
    assert scripts.TAKE.decode([-2]).superseded
    reply = scripts.TAKE.decode([0, b"", b"", b"", b"", b"", b"a", b"b"])
    assert reply == (False, 0, None, [0, 0], [b"a", b"b"], None, [], None)
    reply = scripts.TAKE.decode([-1, b"12.5", b"2,0", b"", b"", b"1", b"a", b"b"])
    assert (reply.missing_acks, reply.next_due, reply.attempts) == (-1, 12.5, [2, 0])
    assert reply.segment is True
    assert scripts.TAKE.decode([0, b"", b"", b"", b"", b"0"]).segment is False
    assert scripts.TAKE.decode([0, b"", b"", b"rate:250", b"", b""]).held == ("rate", 0.25)
    assert scripts.TAKE.decode([0, b"", b"", b"paused", b"", b""]).held == ("paused", None)
    assert scripts.TAKE.decode([0, b"", b"", b"", b'["61"]', b"", b"x"]).groups == ["61"]


def test_a_reclaim_refused_by_a_live_lease_decodes_to_none() -> None:
    assert scripts.RECLAIM.decode(-1) is None
    assert scripts.RECLAIM.decode(3) == 3


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("-- KEYS: a\n-- Returns 1.\n\nreturn 1\n", "ARGV"),
        ("-- KEYS: a\n-- ARGV: b\n\nreturn 1\n", "returns"),
        ("-- KEYS: a...\n-- ARGV: b\n-- Returns 1.\n\nreturn 1\n", "not a list of names"),
        ("-- KEYS: a\n-- ARGV: b..., c\n-- Returns 1.\n\nreturn 1\n", "not a list of names"),
        ("#!lua name=x\n-- KEYS: a\n-- ARGV: b\n-- Returns 1.\n\nreturn 1\n", "flags"),
        ("return 1\n", "no header comment"),
    ],
)
def test_a_header_the_loader_cannot_read_stops_the_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, complaint: str
) -> None:
    monkeypatch.setattr(scripts, "_LUA", tmp_path)
    (tmp_path / "bad.lua").write_text(text)
    with pytest.raises(ValueError, match=complaint):
        scripts.load("bad.lua", int)


def test_a_script_gets_the_library_and_constants_only_if_it_reads_them() -> None:
    assert scripts.DEAD_LETTER.libraries == ("envelope.lua",)
    assert scripts.DEAD_LETTER.constants == ("PREFIX", "KEPT_TWIN_RECORDS")
    assert scripts.TAKE.constants == ("PREFIX", "LEVEL_BAND", "FRESH_TAILS")
    assert not scripts.LEASE.libraries and not scripts.LEASE.constants
    assert not scripts.REPLY.libraries and "PREFIX" not in scripts.REPLY.source
    assert scripts.TAKE.libraries == ("envelope.lua", "levels.lua", "take_core.lua"), "no flow"
    assert scripts.TAKE_FLOW.libraries == (
        "envelope.lua",
        "levels.lua",
        "flow.lua",
        "take_core.lua",
    )
