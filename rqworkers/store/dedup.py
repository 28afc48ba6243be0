"""Deduplication keys: a push that is dropped while a message with the same key waits, is
scheduled or runs, with the check and the push in one script (`scripts.PUSH_ONCE`).

The worker must learn a message's key to free it once the message is settled, and a raw
`LPUSH` producer's messages must stay as they are. So only a message pushed with a key (in
the default mode, and `debounce`) travels wrapped: `rqw1:dedup:<token>:<key, hex>:<payload>`.
The worker unwraps it when it takes it (`queue.Delivery`): the handler sees the payload, the
dead list keeps the payload (lua/dead_letter.lua unwraps it there too), and the settler
frees the key after the ack or the dead letter (`release`), never after a retry: the
message is still pending then. `throttle` (`dedup_ttl`) sends the payload bare: its key
lives its TTL, whatever becomes of the message.

The key expires in any case: `HOLD` (a day) after the message is due, so a key whose
message was lost, or whose release failed, blocks pushes for a bounded time only.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Literal

from rqworkers.store import levels, scripts
from rqworkers.store.connections import Client
from rqworkers.store.direct import script_caller
from rqworkers.store.keys import DEDUP, Keys
from rqworkers.store.queue import bind_script, wrap_dedup

HOLD = 86400.0  # seconds a held key lives after its message is due, at most
MAX_KEY_BYTES = 1024

Mode = Literal["hold", "throttle", "debounce"]


def key_name(queue: str, key: str) -> str:
    return DEDUP.of(queue).replace("<key>", key)


def check_key(key: object) -> str:
    if not isinstance(key, str) or not key or len(key.encode()) > MAX_KEY_BYTES:
        raise ValueError(f"dedup_key must be a non-empty string of at most {MAX_KEY_BYTES} bytes")
    return key


def _call(
    client: Client, script: scripts.Script[bool], keys: Sequence[str], **args: object
) -> bool:
    bind = script_caller(client, False)
    call = bind_script(lambda source: bind(source, keys), script)
    return script.decode(call(*script.argv(**args)))


def push_once(
    client: Client,
    queue: str,
    key: str,
    payload: bytes,
    mode: Mode,
    hold: float,
    due: float | None,
    level: int = 0,
) -> bool:
    """Push `payload` onto `queue` (or its retry set, due at `due`, or waiting at a priority
    `level` of 1 to 9) under `key`; whether it was enqueued. `hold`: seconds the key lives
    (after `due`, if delayed)."""
    token = secrets.token_hex(16)
    body = payload if mode == "throttle" else wrap_dedup(token, key, payload)
    body = levels.wrap(level, body)
    member, score = b"", ""
    if due is not None or level:
        ident = f"p{token}." if due is not None else levels.waiting_id_base(token[:16])
        member = b"%s%s00000001:0:%s" % (scripts.PREFIX.encode(), ident.encode(), body)
        at = levels.waiting_score(level) if due is None else levels.due_score(level, due)
        score = repr(at)
    k = Keys(queue)
    return _call(
        client,
        scripts.PUSH_ONCE,
        [k.queue, k.retry, k.nudge, key_name(queue, key)],
        mode=mode,
        token=token,
        hold_ms=max(1, round(hold * 1000)),
        due=score,
        member=member,
        payload=body,
        fresh_token=scripts.new_nudge_token(),
    )


def release(client: Client, queue: str, token: str, key: str) -> bool:
    """Free `key` if the message with `token` still holds it."""
    return _call(client, scripts.RELEASE, [key_name(queue, key)], token=token)
