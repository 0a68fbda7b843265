# -*- test-case-name: tests.test_security -*-
"""
Public-URL reconstruction for webhook signature checks (SPEC §9.1, hardened rules), the ngrok
free-tier loopback rule (SPEC §9.5) and the forwarded client address used for per-IP limits.

Forwarding headers (``X-Forwarded-Proto``, ``X-Forwarded-Host``, ``X-Original-Host``,
``Ngrok-Forwarded-Host``, ``X-Forwarded-For``, ``X-Real-IP``) are attacker-controlled text unless
the request came from a proxy we were told to trust, so they are ignored by default.  The URL
built here is only ever *verified* against a signature; it never bypasses one.

This module imports nothing from ``voicecall.providers``: the webhook resource reconstructs the
URL here and hands the string to a provider, which verifies it.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Mapping

from attrs import field, frozen

__all__ = [
    "ForwardingPolicy",
    "extract_hostname",
    "header_value",
    "is_loopback",
    "normalize_ip",
]

_HOSTNAME = re.compile(
    r"^([a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?\.)*"
    r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?$"
)
_PORT = re.compile(r"^:[0-9]{1,5}$")
_ABSOLUTE_FORM = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_FORWARDED_HOST_HEADERS = ("x-forwarded-host", "x-original-host", "ngrok-forwarded-host")
_MAX_HOSTNAME = 253


def header_value(headers: Mapping[str, Any], name: str) -> str | None:
    """
    The value of header `name` in `headers`: the exact lower-case key first, then any key that
    matches case-insensitively; a list or tuple value gives its first element.
    """
    lname = name.lower()
    value = headers.get(lname)
    if value is None:
        for key, candidate in headers.items():
            if isinstance(key, str) and key.lower() == lname:
                value = candidate
                break
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return value


def normalize_ip(value: str | None) -> str | None:
    """
    An IP address in the form used for comparisons: surrounding blanks and ``[]`` stripped,
    lower-cased, and an IPv4-mapped IPv6 address (``::ffff:a.b.c.d``) reduced to ``a.b.c.d``.
    A parseable address is also written in its canonical form (``0:0::1`` -> ``::1``).
    ``None`` or a blank value gives ``None``.
    """
    if value is None:
        return None
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1].strip()
    text = text.lower()
    if not text:
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return text
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped if mapped is not None else address)


def is_loopback(ip: str | None) -> bool:
    """
    Whether `ip` names this host: ``localhost``, an address in ``127.0.0.0/8`` (also written as
    an IPv4-mapped IPv6 address) or ``::1``.  Anything unparseable is not loopback.
    """
    text = normalize_ip(ip)
    if text is None:
        return False
    if text == "localhost":
        return True
    try:
        return ipaddress.ip_address(text).is_loopback
    except ValueError:
        return False


def extract_hostname(value: str) -> str | None:
    """
    The lower-cased host named by a ``Host``-style value (SPEC §9.1 step 4), without its port.

    ``[v6]`` or ``[v6]:port`` gives the inner IPv6 address; a value holding ``@`` is rejected;
    otherwise the text before the first ``:`` must be an RFC 1123 hostname of at most 253
    characters.  Anything else gives ``None``.
    """
    text = value.strip()
    if not text:
        return None
    if text.startswith("["):
        end = text.find("]")
        if end == -1:
            return None
        rest = text[end + 1 :]
        if rest and not _PORT.match(rest):
            return None
        inner = text[1:end]
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            return None
        return inner.lower()
    if "@" in text:
        return None
    hostname = text.split(":", 1)[0]
    if len(hostname) > _MAX_HOSTNAME or not _HOSTNAME.match(hostname):
        return None
    return hostname.lower()


def _first_element(value: str | None) -> str | None:
    """The first comma-separated element of a header value, trimmed, or ``None`` when blank."""
    if not value:
        return None
    first = value.split(",", 1)[0].strip()
    return first or None


def _host_from_header(value: str | None) -> str | None:
    first = _first_element(value)
    return extract_hostname(first) if first is not None else None


def _url_host(host: str) -> str:
    """`host` as it appears in a URL: IPv6 addresses go back between brackets."""
    return "[" + host + "]" if ":" in host else host


def _split_target(path_and_query: str) -> tuple[str | None, str]:
    """
    Split a request target into the authority of an absolute-form target (or ``None``) and the
    path plus query, kept byte for byte except that an empty trailing ``?`` is dropped, as
    WHATWG ``URL.toString()`` does.
    """
    authority = None
    target = path_and_query
    if _ABSOLUTE_FORM.match(target):
        rest = target.split("://", 1)[1]
        cut = len(rest)
        for separator in "/?#":
            index = rest.find(separator)
            if index != -1:
                cut = min(cut, index)
        authority, target = rest[:cut], rest[cut:]
    target = target.split("#", 1)[0]
    if not target.startswith("/"):
        target = "/" + target
    if target.endswith("?") and target.count("?") == 1:
        target = target[:-1]
    return authority, target


def _normalized_hosts(hosts: tuple[str, ...]) -> frozenset[str]:
    result = set()
    for host in hosts:
        extracted = extract_hostname(host)
        if extracted is not None:
            result.add(extracted)
    return frozenset(result)


def _normalized_ips(ips: tuple[str, ...]) -> frozenset[str]:
    return frozenset(ip for ip in (normalize_ip(entry) for entry in ips) if ip is not None)


@frozen
class ForwardingPolicy:
    """
    Which forwarding headers a webhook request may use to name its public URL and client.

    Forwarding headers are trusted only when (`allowed_hosts` is set or
    `trust_forwarding_headers` is true) and the peer is in the non-empty `trusted_proxy_ips`
    list (both sides compared after `normalize_ip`).  `ngrok_loopback_bypass` is the *effective*
    ngrok free-tier flag (tunnel is ngrok, bind is loopback, flag set): with it, a Twilio request
    from a loopback peer may use forwarded headers for URL reconstruction, and nothing more.

    A configured `allowed_hosts` list restricts forwarded hosts to its entries; when none of its
    entries is a valid hostname, no forwarded host is accepted (fail closed).
    """

    allowed_hosts: tuple[str, ...] = field(default=(), converter=tuple)
    trust_forwarding_headers: bool = False
    trusted_proxy_ips: tuple[str, ...] = field(default=(), converter=tuple)
    ngrok_loopback_bypass: bool = False
    _allowed: frozenset[str] = field(init=False, repr=False, eq=False)
    _proxies: frozenset[str] = field(init=False, repr=False, eq=False)

    @_allowed.default
    def _allowed_default(self) -> frozenset[str]:
        return _normalized_hosts(self.allowed_hosts)

    @_proxies.default
    def _proxies_default(self) -> frozenset[str]:
        return _normalized_ips(self.trusted_proxy_ips)

    def _from_trusted_proxy(self, remote_ip: str | None) -> bool:
        peer = normalize_ip(remote_ip)
        return peer is not None and peer in self._proxies

    def _forwarding_trusted(self, remote_ip: str | None) -> bool:
        wanted = bool(self.allowed_hosts) or self.trust_forwarding_headers
        return wanted and self._from_trusted_proxy(remote_ip)

    def reconstruct_url(
        self,
        path_and_query: str,
        headers: Mapping[str, Any],
        remote_ip: str | None,
        *,
        for_twilio: bool = False,
    ) -> str:
        """
        The public URL the carrier most likely requested: ``proto://host`` followed by
        `path_and_query` exactly as received.  The port is always dropped (SPEC §9.1); a
        signature made over a URL with a port is matched by the provider's port variants.

        `headers` maps lower-case header names to their first value.  The ngrok loopback rule
        applies only when `for_twilio` is true (Plivo verification has no ngrok mode).
        """
        authority, target = _split_target(path_and_query)
        trusted = self._forwarding_trusted(remote_ip) or (
            for_twilio and self.ngrok_loopback_bypass and is_loopback(remote_ip)
        )
        proto = "https"
        host = None
        if trusted:
            forwarded_proto = header_value(headers, "x-forwarded-proto")
            if forwarded_proto in ("http", "https"):
                proto = forwarded_proto
            for name in _FORWARDED_HOST_HEADERS:
                candidate = _host_from_header(header_value(headers, name))
                if candidate is None:
                    continue
                if self.allowed_hosts and candidate not in self._allowed:
                    continue
                host = candidate
                break
        if host is None:
            host = _host_from_header(header_value(headers, "host"))
        if host is None and authority is not None:
            host = extract_hostname(authority)
        return proto + "://" + _url_host(host or "") + target

    def client_ip(self, headers: Mapping[str, Any], remote_ip: str | None) -> str:
        """
        The client address for per-client limits.  When the peer is in `trusted_proxy_ips`
        (nothing else is needed: the address only picks a bucket, it never authenticates), the
        rightmost ``X-Forwarded-For`` element that is not itself a trusted proxy: the one the
        last trusted proxy saw (elements to its left are whatever the client wrote).  Without
        ``X-Forwarded-For`` (or when its rightmost hop is not an address), a valid
        ``X-Real-IP``; with neither, the proxy's own address.  Otherwise the normalised peer
        address.  A missing peer address gives ``""`` (one shared bucket).
        """
        peer = normalize_ip(remote_ip) or ""
        if peer not in self._proxies:
            return peer
        forwarded = header_value(headers, "x-forwarded-for")
        if forwarded:
            found = None
            for hop in reversed(forwarded.split(",")[-_MAX_HOPS:]):
                candidate = _valid_ip(hop)
                if candidate is None:
                    break
                found = candidate
                if candidate not in self._proxies:
                    return candidate
            if found:
                return found
        return _valid_ip(header_value(headers, "x-real-ip")) or peer


#: At most this many ``X-Forwarded-For`` hops are looked at, from the right.
_MAX_HOPS = 16


def _valid_ip(value: str | None) -> str | None:
    """`value` as a canonical IP address, or ``None`` when it is not one."""
    candidate = normalize_ip(value[:64] if value else None)
    if candidate is None:
        return None
    try:
        return str(ipaddress.ip_address(candidate))
    except ValueError:
        return None
