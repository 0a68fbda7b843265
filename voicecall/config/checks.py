# -*- test-case-name: tests.test_config -*-
"""
The value checks a config key declares (voicecall.config.model): each takes the raw JSON value
and returns it (converted) or raises `Invalid` with the SPEC-style text of what was expected.
"""
from __future__ import annotations

import difflib
import re
from typing import Any, Callable
from urllib.parse import urlsplit

from attrs import frozen

#: The message for a phone number that is not E.164.
E164_MESSAGE = "Expected E.164 format, e.g. +15550001234"

Check = Callable[[Any], Any]


class Invalid(Exception):
    """A value failed its check; the message says what was expected (and maybe what was meant)."""

    def __init__(self, message: str, suggestion: str | None = None) -> None:
        super().__init__(message)
        self.suggestion = suggestion


def suggest(word: Any, choices: Any) -> str | None:
    """The choice ``word`` was most likely meant to be (case-insensitive, difflib), or None."""
    if not isinstance(word, str):
        return None
    lowered = {c.lower(): c for c in choices if isinstance(c, str)}
    close = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[close[0]] if close else None


@frozen
class ListOf:
    """An array whose items all pass ``check``; parsed to a tuple."""

    check: Check


@frozen
class MapOf:
    """An object with free keys whose values all pass ``check``; parsed to a read-only mapping."""

    check: Check


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise Invalid("expected a boolean")


def integer(minimum: int, maximum: int | None = None) -> Check:
    if maximum is not None:
        expected = f"expected an integer between {minimum} and {maximum}"
    else:
        expected = f"expected an integer >= {minimum}"
        if minimum == 1:
            expected = "expected an integer > 0"

    def check(value: Any) -> int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid(expected)
        if value < minimum or (maximum is not None and value > maximum):
            raise Invalid(expected)
        return value

    return check


POSITIVE = integer(1)
TIMEOUT_MS = integer(1000, 120000)


def port(value: Any) -> int:
    number = POSITIVE(value)
    if number > 65535:
        raise Invalid("expected an integer between 1 and 65535")
    return number


def number(minimum: float, maximum: float) -> Check:
    expected = f"expected a number between {minimum} and {maximum}"

    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Invalid(expected)
        if not minimum <= value <= maximum:  # also rejects NaN
            raise Invalid(expected)
        return float(value)

    return check


UNIT = number(0, 1)


def non_empty(value: Any) -> str:
    if isinstance(value, str) and value:
        return value
    raise Invalid("expected a non-empty string")


def any_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise Invalid("expected a string")


def openai_model(value: Any) -> str:
    """
    `openai/<model>` or a bare model name: the built-in responder speaks the OpenAI API only
    (speech/responder.py splits it the same way, at the first slash).
    """
    model = non_empty(value)
    provider, slash, name = model.partition("/")
    if slash and provider.lower() != "openai":
        raise Invalid(
            f'provider "{provider}" is not supported: the built-in responder speaks the OpenAI API '
            '(use "openai/<model>", also for an OpenAI-compatible server at responseBaseUrl)'
        )
    if slash and not name.strip():
        raise Invalid('expected a model name after "openai/"')
    return model


#: A cluster node id names the node's row and its NOTIFY channel (``voicecall_node_<id>``, a
#: PostgreSQL identifier of at most 63 bytes): letters, digits, ``.``, ``_`` and ``-`` only.
_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,47}")


def node_id(value: Any) -> str:
    if isinstance(value, str) and _NODE_ID.fullmatch(value):
        return value
    raise Invalid("expected a node id: 1 to 48 letters, digits, '.', '_' or '-', starting with a letter or digit")


def url_path(value: Any) -> str:
    if isinstance(value, str) and value.startswith("/"):
        return value
    raise Invalid('expected a path starting with "/"')


def one_of(*choices: str) -> Check:
    expected = "expected one of " + ", ".join(f'"{c}"' for c in choices)

    def check(value: Any) -> str:
        if isinstance(value, str) and value in choices:
            return value
        raise Invalid(expected, suggest(value, choices))

    return check


_E164 = re.compile(r"\+[1-9][0-9]{1,14}")


def e164(value: Any) -> str:
    if isinstance(value, str) and _E164.fullmatch(value):
        return value
    raise Invalid(E164_MESSAGE)


def _url(label: str, *schemes: str) -> Check:
    expected = f"expected an absolute {label} URL"

    def check(value: Any) -> str:
        if not isinstance(value, str) or any(c.isspace() or not c.isprintable() for c in value):
            raise Invalid(expected)
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError:
            raise Invalid(expected) from None
        if parts.scheme not in schemes or not parts.hostname:
            raise Invalid(expected)
        return value

    return check


#: The URL schemes that put the store on PostgreSQL (libpq's); anything else is a directory.
POSTGRES_SCHEMES = ("postgresql", "postgres")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def is_postgres_url(store: str) -> bool:
    """Whether the ``store`` value names a PostgreSQL database (else it is a directory)."""
    m = _SCHEME.match(store)
    return m is not None and m.group(1).lower() in POSTGRES_SCHEMES


def redact_url(text: str) -> str:
    """`text` with the password of a URL in it replaced by ``***`` (other text unchanged)."""
    m = _SCHEME.match(text)
    if m is None:
        return text
    try:
        parts = urlsplit(text)
        password = parts.password
    except ValueError:
        return re.sub(r"(://[^/@:]*):[^/@]*@", r"\1:***@", text)
    if not password:
        return text
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return parts._replace(netloc=f"{user}:***@{hostinfo}").geturl()


def store_location(value: Any) -> str:
    """
    A directory (SQLite) or a libpq URL ``postgresql://[user[:password]@][host][:port][/dbname][?...]``
    (``postgres://`` too). Only the URL's form is checked here; the server is reached at start.
    """
    text = non_empty(value)
    m = _SCHEME.match(text)
    if m is None:
        return text
    if m.group(1).lower() not in POSTGRES_SCHEMES:
        raise Invalid(f'expected a directory or a postgresql:// URL, not a "{m.group(1)}" URL')
    if any(c.isspace() or not c.isprintable() for c in text):
        raise Invalid("expected a postgresql:// URL without spaces or control characters")
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise Invalid("expected a postgresql:// URL with a valid host and port") from None
    if len(parts.path.lstrip("/")) > 63:
        raise Invalid("expected a database name of at most 63 bytes")
    return text


http_url = _url("http(s)", "http", "https")
ws_url = _url("ws(s)", "ws", "wss")
