# -*- test-case-name: tests.test_config -*-
"""
The value checks a config key declares (voicecall.config.model): each takes the raw JSON value
and returns it (converted) or raises `Invalid` with the SPEC-style text of what was expected.
"""
from __future__ import annotations

import difflib
import re
from typing import Any, Callable
from urllib.parse import parse_qs, unquote, urlsplit

from attrs import frozen

#: The message for a phone number that is not E.164.
E164_MESSAGE = "Expected E.164 format, e.g. +15550001234"

Check = Callable[[Any], Any]


class Invalid(Exception):
    """
    A value failed its check; the message says what was expected (and maybe what was meant).
    ``hidden``: the value must not be shown (a malformed URL whose password cannot be told apart).
    """

    def __init__(self, message: str, suggestion: str | None = None, hidden: bool = False) -> None:
        super().__init__(message)
        self.suggestion = suggestion
        self.hidden = hidden


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


_SIP = re.compile(r"sips?:[^\s@<>\"]+@[^\s@<>\"]+")


def phone_or_sip(value: Any) -> str:
    """A number to dial: E.164, or a SIP URI (``sip:user@host``)."""
    if isinstance(value, str) and (_E164.fullmatch(value) or _SIP.fullmatch(value)):
        return value
    raise Invalid("expected an E.164 number (e.g. +15550001234) or a SIP URI (sip:user@host)")


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
#: What starts like a URL (``scheme:``): a store value so written is a URL or a typo, never a directory.
_SCHEME_ISH = re.compile(r"\s*([A-Za-z][A-Za-z0-9+.-]*):")
#: libpq decodes ``%XX`` in every part of a URL and refuses any other ``%`` (and ``%00``).
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})|%00")
_PASSWORD_PARAM = re.compile(r"([?&]password=)[^&]*", re.IGNORECASE)


def is_postgres_url(store: str) -> bool:
    """Whether the ``store`` value names a PostgreSQL database (else it is a directory)."""
    m = _SCHEME.match(store)
    return m is not None and m.group(1).lower() in POSTGRES_SCHEMES


def redact_url(text: str) -> str:
    """
    `text` with the password of a URL in it replaced by ``***`` (other text unchanged): the
    user-info password, also of a malformed URL (one slash, a ``%`` that is no escape, an
    unescaped ``@``), and a ``password=`` query parameter.
    """
    m = _SCHEME_ISH.match(text)
    if m is None:
        return text
    text = _PASSWORD_PARAM.sub(r"\1***", text)
    head, rest = text[: m.end()], text[m.end() :]
    slashes = len(rest) - len(rest.lstrip("/"))
    head, rest = head + rest[:slashes], rest[slashes:]
    authority = re.match(r"[^/?#]*@", rest)  # up to the last "@" before the path: user[:password]@
    if authority is None:
        return text
    userinfo = authority.group(0)[:-1]
    if ":" not in userinfo:
        return text
    return f"{head}{userinfo.split(':', 1)[0]}:***@{rest[authority.end():]}"


def store_location(value: Any) -> str:
    """
    A directory (SQLite) or a libpq URL ``postgresql://[user[:password]@]host[:port]/dbname[?...]``
    (``postgres://`` too, the scheme in any case, given to libpq in lower case). Only the URL's
    form is checked here (what libpq would refuse, quoting the whole URL and its password, in its
    errors); the server is reached at start. A value that starts like a URL but is not a
    PostgreSQL one is refused, not taken as a directory: a mistyped URL would otherwise start a
    lone SQLite node in a directory named after it. No message here repeats the value.
    """
    text = non_empty(value)
    ish = _SCHEME_ISH.match(text)
    if text != text.strip():
        raise Invalid("expected no leading or trailing spaces", hidden=ish is not None)
    if ish is None:
        return text
    try:
        return _postgres_url(text, ish)
    except Invalid as e:
        raise Invalid(str(e), e.suggestion, hidden=True) from None


def _postgres_url(text: str, ish: re.Match) -> str:
    """`store_location` of a value starting like a URL (``scheme:``)."""
    scheme = ish.group(1)
    if scheme.lower() not in POSTGRES_SCHEMES:
        if not text.startswith("/", ish.end()) and suggest(scheme, POSTGRES_SCHEMES) is None:
            return text  # a directory with a colon in its name ("calls:2026")
        raise Invalid(f'expected a directory or a postgresql:// URL, not a "{scheme}" URL', "postgresql://")
    if not text.startswith("//", ish.end()):
        raise Invalid(f'expected "{scheme}://" (two slashes) at the start of a PostgreSQL URL')
    text = scheme.lower() + text[len(scheme) :]
    if any(c.isspace() or not c.isprintable() for c in text):
        raise Invalid("expected a postgresql:// URL without spaces or control characters")
    if _BAD_PERCENT.search(text):
        raise Invalid('expected "%" only in an escape of two hex digits (write "%" in a password as %25)')
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise Invalid("expected a postgresql:// URL with a valid host and port (write \"/\" in a password as %2F)") from None
    if parts.netloc.count("@") > 1:
        raise Invalid('expected one "@" before the host (write "@" in a password as %40)')
    if parts.fragment or "#" in text:
        raise Invalid('expected no "#" in a postgresql:// URL (write "#" in a password as %23)')
    query = parse_qs(parts.query, keep_blank_values=True)
    if not parts.hostname and not query.get("host"):
        raise Invalid("expected a host: postgresql://user:password@host:port/dbname")
    database = unquote(parts.path[1:])
    if not database or "/" in database:
        raise Invalid("expected a database name after the host: postgresql://user:password@host:port/dbname")
    if len(database.encode()) > 63:
        raise Invalid("expected a database name of at most 63 bytes")
    return text


http_url = _url("http(s)", "http", "https")
ws_url = _url("ws(s)", "ws", "wss")
