"""Connecting to Redis, whatever the deployment: one server, a Cluster or a Sentinel master.

A host is one URL. The schemes of redis-py (`redis://`, `rediss://`, `unix://`) reach one
server; two more forms name a deployment:

- `redis+cluster://[user:pass@]host:port[,host:port...]` (`rediss+cluster://` for TLS):
  a Redis Cluster, found from these startup nodes.
- `redis+sentinel://[user:pass@]host:port[,host:port...]/<master-name>[/db]`
  (`rediss+sentinel://`): the master that these sentinels name; a failover is followed.

Query arguments go to redis-py (`ssl_ca_certs`, `ssl_certfile`, ...), except
`password_file=PATH`, read here at connect time (Docker secrets): the password is then
never written in the config, the environment or a URL.

Every client is made so that its failures surface at once: redis-py's own retry is off,
the clients that ask the sentinels included, because a retried `BLMOVE` could move a
second message while the first reply was lost, and retries with backoff only delay a
failover (and `check`). The worker backs off instead and replays its private list, which
holds every message whatever happened to the reply.

Errors are made to say what is wrong in one line: which sentinels were asked and what
each answered, a TLS handshake that got no answer (a plain-TCP port), a server that wants
a client certificate.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import ssl
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import SSLConnection
from redis.connection import parse_url as _redis_parse_url
from redis.exceptions import RedisClusterException
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel, SentinelManagedConnection

from rqworkers.common import files

Client = redis.Redis | RedisCluster

SINGLE_SCHEMES = ("redis", "rediss", "unix")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
SCHEMES = tuple(f"{s}://" for s in (*SINGLE_SCHEMES, *CLUSTER_SCHEMES, *SENTINEL_SCHEMES))

# Query arguments naming files that must exist; `password_file` is read here.
_FILE_ARGUMENTS = ("password_file", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_ca_path")
_DEFAULT_PORT = 6379
_MAX_SECRET_BYTES = 64 * 1024


@dataclass(frozen=True)
class ParsedUrl:
    """A host URL taken apart: what to connect to and how."""

    kind: Literal["single", "cluster", "sentinel"]
    tls: bool
    # A redis-py URL (redis://, rediss://, unix://) with the credentials and the query
    # arguments meant for redis-py; for a cluster or Sentinel, that of the first node.
    url: str
    nodes: tuple[tuple[str, int], ...] = ()  # cluster startup nodes or sentinels
    service: str = ""  # the Sentinel master name
    db: int = 0
    password_file: str | None = None


def parse(url: str) -> ParsedUrl:
    """Take a host URL apart; `ValueError` says what is wrong with it, without secrets."""
    scheme, sep, _ = url.partition("://")
    if not sep or scheme not in (*SINGLE_SCHEMES, *CLUSTER_SCHEMES, *SENTINEL_SCHEMES):
        raise ValueError("the URL must start with " + ", ".join(SCHEMES))
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    password_file = None
    kept = []
    for key, value in query:
        if key == "password_file":
            if not value:
                raise ValueError("password_file is empty")
            password_file = value
        else:
            kept.append((key, value))
    userinfo, at, hostlist = parts.netloc.rpartition("@")
    if password_file is not None:
        _, colon, password = userinfo.partition(":")
        if (colon and password) or any(k == "password" for k, _ in kept):
            raise ValueError("give either a password or password_file, not both")
    tls = scheme.startswith("rediss")
    clean_query = urlencode(kept, safe="/:")
    if scheme in SINGLE_SCHEMES:
        # Not urlunsplit: it would turn unix:///path into unix:/path.
        clean = url if password_file is None else url.partition("?")[0]
        if password_file is not None and clean_query:
            clean += f"?{clean_query}"
        parse_url(clean)  # redis-py's own checks: the port, the db
        return ParsedUrl("single", tls, clean, password_file=password_file)

    nodes = tuple(_node(item) for item in hostlist.split(","))
    base = "rediss" if tls else "redis"
    credentials = f"{userinfo}{at}"
    host, port = nodes[0]
    netloc = f"{credentials}[{host}]:{port}" if ":" in host else f"{credentials}{host}:{port}"
    path = [unquote(p) for p in parts.path.split("/") if p]
    if scheme in CLUSTER_SCHEMES:
        if path and path != ["0"]:
            raise ValueError("a Redis Cluster has only database 0: leave the path out")
        first = urlunsplit((base, netloc, "", clean_query, ""))
        if "db" in dict(parse_url(first)):
            raise ValueError("a Redis Cluster has only database 0: no db argument")
        return ParsedUrl("cluster", tls, first, nodes, password_file=password_file)

    if not path or len(path) > 2:
        raise ValueError("a Sentinel URL ends with /<master-name> or /<master-name>/<db>")
    service = path[0]
    try:
        db = int(path[1]) if len(path) == 2 else 0
    except ValueError:
        raise ValueError(f"the database after /{service}/ must be a number") from None
    first = urlunsplit((base, netloc, f"/{db}", clean_query, ""))
    options = parse_url(first)
    return ParsedUrl(
        "sentinel", tls, first, nodes, service, int(options.get("db", db)), password_file
    )


def parse_url(url: str) -> dict[str, Any]:
    """redis-py's reading of a redis://, rediss:// or unix:// URL into keyword arguments."""
    options: dict[str, Any] = _redis_parse_url(url)  # type: ignore[no-untyped-call]
    return options


def _node(item: str) -> tuple[str, int]:
    if not item:
        raise ValueError("an empty host in the list of nodes")
    parts = urlsplit(f"//{item}")
    try:
        port = parts.port or _DEFAULT_PORT
    except ValueError:
        raise ValueError(f"{item!r} has no valid port") from None
    if not parts.hostname or parts.username is not None:
        raise ValueError(f"{item!r} is not host:port")
    return parts.hostname, port


def is_cluster(url: str) -> bool:
    return url.startswith(tuple(f"{s}://" for s in CLUSTER_SCHEMES))


def hash_tag(queue: str) -> str | None:
    """The `{tag}` that decides the cluster slot of `queue` and of every key derived from it.

    Redis hashes only what is between the first `{` and the next `}` when that is not
    empty. Every key of a queue starts with its name, so a complete tag in the name is the
    tag of all of them.
    """
    start = queue.find("{")
    end = queue.find("}", start + 1) if start >= 0 else -1
    return queue[start + 1 : end] if end > start + 1 else None


def queue_problem(url: str, queue: str) -> str | None:
    """Why `queue` cannot work on the host at `url`, or None. Pure: nothing is contacted."""
    if is_cluster(url) and hash_tag(queue) is None:
        return (
            f"queue {queue!r} on a Redis Cluster needs a {{hash tag}} in its name, such as "
            f"'{{{queue}}}': its messages move atomically between several keys "
            f"({queue}, {queue}:processing:<worker>, {queue}:retry, ...) in Lua "
            "scripts, and a cluster refuses a script whose keys are in different slots "
            "(CROSSSLOT). With a tag they all hash to one slot"
        )
    return None


def url_problem(url: str) -> str | None:
    """What is wrong with `url`, found without connecting: its form, a bad port, a file.

    A file named by a query argument (`password_file`, `ssl_ca_certs`, ...) must be
    readable; its content is not looked at here.
    """
    try:
        target = parse(url)
        _check_arguments(target)  # unknown arguments, a bad ssl_cert_reqs ...
    except TypeError as exc:  # an argument redis-py does not know
        return f"redis-py does not accept its query arguments: {exc}"
    except (ValueError, redis.RedisError, RedisClusterException) as exc:
        return str(exc)
    query = dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))
    text = _text_problem(query)
    if text:
        return text
    for key in _FILE_ARGUMENTS:
        path = query.get(key)
        if path and not os.access(path, os.R_OK):
            why = "does not exist" if not os.path.exists(path) else "is not readable"
            return f"{key} {path} {why}"
        # A FIFO would hang the connect that reads it, a device fill the memory.
        found = path and key != "ssl_ca_path" and files.problem(path)
        if found:
            return f"{key} {path} {found}"
    return None


def _text_problem(query: dict[str, str]) -> str | None:
    """What is wrong with the URL's text arguments, which redis-py takes as they are and
    fails on only at the first command: a codec or error handler Python does not know, or
    `decode_responses`, which (as any string, `false` too) would hand the worker text where
    it reads payloads and envelopes as bytes."""
    if "decode_responses" in query:
        return "decode_responses is not supported: rqworkers reads replies as bytes"
    for key, lookup in (("encoding", codecs.lookup), ("encoding_errors", codecs.lookup_error)):
        if key in query:
            try:
                lookup(query[key])
            except LookupError:
                return f"{key}={query[key]!r} is not a text encoding Python knows"
    return None


def _check_arguments(target: ParsedUrl) -> None:
    """Let redis-py judge the URL's arguments by making (not opening) a connection with them.

    Raises TypeError for an argument it does not know, RedisError for a bad value.
    """
    options = parse_url(target.url)
    connection_class = options.pop("connection_class", redis.Connection)
    connection_class(**options)


def read_password(path: str) -> str:
    """The content of a secret file, without its trailing newline. The file is read at
    every connect, so it is checked then too: a FIFO or a device swapped in since `check`
    raises `files.NotRegularFileError` rather than hanging or filling the memory."""
    secret = files.read_regular(path, _MAX_SECRET_BYTES, "a password file")
    return secret.decode("utf-8", errors="strict").rstrip("\r\n")


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


def connect(url: str, block_timeout: float = 1.0, *, timeout: float | None = None) -> Client:
    """A client for `url` whose failures surface at once: the caller owns retrying.

    `block_timeout` is the longest a blocking command (`BLMOVE`) waits: the socket allows
    ten seconds more. `timeout`, if given, bounds connecting and every reply instead (for
    `check`). No server is contacted before the first command, a cluster's included.
    """
    target = parse(url)
    settings: dict[str, Any] = {
        "socket_timeout": timeout if timeout is not None else block_timeout + 10.0,
        "socket_connect_timeout": timeout if timeout is not None else 5.0,
        "socket_keepalive": True,
        "decode_responses": False,
    }
    if target.password_file is not None:
        settings["password"] = read_password(target.password_file)
    if target.kind == "cluster":
        startup = [ClusterNode(h, p) for h, p in target.nodes[1:]]  # type: ignore[no-untyped-call]
        return _LazyCluster(url=target.url, startup_nodes=startup, **settings)
    settings["health_check_interval"] = 30
    settings["retry"] = no_retry()
    if target.kind == "sentinel":
        options = parse_url(target.url)
        for key in ("host", "port", "connection_class"):
            options.pop(key, None)
        if target.tls:
            options["connection_class"] = _SentinelTlsConnection
        asking = {k: v for k, v in settings.items() if k.startswith("socket_")}
        sentinel = _Sentinel(
            list(target.nodes),
            sentinel_kwargs={**asking, "retry": no_retry()},
            **{**settings, **options},
        )
        master: redis.Redis = sentinel.master_for(target.service, redis_class=redis.Redis)
        return master
    if target.tls:
        settings["connection_class"] = _TlsConnection
    # Query arguments of the URL win over these keywords (redis-py's rule).
    return redis.Redis.from_url(target.url, **settings)


def no_retry() -> Retry:
    """redis-py's retry policy for "never": a command fails at its first error."""
    return Retry(NoBackoff(), 0)


def _tls_hint(exc: BaseException) -> str | None:
    """The likely cause of a TLS failure that redis-py reports only as a broken socket.

    A server with `tls-auth-clients yes` accepts the handshake, then closes the connection
    when the client has sent no certificate it trusts: the client sees an EOF, or the alert
    that says so without naming the arguments that give one.
    """
    cause = exc.__cause__ or exc.__context__
    text = str(exc)
    # Which one the client sees depends on timing: the server's TLS 1.3 alert, or its EOF.
    if (
        isinstance(cause, ssl.SSLEOFError)
        or "EOF occurred in violation of protocol" in text
        or "CERTIFICATE_REQUIRED" in text
    ):
        return (
            "the server closed the TLS connection: it most likely requires a client "
            "certificate it trusts; give ssl_certfile and ssl_keyfile (and ssl_ca_certs for "
            "the server's CA) in the host URL's query"
        )
    return None


class _TlsConnection(SSLConnection):
    """redis-py's TLS connection, whose timeout to connect says that TLS may be the cause.

    Pointed at a plain-TCP port, which never answers a ClientHello, `rediss://` gets only
    "Timeout connecting to server". redis-py bounds the handshake by the connect timeout
    from 8.2 on (before, by the 11 s reply timeout, with no public way to change it): that
    is why pyproject.toml asks for redis>=8.2.
    """

    def connect(self) -> None:
        try:
            super().connect()  # type: ignore[no-untyped-call]
        except redis.TimeoutError as exc:
            raise redis.TimeoutError(
                f"the TLS connection to {self.host}:{self.port} got no answer within "
                f"{self.socket_connect_timeout:g}s (TCP connect or TLS handshake): is that a "
                "plain (non-TLS) port? For a server without TLS, use redis:// instead of "
                "rediss://"
            ) from exc

    def on_connect_check_health(self, check_health: bool = True) -> None:
        """redis-py's first commands on a new connection, with the likely cause added to an
        EOF: that is where a server wanting a client certificate closes the connection."""
        try:
            super().on_connect_check_health(check_health=check_health)
        except redis.ConnectionError as exc:
            hint = _tls_hint(exc)
            if hint is None:
                raise
            raise redis.ConnectionError(f"{exc} ({hint})") from exc


class _SentinelTlsConnection(SentinelManagedConnection, _TlsConnection):
    """A connection to the master that the sentinels name, over TLS (see `_TlsConnection`)."""


class _Sentinel(Sentinel):
    """redis-py's Sentinel, whose failure to find the master says in one line which
    sentinels were asked and what each said (redis-py's message holds the whole repr of
    every client: kilobytes per line)."""

    def discover_master(self, service_name: str) -> tuple[str, int]:
        answers = []
        for number, sentinel in enumerate(self.sentinels):
            kwargs = sentinel.connection_pool.connection_kwargs
            where = f"{kwargs.get('host')}:{kwargs.get('port')}"
            try:
                masters = sentinel.sentinel_masters()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                answers.append(f"{where} {type(exc).__name__}: {' '.join(str(exc).split())}")
                continue
            state = masters.get(service_name) if isinstance(masters, dict) else None
            if state is None:
                answers.append(f"{where} knows no master {service_name!r}")
            elif not self.check_master_state(state, service_name):  # type: ignore[no-untyped-call]
                answers.append(f"{where} sees master {service_name!r} down")
            else:
                self.sentinels[0], self.sentinels[number] = sentinel, self.sentinels[0]
                return str(state["ip"]), int(state["port"])
        raise MasterNotFoundError(
            f"no master {service_name!r} from {len(answers)} sentinel(s): " + "; ".join(answers)
        )


class _LazyCluster(RedisCluster):
    """A `RedisCluster` that asks the cluster for its slots on first use, not when made.

    redis-py's constructor contacts the startup nodes and raises if none answers. Made
    lazy, a worker started during an outage gets its error from its first command, like
    any other, and waits it out with backoff instead of crashing.
    Retries are off (`Retry(NoBackoff(), 0)`): MOVED and ASK redirections are still
    followed, but a command is never sent again after a connection error.
    """

    def __init__(self, **kwargs: Any) -> None:  # no super().__init__: see __getattr__
        kwargs["retry"] = Retry(NoBackoff(), 0)
        self.__dict__["_lazy_kwargs"] = kwargs
        self.__dict__["_lazy_state"] = "new"

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes not yet set: the first one RedisCluster's methods use
        # builds the client. While it is being built, a missing attribute is just missing.
        if self.__dict__.get("_lazy_state") != "new":
            raise AttributeError(name)
        self.__dict__["_lazy_state"] = "starting"
        kwargs = dict(self.__dict__["_lazy_kwargs"])
        kwargs["startup_nodes"] = list(kwargs.get("startup_nodes", []))  # it appends to it
        try:
            RedisCluster.__init__(self, **kwargs)
        except BaseException:
            self.__dict__["_lazy_state"] = "new"  # the next command tries again
            raise
        self.__dict__["_lazy_state"] = "ready"
        return getattr(self, name)

    def get_encoder(self) -> Any:
        # Needed by register_script before any command: no reason to contact the cluster.
        # A client that is made but never connected lends its public encoder instead.
        if self.__dict__.get("_lazy_state") == "ready":
            return super().get_encoder()  # type: ignore[no-untyped-call]
        decode = bool(self.__dict__["_lazy_kwargs"].get("decode_responses", False))
        return redis.Redis(decode_responses=decode).get_encoder()

    def close(self) -> None:
        if self.__dict__.get("_lazy_state") == "ready":
            super().close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # as RedisCluster's: a finalizer never raises
            self.close()
