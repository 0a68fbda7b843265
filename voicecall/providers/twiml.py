# -*- test-case-name: tests.test_twiml -*-
"""
Pure TwiML builders for the Twilio provider (SPEC §7.1.3, §12.5; PROVIDERS.md §1.3).

Every function returns a complete document as `str`: the XML declaration, then one
`<Response>` element. Every interpolated value (text and attributes) is XML-escaped. No I/O.
"""
from __future__ import annotations

from urllib.parse import quote, urlencode, urlsplit

XML_DECLARATION = '<?xml version="1.0" encoding="UTF-8"?>'
DEFAULT_VOICE = "Polly.Joanna"
DEFAULT_LANGUAGE = "en-US"
HOLD_MUSIC_PATH = "/voice/hold-music"
HOLD_MUSIC_URL = "https://s3.amazonaws.com/com.twilio.music.classical/BusyStrings.mp3"

#: OpenAI voice names and the Amazon Polly voice each one maps to (SPEC §12.5).
POLLY_VOICES = {
    "alloy": "Polly.Joanna",
    "echo": "Polly.Matthew",
    "fable": "Polly.Amy",
    "onyx": "Polly.Brian",
    "nova": "Polly.Salli",
    "shimmer": "Polly.Kimberly",
}

_ESCAPES = str.maketrans(
    {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&apos;"}
)


def escape(text: str) -> str:
    """Escape `& < > " '` so that `text` is safe as element text and as an attribute value."""
    return str(text).translate(_ESCAPES)


def polly_voice(voice: str | None) -> str:
    """
    The `<Say voice=...>` for a configured voice: OpenAI names map to Polly voices
    (case-insensitively), `Polly.*` and `Google.*` pass through, anything else is Polly.Joanna.
    """
    if not voice:
        return DEFAULT_VOICE
    voice = voice.strip()
    if voice.startswith(("Polly.", "Google.")):
        return voice
    return POLLY_VOICES.get(voice.lower(), DEFAULT_VOICE)


def _document(body: str) -> str:
    return f"{XML_DECLARATION}<Response>{body}</Response>"


def _say(text: str, voice: str | None, language: str | None) -> str:
    return (
        f'<Say voice="{escape(polly_voice(voice))}" '
        f'language="{escape(language or DEFAULT_LANGUAGE)}">{escape(text)}</Say>'
    )


def empty() -> str:
    """`<Response></Response>`: do nothing more (status callbacks, replays, notify leftovers)."""
    return _document("")


def reject() -> str:
    """Turn an inbound call away without answering it (the caller hears it ring out or busy)."""
    return _document("<Reject/>")


def pause(length: int = 30) -> str:
    """Keep the call open for `length` seconds."""
    return _document(f'<Pause length="{int(length)}"/>')


def notify(message: str, voice: str | None) -> str:
    """Say one message, then hang up (notify-mode calls)."""
    return _document(f'<Say voice="{escape(polly_voice(voice))}">{escape(message)}</Say><Hangup/>')


def hold_queue() -> str:
    """Put a caller on hold while another call holds the media stream."""
    return _document(
        '<Say voice="alice">Please hold while we connect you.</Say>'
        f'<Enqueue waitUrl="{HOLD_MUSIC_PATH}">hold-queue</Enqueue>'
    )


def hold_music() -> str:
    """The document served at `/voice/hold-music` to callers in the hold queue."""
    return _document(
        '<Say voice="alice">All agents are currently busy. Please hold.</Say>'
        f'<Play loop="0">{HOLD_MUSIC_URL}</Play>'
    )


def stream(stream_url: str, token: str, resume_url: str | None = None) -> str:
    """
    Connect the call to our media-stream WebSocket. The token travels as a `<Parameter>`
    because Twilio strips query strings from stream URLs. With `resume_url`, a `<Redirect>`
    follows the `<Connect>`: Twilio runs it when the socket closes (the daemon restarted, or the
    network dropped it), instead of reaching the document's end and hanging up, so a dropped
    stream comes back through a fresh, signed TwiML fetch and a new token.
    """
    redirect = "" if resume_url is None else f'<Redirect method="POST">{escape(resume_url)}</Redirect>'
    return _document(
        f'<Connect><Stream url="{escape(stream_url)}">'
        f'<Parameter name="token" value="{escape(token)}" />'
        f"</Stream></Connect>{redirect}"
    )


def come_back(url: str, seconds: int = 1) -> str:
    """Wait `seconds`, then fetch `url` again (a daemon that is stopping sends Twilio to its successor)."""
    return _document(f'<Pause length="{int(seconds)}"/><Redirect method="POST">{escape(url)}</Redirect>')


def hangup() -> str:
    """End the call (a stream resume for a call that is over)."""
    return _document("<Hangup/>")


def stream_url(public_url: str, stream_path: str) -> str:
    """
    The media-stream URL: the origin of `public_url` with https->wss and http->ws, then
    `stream_path` (a leading `/` is added). Default ports are left out, as in a WHATWG origin.
    """
    parts = urlsplit(public_url.strip())
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {public_url!r}")
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    if port is not None and port != (443 if scheme == "https" else 80):
        host = f"{host}:{port}"
    ws = "wss" if scheme == "https" else "ws"
    path = stream_path if stream_path.startswith("/") else "/" + stream_path
    return f"{ws}://{host}{path}"


#: Seconds a `<Gather input="speech dtmf">` waits for the next key (Twilio's `timeout` is also the
#: wait between keys: at 120 s one key pressed would be posted two minutes later).
DTMF_TIMEOUT_SECONDS = 5


def say_and_gather(
    text: str | None,
    voice: str | None,
    language: str | None,
    action_url: str,
    redirect_url: str | None,
    *,
    dtmf: bool = False,
    before: str = "",
) -> str:
    """
    One conversational turn without a media stream: `<Say>` the text (left out when `text` is
    None or empty), then listen with a speech `<Gather>` whose action carries the turn token,
    then, when `redirect_url` is given, `<Redirect>` there so silence re-prompts instead of the
    document ending (which would hang up). With `dtmf` the Gather takes keys too (`input="speech
    dtmf"`, posted as `Digits` after `#` or DTMF_TIMEOUT_SECONDS without a key). `before` is
    TwiML run first (keypad tones: `play_digits`).
    """
    lang = escape(language or DEFAULT_LANGUAGE)
    body = before + (_say(text, voice, language) if text else "")
    inputs, timeout = ("speech dtmf", DTMF_TIMEOUT_SECONDS) if dtmf else ("speech", 120)
    body += (
        f'<Gather input="{inputs}" speechTimeout="auto" timeout="{timeout}" '
        f'language="{lang}" action="{escape(action_url)}" method="POST"></Gather>'
    )
    if redirect_url is not None:
        body += f'<Redirect method="POST">{escape(redirect_url)}</Redirect>'
    return _document(body)


def say(
    text: str, voice: str | None, language: str | None, *, redirect_url: str | None = None
) -> str:
    """
    Speak without listening. Twilio hangs up when a document ends, so pass `redirect_url` to
    fetch the next instructions after speaking instead.
    """
    body = _say(text, voice, language)
    if redirect_url is not None:
        body += f'<Redirect method="POST">{escape(redirect_url)}</Redirect>'
    return _document(body)


def play_digits(digits: str) -> str:
    """`<Play digits>`: keypad tones sent on the call (`w` is a half-second pause). A fragment."""
    return f'<Play digits="{escape(digits)}"/>'


def then_redirect(before: str, url: str) -> str:
    """Run `before` (a fragment), then fetch `url` (a streamed call's way back to its stream)."""
    return _document(f'{before}<Redirect method="POST">{escape(url)}</Redirect>')


def dial(to: str, caller_id: str | None) -> str:
    """
    Connect the call to `to`: a `sip:` URI as `<Sip>`, else a phone number as `<Number>`;
    `caller_id` is the number the target sees (None: Twilio's default, the caller's own).
    When the target hangs up the document ends, and so does the call.
    """
    noun = f"<Sip>{escape(to)}</Sip>" if to.lower().startswith("sip:") else f"<Number>{escape(to)}</Number>"
    attribute = "" if caller_id is None else f' callerId="{escape(caller_id)}"'
    return _document(f"<Dial{attribute}>{noun}</Dial>")


def with_query(url: str, /, **params: str | None) -> str:
    """
    `url` with `params` appended to its query string (URL-encoded, in the order given; None
    values are skipped). Any fragment stays at the end.
    """
    items = [(k, str(v)) for k, v in params.items() if v is not None]
    if not items:
        return url
    base, hash_, fragment = url.partition("#")
    if "?" not in base:
        sep = "?"
    elif base.endswith(("?", "&")):
        sep = ""
    else:
        sep = "&"
    return f"{base}{sep}{urlencode(items, quote_via=quote, safe='')}{hash_}{fragment}"
