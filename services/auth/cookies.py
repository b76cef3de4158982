"""The refresh token as a browser cookie, pure.

Browsers keep the refresh token where scripts cannot read it: every reply that issues one also sets it as an
httpOnly, Secure, SameSite=Strict cookie scoped to the auth routes (`Set-Cookie`, which the edge passes on from
the reply's metadata), Refresh takes it from the `Cookie` header when the body carries none, and Logout clears it.
The app (app.<domain>) and the API (api.<domain>) are one site, so Strict still sends it.
"""

from __future__ import annotations

from http.cookies import CookieError, SimpleCookie

REFRESH_COOKIE = "megacity_refresh"
COOKIE_PATH = "/api/v1/auth"


def refresh_cookie(token: str, max_age_seconds: int) -> str:
    return f"{REFRESH_COOKIE}={token}; Max-Age={max_age_seconds}; Path={COOKIE_PATH}; HttpOnly; Secure; SameSite=Strict"


def cleared_refresh_cookie() -> str:
    return refresh_cookie("", 0)


def refresh_token_from(cookie_header: str) -> str:
    """The refresh token a `Cookie` header carries; empty when none (or the header does not parse)."""
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(cookie_header)
    except CookieError:
        return ""
    morsel = jar.get(REFRESH_COOKIE)
    return morsel.value if morsel is not None else ""
