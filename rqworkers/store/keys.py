"""Every key of a queue, declared once: its name, its Redis type, what runs on it, what it
holds.

Everything else that knows a key reads it from here, so that a key added or changed is
changed everywhere at once: the names a worker uses (`Keys`), the types `rqworkers check`
expects and a worker names when Redis answers WRONGTYPE, the commands the ACL check asks
about, and the table in docs/redis-keys.md (a test renders it from this declaration).

All keys start with the queue name, so that a `{hash tag}` in it keeps them in one Redis
Cluster slot.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, overload

if TYPE_CHECKING:
    from rqworkers.store import scripts

QUEUE = "<queue>"
WORKER = "<worker-id>"
GROUP = "<group>"  # a key per group: on a `Keys`, the name up to the group (a prefix)
PROCESS = "<process>"  # a key per worker process: on a `Keys`, the name up to it (a prefix)


class Key:
    """One key of a queue, declared as an attribute of `Keys`.

    `pattern` is its name with `<queue>` and `<worker-id>` to fill in; `type` is what Redis
    TYPE answers for it; `ttl` says how it expires, for the documentation. `commands` are
    what workers and keepers run on it outside the Lua scripts (which may touch every key),
    as the ACL check asks about them: `{name}` stands for the key of that name, so a move
    names its destination too. On an instance of `Keys` the attribute is the key's name.
    """

    def __init__(
        self,
        pattern: str,
        type: str,
        meaning: str,
        commands: tuple[tuple[str, ...], ...] = (),
        ttl: str = "",
        name: str = "",
    ) -> None:
        self.pattern = pattern
        self.type = type
        self.meaning = meaning
        self.commands = commands
        self.ttl = ttl
        self.name = name  # an attribute of `Keys` is named by `__set_name__`

    def __set_name__(self, owner: type[Keys], name: str) -> None:
        self.name = name

    @overload
    def __get__(self, keys: None, owner: type[Keys]) -> Key: ...
    @overload
    def __get__(self, keys: Keys, owner: type[Keys]) -> str: ...
    def __get__(self, keys: Keys | None, owner: type[Keys]) -> Key | str:
        if keys is None:
            return self
        # Kept on the instance, which then answers without calling here again.
        value = keys.__dict__[self.name] = self.of(keys.queue_name, keys.worker_id)
        return value

    def of(self, queue: str, worker_id: str = "") -> str:
        """This key's name for one queue (and worker). Every pattern starts with `<queue>`;
        only the rest is filled in, so a queue name is never read as a placeholder."""
        rest = self.pattern.removeprefix(QUEUE).replace(WORKER, worker_id)
        return queue + rest.removesuffix(GROUP).removesuffix(PROCESS)

    def probes(self, names: Mapping[str, str]) -> list[list[str]]:
        """`commands`, with the keys' names from `names` (attribute name → key name)."""
        return [[arg.format_map(names) for arg in command] for command in self.commands]

    @property
    def per_worker(self) -> bool:
        """Whether each worker has its own (a private list, a lease), or the queue has one."""
        return WORKER in self.pattern


class Keys:
    """The keys of one queue, as one of its workers names them: `Keys("jobs", "n:1").dead`.

    Each attribute below is a key's declaration on the class and its name on an instance
    (`Keys.dead.type` is "list", `Keys("jobs").dead` is "jobs:dead"). A worker id is needed
    only for the keys that have one (`Key.per_worker`).
    """

    queue = Key(
        QUEUE, "list",
        "the shared queue: producers `LPUSH`, workers take from the right (FIFO)",
        commands=(("BLMOVE", "{queue}", "{landing}", "RIGHT", "LEFT", "1"), ("LLEN", "{queue}")),
    )  # fmt: skip
    landing = Key(
        f"{QUEUE}:landing:{WORKER}", "list",
        "at most one message a worker's blocking fetch (`BLMOVE`) took while the queue was "
        "empty; its next take moves it to the private list",
    )  # fmt: skip
    processing = Key(
        f"{QUEUE}:processing:{WORKER}", "list",
        "one worker's in-flight deliveries, as envelopes `rqw1:<id>:<attempts>:<payload>`; "
        "fresh messages taken into it when empty may sit there as they came (a *segment*), "
        "above the oldest of them in a marked envelope `rqw1:<id>+<last>:0:<payload>`",
        commands=(("LRANGE", "{processing}", "0", "-1"),),
    )  # fmt: skip
    fast = Key(
        f"{QUEUE}:fast:{WORKER}:{PROCESS}", "list",
        "one worker process's in-flight deliveries taken by the fast path (prefetch 1: "
        "`LMOVE` from the shared list, acked by `LREM`), as the payloads themselves; "
        "`<process>` is the process's id prefix (in `fast_owners`) and `:0` or `:1`, for "
        "each process has two, used in turn (`fast_0`, `fast_1`). Once a replay or "
        "reclaim took it over, *sealed*: a string `superseded` for a day, so that a `LMOVE` "
        "into it fails and the superseded process can take nothing more",
        commands=(("LMOVE", "{queue}", "{fast}", "RIGHT", "LEFT"), ("LREM", "{fast}", "-1", "x"),
                  ("LMOVE", "{fast}", "{queue}", "LEFT", "RIGHT"), ("TYPE", "{fast}")),
        ttl="1 day, once superseded",
    )  # fmt: skip
    fast_owners = Key(
        f"{QUEUE}:fast-owners:{WORKER}", "set",
        "the processes (id prefixes) of that worker whose fast lists may hold deliveries: "
        "added by a process's replay, struck when its lists are taken over; where the "
        "next replay, or a reclaim, finds them",
        commands=(("SMEMBERS", "{fast_owners}"),),
    )  # fmt: skip
    retry = Key(
        f"{QUEUE}:retry", "zset",
        "envelopes waiting for their time (the score): failed messages, delayed messages "
        "(attempts 0, id `p<128 random bits>.<n>`), and messages given back or reclaimed "
        "with attempts behind them (due at once); taken before the shared list. Priorities 1 "
        "to 9 in bands of scores below 0, highest first (`rqw1:prio:<L>:` before the payload; "
        "see lua/levels.lua)",
        commands=(
            ("ZRANGE", "{retry}", "0", "0"), ("ZCARD", "{retry}"),
            ("ZRANGEBYSCORE", "{retry}", "0", "0"), ("ZCOUNT", "{retry}", "0", "0"),
        ),
    )  # fmt: skip
    nudge = Key(
        f"{QUEUE}:nudge", "string",
        "a random token, set once: pushed onto an empty shared list, it wakes a worker "
        "blocked there to learn that a message is due sooner (a nudge); a take drops it",
        commands=(("GET", "{nudge}"),),
    )  # fmt: skip
    schedules = Key(
        f"{QUEUE}:schedules", "hash",
        "schedule name → its watermark, the epoch seconds of the last fire time claimed: a "
        "manager enqueues a fire only by moving it, compare-and-set, in the same script",
        commands=(("HGET", "{schedules}", "s"),),
    )  # fmt: skip
    dead = Key(
        f"{QUEUE}:dead", "list", "dead-lettered payloads, byte-for-byte, newest first"
    )  # fmt: skip
    dead_reasons = Key(
        f"{QUEUE}:dead:reasons", "hash",
        "SHA-1 of a payload → JSON record of its newest dead copy `{reason, attempts, "
        "traceback, at, worker, id, copies, older}`; `older` holds the other copies' records, "
        "newest first",
        commands=(("HMGET", "{dead_reasons}", "d"),),
    )  # fmt: skip
    registry = Key(
        f"{QUEUE}:workers", "set",
        "worker ids that have had a private list: where orphan recovery looks (`SSCAN`)",
        commands=(("SADD", "{registry}", "w"), ("SSCAN", "{registry}", "0")),
    )  # fmt: skip
    lease = Key(
        f"{QUEUE}:lease:{WORKER}", "string",
        "the worker's lease; its value is the worker's status as JSON",
        commands=(("SET", "{lease}", "v", "PX", "1000", "GET"), ("EXISTS", "{lease}")),
        ttl="`lease_ttl`",
    )  # fmt: skip
    fence = Key(
        f"{QUEUE}:reclaim:{WORKER}", "string",
        "fence held while one manager reclaims that list",
        commands=(("SET", "{fence}", "1", "NX", "PX", "1000"), ("DEL", "{fence}")),
        ttl="5 s",
    )  # fmt: skip
    reclaim_turn = Key(
        f"{QUEUE}:reclaim-turn", "string",
        "the node whose keeper has the turn to look for orphans: one node at a time walks "
        "the registry, not every node at every pass",
        commands=(("SET", "{reclaim_turn}", "n", "NX", "PX", "1000"),),
        ttl="0.8 of the shorter of `reclaim_interval` and `lease_ttl`",
    )  # fmt: skip
    lengths = Key(
        f"{QUEUE}:lengths", "string",
        "the queue's lengths as a keeper last read them, JSON `{waiting, in_flight, "
        "retrying, dead}`: every node's `/metrics` shows them, one node a period reads them",
        commands=(("GET", "{lengths}"), ("SET", "{lengths}", "v", "PX", "1000")),
        ttl="the keepers' renewal period",
    )  # fmt: skip
    owner = Key(
        f"{QUEUE}:owner:{WORKER}", "string",
        "the id prefix of the process that last replayed (or first took into) that private "
        "list: only it takes into the list; deleted by a reclaim",
    )  # fmt: skip

    paused = Key(
        f"{QUEUE}:paused", "string",
        "present while the queue is paused (`rqworkers pause`): who paused it and when, as "
        "JSON; no worker starts a message of the queue meanwhile",
        commands=(("SET", "{paused}", "v"), ("DEL", "{paused}"), ("GET", "{paused}")),
    )  # fmt: skip
    permits = Key(
        f"{QUEUE}:permits", "hash",
        "worker id → how many of the queue's `max_running` permits it holds; a worker's "
        "entry goes with its replay or reclaim",
        commands=(("HGETALL", "{permits}"),),
    )  # fmt: skip
    starts = Key(
        f"{QUEUE}:starts", "zset",
        "the handler starts of the last `rate_limit` window, scored by their time in ms "
        "(Redis's clock): the sliding window's log",
        commands=(("ZCOUNT", "{starts}", "0", "+inf"),),
        ttl="the window",
    )  # fmt: skip
    wake = Key(
        f"{QUEUE}:wake", "list",
        "tokens that wake workers waiting for a permit or a resume (`BLPOP`); a few at most",
        commands=(("BLPOP", "{wake}", "1"), ("LPUSH", "{wake}", "1"), ("PEXPIRE", "{wake}", "1")),
        ttl="2 s",
    )  # fmt: skip

    ring = Key(
        f"{QUEUE}:groups", "list",
        "with `group_by`: the groups that have messages waiting, each once, in their turn "
        "(taken round-robin)",
        commands=(("LRANGE", "{ring}", "0", "99"),),
    )  # fmt: skip
    group_list = Key(
        f"{QUEUE}:group:{GROUP}", "list",
        "with `group_by`: one group's waiting messages, oldest last, each `<ms>|<payload>` "
        "(ms: when it was sorted out of the shared list)",
        commands=(("LLEN", "{group_list}"), ("LINDEX", "{group_list}", "-1")),
    )  # fmt: skip
    group_running = Key(
        f"{QUEUE}:group_running", "hash",
        "with groups: group → its messages in a handler, across every worker; a group "
        "with none running has no field",
        commands=(("HMGET", "{group_running}", "g"),),
    )  # fmt: skip
    held = Key(
        f"{QUEUE}:held:{WORKER}", "hash",
        "with groups: group → the group permits this worker holds; given back with its "
        "replay or reclaim",
    )  # fmt: skip
    group_starts = Key(
        f"{QUEUE}:group_starts:{GROUP}", "zset",
        "with `group_rate_limit`: one group's handler starts in its window, as `starts`",
        ttl="the window",
    )  # fmt: skip

    def __init__(self, queue: str, worker_id: str = "", process: str = "") -> None:
        self.queue_name = queue
        self.worker_id = worker_id
        self.process = process  # a worker process's id prefix, for its fast lists

    @property
    def fast_0(self) -> str:
        """The first of the two fast lists of the worker's process `process`."""
        return f"{self.fast}{self.process}:0"

    @property
    def fast_1(self) -> str:
        """The second of them (see store/fast.py for why two)."""
        return f"{self.fast}{self.process}:1"

    @classmethod
    def of(cls, queue: str, worker_id: str) -> Keys:
        """`Keys(queue, worker_id)`, as the queue's callers spell it."""
        return cls(queue, worker_id)

    @classmethod
    def declared(cls) -> Iterator[Key]:
        """Every key of a queue, in the order declared above."""
        return (value for value in vars(cls).values() if isinstance(value, Key))

    def names(self) -> dict[str, str]:
        """Each key's attribute name → its name for this queue and worker."""
        return {key.name: key.of(self.queue_name, self.worker_id) for key in self.declared()}

    def types(self, per_worker: bool = True) -> dict[str, str]:
        """Each key's name → the type Redis TYPE must answer for it, if it exists; without
        `per_worker`, only the keys the queue has one of (the shared list, the dead list...)."""
        return {
            key.of(self.queue_name, self.worker_id): key.type
            for key in self.declared()
            if per_worker or not key.per_worker
        }

    def commands(self) -> list[list[str]]:
        """What workers and keepers run on these keys outside scripts (`Key.commands`)."""
        names = self.names()
        return [probe for key in self.declared() for probe in key.probes(names)]

    def but(self, **names: str) -> Keys:
        """These keys, but with the keys `names` names given other names: a process's own
        fast list (`fast`), or its fast list as the private list a settling script works
        on (`processing`)."""
        keys = Keys(self.queue_name, self.worker_id, self.process)
        keys.__dict__.update(names)  # as `Key.__get__` keeps a name once worked out
        return keys

    def of_script(self, script: scripts.Script[Any]) -> list[str]:
        """The KEYS of `script`, in the order its Lua header binds them."""
        return [getattr(self, name) for name in script.keys]

    def __repr__(self) -> str:
        return f"Keys({self.queue_name!r}, {self.worker_id!r})"


# A task pair's replies: not one key per queue or worker but a namespace, `<id>` being
# anything after the prefix (`tasks.reply_prefix`). One script pushes a reply and sets its
# expiry; the ACL check asks about a key of it, `{replies}`.
REPLIES = Key(
    f"{QUEUE}:replies:<id>", "list",
    "task replies: an `Executor`'s, `Producer.reply_key`'s, any `reply_to` (the only keys a "
    "task message can make a worker write, with the pair's `reply_keys`)",
    commands=(("EVAL", "return 0", "1", "{replies}"), ("LPUSH", "{replies}", "r"),
              ("PEXPIRE", "{replies}", "1")),
    ttl="`result_ttl`",
    name="replies",
)  # fmt: skip

# A deduplication key (`Producer.push(dedup_key=K)`): one key per K, `<key>` being K as
# given. Its value is `<token>:<member>`: the token of the message that holds it (and its
# envelope in the retry set, when delayed). Written by one script with the push, freed by
# another when the message is acked or dead-lettered, or when its TTL ends.
DEDUP = Key(
    f"{QUEUE}:dedup:<key>", "string",
    "a deduplication key held by the message pushed with it, until that message is acked "
    "or dead-lettered (or, with `dedup_ttl`, for that long)",
    ttl="`dedup_ttl`, else 24 h after the message is due",
    name="dedup",
)  # fmt: skip
