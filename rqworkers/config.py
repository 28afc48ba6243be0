"""Loading and validating the TOML configuration.

This is the only module that knows the file format. It turns a file into a frozen `Config`
whose `pairs` are fully resolved: `[defaults]` merged into every `[[workers]]` entry, host
names replaced by URLs, `${VAR}` references expanded. Every problem is reported at once,
each naming the file, the field path and what is wrong.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails

from rqworkers import connections, tasks
from rqworkers.errors import ConfigError

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
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_VAR_RE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


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


Size = Annotated[int, BeforeValidator(parse_size)]


class _Section(BaseModel):
    # Unknown keys are errors: a typo such as `max_request` must not pass silently.
    model_config = ConfigDict(extra="forbid", frozen=True)


class ManagerSettings(_Section):
    check_interval: float = Field(1.0, gt=0, description="seconds between supervision passes")
    shutdown_timeout: float = Field(30.0, ge=0, description="graceful stop budget, seconds")
    restart_backoff_max: float = Field(30.0, gt=0, description="cap of the restart backoff")
    node: str | None = Field(None, min_length=1, description="node identity in worker ids")
    lease_ttl: float = Field(30.0, ge=1, description="seconds a lease outlives its last renewal")
    reclaim_interval: float = Field(10.0, gt=0, description="seconds between orphan scans")
    pid_file: str | None = Field(None, description="where the manager writes its pid")
    metrics_address: str | None = Field(
        None, pattern=r"^[^:]*:\d{1,5}$", description="host:port for /metrics and /healthz"
    )


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    file: str | None = None
    max_bytes: Size = 10 * 1000**2
    backup_count: int = Field(5, ge=0)
    format: Literal["text", "json"] = "text"
    # Per-message lines, as the fraction of messages that get one (0 = none, 1 = all): at
    # thousands of messages a second, logging each would become the bottleneck.
    handled: float = Field(0.0, ge=0, le=1, description="share of handled messages logged")
    failures: float = Field(1.0, ge=0, le=1, description="share of failures logged")

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value


class PairSettings(_Section):
    """One `(host, queue)` pair with every setting resolved. The unit the manager runs."""

    host: str = Field(min_length=1)
    queue: str = Field(min_length=1)
    handler: str | None = Field(None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
    # A task pair: an allow-list of `module:function` / `module:*` (see `tasks`).
    tasks: tuple[str, ...] | None = Field(None, min_length=1)
    processes: int = Field(1, ge=1)
    prefetch: int = Field(1, ge=1, le=10_000)
    max_requests: int = Field(10_000, ge=0)
    max_requests_jitter: int = Field(0, ge=0)
    timeout: float = Field(30.0, gt=0)
    timeout_grace: float = Field(5.0, ge=0)
    soft_memory_limit: Size = 0
    hard_memory_limit: Size = 0
    max_attempts: int = Field(5, ge=1)
    retry_delay: float = Field(1.0, ge=0)
    retry_delay_max: float = Field(300.0, ge=0)
    # Filled in by the loader, never by the user: the host's URL.
    url: str = Field("", exclude=True)

    @field_validator("tasks")
    @classmethod
    def _task_patterns(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        problems = [p for p in map(tasks.pattern_problem, value or ()) if p]
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
        return redact(self.url)


class _Document(_Section):
    manager: ManagerSettings = ManagerSettings()
    logging: LoggingSettings = LoggingSettings()
    hosts: dict[str, str] = {}
    defaults: dict[str, Any] = {}
    workers: list[dict[str, Any]] = Field(min_length=1)


@dataclass(frozen=True)
class Config:
    source: str
    node: str
    manager: ManagerSettings
    logging: LoggingSettings
    pairs: tuple[PairSettings, ...]


def redact(url: str) -> str:
    """`redis://user:secret@h/0` → `redis://user:***@h/0`: passwords never reach a log.

    Parsed the way redis-py parses it: the password may contain `@`, and may also come as
    a `?password=` query argument (or `ssl_password=`, the key file's). `password_file=`
    is a path and stays visible; so do the hosts of a cluster or Sentinel URL.
    """
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}{colon}***@{hostport}" if colon else netloc
    query = parts.query
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(_secret(k) for k, _ in pairs):
        query = urlencode([(k, "***" if _secret(k) else v) for k, v in pairs], safe="*/:")
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _secret(query_key: str) -> bool:
    return query_key.endswith("password")


def load(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Read, expand and validate the file; raise `ConfigError` listing every problem."""
    source = str(path)
    env = os.environ if environ is None else environ
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(source, ["file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, [f"cannot read: {exc}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [f"not valid TOML: {exc}"]) from None

    problems: list[str] = []
    expanded = _expand(raw, env, (), problems)
    if problems:
        raise ConfigError(source, problems)
    try:
        document = _Document.model_validate(expanded)
    except ValidationError as exc:
        raise ConfigError(source, _describe(exc, ())) from None

    pairs = _resolve_pairs(document, problems)
    if problems:
        raise ConfigError(source, problems)
    node = document.manager.node or env.get("RQWORKERS_NODE") or socket.gethostname()
    return Config(source, node, document.manager, document.logging, tuple(pairs))


def _expand(value: Any, env: Mapping[str, str], where: tuple[Any, ...], problems: list[str]) -> Any:
    if isinstance(value, dict):
        return {k: _expand(v, env, (*where, k), problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, env, (*where, i), problems) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        if name in env and (env[name] or default is None):
            return env[name]
        if default is not None:
            return default
        problems.append(f"{_path(where)}: environment variable {name} is not set")
        return ""

    return _VAR_RE.sub(substitute, value)


def _resolve_pairs(document: _Document, problems: list[str]) -> list[PairSettings]:
    if "queue" in document.defaults:
        problems.append("defaults.queue: a queue belongs in a [[workers]] entry")
    unknown_defaults = set(document.defaults) - (set(PairSettings.model_fields) - {"url"})
    for key in sorted(unknown_defaults):
        problems.append(f"defaults.{key}: unknown setting")
    pairs: list[PairSettings] = []
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
            for line in _describe(exc, where, from_defaults=set(defaults) - set(entry)):
                if line not in problems:
                    problems.append(line)
            continue
        url = _host_url(pair.host, document.hosts)
        if url is None:
            problems.append(
                f"{_path(where)}.host: {pair.host!r} is neither a [hosts] name nor a "
                f"URL starting with {', '.join(URL_SCHEMES)}"
            )
            continue
        problem = connections.url_problem(url)
        if problem:
            problems.append(f"{_path(where)}.host: {redact(url)!r} is not a valid URL: {problem}")
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
        pairs.append(pair.model_copy(update={"url": url}))
    return pairs


def _host_url(host: str, hosts: Mapping[str, str]) -> str | None:
    url = hosts.get(host, host)
    return url if url.startswith(URL_SCHEMES) else None


def _describe(
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
        lines.append(f"{_path((*prefix, *loc))}: {message}")
    return lines


def _path(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"
