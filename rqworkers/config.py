"""Loading and validating the TOML configuration.

This is the only module that knows the file format. It turns a file into a frozen `Config`
whose `pairs` are fully resolved: `[defaults]` merged into every `[[workers]]` entry, host
names replaced by URLs, `${VAR}` references expanded. Every problem is reported at once,
each naming the file, the field path and what is wrong.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import socket
import stat
import tomllib
import zoneinfo
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal, cast

import cronsim
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails

from rqworkers.client import tasks
from rqworkers.common import files
from rqworkers.common.globs import Glob
from rqworkers.common.rates import Rate
from rqworkers.errors import ConfigError
from rqworkers.store import connections
from rqworkers.store.flow import Limits

URL_SCHEMES = connections.SCHEMES

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
# Bounds (docs/configuration.md lists them). Every value inside them runs.
MAX_SECONDS = 7 * 24 * 3600.0  # any duration: a week; `inf` or 1e308 overflow timers
MIN_CHECK_INTERVAL = 0.01  # below it the manager would busy-loop
MAX_CHECK_INTERVAL = 60.0  # memory limits and hard timeouts are enforced on this tick
MIN_TIMEOUT = 0.001  # setitimer rounds anything shorter to 0, which means "no timeout"
MIN_RECLAIM_INTERVAL = 0.1  # below it the keeper would busy-loop
MAX_LEASE_TTL = 24 * 3600.0
MAX_COUNT = 10**9  # max_requests, max_requests_jitter, max_attempts
MAX_BACKUP_COUNT = 1000  # a rollover renames every kept file
MAX_SIZE = 2**63 - 1  # bytes: what the OS and Redis count in
MIN_MEMORY_LIMIT = 64 * 1024**2  # bytes; a bare worker's RSS is about 40 MB
MAX_PROCESSES_TOTAL = 4096  # all pairs together: one process and one shared page each
MIN_RESTART_BACKOFF = 1.0  # seconds: below it a worker that cannot start forks in a tight loop
MAX_CONFIG_BYTES = 1024 * 1024  # a config file is a few KiB; past this it is no config file


def max_processes() -> int:
    """Ceiling of `processes` for one pair on this machine: 32 per CPU core.

    Beyond it the workers of one queue only take turns on the CPUs. Checked where workers
    run (`check`, `run`), not by `load`.
    """
    return 32 * (os.cpu_count() or 1)


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_VAR_RE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
# What `_VAR_RE` reads, plus a `${` that starts no valid reference (group 3).
_BROKEN_VAR_RE = re.compile(_VAR_RE.pattern + r"|(\$\{[^}]*\}?)")


def parse_size(value: object) -> int:
    """Bytes from `1048576`, `"200MB"` (10**6) or `"1GiB"` (2**30). Booleans are refused."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 200MB, 1GiB or a number of bytes")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match and match.group(2).lower() in _SIZE_UNITS and len(match.group(1)) <= 30:
            # Decimal, not float: exact for every integer and no overflow on absurd input.
            return int(Decimal(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    raise ValueError(f"{value!r} is not a size such as 200MB, 1GiB or a number of bytes")


class Expanded(str):
    """A string in which a `${VAR}` was replaced: it may stand for a number."""


def _from_environment(value: object) -> object:
    """A number that came from `${VAR}` (`processes = "${PROCS:-3}"`), parsed as TOML would.

    Only there: a number written as a string in the file itself (`processes = "3"`) stays
    a string and is refused, as are `true` for an int and `2.0` for an int.
    """
    if not isinstance(value, Expanded):
        return value
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except (tomllib.TOMLDecodeError, KeyError):
        return value
    return parsed if isinstance(parsed, int | float) and not isinstance(parsed, bool) else value


_NUMBER = BeforeValidator(_from_environment)
Int = Annotated[int, _NUMBER]
Float = Annotated[float, _NUMBER]
Size = Annotated[int, BeforeValidator(parse_size), Field(le=MAX_SIZE)]


def _rate(value: object) -> object:
    """`"100/s"` as a `Rate`; a `Rate` as it is (a pair from `[defaults]`)."""
    if isinstance(value, Rate):
        return value
    if not isinstance(value, str):
        raise ValueError(
            f"{value!r} is not a rate: write a string, N/s, N/m or N/h, such as '100/s'"
        )
    return Rate.parse(value)


RateLimit = Annotated[Rate, BeforeValidator(_rate)]


class _Section(BaseModel):
    # Unknown keys are errors: a typo such as `max_request` must not pass silently.
    # Strict: `processes = "3"`, `processes = true`, `max_attempts = 2.0` are mistakes, not
    # values to coerce. Not finite (`inf`, `nan`) is refused for every number.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


def _tuple_of_list(value: object) -> object:
    """A TOML array as the tuple a frozen setting holds (strict types take no list)."""
    return tuple(value) if isinstance(value, list) else value


def _no_nul(cls: type, value: str | None) -> str | None:
    """A path no system call can take: refused here rather than by a `ValueError` later."""
    if value is not None and "\0" in value:
        raise ValueError(f"{value!r} holds a NUL character: no file has that name")
    return value


class ManagerSettings(_Section):
    check_interval: Float = Field(
        1.0, ge=MIN_CHECK_INTERVAL, le=MAX_CHECK_INTERVAL, description="seconds between passes"
    )
    shutdown_timeout: Float = Field(30.0, ge=0, le=MAX_SECONDS, description="stop budget, s")
    restart_backoff_max: Float = Field(
        30.0, ge=MIN_RESTART_BACKOFF, le=MAX_SECONDS, description="backoff cap, s"
    )
    node: str | None = Field(None, min_length=1, description="node identity in worker ids")
    lease_ttl: Float = Field(30.0, ge=1, le=MAX_LEASE_TTL, description="lease life, seconds")
    reclaim_interval: Float = Field(
        10.0, ge=MIN_RECLAIM_INTERVAL, le=MAX_SECONDS, description="seconds between orphan scans"
    )
    pid_file: str | None = Field(None, min_length=1, description="where the manager writes its pid")
    metrics_address: str | None = Field(None, description="host:port for /metrics and /healthz")
    # The status page's actions (see `rqworkers.ops.web`): a SecretStr so that no repr or log
    # shows it; the file is read again at every check, so it can be rotated in place.
    dashboard_token: SecretStr | None = Field(None, description="enables requeue and purge")
    dashboard_token_file: str | None = Field(None, description="file holding that token")
    # Host names the page answers besides its own address and loopback (DNS rebinding).
    dashboard_hosts: Annotated[tuple[str, ...], BeforeValidator(_tuple_of_list)] = Field(
        (), description="more Host names for the page"
    )
    dashboard_private: bool = Field(False, description="dead letters only with the token")

    _pid_file_path = field_validator("pid_file")(_no_nul)

    @field_validator("pid_file")
    @classmethod
    def _pid_file_is_a_file(cls, value: str | None) -> str | None:
        if value is not None and Path(value).is_dir():
            raise ValueError(f"{value!r} is a directory; name a file in it, such as rqworkers.pid")
        return value

    @field_validator("metrics_address")
    @classmethod
    def _host_and_port(cls, value: str | None) -> str | None:
        if value is not None:
            metrics_endpoint(value)
        return value

    @field_validator("dashboard_hosts")
    @classmethod
    def _host_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        problems = [f"{name!r} is not a host name or address" for name in value
                    if not host_name_ok(name)]  # fmt: skip
        if problems:
            raise ValueError("; ".join(problems))
        return tuple(name.lower() for name in value)

    @model_validator(mode="after")
    def _one_good_token(self) -> ManagerSettings:
        if self.dashboard_token is not None and self.dashboard_token_file is not None:
            raise ValueError("give either dashboard_token or dashboard_token_file, not both")
        if self.dashboard_token is not None:
            check_token(self.dashboard_token.get_secret_value(), "dashboard_token")
        if self.dashboard_token_file is not None:
            read_token_file(self.dashboard_token_file)
        elif self.dashboard_private and self.dashboard_token is None:
            raise ValueError("dashboard_private needs dashboard_token or dashboard_token_file")
        return self


MIN_TOKEN_LENGTH = 16  # characters: too many to guess over HTTP, even at full speed


MAX_TOKEN_FILE = 4096  # bytes: a token file is one line; /dev/zero must not fill memory
# A DNS name (`status.example.com`): labels of letters, digits and inner hyphens.
_DNS_NAME_RE = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}"
    r"[A-Za-z0-9])?\.?"
)


def host_name_ok(name: str) -> bool:
    """Whether `name` is a DNS name, an IPv4 address, or an IPv6 one in brackets, as a
    `Host` header names a server (without the port). The whole text must be one: no
    trailing newline, no `[:]`, no all-digit name that is not an IPv4 address."""
    if name.startswith("[") and name.endswith("]"):
        try:
            ipaddress.IPv6Address(name[1:-1])
        except ValueError:
            return False
        return True
    if not _DNS_NAME_RE.fullmatch(name):
        return False
    if name.rstrip(".").rpartition(".")[2].isdigit():  # numbers: an IPv4 address or nothing
        try:
            ipaddress.IPv4Address(name)
        except ValueError:
            return False
    return True


def check_token(token: str, where: str) -> None:
    """Raise ValueError if `token` is too short to protect the status page's actions."""
    if len(token.strip()) < MIN_TOKEN_LENGTH:
        raise ValueError(f"{where}: must hold at least {MIN_TOKEN_LENGTH} characters")


def read_token_file(path: str) -> str:
    """The token in `path`, checked as at load; ValueError saying what is wrong otherwise.

    The status page calls this at every request, so a file emptied, shortened, swapped
    for a FIFO or a device, or replaced by another user while the service runs turns the
    actions off rather than on. It must be a regular file that only its owner, this user
    or root, can write. It may be reached through symlinks (Kubernetes mounts secrets so)
    if each is this user's or root's; and no folder that holds a link, a folder or the
    file on the way may let others swap what it holds: not writable by others, or sticky
    (as /tmp is), where no one removes another's file. `_resolve_owned` walks the path.
    """
    where = f"dashboard_token_file {path}"
    try:
        real = _resolve_owned(path, where)
        fd = files.open_regular(real, os.O_RDONLY | os.O_NOCTTY, follow=False)
    except files.NotRegularFileError as exc:
        raise ValueError(f"{where}: {exc}") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise ValueError(f"{where}: cannot read: {exc}") from None
    try:
        info = os.fstat(fd)
        named = "" if real == os.path.abspath(path) else f" ({real})"
        if info.st_uid not in (0, os.geteuid()):
            raise ValueError(f"{where}: the file{named} is owned by uid {info.st_uid}, "
                             "not this user or root")  # fmt: skip
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ValueError(f"{where}: the file{named} is writable by others than its owner")
        data = os.read(fd, MAX_TOKEN_FILE + 1)
    except OSError as exc:
        raise ValueError(f"{where}: cannot read: {exc}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_TOKEN_FILE:
        raise ValueError(f"{where}: larger than {MAX_TOKEN_FILE} bytes")
    try:
        token = data.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise ValueError(f"{where}: not UTF-8 text") from None
    check_token(token, where)
    return token


MAX_LINKS = 40  # symlinks followed on the way to a token file, as Linux allows


def _resolve_owned(path: str, where: str) -> str:
    """The real path of `path`, found as the kernel would, one component at a time (each
    link read with `os.readlink`), checking that no other user can change where it leads:
    every link is this user's or root's, and every folder holding a component is too and
    is not writable by group or others unless sticky. ValueError names the first that
    fails.

    Checking only the configured path would not do: a private link to a file in a
    world-writable folder lets anyone there put their own file, or link, in its place."""
    pending = list(reversed(os.path.abspath(path).split("/")))
    current, links = "/", 0
    while pending:
        name = pending.pop()
        if name in ("", "."):
            continue
        if name == "..":
            current = os.path.dirname(current)  # `current` holds no link: this is exact
            continue
        candidate = os.path.join(current, name)
        folder = os.stat(current)
        entry = os.lstat(candidate)
        if folder.st_uid not in (0, os.geteuid()):  # its owner may change anything in it
            raise ValueError(f"{where}: {candidate} is in a folder owned by uid "
                             f"{folder.st_uid}, not this user or root: {current}")  # fmt: skip
        if folder.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not folder.st_mode & stat.S_ISVTX:
            raise ValueError(f"{where}: {candidate} is in a folder others can write to "
                             f"(and not sticky): {current}")  # fmt: skip
        if not stat.S_ISLNK(entry.st_mode):
            current = candidate
            continue
        links += 1
        if links > MAX_LINKS:
            raise ValueError(f"{where}: more than {MAX_LINKS} symlinks on the way")
        if entry.st_uid not in (0, os.geteuid()):
            raise ValueError(f"{where}: {candidate} is a symlink owned by uid {entry.st_uid}, "
                             "not this user or root")  # fmt: skip
        target = os.readlink(candidate)
        if target.startswith("/"):
            current = "/"
        pending.extend(reversed(target.split("/")))
    return current


def metrics_endpoint(address: str) -> tuple[str, int]:
    """`("127.0.0.1", 9108)` from `"127.0.0.1:9108"`; an empty host is 127.0.0.1.

    Raises ValueError naming what is wrong: no port, one outside 1..65535, or an IPv6
    address (the keeper's server listens on IPv4).
    """
    host, colon, port = address.rpartition(":")
    if not colon or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{address!r} is not host:port with a port from 1 to 65535")
    if ":" in host or host.startswith("["):
        raise ValueError(
            f"{address!r}: the page and /metrics listen on IPv4 only; give an IPv4 address "
            "or a host name, such as 127.0.0.1:9108 or 0.0.0.0:9108"
        )
    return host or "127.0.0.1", int(port)


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    file: str | None = None  # "" is none too: `file = "${LOG_FILE:-}"` may turn it off
    max_bytes: Size = 10 * 1000**2
    backup_count: Int = Field(5, ge=0, le=MAX_BACKUP_COUNT)
    format: Literal["text", "json"] = "text"
    # Per-message lines, as the fraction of messages that get one (0 = none, 1 = all): at
    # thousands of messages a second, logging each would become the bottleneck.
    sample_succeeded: Float = Field(0.0, ge=0, le=1)
    sample_failed: Float = Field(1.0, ge=0, le=1)

    _file_path = field_validator("file")(_no_nul)

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value


class TelemetrySettings(_Section):
    # One consumer span per delivery, exported as the OTEL_* environment variables say
    # (docs/tracing.md); needs the `otel` extra, which `check` and `run` verify.
    tracing: bool = False


class PairSettings(_Section):
    """One `(host, queue)` pair with every setting resolved. The unit the manager runs."""

    host: str = Field(min_length=1)
    queue: str = Field(min_length=1)
    handler: str | None = Field(None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
    # A task pair: an allow-list of `module:function` / `module:*` (see `tasks`).
    tasks: Annotated[tuple[str, ...], BeforeValidator(_tuple_of_list)] | None = Field(
        None, min_length=1
    )
    # Globs of keys a task pair may push replies onto, besides `<queue>:replies:*`.
    reply_keys: Annotated[tuple[str, ...], BeforeValidator(_tuple_of_list)] = ()
    # The machine's own ceiling (`max_processes`) is checked by `check` and `run`, not here:
    # `status` and `dead` load the same file on a smaller machine.
    processes: Int = Field(1, ge=1, le=MAX_PROCESSES_TOTAL)
    prefetch: Int = Field(1, ge=1, le=10_000)
    # Messages one worker process runs at once: threads, or coroutines for `async def`.
    concurrency: Int = Field(1, ge=1, le=1000)
    max_requests: Int = Field(10_000, ge=0, le=MAX_COUNT)
    max_requests_jitter: Int = Field(0, ge=0, le=MAX_COUNT)
    timeout: Float = Field(30.0, ge=MIN_TIMEOUT, le=MAX_SECONDS)
    timeout_grace: Float = Field(5.0, ge=0, le=MAX_SECONDS)
    setup_timeout: Float = Field(60.0, gt=0, le=MAX_SECONDS)  # seconds setup() may take
    soft_memory_limit: Size = 0
    hard_memory_limit: Size = 0
    max_attempts: Int = Field(5, ge=1, le=MAX_COUNT)
    retry_delay: Float = Field(1.0, ge=0, le=MAX_SECONDS)
    retry_delay_max: Float = Field(300.0, ge=0, le=MAX_SECONDS)
    # Flow control across the fleet (`docs/flow-control.md`): at most this many messages of
    # the queue in a handler at once, and at most this many handler starts in any window.
    max_running: Int | None = Field(None, ge=1, le=MAX_COUNT)
    rate_limit: RateLimit | None = None
    # Groups: the JSON field naming each message's group; they share the workers fairly
    # (round-robin), each under these limits of its own.
    group_by: str | None = Field(None, pattern=r"^[^.\s]+(\.[^.\s]+)*$", max_length=200)
    group_max_running: Int | None = Field(None, ge=1, le=MAX_COUNT)
    group_rate_limit: RateLimit | None = None
    # Priorities (`docs/time.md`): every N-th take of a worker serves level 0 (the shared
    # list) first, so that a steady stream of prioritised messages cannot starve it; 0: off.
    level0_every: Int = Field(0, ge=0, le=MAX_COUNT)
    # Filled in by the loader, never by the user: the host's URL.
    url: str = Field("", exclude=True)

    @field_validator("soft_memory_limit", "hard_memory_limit")
    @classmethod
    def _room_to_start(cls, value: int) -> int:
        if 0 < value < MIN_MEMORY_LIMIT:
            raise ValueError(
                f"{value} bytes is below what a worker needs to start; use 0 (off) or at "
                f"least {MIN_MEMORY_LIMIT // 1024**2}MiB"
            )
        return value

    @field_validator("tasks")
    @classmethod
    def _task_patterns(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        problems = [p for p in map(tasks.pattern_problem, value or ()) if p]
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @field_validator("reply_keys")
    @classmethod
    def _reply_globs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        problems = []
        for pattern in value:
            try:
                Glob.parse(pattern)
            except ValueError as exc:
                problems.append(str(exc))
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @model_validator(mode="wrap")
    @classmethod
    def _handler_or_tasks(cls, data: Any, validate: Any) -> Any:
        """Exactly one of `handler` and `tasks`; neither is reported with the other problems."""
        neither = isinstance(data, dict) and not {"handler", "tasks"} & set(data)
        missing: InitErrorDetails = {"type": "missing", "loc": ("handler",), "input": data}
        try:
            pair = validate(data)
        except ValidationError as exc:
            if not neither:
                raise
            found = [cast(InitErrorDetails, error) for error in exc.errors()]
            raise ValidationError.from_exception_data(exc.title, [*found, missing]) from None
        if neither:
            raise ValidationError.from_exception_data(cls.__name__, [missing])
        if pair.handler is not None and pair.tasks is not None:
            raise ValueError("set `handler` (raw payloads) or `tasks` (task messages), not both")
        if pair.reply_keys and pair.tasks is None:
            raise ValueError("reply_keys: only a task pair (`tasks`) sends replies")
        return pair

    @model_validator(mode="after")
    def _limits_ordered(self) -> PairSettings:
        soft, hard = self.soft_memory_limit, self.hard_memory_limit
        if soft and hard and soft >= hard:
            raise ValueError(
                f"soft_memory_limit ({soft} bytes) must be below hard_memory_limit ({hard} bytes)"
            )
        return self

    @property
    def endpoint(self) -> str:
        """The URL with any password hidden, fit for logs."""
        return connections.redact(self.url)

    @property
    def limits(self) -> Limits:
        """The flow limits its workers enforce (in TAKE) and `status` shows."""
        return Limits(
            max_running=self.max_running or 0,
            rate=self.rate_limit,
            group_by=self.group_by or "",
            group_max_running=self.group_max_running or 0,
            group_rate=self.group_rate_limit,
        )


MIN_EVERY = 0.1  # seconds between a schedule's fires, at least: the keeper ticks 5 a second
CATCH_UP_ALL = 100  # fires `catch_up = "all"` sends at most, the newest: never a storm


class ScheduleSettings(_Section):
    """One `[[schedules]]` table: a message pushed onto `queue` at each fire time (see
    `ops/schedules.py`), by whichever manager claims the fire time first."""

    name: str = Field(min_length=1, max_length=200, pattern=r"^[\w.-]+$")
    host: str = Field(min_length=1)
    queue: str = Field(min_length=1)
    cron: str | None = Field(None, min_length=1)
    every: Float | None = Field(None, ge=MIN_EVERY, le=MAX_SECONDS)
    timezone: str = "UTC"
    task: str | None = Field(None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
    payload: str | None = None
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    catch_up: Literal["none", "last", "all"] = "last"
    # Filled in by the loader, never by the user: the host's URL.
    url: str = Field("", exclude=True)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        # OSError: a region's folder ("Europe") or a name too long for a file, opened as one.
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
            raise ValueError(
                f"{value!r} is not an IANA time zone (such as Europe/Berlin)"
            ) from None
        return value

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                cronsim.CronSim(value, datetime.datetime.now(datetime.UTC))
            except cronsim.CronSimError as exc:
                raise ValueError(f"{value!r} is not a cron expression: {exc}") from None
        return value

    @model_validator(mode="after")
    def _one_of_each(self) -> ScheduleSettings:
        if (self.cron is None) == (self.every is None):
            raise ValueError("set `cron` (an expression) or `every` (seconds), one of them")
        if (self.task is None) == (self.payload is None):
            raise ValueError("set `task` (a task message) or `payload` (raw bytes), one of them")
        if self.task is None and (self.args or self.kwargs):
            raise ValueError("args and kwargs go with `task`, not with `payload`")
        try:  # TOML has dates and times, which a task message (JSON) cannot carry
            json.dumps([self.args, self.kwargs], allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"args and kwargs must be JSON values: {exc}") from None
        return self

    @property
    def endpoint(self) -> str:
        return connections.redact(self.url)


class _Document(_Section):
    manager: ManagerSettings = ManagerSettings()
    logging: LoggingSettings = LoggingSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    hosts: dict[str, str] = {}
    defaults: dict[str, Any] = {}
    workers: list[dict[str, Any]] = Field(min_length=1)
    schedules: list[dict[str, Any]] = []


@dataclass(frozen=True)
class Config:
    source: str
    node: str
    manager: ManagerSettings
    logging: LoggingSettings
    pairs: tuple[PairSettings, ...]
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)
    schedules: tuple[ScheduleSettings, ...] = ()


def load(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Read, expand and validate the file; raise `ConfigError` listing every problem."""
    source = str(path)
    env = os.environ if environ is None else environ
    try:
        data = files.read_regular(source, MAX_CONFIG_BYTES, "a config file")
        raw = tomllib.loads(data.decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(source, ["file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, [f"cannot read: {exc}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [f"not valid TOML: {exc}"]) from None

    problems: list[str] = []
    expanded = _expand(raw, env, (), problems)
    _override_log_level(expanded, env)
    if problems:
        raise ConfigError(source, problems)
    try:
        document = _Document.model_validate(expanded)
    except ValidationError as exc:
        raise ConfigError(source, _explain(exc, ())) from None

    schedule_problems: list[str] = []  # listed after the pairs' problems
    schedules = _resolve_schedules(document, schedule_problems)
    pairs = _resolve_pairs(document, problems, schedules)
    problems.extend(schedule_problems)
    if problems:
        raise ConfigError(source, problems)
    node = document.manager.node or env.get("RQWORKERS_NODE") or socket.gethostname()
    return Config(
        source,
        node,
        document.manager,
        document.logging,
        tuple(pairs),
        document.telemetry,
        schedules,
    )


def _override_log_level(document: dict[str, Any], env: Mapping[str, str]) -> None:
    """`$RQWORKERS_LOG_LEVEL` (set by `run --log-level`) wins over `[logging] level`.

    Read at every load, so that a reload keeps the level asked for on the command line.
    """
    level = env.get("RQWORKERS_LOG_LEVEL")
    if level and isinstance(document.setdefault("logging", {}), dict):
        document["logging"]["level"] = level


def _expand(value: Any, env: Mapping[str, str], where: tuple[Any, ...], problems: list[str]) -> Any:
    if isinstance(value, dict):
        return {k: _expand(v, env, (*where, k), problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, env, (*where, i), problems) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    if where[:1] == ("hosts",):
        # A URL is never meant to hold a literal `${`: it is a reference gone wrong.
        for broken in filter(None, (m.group(3) for m in _BROKEN_VAR_RE.finditer(value))):
            problems.append(
                f"{_path(where)}: {broken!r} is not a valid reference "
                "(write ${NAME} or ${NAME:-default}; $$ for a literal $)"
            )
    replaced = False

    def substitute(match: re.Match[str]) -> str:
        nonlocal replaced
        if match.group(0) == "$$":
            return "$"
        replaced = True
        name, default = match.group(1), match.group(2)
        if default is not None and "${" in default:
            problems.append(
                f"{_path(where)}: ${{{name}:-${{...}}}}: a reference inside a default is not "
                f"supported; write the default itself, or set {name}"
            )
            return ""
        if name in env and (env[name] or default is None):
            return env[name]
        if default is not None:
            return default
        problems.append(f"{_path(where)}: environment variable {name} is not set")
        return ""

    text = _VAR_RE.sub(substitute, value)
    return Expanded(text) if replaced else text


def _resolve_pairs(
    document: _Document, problems: list[str], schedules: tuple[ScheduleSettings, ...] = ()
) -> list[PairSettings]:
    if "queue" in document.defaults:
        problems.append("defaults.queue: a queue belongs in a [[workers]] entry")
    unknown_defaults = set(document.defaults) - (set(PairSettings.model_fields) - {"url"})
    for key in sorted(unknown_defaults):
        problems.append(f"defaults.{key}: unknown setting")
    hosts, bad_hosts = _check_hosts(document.hosts, problems)
    pairs: dict[int, PairSettings] = {}
    seen: dict[tuple[str, str], int] = {}
    for index, entry in enumerate(document.workers):
        where = ("workers", index)
        if "url" in entry:
            problems.append(f"{_path(where)}.url: unknown setting (hosts go in `host`)")
            continue
        # An entry that names its own `handler` or `tasks` drops the other from [defaults].
        kind = {"handler", "tasks"} & set(entry)
        dropped = unknown_defaults | ({"handler", "tasks"} - kind if kind else set())
        defaults = {k: v for k, v in document.defaults.items() if k not in dropped}
        try:
            pair = PairSettings.model_validate({**defaults, **entry})
        except ValidationError as exc:
            for line in _explain(exc, where, from_defaults=set(defaults) - set(entry)):
                if line not in problems:
                    problems.append(line)
            continue
        if pair.host in bad_hosts:
            continue  # reported once, at hosts.<name>
        url = _host_url(pair.host, hosts)
        if url is None:
            problems.append(
                f"{_path(where)}.host: {pair.host!r} is neither a [hosts] name nor a "
                f"URL starting with {', '.join(URL_SCHEMES)}"
            )
            continue
        problem = _url_problem(url)
        if problem:
            problems.append(f"{_path(where)}.host: {problem}")
            continue
        problem = connections.queue_problem(url, pair.queue)
        if problem:
            problems.append(f"{_path(where)}.queue: {problem}")
            continue
        pair_key = (url, pair.queue)
        if pair_key in seen:
            problems.append(
                f"{_path(where)}: queue {pair.queue!r} on this host is already declared in "
                f"workers[{seen[pair_key]}]; use `processes` for more workers"
            )
            continue
        seen[pair_key] = index
        pairs[index] = pair.model_copy(update={"url": url})
    problems.extend(key_collisions(pairs))
    problems.extend(_reply_key_collisions(pairs, schedules))
    problems.extend(_schedule_collisions(document, pairs, schedules))
    problems.extend(_too_many_processes(pairs.values()))
    return list(pairs.values())


def _check_hosts(hosts: Mapping[str, str], problems: list[str]) -> tuple[dict[str, str], set[str]]:
    """The usable `[hosts]` entries, and the names of the broken ones, each reported at
    `hosts.<name>`: the entry is what needs fixing, not every worker that uses it."""
    good, bad = {}, set()
    for name, url in hosts.items():
        problem = (
            _url_problem(url)
            if url.startswith(URL_SCHEMES)
            else f"{url!r} is not a URL starting with {', '.join(URL_SCHEMES)}"
        )
        if problem:
            problems.append(f"hosts.{name}: {problem}")
            bad.add(name)
        else:
            good[name] = url
    return good, bad


def _url_problem(url: str) -> str | None:
    problem = connections.url_problem(url)
    return f"{connections.redact(url)!r} is not a valid URL: {problem}" if problem else None


def _url(pair: PairSettings) -> object:
    return server_spelling(pair.url)


# Names of this machine's loopback that a URL may use for one local server.
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})


def server_spelling(url: str) -> object:
    """What a URL's text says of its server and database, spelled one way: `localhost`,
    `127.0.0.1` and `[::1]` alike, the default port written or not, database `/1`, `/01`
    or `?db=1`; credentials and options left out. All that can be known without
    connecting (`checks.server_identity` knows more)."""
    try:
        target = connections.parse(url)
        if target.kind == "cluster":
            return ("cluster", frozenset(_node(h, p) for h, p in target.nodes))
        if target.kind == "sentinel":
            nodes = frozenset(_node(h, p) for h, p in target.nodes)
            return ("sentinel", nodes, target.service, target.db)
        options = connections.parse_url(target.url)
        db = int(options.get("db") or 0)
        if "path" in options:  # unix://
            return ("unix", os.path.normpath(str(options["path"])), db)
        return ("single", _node(str(options.get("host") or "localhost"),
                                int(options.get("port") or 6379)), db)  # fmt: skip
    except (ValueError, TypeError):  # not a URL `load` accepts: only its text is known
        return url


def _node(host: str, port: int) -> tuple[str, int]:
    host = host.lower().strip("[]")
    return ("localhost" if host in _LOOPBACK else host, port)


def key_collisions(
    pairs: Mapping[int, PairSettings], server: Callable[[PairSettings], object] = _url
) -> list[str]:
    """One line per queue whose name is, or could be, a key of another queue on its host.

    Every key derived from queue `jobs` is `jobs:<something>` (`jobs:dead`,
    `jobs:processing:<worker-id>`, and any added later), so a queue `jobs:dead` would
    consume `jobs`'s dead letters, and `jobs:processing:web-1:1` would run a worker's
    in-flight messages a second time. Any name `<other queue>:<anything>` is refused.

    The same name twice on one host is refused too, as `load` refuses it on one URL: more
    workers for a queue are `processes`, not another spelling of its URL.

    Two pairs are on the same host when `server` gives them the same value, not None: by
    default the same `server_spelling` of their URLs (all `load` can know); `check` and
    `run`, which connect, pass the server's identity, so that any two spellings of one
    server are one host.
    """
    problems = []
    for index, pair in pairs.items():
        for other_index, other in pairs.items():
            same = server(pair) is not None and server(other) == server(pair)
            if same and other_index < index and pair.queue == other.queue:
                problems.append(
                    f"{_path(('workers', index))}.queue: queue {pair.queue!r} is already "
                    f"declared on the same host in workers[{other_index}] (another spelling of "
                    "its URL); use `processes` for more workers"
                )
                break
            if same and _could_be_key_of(pair.queue, other.queue):
                problems.append(
                    f"{_path(('workers', index))}.queue: {pair.queue!r} could be a key of "
                    f"queue {other.queue!r} (workers[{other_index}]) on the same host: every "
                    f"key {other.queue}:... belongs to that queue; rename one of them"
                )
                break
    return problems


def _could_be_key_of(name: str, queue: str) -> bool:
    """Whether `name` has the form of a key of `queue`: every key derived from a queue is
    `<queue>:<something>`."""
    return name.startswith(f"{queue}:")


def _schedule_collisions(
    document: _Document, pairs: Mapping[int, PairSettings], schedules: Iterable[ScheduleSettings]
) -> list[str]:
    """One line per schedule that pushes into a key of a queue on its host (`tasks:dead`
    beside `tasks`): each fire would feed that queue's dead letters, replies or private
    lists, as a queue of that name would take them (`key_collisions`)."""
    index = {entry.get("name"): n for n, entry in enumerate(document.schedules)}
    problems = []
    for schedule in schedules:
        for pair_index, pair in pairs.items():
            if server_spelling(schedule.url) == _url(pair) and _could_be_key_of(
                schedule.queue, pair.queue
            ):
                problems.append(
                    f"{_path(('schedules', index[schedule.name]))}.queue: {schedule.queue!r} "
                    f"could be a key of queue {pair.queue!r} (workers[{pair_index}]) on the "
                    f"same host: every key {pair.queue}:... belongs to that queue; push into "
                    "the queue itself"
                )
                break
    return problems


def _reply_key_collisions(
    pairs: Mapping[int, PairSettings], schedules: Iterable[ScheduleSettings] = ()
) -> list[str]:
    """One line per `reply_keys` glob that could match a key of a configured queue: the
    worker would push a reply wherever a message points it, so a glob that reaches
    another queue's keys (or this queue's own, outside `<queue>:replies:`) would let a
    producer corrupt that queue. Compared with every queue of the file, on any host: two
    spellings of a URL may name one server, and only a refusal is sure to be safe. A queue
    that a schedule pushes into is one of them, even if another fleet consumes it."""
    problems = []
    for index, pair in pairs.items():
        for number, pattern in enumerate(pair.reply_keys):
            where = f"{_path(('workers', index, 'reply_keys', number))}: {pattern!r}"
            if tasks.reaches_own_keys(pattern, pair.queue):
                problems.append(
                    f"{where} could match keys of this queue itself ({pair.queue}, "
                    f"{pair.queue}:dead, ...): only {tasks.reply_prefix(pair.queue)}* are replies"
                )
                continue
            for other_index, other in pairs.items():
                if other.queue != pair.queue and tasks.reaches_queue(pattern, other.queue):
                    problems.append(
                        f"{where} could match keys of queue {other.queue!r} "
                        f"(workers[{other_index}]): a reply there would corrupt it; choose "
                        "keys that no configured queue uses"
                    )
                    break
            else:
                for schedule in schedules:
                    queue = schedule.queue
                    if queue != pair.queue and tasks.reaches_queue(pattern, queue):
                        problems.append(
                            f"{where} could match keys of queue {queue!r} (schedule "
                            f"{schedule.name!r} pushes there): a reply there would corrupt "
                            "it; choose keys that no configured queue uses"
                        )
                        break
    return problems


def _resolve_schedules(document: _Document, problems: list[str]) -> tuple[ScheduleSettings, ...]:
    """The `[[schedules]]`, each with its host's URL; every problem named by its table."""
    hosts, bad_hosts = _check_hosts(document.hosts, [])  # reported by _resolve_pairs
    schedules: list[ScheduleSettings] = []
    names: dict[str, int] = {}
    for index, entry in enumerate(document.schedules):
        where = ("schedules", index)
        try:
            schedule = ScheduleSettings.model_validate(entry)
        except ValidationError as exc:
            problems.extend(_explain(exc, where))
            continue
        if schedule.host in bad_hosts:
            continue
        url = _host_url(schedule.host, hosts)
        problem = (
            f"{schedule.host!r} is neither a [hosts] name nor a URL starting with "
            f"{', '.join(URL_SCHEMES)}"
            if url is None
            else _url_problem(url)
        )
        if problem or url is None:
            problems.append(f"{_path(where)}.host: {problem}")
            continue
        problem = connections.queue_problem(url, schedule.queue)
        if problem:
            problems.append(f"{_path(where)}.queue: {problem}")
            continue
        if schedule.name in names:
            problems.append(
                f"{_path(where)}.name: {schedule.name!r} is already the name of "
                f"schedules[{names[schedule.name]}]"
            )
            continue
        names[schedule.name] = index
        schedules.append(schedule.model_copy(update={"url": url}))
    return tuple(schedules)


def _too_many_processes(pairs: Iterable[PairSettings]) -> list[str]:
    total = sum(pair.processes for pair in pairs)
    if total <= MAX_PROCESSES_TOTAL:
        return []
    return [f"workers: {total} processes in all; at most {MAX_PROCESSES_TOTAL} are allowed"]


def _host_url(host: str, hosts: Mapping[str, str]) -> str | None:
    url = hosts.get(host, host)
    return url if url.startswith(URL_SCHEMES) else None


def _explain(
    exc: ValidationError, where: tuple[Any, ...], from_defaults: set[str] | None = None
) -> list[str]:
    lines = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        prefix = where
        if from_defaults and loc and loc[0] in from_defaults:
            prefix = ("defaults",)  # the bad value was written in [defaults]
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown setting"
        elif error["type"] == "missing":
            message = "required setting is missing"
        elif error["type"] in _EXPECTED:
            message = f"expected {_EXPECTED[error['type']]}, not {_kind(error['input'])}"
        lines.append(f"{_path((*prefix, *loc))}: {message}")
    return lines


# What strict validation wanted, by pydantic's error type.
_EXPECTED = {
    "int_type": "an integer (such as 3)",
    "float_type": "a number (such as 1.5)",
    "string_type": "a string",
    "bool_type": "true or false",
    "dict_type": "a table",
    "list_type": "a list",
    "tuple_type": "a list",
    "model_type": "a table",
}


def _kind(value: object) -> str:
    """How a TOML value reads to the person who wrote it: `the string "3"`, `true`, `2.0`."""
    if isinstance(value, str):
        numeric = value.strip().lstrip("+-").replace(".", "", 1).isdigit()
        return f"the string {value!r}" + (" (write numbers without quotes)" if numeric else "")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value!r} (a fraction; write an integer without a decimal point)"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _path(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"
