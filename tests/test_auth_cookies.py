"""The refresh-token cookie: what is set, and what is read back."""

from __future__ import annotations

from services.auth.cookies import cleared_refresh_cookie, refresh_cookie, refresh_token_from


def test_the_cookie_is_out_of_scripts_reach_and_scoped_to_the_auth_routes() -> None:
    cookie = refresh_cookie("r-token", 2592000)
    assert cookie.startswith("megacity_refresh=r-token; Max-Age=2592000; Path=/api/v1/auth;")
    assert {"HttpOnly", "Secure", "SameSite=Strict"} <= {part.strip() for part in cookie.split(";")}
    assert "Max-Age=0;" in cleared_refresh_cookie()


def test_the_token_is_read_back_from_a_cookie_header() -> None:
    assert refresh_token_from("theme=dark; megacity_refresh=abc.DEF-123_x; lang=ko") == "abc.DEF-123_x"
    assert refresh_token_from("theme=dark") == ""
    assert refresh_token_from("") == ""
    assert refresh_token_from('megacity_refresh="unterminated') == ""
