"""The status page and its JSON API, served next to `/metrics` by the keeper.

Reads: `GET /api/status` is exactly `rqworkers status --json` (one `status.collect` per
second at most, shared by every open browser), `GET /api/schedules` `rqworkers schedules
--json` (as often); `GET /api/history` the throughput of the
last minutes, sampled here (`history`); `GET /api/dead` pages a queue's dead letters, each
with a binary-safe preview (`dead.preview`), everything its record says, and the worker
that dead-lettered it by the name and node the workers table shows.
Writes: `POST /api/dead/requeue` and `/api/dead/purge`, `POST /api/pause` and
`/api/resume` (a queue, on every node: `store.flow`), only with the token (see `auth`).
All of it only for requests addressed to one of this server's names (`Site.check_host`).

Nothing here runs in a worker: the page costs the workers' hot path nothing, and Redis at
most one status read per second and one read per dead-letter page per second.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from importlib.resources import files
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

from redis.exceptions import RedisError

from rqworkers.config import Config, PairSettings
from rqworkers.ops import dead, schedules, status
from rqworkers.ops.web.auth import (
    COOKIE,
    SESSION_SECONDS,
    Gate,
    Identity,
    QuietLog,
    Throttle,
    token_source,
)
from rqworkers.ops.web.cache import SharedReads
from rqworkers.ops.web.history import History
from rqworkers.store import flow
from rqworkers.store.connections import Client
from rqworkers.store.outage import REDIS_ERRORS, explain, is_outage
from rqworkers.store.queue import DeadLetter, DeadLetters, connect, snapshot

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024  # bytes: an action names at most MAX_PAGE letters by index and digest
MAX_PAGE = 100  # dead letters per page and per action
READ_ONLY = "read-only: [manager] dashboard_token is not set"
UNUSABLE = "actions are off: the dashboard token is unusable now (the keeper's log says why)"
PRIVATE = "dead letters are private here ([manager] dashboard_private): log in first"
LOOPBACK = ("localhost", "127.0.0.1", "[::1]")  # names that cannot be rebound to a page
MAX_HOSTS_LOGGED = 100  # distinct refused Host names logged: a flood cannot fill the log
REDIS_TIMEOUT = 5.0  # seconds to connect to or hear from Redis, for dead-letter requests

_STATIC = files("rqworkers.ops.web") / "static"
ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/app.css": ("app.css", "text/css; charset=utf-8"),
    "/static/favicon.svg": ("favicon.svg", "image/svg+xml"),
}


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: Any  # email.message.Message: case-insensitive `.get`
    body: bytes
    client: str  # the peer's address, for the audit log

    def arg(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[0] if values else default


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


class HttpError(Exception):
    """A request that cannot be served as asked (bad, forbidden, not found...): answered
    with `status` and `message`."""

    def __init__(self, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(message)
        self.status = status
        self.headers = list(headers)


def letter_key(payload: bytes) -> str:
    """How the page names a dead letter's value when it asks for an action on it."""
    return hashlib.sha256(payload).hexdigest()


class Site:
    """Routes requests; `handle` is the hook `metrics.serve` calls for paths it lacks."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.gate = Gate(token_source(config.manager))
        self.throttle = Throttle()
        self.denials = QuietLog()
        self.private = config.manager.dashboard_private
        self.hosts = frozenset(config.manager.dashboard_hosts)
        self._hosts_denied: set[str] = set()
        self.status_reads: SharedReads[bytes] = SharedReads()
        self.dead_reads: SharedReads[dict[str, Any]] = SharedReads()
        # Started by whoever serves the page (the keeper): `history.start()`.
        self.history = History(lambda: cast(list[dict[str, Any]], json.loads(self.status())))
        self._clients: dict[str, Client] = {}
        self._clients_lock = threading.Lock()
        self.assets = {path: (_STATIC / name).read_bytes() for path, (name, _) in ASSETS.items()}
        self.routes: dict[tuple[str, str], Callable[[Request], Response]] = {
            ("GET", "/api/status"): self.get_status,
            ("GET", "/api/schedules"): self.get_schedules,
            ("GET", "/api/history"): lambda r: _json(self.history.as_json()),
            ("GET", "/api/session"): self.get_session,
            ("GET", "/api/dead"): self.get_dead,
            ("POST", "/api/dead/requeue"): lambda r: self.act(r, "requeue"),
            ("POST", "/api/dead/purge"): lambda r: self.act(r, "purge"),
            ("POST", "/api/pause"): lambda r: self.flow(r, "pause"),
            ("POST", "/api/resume"): lambda r: self.flow(r, "resume"),
            ("POST", "/login"): self.login,
            ("POST", "/logout"): self.logout,
            **{("GET", path): self.get_asset for path in ASSETS},
        }

    # -- plumbing -------------------------------------------------------------------------

    def handle(self, http: BaseHTTPRequestHandler) -> bool:
        """Answer `http` if the path is ours; False leaves it to the caller (a 404)."""
        url = urlsplit(http.path)
        route = self.routes.get((http.command, url.path))
        if not any(path == url.path for _, path in self.routes):
            return False
        try:
            self.check_authority(http, url.scheme, url.netloc)
            self.check_host(http)
            if http.command == "POST":
                self.check_origin(http)
            if route is None:
                raise HttpError(HTTPStatus.METHOD_NOT_ALLOWED, f"{http.command} not allowed here")
            request = Request(http.command, url.path, parse_qs(url.query), http.headers,
                              _body(http), http.client_address[0])  # fmt: skip
            response = route(request)
        except HttpError as exc:
            response = _error(exc.status, str(exc))
            response.headers += exc.headers
        except REDIS_ERRORS as exc:
            code = (
                HTTPStatus.SERVICE_UNAVAILABLE
                if is_outage(exc)
                else HTTPStatus.INTERNAL_SERVER_ERROR
            )
            response = _error(code, f"redis: {explain(exc)}")
        except RedisError as exc:  # any other: said as such, never a dropped connection
            response = _error(HTTPStatus.INTERNAL_SERVER_ERROR, f"redis: {explain(exc)}")
        except (ConnectionError, TimeoutError):
            raise  # the client went away: nobody to answer (`web.server` logs it quietly)
        except Exception:  # a bug: logged with its traceback, and still an answer
            log.exception("dashboard: %s %s failed", http.command, url.path)
            response = _error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error: see the log")
        http.send_response(response.status)  # with the security headers: `web.server`
        for name, value in response.headers:
            http.send_header(name, value)
        http.send_header("Content-Type", response.content_type)
        http.send_header("Content-Length", str(len(response.body)))
        http.end_headers()
        http.wfile.write(response.body)
        return True

    def check_host(self, http: BaseHTTPRequestHandler) -> None:
        """Refuse (421) a request whose `Host` is not a name of this server.

        A page of another origin can point a name it owns at 127.0.0.1 (DNS rebinding) and
        read whatever answers there as its own: its requests carry its own name as `Host`.
        So the page and its API answer only the bound address and loopback names with the
        bound port, or a name in `[manager] dashboard_hosts` (with any port: behind a
        proxy, the proxy's). `/metrics` and `/healthz` never come here."""
        hosts = http.headers.get_all("Host") or []
        host = hosts[0].strip().lower() if len(hosts) == 1 else ""
        name, port = _split_host(host)
        bound, bound_port = cast(tuple[str, int], http.server.server_address)[:2]
        bound_name = f"[{bound}]" if ":" in str(bound) else str(bound)
        if name in self.hosts:
            return
        default_port = port is None and bound_port == 80
        if name in (*LOOPBACK, bound_name) and (port == str(bound_port) or default_port):
            return
        with self._clients_lock:
            first = host not in self._hosts_denied and len(self._hosts_denied) < MAX_HOSTS_LOGGED
            if first:
                self._hosts_denied.add(host)
        if first:
            log.warning("dashboard: refused requests for Host %r from %s: not a name of this "
                        "server (add it to [manager] dashboard_hosts if it is)",
                        host, http.client_address[0])  # fmt: skip
        raise HttpError(HTTPStatus.MISDIRECTED_REQUEST,
                           f"this server does not answer for Host {host!r}")  # fmt: skip

    def check_authority(self, http: BaseHTTPRequestHandler, scheme: str, netloc: str) -> None:
        """Refuse (400) a request line naming another server (`GET http://evil/api/dead`):
        in that absolute form the URL's authority, not `Host`, names the server asked for,
        so it must be the very `Host` that `check_host` then checks."""
        if not (scheme or netloc or not http.path.startswith("/")):
            return
        host = (http.headers.get("Host") or "").strip().lower()
        if scheme not in ("http", "https") or netloc.lower() != host:
            raise HttpError(HTTPStatus.BAD_REQUEST,
                               "the request names another server than its Host")  # fmt: skip

    def check_origin(self, http: BaseHTTPRequestHandler) -> None:
        """Refuse (403) a POST that a browser sent from a page of another origin.

        A form of any site can POST to the page: it gets no answer it can read, but a
        login with a wrong token spends the throttle's guesses (locking the operator out),
        and `SameSite` does not stop a login. Browsers say where a request comes from, in
        headers no page can set: `Sec-Fetch-Site` (`same-origin`, or `none` when the user
        typed it; `same-site` is another port or subdomain, so another origin), and, in
        browsers too old for that, `Origin` (`null` from a sandbox or a redirect), which
        must then be the `Host` that `check_host` accepted or a name in `dashboard_hosts`.
        `same-origin` is trusted whatever `Origin` says: behind a proxy that rewrites
        `Host`, the browser's origin is the proxy's name, which only the browser knows. A
        script (curl) sends neither header and is let through: it is no browser a page
        could drive. Checked before any token is charged or compared."""
        fetch_site = (http.headers.get("Sec-Fetch-Site") or "").strip().lower()
        origin = http.headers.get("Origin")
        problem = None
        if fetch_site and fetch_site not in ("same-origin", "none"):
            problem = f"Sec-Fetch-Site {fetch_site[:30]!r}"
        elif not fetch_site and origin is not None and not self._our_origin(origin, http):
            problem = f"Origin {origin[:100]!r}"
        if problem:
            self.denials.note(f"a POST to {urlsplit(http.path).path}", http.client_address[0],
                                  f"sent from another origin ({problem})")  # fmt: skip
            raise HttpError(HTTPStatus.FORBIDDEN, "refused: sent from a page of another origin")

    def _our_origin(self, origin: str, http: BaseHTTPRequestHandler) -> bool:
        try:
            url = urlsplit(origin.strip())
            _ = url.port  # a port that is not a number is no origin of ours
        except ValueError:
            return False
        if url.scheme not in ("http", "https") or url.path or url.query or url.fragment:
            return False
        netloc, name = url.netloc.lower(), (url.hostname or "").lower()
        name = f"[{name}]" if ":" in name else name
        host = (http.headers.get("Host") or "").strip().lower()
        return netloc == host or name in self.hosts

    def client(self, url: str) -> Client:
        with self._clients_lock:
            if url not in self._clients:
                self._clients[url] = connect(url, timeout=REDIS_TIMEOUT)
            return self._clients[url]

    def close(self) -> None:
        self.history.stop()
        with self._clients_lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()

    def pair(self, args: dict[str, Any]) -> PairSettings:
        """The pair named by `queue` (and `host`, the redacted URL, when a queue name is
        used on several hosts)."""
        queue, host = args.get("queue"), args.get("host")
        matches = [
            p for p in self.config.pairs if p.queue == queue and host in (None, "", p.endpoint)
        ]
        if not matches:
            raise HttpError(HTTPStatus.NOT_FOUND, f"no queue {queue!r} in the config")
        if len({p.url for p in matches}) > 1:
            raise HttpError(
                HTTPStatus.BAD_REQUEST, f"queue {queue!r} is on several hosts: add host"
            )
        return matches[0]

    # -- reads ----------------------------------------------------------------------------

    def get_asset(self, request: Request) -> Response:
        _, content_type = ASSETS[request.path]
        return Response(HTTPStatus.OK, self.assets[request.path], content_type)

    def status(self) -> bytes:
        """`rqworkers status --json`, at most a second old: one read for every caller."""
        return self.status_reads.get(
            "status", lambda: _safe_json(status.as_json(status.collect(self.config)))
        )

    def get_status(self, request: Request) -> Response:
        return Response(HTTPStatus.OK, self.status())

    def get_schedules(self, request: Request) -> Response:
        """`rqworkers schedules --json`, at most a second old."""
        read = self.status_reads.get(
            "schedules",
            lambda: _safe_json(json.dumps(schedules.as_dicts(schedules.collect(self.config)))),
        )
        return Response(HTTPStatus.OK, read)

    def get_session(self, request: Request) -> Response:
        identity = self.identify(request)
        token = self.gate.token()
        return _json(
            {
                "node": self.config.node,
                "actions": token is not None,
                "authenticated": identity.authenticated,
                "csrf": identity.csrf(token) if token and identity.authenticated else None,
                "private": self.private,
            }
        )

    def get_dead(self, request: Request) -> Response:
        if self.private and not self.identify(request).authenticated:
            raise HttpError(HTTPStatus.FORBIDDEN, PRIVATE)
        pair = self.pair({"queue": request.arg("queue"), "host": request.arg("host")})
        start = _integer(request.arg("start", "0"), "start", 0, 2**31)
        limit = _integer(request.arg("limit", "20"), "limit", 1, MAX_PAGE)

        def read() -> dict[str, Any]:
            client = self.client(pair.url)
            letters = DeadLetters(client, pair.queue)
            page = letters.page(start, limit)
            # Records name a worker by its id (`node:index`, for Redis keys); the workers
            # table, the logs and `ps` by its name and node: shown as those where known.
            names = {
                str(w["worker_id"]): {"name": w.get("name"), "node": w.get("node")}
                for w in snapshot(client, pair.queue).workers
            }
            return {
                "host": pair.endpoint,
                "queue": pair.queue,
                "total": len(letters),
                "start": start,
                "letters": [_letter(letter, names) for letter in page],
            }

        return _json(self.dead_reads.get((pair.url, pair.queue, start, limit), read))

    # -- writes ---------------------------------------------------------------------------

    def identify(self, request: Request) -> Identity:
        """Who sent `request`; a wrong bearer token counts against its address (`Throttle`),
        and an address out of guesses gets 429 before its token is even compared."""
        if not self.gate.presents_token(request.headers):
            return self.gate.identify(request.headers)
        self.slow_down(request)
        identity = self.gate.identify(request.headers)
        if identity.authenticated or not self.gate.actions_enabled:
            self.throttle.refund(request.client)
        return identity

    def slow_down(self, request: Request) -> None:
        """Charge the client one guess, or refuse (429) if it has none left."""
        wait = self.throttle.attempt(request.client)
        if wait > 0:
            raise HttpError(HTTPStatus.TOO_MANY_REQUESTS,
                               f"too many wrong tokens: try again in {math.ceil(wait)}s",
                               (("Retry-After", str(math.ceil(wait))),))  # fmt: skip

    def actions_on(self) -> None:
        """`HttpError` (403) unless a usable token is configured right now."""
        if not self.gate.actions_enabled:
            configured = self.config.manager
            unset = configured.dashboard_token is None and configured.dashboard_token_file is None
            raise HttpError(HTTPStatus.FORBIDDEN, READ_ONLY if unset else UNUSABLE)

    def authorize(self, request: Request) -> Identity:
        """The requester, if it may act; else `HttpError` with 403 and why."""
        self.actions_on()
        identity = self.identify(request)
        if not identity.authenticated:
            self.denials.note(f"{request.method} {request.path}", request.client,
                                  "no valid token")  # fmt: skip
            raise HttpError(HTTPStatus.FORBIDDEN, "a valid token is needed: log in first")
        if not self.gate.csrf_ok(identity, request.headers.get("X-CSRF-Token")):
            raise HttpError(HTTPStatus.FORBIDDEN, "missing or wrong CSRF token: reload the page")
        return identity

    def json_body(self, request: Request) -> Any:
        """An action's JSON body; 415 for any other type, which a form of another site
        could send without asking the browser first."""
        if request.headers.get_content_type() != "application/json":
            raise HttpError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send application/json")
        return _parse_json(request.body)

    def act(self, request: Request, action: str) -> Response:
        """Requeue or purge the letters named by index and value; all or nothing: if any
        has moved since the page read it, nothing is done (409) and the page reloads."""
        self.authorize(request)
        args = self.json_body(request)
        shape = "expected {queue, letters: [{index, key}]}"
        try:
            wanted = [(x["index"], x["key"]) for x in args["letters"]]
        except (KeyError, TypeError) as exc:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"{shape}: {exc}") from None
        if not all(type(i) is int and 0 <= i < 2**31 and isinstance(k, str) for i, k in wanted):
            raise HttpError(HTTPStatus.BAD_REQUEST, f"{shape}: index a whole number, key text")
        if not 0 < len(wanted) <= MAX_PAGE:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"name 1 to {MAX_PAGE} letters")
        pair = self.pair(args)
        letters = DeadLetters(self.client(pair.url), pair.queue)
        found: list[DeadLetter] = []
        for index, key in sorted(set(wanted)):
            letter = letters.get(index)
            if letter is None or letter_key(letter.payload) != key:
                raise HttpError(HTTPStatus.CONFLICT, "the dead letters changed since the page "
                              "read them: nothing was done, look again")  # fmt: skip
            found.append(letter)
        done = letters.requeue(found) if action == "requeue" else letters.purge(found)
        self.status_reads.forget()
        self.dead_reads.forget()
        log.info("dashboard: %s of %d dead letter(s) of %s on %s by %s: %d done",
                 action, len(found), pair.queue, pair.endpoint, request.client, done)  # fmt: skip
        return _json({"action": action, "asked": len(found), "done": done})

    def flow(self, request: Request, action: str) -> Response:
        """Pause or resume the queue named by `{queue, host}` on every node, as `rqworkers
        pause` and `resume` do; `done` is False if it was paused (resumed) already."""
        self.authorize(request)
        args = self.json_body(request)
        if not (
            isinstance(args, dict)
            and isinstance(args.get("queue"), str)
            and isinstance(args.get("host", ""), str)
        ):
            raise HttpError(HTTPStatus.BAD_REQUEST, "expected {queue, host}, as text")
        pair = self.pair(args)
        client = self.client(pair.url)
        if action == "pause":
            done = flow.pause(client, pair.queue, by=f"the status page ({request.client})")
        else:
            done = flow.resume(client, pair.queue)
        self.status_reads.forget()
        log.info("dashboard: %s of %s on %s by %s: %s", action, pair.queue, pair.endpoint,
                 request.client, "done" if done else "nothing to do")  # fmt: skip
        return _json({"action": action, "host": pair.endpoint, "queue": pair.queue, "done": done})

    def login(self, request: Request) -> Response:
        self.actions_on()
        self.slow_down(request)
        form = parse_qs(request.body.decode("utf-8", "surrogateescape"))
        if not self.gate.token_matches((form.get("token") or [""])[0]):
            self.denials.note("a login", request.client, "wrong token")
            raise HttpError(HTTPStatus.FORBIDDEN, "wrong token")
        self.throttle.refund(request.client)
        log.info("dashboard: login from %s", request.client)
        return _see_other(_cookie(request, self.gate.new_session(), SESSION_SECONDS))

    def logout(self, request: Request) -> Response:
        """Only from the page itself: a valid session and its CSRF token. A form of
        another origin could otherwise log the operator out (the browser applies the
        `Set-Cookie` of a cross-site answer even though it sent no cookie)."""
        self.authorize(request)
        return _see_other(_cookie(request, "", 0))


def _split_host(host: str) -> tuple[str, str | None]:
    """`("[::1]", "9108")` from `[::1]:9108`; `("localhost", None)` from `localhost`."""
    after_brackets = host.rfind("]") + 1  # an IPv6 address holds colons of its own
    colon = host.find(":", after_brackets)
    return (host, None) if colon < 0 else (host[:colon], host[colon + 1 :])


def _body(http: BaseHTTPRequestHandler) -> bytes:
    if http.command != "POST":
        return b""
    try:
        length = int(http.headers.get("Content-Length") or 0)
    except ValueError:
        raise HttpError(HTTPStatus.BAD_REQUEST, "bad Content-Length") from None
    if not 0 <= length <= MAX_BODY:
        raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"at most {MAX_BODY} bytes")
    body = http.rfile.read(length)
    if len(body) < length:
        raise HttpError(HTTPStatus.BAD_REQUEST, "the body ended before its Content-Length")
    return body


def _parse_json(body: bytes) -> Any:
    """The JSON in `body`, or 400: never a traceback, whatever the nesting or the numbers
    (`1e400` is not a number JSON can carry, nor `NaN`)."""
    try:
        return json.loads(body, parse_float=_finite, parse_constant=_no_constant)
    except RecursionError:
        raise HttpError(HTTPStatus.BAD_REQUEST, "JSON nested too deep") from None
    except ValueError as exc:  # UnicodeDecodeError and too long integers included
        raise HttpError(HTTPStatus.BAD_REQUEST, f"not JSON: {exc}") from None


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number out of range: {text[:20]}")
    return value


def _no_constant(text: str) -> float:
    raise ValueError(f"{text} is not JSON")


def _letter(letter: DeadLetter, names: dict[str, dict[str, Any]]) -> dict[str, Any]:
    info = letter.info or {}  # reason, attempts, at, worker, and any newer fields
    worker = info.get("worker")
    return {
        "index": letter.index,
        "key": letter_key(letter.payload),
        "size": len(letter.payload),
        "preview": dead.preview(letter.payload),
        "info": info,
        # `name` and `node` as the workers table shows them; without a live worker of that
        # id, `name` is None and the page shows the stored id.
        "worker": {"id": worker, "name": None, "node": None, **names.get(str(worker), {})}
        if worker is not None
        else None,
    }


def _integer(text: str | None, name: str, low: int, high: int) -> int:
    try:
        value = int(text or "")
    except ValueError:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"{name} must be a whole number") from None
    if not low <= value <= high:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"{name} must be from {low} to {high}")
    return value


def _json(value: object) -> Response:
    return Response(HTTPStatus.OK, _safe_json(json.dumps(value, default=str)))


def _safe_json(text: str) -> bytes:
    """JSON text with `<`, `>` and `&` escaped: even a browser that sniffed it as HTML
    would find no tag in it."""
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").encode()


def _error(code: int, message: str) -> Response:
    response = _json({"error": message})
    response.status = code
    return response


def _cookie(request: Request, value: str, max_age: int) -> tuple[str, str]:
    # Secure when the reverse proxy says the browser came over HTTPS.
    secure = "; Secure" if request.headers.get("X-Forwarded-Proto") == "https" else ""
    return (
        "Set-Cookie",
        f"{COOKIE}={value}; Max-Age={max_age}; Path=/; HttpOnly; SameSite=Strict{secure}",
    )


def _see_other(cookie: tuple[str, str]) -> Response:
    # Relative, so that it works under a proxy's path prefix too.
    return Response(HTTPStatus.SEE_OTHER, b"", "text/plain", [cookie, ("Location", "./")])
