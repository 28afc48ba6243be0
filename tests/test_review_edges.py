"""A hostile review of issue 17 (security at the edges): what a producer, a page visitor
and the operator's own config can make the service do, tried where the earlier tests did
not look. Each test says which promise it holds the service to.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rqworkers.client.tasks import ReplyKeys
from rqworkers.config import load
from rqworkers.errors import ConfigError
from rqworkers.store.keys import DEDUP, REPLIES, Keys
from tests.support import APPS, task_pair, write_config


@pytest.fixture(autouse=True)
def apps_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(APPS))


# --- reply_keys and the queues the config schedules into --------------------------------


def test_reply_keys_that_could_reach_a_scheduled_queue_are_refused(tmp_path: Path) -> None:
    """`check` promises that `reply_keys` reach no configured queue's keys. A queue that
    `[[schedules]]` pushes into is configured too, even when another fleet consumes it:
    a glob reaching it let any producer push into it, or empty it (`result_ttl` 0.001
    expires it), through the worker's rights."""
    path = write_config(
        tmp_path / "rq.toml",
        "redis://127.0.0.1:1/0",
        [task_pair(reply_keys=["results:*", "bill*"])],
        schedules=[{"name": "nightly", "host": "local", "queue": "billing", "every": 60,
                    "payload": "run"}],
    )  # fmt: skip
    with pytest.raises(ConfigError) as info:
        load(path, environ={})
    (line,) = info.value.render().splitlines()
    assert line.startswith(f"{path}: workers[0].reply_keys[1]: 'bill*' could match keys of ")
    assert "'billing' (schedule 'nightly' pushes there)" in line


def test_reply_keys_beside_a_scheduled_queue_they_cannot_reach_pass(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "rq.toml",
        "redis://127.0.0.1:1/0",
        [task_pair(reply_keys=["results:*", "tasks:replies:done:*"])],
        schedules=[{"name": "nightly", "host": "local", "queue": "billing", "every": 60,
                    "payload": "run"},
                   {"name": "own", "host": "local", "queue": "tasks", "every": 60,
                    "task": "taskapp:add", "args": [1, 2]}],
    )  # fmt: skip
    assert load(path, environ={}).pairs[0].reply_keys == ("results:*", "tasks:replies:done:*")


# --- reply_to against every key the service owns ----------------------------------------


def test_no_key_of_a_queue_but_its_replies_can_be_a_reply_to() -> None:
    """Every key declared in store/keys.py, for this queue and for a queue whose name
    starts like it, with glob and Cluster hash-tag characters: only `<queue>:replies:*`
    passes, and what the operator's (checked) `reply_keys` add. (A queue named
    `<queue>:replies...` on the same host is refused by the config.)"""
    for queue in ("tasks", "{tasks}", "t*[a]?"):
        keys = Keys(queue, "node:1", "p1")
        replies = ReplyKeys(queue, ["results:*"])
        owned = [*keys.names().values(), keys.fast_0, keys.fast_1,
                 DEDUP.of(queue).replace("<key>", "k"), keys.group_list + "g"]  # fmt: skip
        owned += Keys(f"{queue}x", "node:1").names().values()  # a look-alike queue's
        for key in owned:
            assert replies.refusal(key), key
        for key in (REPLIES.of(queue).replace("<id>", "x"), f"{queue}:replies:", "results:1"):
            assert replies.refusal(key) is None, key
        for key in ("", "\udc80", f"{queue}:replies:\ud800"):  # empty, not UTF-8
            assert replies.refusal(key), repr(key)
