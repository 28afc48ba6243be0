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
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie

from rqworkers.config import ManagerSettings
from rqworkers.connections import read_password

log = logging.getLogger(__name__)

COOKIE = "rqworkers_session"
SESSION_SECONDS = 12 * 3600


def token_source(settings: ManagerSettings) -> Callable[[], str | None]:
    """How to get the token now: from the config, or read from its file each time (so that
    rotating the file takes effect without a restart). None: actions are off."""
    if settings.dashboard_token is not None:
        token = settings.dashboard_token.get_secret_value()
        return lambda: token
    path = settings.dashboard_token_file
    if path is None:
        return lambda: None

    def from_file() -> str | None:
        try:
            return read_password(path)
        except (OSError, UnicodeDecodeError) as exc:
            log.error("dashboard_token_file %s: cannot read: %s; actions refused", path, exc)
            return None

    return from_file


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
        self.token = token
        self.clock = clock

    @property
    def actions_enabled(self) -> bool:
        return self.token() is not None

    def token_matches(self, candidate: str) -> bool:
        token = self.token()
        return token is not None and hmac.compare_digest(
            candidate.encode("utf-8", "surrogateescape"), token.encode("utf-8", "surrogateescape")
        )

    def identify(self, headers: Mapping[str, str]) -> Identity:
        """A bearer header, or a valid unexpired session cookie; else anonymous."""
        token = self.token()
        if token is None:
            return ANONYMOUS
        scheme, _, value = (headers.get("Authorization") or "").partition(" ")
        if scheme.lower() == "bearer" and value:
            return Identity(self.token_matches(value.strip()))
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
        try:
            morsel = SimpleCookie(cookie_header).get(COOKIE)
        except CookieError:
            return None
        if morsel is None:
            return None
        session, _, mac = morsel.value.rpartition(".")
        _, _, expires = session.partition(".")
        if not hmac.compare_digest(mac.encode(), _mac(token, "session", session).encode()):
            return None
        if not expires.isdigit() or int(expires) < self.clock():
            return None
        return session


def _mac(token: str, purpose: str, value: str) -> str:
    key = token.encode("utf-8", "surrogateescape")
    return hmac.new(key, f"{purpose}|{value}".encode(), hashlib.sha256).hexdigest()
