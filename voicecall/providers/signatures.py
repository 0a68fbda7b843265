# -*- test-case-name: tests.test_signatures -*-
"""
Webhook signature schemes of the carriers (SPEC §9.2-9.4, §9.6; PROVIDERS.md §1.5, §2.3, §3.5):
Twilio ``X-Twilio-Signature`` (HMAC-SHA1 with the Auth Token, or HMAC-SHA256 with a SharedKey),
Telnyx Ed25519, Plivo V3 and V2; plus the verified request keys that replay protection uses.

Everything here is a pure function over the request exactly as received: the raw body bytes,
header text and the verification URL that the webhook resource reconstructed.  Secrets are
compared with `hmac.compare_digest` only, and never appear in a result or a reason.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from functools import lru_cache
from typing import Any, Callable, Iterator, Mapping, Sequence
from urllib.parse import unquote_to_bytes

from attrs import frozen
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

__all__ = [
    "SignatureResult",
    "mock_request_key",
    "parse_form",
    "parse_twilio_signature_settings",
    "replace_origin",
    "skip_request_key",
    "twilio_signature",
    "verify_plivo",
    "verify_telnyx",
    "verify_twilio",
]

Params = Sequence[tuple[str, str]]

#: Accepted clock skew of a Telnyx timestamp, inclusive.
TELNYX_TOLERANCE_SECONDS = 300
#: At most this many comma-separated Plivo signatures are looked at.
_MAX_PLIVO_SIGNATURES = 16

_HASHES: dict[str, Callable[..., Any]] = {
    "HMAC_SHA1": hashlib.sha1,
    "HMAC_SHA256": hashlib.sha256,
}
_DEFAULT_PORTS = {"https": "443", "wss": "443", "http": "80", "ws": "80"}
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://([^/?#]*)(.*)$", re.DOTALL)
_BASE64 = re.compile(r"^[A-Za-z0-9+/_\-]*={0,2}$")
_TIMESTAMP = re.compile(r"^[0-9]{1,15}$")
_SPKI_ED25519_PREFIX = bytes.fromhex("302a300506032b6570032100")


@frozen
class SignatureResult:
    """
    The outcome of a webhook signature check.

    `request_key` is the verified request key of SPEC §9.6 (set only when `ok`);
    `verification_url` is the URL that was verified (the matching variant on success);
    `is_ngrok_free_tier` is a diagnostic for Twilio only.
    """

    ok: bool
    reason: str | None = None
    verification_url: str | None = None
    request_key: str | None = None
    is_ngrok_free_tier: bool = False


# -- shared helpers ---------------------------------------------------------------------------


def _form_decode(data: bytes) -> str:
    data = data.replace(b"+", b" ")
    if b"%" in data:
        data = unquote_to_bytes(data)
    return data.decode("utf-8", "replace")


def parse_form(raw_body: bytes | str) -> list[tuple[str, str]]:
    """
    Decode an ``application/x-www-form-urlencoded`` body the way WHATWG ``URLSearchParams``
    does: split on ``&``, skip empty parts, ``+`` is a space, percent-escapes are decoded as
    UTF-8 (invalid bytes become U+FFFD), a part without ``=`` has an empty value; blank values
    and the order of the pairs are kept.
    """
    if isinstance(raw_body, str):
        raw_body = raw_body.encode("utf-8")
    return list(_parse_form(raw_body))


@lru_cache(maxsize=32)
def _parse_form(raw_body: bytes) -> tuple[tuple[str, str], ...]:
    # Memoised: a webhook's body is decoded for its signature and again for its events.
    pairs = []
    for part in raw_body.split(b"&"):
        if part:
            name, _, value = part.partition(b"=")
            pairs.append((_form_decode(name), _form_decode(value)))
    return tuple(pairs)


def _sha256_hex(*parts: str | bytes) -> str:
    joined = b"\n".join(
        p.encode("utf-8", "surrogatepass") if isinstance(p, str) else p for p in parts
    )
    return hashlib.sha256(joined).hexdigest()


def _b64decode_loose(text: str) -> bytes | None:
    """Decode standard or URL-safe base64 with optional padding; ``None`` when malformed."""
    text = text.strip()
    if not _BASE64.match(text):
        return None
    body = text.rstrip("=").replace("-", "+").replace("_", "/")
    if len(body) % 4 == 1:
        return None
    try:
        return base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None


def _header(headers: Mapping[str, Any], name: str) -> str | None:
    """A header's first value; exact lower-case key first, then a case-insensitive match."""
    value = headers.get(name)
    if value is None:
        for key, candidate in headers.items():
            if isinstance(key, str) and key.lower() == name:
                value = candidate
                break
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return value


def _printable(text: str, limit: int = 64) -> str:
    return "".join(c for c in text[:limit] if c.isprintable())


def _split_url(url: str) -> tuple[str, str, str, str | None, str] | None:
    """``(scheme, userinfo, host, port, rest)`` of an absolute URL, or ``None``."""
    match = _URL.match(url)
    if match is None:
        return None
    scheme, authority, rest = match.groups()
    userinfo, at, hostport = authority.rpartition("@")
    userinfo = userinfo + at
    if hostport.startswith("["):
        end = hostport.find("]")
        if end == -1:
            return None
        host, tail = hostport[: end + 1], hostport[end + 1 :]
    else:
        host, colon, tail = hostport.partition(":")
        tail = colon + tail
    port = tail[1:] if tail.startswith(":") and tail[1:].isdigit() else None
    if tail and port is None and tail != ":":
        return None
    return scheme, userinfo, host, port, rest


def _join_url(scheme: str, userinfo: str, host: str, port: str | None, rest: str) -> str:
    return scheme + "://" + userinfo + host + (":" + port if port else "") + rest


def replace_origin(public_url: str, url: str) -> str:
    """
    `url` with its origin replaced by the origin of `public_url` (path and query of `url` kept
    byte for byte): the verification URL when a public URL is configured or tunnelled
    (SPEC §9.2, §9.4).  The origin is written like WHATWG ``URL.toString()``: scheme and host
    lower-cased, default port elided.  An unusable `public_url` leaves `url` unchanged.
    """
    public = _split_url(public_url.strip())
    request = _split_url(url)
    if public is None or request is None or not public[2]:
        return url
    scheme, _, host, port, _ = public
    scheme = scheme.lower()
    if port is not None and _DEFAULT_PORTS.get(scheme) == str(int(port)):
        port = None
    rest = request[4]
    if not rest.startswith("/"):
        rest = "/" + rest
    return _join_url(scheme, "", host.lower(), port, rest)


# -- Twilio -----------------------------------------------------------------------------------


def _hash_for(algorithm: str) -> Callable[..., Any] | None:
    return _HASHES.get(algorithm.strip().upper().replace("-", "_"))


def _twilio_params_data(params: Params) -> bytes:
    return "".join(k + v for k, v in sorted(params)).encode("utf-8", "surrogatepass")


def twilio_signature(url: str, params: Params, key: str, algorithm: str = "HMAC-SHA1") -> str:
    """
    The ``X-Twilio-Signature`` of a request: base64 of the HMAC (SHA-1 or SHA-256) keyed by
    `key` over `url` followed by every ``name + value`` of the decoded form `params`, sorted by
    name and then by value (PROVIDERS.md §1.5).  Raises `ValueError` for another algorithm.
    """
    digest = _hash_for(algorithm)
    if digest is None:
        raise ValueError("Unsupported Twilio signature algorithm: " + _printable(algorithm))
    data = url.encode("utf-8", "surrogatepass") + _twilio_params_data(params)
    return base64.b64encode(hmac.new(key.encode("utf-8"), data, digest).digest()).decode("ascii")


def parse_twilio_signature_settings(header: str | None) -> tuple[str | None, str] | None:
    """
    ``(key_id, algorithm)`` from ``X-Twilio-Webhooks-Signature-Settings``
    (``key=<sharedKeyId>,algorithm=HMAC_SHA256``); the algorithm defaults to ``HMAC_SHA1`` and
    the key id to ``None``.  A missing header, or one naming neither, gives ``None``.
    """
    if not header:
        return None
    key_id = algorithm = None
    for part in header.split(","):
        name, separator, value = part.partition("=")
        name, value = name.strip().lower(), value.strip()
        if not separator or not value:
            continue
        if name == "key" and key_id is None:
            key_id = value
        elif name == "algorithm" and algorithm is None:
            algorithm = value
    if key_id is None and algorithm is None:
        return None
    return key_id, algorithm or "HMAC_SHA1"


def _is_ngrok_free_tier(url: str) -> bool:
    return ".ngrok-free.app" in url or ".ngrok.io" in url


def _twilio_url_variants(url: str) -> Iterator[str]:
    """
    `url`, then once: the same URL with the scheme's default port written out when it has
    none, or without it when it names the default port.  Never another port: a port from the
    request (its ``Host`` header) is the client's to choose, so accepting it would let a
    signature over any port of the public host pass (issue 12 item 9).  Lazy: a valid request
    usually matches the first.
    """
    yield url
    parts = _split_url(url)
    if parts is None:
        return
    scheme, userinfo, host, port, rest = parts
    default = _DEFAULT_PORTS.get(scheme.lower())
    if default is None:
        return
    if port is None:
        yield _join_url(scheme, userinfo, host, default, rest)
    elif port.lstrip("0") == default:
        yield _join_url(scheme, userinfo, host, None, rest)


def _twilio_request_key(url: str, params: Params, signature: str) -> str:
    canonical = "&".join(k + "=" + v for k, v in sorted(params))
    return "twilio:req:" + _sha256_hex(url, canonical, signature)


def verify_twilio(
    *,
    url: str,
    params: Params,
    signature: str | None,
    auth_token: str,
    settings_header: str | None = None,
    signing_keys: Mapping[str, str] = {},
) -> SignatureResult:
    """
    Check ``X-Twilio-Signature`` (SPEC §9.2).

    `url` is the verification URL (the configured public URL's origin, or the reconstructed
    one); it is also tried with the scheme's default port written out (or left out), and with
    no other port: no port is ever taken from the request.  With
    ``X-Twilio-Webhooks-Signature-Settings`` naming a key id, the SharedKey of that id in
    `signing_keys` signs with the named algorithm; an unknown key id fails.
    """
    ngrok = _is_ngrok_free_tier(url)

    def fail(reason: str) -> SignatureResult:
        return SignatureResult(False, reason, url, None, ngrok)

    if not signature:
        return fail("Missing X-Twilio-Signature header")
    key = auth_token
    algorithm = "HMAC_SHA1"
    settings = parse_twilio_signature_settings(settings_header)
    if settings is not None:
        key_id, algorithm = settings
        if key_id is not None:
            found = signing_keys.get(key_id)
            if not found:
                return fail("Unknown Twilio signature key id: " + _printable(key_id))
            key = found
    digest = _hash_for(algorithm)
    if digest is None:
        return fail("Unsupported Twilio signature algorithm: " + _printable(algorithm))
    if not key:
        return fail("Missing Twilio auth token (configure to verify webhooks)")
    provided = signature.encode("utf-8", "surrogatepass")
    signing_key = key.encode("utf-8")
    data = _twilio_params_data(params)
    for candidate in _twilio_url_variants(url):
        mac = hmac.new(signing_key, candidate.encode("utf-8", "surrogatepass") + data, digest)
        if hmac.compare_digest(base64.b64encode(mac.digest()), provided):
            return SignatureResult(
                True,
                None,
                candidate,
                _twilio_request_key(candidate, params, signature),
                ngrok,
            )
    return fail("Invalid signature for URL: " + url)


# -- Telnyx -----------------------------------------------------------------------------------


def _raw_ed25519_from_spki(der: bytes | None) -> bytes:
    if der is None or len(der) != 44 or not der.startswith(_SPKI_ED25519_PREFIX):
        raise ValueError("telnyx.publicKey is not an Ed25519 public key")
    return der[len(_SPKI_ED25519_PREFIX) :]


@lru_cache(maxsize=16)
def _telnyx_verify_key(public_key: str) -> VerifyKey:
    """The key from PEM SPKI, base64(url) of the raw 32 bytes, or base64 DER SPKI."""
    text = public_key.strip()
    if text.startswith("-----BEGIN"):
        lines = [line.strip() for line in text.splitlines()]
        body = "".join(line for line in lines if line and not line.startswith("-----"))
        return VerifyKey(_raw_ed25519_from_spki(_b64decode_loose(body)))
    data = _b64decode_loose(text)
    if data is not None and len(data) == 32:
        return VerifyKey(data)
    return VerifyKey(_raw_ed25519_from_spki(data))


def verify_telnyx(
    *,
    raw_body: bytes,
    signature: str | None,
    timestamp: str | None,
    public_key: str | None,
    now: float,
) -> SignatureResult:
    """
    Check a Telnyx Ed25519 webhook signature (SPEC §9.3) over ``"<timestamp>|<raw body>"``.

    The signature (base64 or base64url, padding optional) is checked before the clock; the
    timestamp must then lie within 300 seconds of `now` (inclusive), in either direction.
    """
    if not public_key:
        return SignatureResult(False, "Missing telnyx.publicKey (configure to verify webhooks)")
    if not signature or not timestamp:
        return SignatureResult(False, "Missing signature or timestamp header")
    if not _TIMESTAMP.match(timestamp):
        return SignatureResult(False, "Invalid timestamp header")
    try:
        key = _telnyx_verify_key(public_key)
        decoded = _b64decode_loose(signature)
        if decoded is None or len(decoded) != 64:
            return SignatureResult(False, "Invalid signature")
        try:
            key.verify(timestamp.encode("ascii") + b"|" + raw_body, decoded)
        except BadSignatureError:
            return SignatureResult(False, "Invalid signature")
    except Exception as e:
        return SignatureResult(False, "Verification error: " + _printable(str(e), 200))
    if abs(now - int(timestamp)) > TELNYX_TOLERANCE_SECONDS:
        return SignatureResult(False, "Timestamp too old")
    canonical = base64.b64encode(decoded).decode("ascii")
    return SignatureResult(
        True, request_key="telnyx:" + _sha256_hex(timestamp, canonical, raw_body)
    )


# -- Plivo ------------------------------------------------------------------------------------


#: Why a request signed with V2 only is refused while ``plivo.allowV2Signatures`` is off.
PLIVO_V2_REFUSED = (
    "Plivo V2 signature not accepted: it does not cover the body or the query"
    " (only V3 is, unless plivo.allowV2Signatures is set)"
)


def _plivo_base(url: str) -> tuple[str, str]:
    """``scheme://authority/path`` of `url` (port kept, nothing normalised) and its query."""
    before_fragment = url.split("#", 1)[0]
    base, _, query = before_fragment.partition("?")
    return base, query


def _hmac_sha256(token: str, data: str) -> bytes:
    return hmac.new(
        token.encode("utf-8"), data.encode("utf-8", "surrogatepass"), hashlib.sha256
    ).digest()


def _plivo_v3_string(method: str, url: str, params: Params, nonce: str) -> str:
    base, query = _plivo_base(url)
    query_pairs = parse_form(query)
    body_pairs = list(params)
    if method == "GET":
        query_pairs.extend(body_pairs)
        body_pairs = []
    sorted_query = "&".join(k + "=" + v for k, v in sorted(query_pairs))
    text = base
    if sorted_query or body_pairs:
        text += "?" + sorted_query
    if sorted_query and body_pairs:
        text += "."
    text += "".join(k + v for k, v in sorted(body_pairs))
    return text + "." + nonce


def verify_plivo(
    *,
    method: str,
    url: str,
    params: Params,
    headers: Mapping[str, Any],
    auth_token: str,
    allow_v2: bool = False,
) -> SignatureResult:
    """
    Check Plivo's V3 signature (SPEC §9.4).  `params` are the decoded form body pairs; for GET
    they are signed along with the URL's query.  A V3 header may list several comma-separated
    signatures; any match passes.  Base64 values are compared decoded, in constant time.

    V2 signs only the URL without its query, and a nonce: not the body, not the query. So V2
    headers taken from any callback to this webhook would let a forged body through (a
    ``Speech``, a hang-up, for any call). They count only when `allow_v2` is set (config
    ``plivo.allowV2Signatures``), and then only on a request without the V3 pair: when V3
    headers are present V3 decides, and a failed V3 check never falls back to V2.
    """
    signature_v3 = _header(headers, "x-plivo-signature-v3")
    nonce_v3 = _header(headers, "x-plivo-signature-v3-nonce")
    signature_v2 = _header(headers, "x-plivo-signature-v2")
    nonce_v2 = _header(headers, "x-plivo-signature-v2-nonce")

    def fail(reason: str) -> SignatureResult:
        return SignatureResult(False, reason, url)

    if signature_v3 and nonce_v3:
        verb = method.upper()
        if verb not in ("GET", "POST"):
            return fail("Unsupported HTTP method for Plivo V3 signature: " + _printable(method))
        if not auth_token:
            return fail("Missing Plivo auth token (configure to verify webhooks)")
        expected = _hmac_sha256(auth_token, _plivo_v3_string(verb, url, params, nonce_v3))
        candidates = [s.strip() for s in signature_v3.split(",")][:_MAX_PLIVO_SIGNATURES]
        matched = False
        for candidate in candidates:
            decoded = _b64decode_loose(candidate) if candidate else None
            if decoded is not None and hmac.compare_digest(decoded, expected):
                matched = True
        if not matched:
            return fail("Invalid Plivo V3 signature")
        return SignatureResult(True, None, url, "plivo:v3:" + _sha256_hex(url, nonce_v3))
    if signature_v2 and nonce_v2:
        if not allow_v2:
            return fail(PLIVO_V2_REFUSED)
        if not auth_token:
            return fail("Missing Plivo auth token (configure to verify webhooks)")
        base, _ = _plivo_base(url)
        expected = _hmac_sha256(auth_token, base + nonce_v2)
        decoded = _b64decode_loose(signature_v2)
        if decoded is None or not hmac.compare_digest(decoded, expected):
            return fail("Invalid Plivo V2 signature")
        return SignatureResult(True, None, url, "plivo:v2:" + _sha256_hex(base, nonce_v2))
    return fail("Missing Plivo signature headers (V3 or V2)")


# -- request keys without a signature ---------------------------------------------------------


def skip_request_key(provider: str, method: str, url: str, raw_body: bytes) -> str:
    """The request key when signature checks are skipped (dev): ``<provider>:skip:<sha256>``."""
    return provider + ":skip:" + _sha256_hex(method, url, raw_body)


def mock_request_key(raw_body: bytes) -> str:
    """The mock provider's request key: ``mock:`` and the SHA-256 of the payload bytes."""
    return "mock:" + hashlib.sha256(raw_body).hexdigest()
