"""Who may act on the status page: the token, login sessions and CSRF tokens.

The page's actions (requeue, purge) need `[manager] dashboard_token`. A client proves it
holds the token either with `Authorization: Bearer <token>` on each request (scripts), or
once through the login form, which sets an HttpOnly cookie (browsers).

The cookie does not hold the token: it holds a random session id, an expiry and an HMAC of
both keyed by the token, so nothing stored server-side is needed, a stolen cookie ends at
its expiry, and changing the token ends every session. The CSRF token is another HMAC of
the session id: a page of another origin can neither read it nor guess it, and the cookie
is `SameSite=Strict` besides. A bearer request needs no CSRF token, because a browser never
adds that header by itself. Every comparison uses `hmac.compare_digest`.

Fail closed: the token is checked at every use, so a token file emptied or shortened
while the service runs turns the actions off instead of making the empty string the key
(`token_source`, `Gate.token`). Wrong tokens are throttled per client address and for
all of them together (`Throttle`), and logged as a summary (`QuietLog`). A POST must come
from the page's own origin, or from no browser at all (`Site.check_origin`): a form of
another origin could otherwise spend everyone's guesses and lock the operator out.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from rqworkers.config import ManagerSettings, check_token, read_token_file

log = logging.getLogger(__name__)

COOKIE = "rqworkers_session"
SESSION_SECONDS = 12 * 3600


def token_source(settings: ManagerSettings) -> Callable[[], str | None]:
    """How to get the token now: from the config, or read from its file each time (so that
    rotating the file takes effect without a restart). None: actions are off.

    Fails closed: a token that is missing, unreadable or shorter than the minimum at the
    moment of a request is None, never an empty or short key, and the keeper logs why once
    each time that changes (not once per request)."""
    if settings.dashboard_token is not None:
        secret = settings.dashboard_token

        def read() -> str:
            token = secret.get_secret_value()
            check_token(token, "dashboard_token")
            return token

    elif settings.dashboard_token_file is not None:
        path = settings.dashboard_token_file

        def read() -> str:
            return read_token_file(path)

    else:
        return lambda: None
    problem = [""]  # the last one logged: "" while the token is usable
    lock = threading.Lock()

    def current() -> str | None:
        try:
            token, now = read(), ""
        except ValueError as exc:
            token, now = None, str(exc)
        with lock:
            if now != problem[0]:
                if now:
                    log.error("dashboard: %s; every action is refused until it is fixed", now)
                else:
                    log.warning("dashboard: the token is usable again: actions are on")
                problem[0] = now
        return token

    return current


@dataclass(frozen=True)
class Identity:
    """What a request proved. `csrf` is what its POSTs must carry (None: nothing needed)."""

    authenticated: bool
    session: str | None = None  # the session id, for cookie logins

    def csrf(self, token: str) -> str | None:
        return None if self.session is None else _mac(token, "csrf", self.session)


ANONYMOUS = Identity(False)


class Gate:
    """Checks credentials against the token of `token_source`."""

    def __init__(self, token: Callable[[], str | None], clock: Callable[[], float] = time.time):
        self.source = token
        self.clock = clock

    def token(self) -> str | None:
        """The token now, or None (actions off) if there is none or it is too short: an
        empty or short key would let anyone log in or forge a session cookie.

        Without the blanks around it, which `check_token` does not count either: a bearer
        header cannot carry them (it is read stripped), nor does anyone type them."""
        token = (self.source() or "").strip()
        try:
            check_token(token, "dashboard token")
        except ValueError:
            return None
        return token

    def presents_token(self, headers: Mapping[str, str]) -> bool:
        """Whether the request offers a token (a bearer header): a guess, if wrong."""
        scheme, _, value = (headers.get("Authorization") or "").partition(" ")
        return scheme.lower() == "bearer" and bool(value)

    @property
    def actions_enabled(self) -> bool:
        return self.token() is not None

    def token_matches(self, candidate: str) -> bool:
        token = self.token()
        return token is not None and _same(candidate.strip(), token)

    def identify(self, headers: Mapping[str, str]) -> Identity:
        """A bearer header, or a valid unexpired session cookie; else anonymous."""
        token = self.token()
        if token is None:
            return ANONYMOUS
        if self.presents_token(headers):
            return Identity(_same(headers["Authorization"].partition(" ")[2].strip(), token))
        session = self._session(headers.get("Cookie") or "", token)
        return Identity(True, session) if session else ANONYMOUS

    def csrf_ok(self, identity: Identity, sent: str | None) -> bool:
        token = self.token()
        if token is None or not identity.authenticated:
            return False
        expected = identity.csrf(token)
        if expected is None:  # bearer: a browser cannot have been tricked into sending it
            return True
        return sent is not None and hmac.compare_digest(sent.encode(), expected.encode())

    def new_session(self) -> str:
        """A cookie value for a client that just gave the right token."""
        token = self.token()
        assert token is not None
        session = f"{secrets.token_urlsafe(18)}.{int(self.clock()) + SESSION_SECONDS}"
        return f"{session}.{_mac(token, 'session', session)}"

    def _session(self, cookie_header: str, token: str) -> str | None:
        value = _cookie_value(cookie_header, COOKIE)
        if value is None:
            return None
        session, _, mac = value.rpartition(".")
        _, _, expires = session.partition(".")
        if not hmac.compare_digest(mac.encode(), _mac(token, "session", session).encode()):
            return None
        if not expires.isdigit() or int(expires) < self.clock():
            return None
        return session


def _cookie_value(header: str, name: str) -> str | None:
    """The value of the first cookie `name` in a `Cookie` header (`a=1; b=2`), as it came:
    ours never needs quotes. Read in time linear in the header, which any visitor writes:
    `http.cookies.SimpleCookie` takes quadratic time on backslashes in a quoted value
    before Python 3.11.10 and 3.12.6 (CVE-2024-7592), seconds of the keeper's CPU for one
    64 KiB header."""
    for part in header.split(";"):
        key, equals, value = part.strip().partition("=")
        if equals and key == name:
            return value.strip()
    return None


def _same(candidate: str, token: str) -> bool:
    return hmac.compare_digest(
        candidate.encode("utf-8", "surrogateescape"), token.encode("utf-8", "surrogateescape")
    )


def _mac(token: str, purpose: str, value: str) -> str:
    key = token.encode("utf-8", "surrogateescape")
    return hmac.new(key, f"{purpose}|{value}".encode(), hashlib.sha256).hexdigest()


LOGIN_BURST = 5  # wrong tokens a client address may offer in a row
LOGIN_REFILL = 5.0  # seconds after which it may offer one more
GLOBAL_BURST = 20  # wrong tokens all addresses together may offer in a row
GLOBAL_REFILL = 0.5  # seconds after which they may offer one more: 2 a second at most
MAX_CLIENTS = 10_000  # addresses remembered at once: a flood of them cannot fill memory
EVERYONE = ""  # the key of the bucket all addresses share (no address is empty)


class Throttle:
    """Wrong tokens: a token bucket per client address (`LOGIN_BURST`, one more every
    `LOGIN_REFILL` seconds) and one for all of them together (`GLOBAL_BURST`, one more
    every `GLOBAL_REFILL` seconds). An empty bucket refuses every token offered, right or
    wrong, until it refills: 12 guesses a minute from one address, and 2 a second from
    any number of them (a local user can source from all of 127.0.0.0/8).

    The price of the shared bucket: whoever keeps it empty delays everyone's login, and
    bearer scripts, until it refills. So does a guesser behind a reverse proxy, where
    every client has the proxy's address."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # address: (tokens, at)

    def attempt(self, client: str) -> float:
        """Charge `client` (and everyone) one guess and return 0, or return the seconds it
        must wait.

        Charged before the token is compared, in one step, so that parallel requests
        cannot all pass the check before any of them is counted. `refund` a right one."""
        with self._lock:
            now = self.clock()
            mine, everyone = self._tokens(client, now), self._tokens(EVERYONE, now)
            if mine < 1 or everyone < 1:
                return max((1 - mine) * LOGIN_REFILL, (1 - everyone) * GLOBAL_REFILL)
            self._set(client, mine - 1, now)
            self._set(EVERYONE, everyone - 1, now)
        return 0.0

    def refund(self, client: str) -> None:
        """The guess `attempt` charged was right (or was no guess): give it back."""
        with self._lock:
            now = self.clock()
            for key in (client, EVERYONE):
                self._set(key, self._tokens(key, now) + 1, now)

    def _set(self, client: str, tokens: float, now: float) -> None:
        self._buckets.pop(client, None)
        if tokens < _burst(client):
            self._buckets[client] = (tokens, now)  # newest last: the oldest go first
        if len(self._buckets) > MAX_CLIENTS:
            self._forget(now)

    def _tokens(self, client: str, now: float) -> float:
        burst = _burst(client)
        tokens, at = self._buckets.get(client, (burst, now))
        refill = GLOBAL_REFILL if client == EVERYONE else LOGIN_REFILL
        return min(float(burst), tokens + (now - at) / refill)

    def _forget(self, now: float) -> None:
        for client in [c for c in self._buckets if self._tokens(c, now) >= _burst(c)]:
            del self._buckets[client]
        while len(self._buckets) > MAX_CLIENTS:
            oldest = next(c for c in self._buckets if c != EVERYONE)
            del self._buckets[oldest]


def _burst(client: str) -> int:
    return GLOBAL_BURST if client == EVERYONE else LOGIN_BURST


LOG_EVERY = 10.0  # seconds: at most one line of refusals this often, however many there are


class QuietLog:
    """Refusals (wrong tokens, cross-site posts) logged as a summary, not one line each:
    the first at once, then at most one line every `LOG_EVERY` seconds saying how many
    there were since and from how many addresses. A flood of guesses, from however many
    addresses, cannot fill the disk; no refusal goes uncounted (the next line counts it)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._last = -math.inf  # when the last line was written
        self._held = 0  # refusals since, not yet written
        self._clients: set[str] = set()  # their addresses (at most MAX_CLIENTS kept)

    def note(self, what: str, client: str, why: str) -> None:
        """Note that `what` (`a login`) from `client` was refused because of `why`."""
        with self._lock:
            now = self.clock()
            if now - self._last < LOG_EVERY:
                self._held += 1
                if len(self._clients) < MAX_CLIENTS:
                    self._clients.add(client)
                return
            held, clients = self._held, len(self._clients)
            self._last, self._held, self._clients = now, 0, set()
        since = f" (and {held} more refused from {clients} address(es) since the last such line)"
        log.warning("dashboard: refused %s from %s: %s%s", what, client, why, since if held else "")
