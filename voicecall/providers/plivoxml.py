# -*- test-case-name: tests.test_plivo -*-
"""
Pure Plivo XML builders for the Plivo provider (SPEC §7.3; PROVIDERS.md §3.3).

Every function returns a complete document as `str`: one `<Response>` element (Plivo needs no
XML declaration). Every interpolated value, text and attributes alike, is XML-escaped. No I/O.

A document that should leave the call up ends with the keep-alive `<Wait length="300" />`:
Plivo hangs up when a document runs out. `<GetInput>` may nest `<Speak>` (the SDK's
`GetInputElement` lists Speak, Play and Wait as nestable; PROVIDERS.md §3.3 shows the SDK's
output), so a question and the listening for its answer are one document.
"""
from __future__ import annotations

from voicecall.providers.twiml import escape, with_query

__all__ = [
    "DEFAULT_LANGUAGE",
    "KEEP_ALIVE_SECONDS",
    "dial",
    "empty",
    "escape",
    "keep_alive",
    "listen",
    "speak",
    "speak_voice",
    "wait_for_beep",
    "with_query",
]

DEFAULT_LANGUAGE = "en-US"
KEEP_ALIVE_SECONDS = 300
#: GetInput limits: executionTimeout is 5-60 s; speechEndTimeout is 2-10 s (or `auto`) in
#: Plivo's docs, so SPEC's "1" is raised to the smallest documented value.
EXECUTION_TIMEOUT = 30
SPEECH_END_TIMEOUT = 2

_WAIT = f'<Wait length="{KEEP_ALIVE_SECONDS}" />'


def _document(body: str) -> str:
    return f"<Response>{body}</Response>"


def speak_voice(voice: str | None) -> str | None:
    """
    The `<Speak voice=...>` for a configured voice: Plivo's `WOMAN`/`MAN` and `Polly.*` pass
    through; anything else (an OpenAI voice name, say) is left out, so Plivo's default is used.
    """
    if not voice:
        return None
    voice = voice.strip()
    if voice.upper() in ("WOMAN", "MAN"):
        return voice.upper()
    if voice.startswith("Polly."):
        return voice
    return None


def speak_element(text: str, language: str | None, voice: str | None) -> str:
    """One `<Speak>` element (not a document): `text` in `language` (default en-US), with `voice` if Plivo knows it."""
    attrs = f' language="{escape(language or DEFAULT_LANGUAGE)}"'
    chosen = speak_voice(voice)
    if chosen is not None:
        attrs += f' voice="{escape(chosen)}"'
    return f"<Speak{attrs}>{escape(text)}</Speak>"


def empty() -> str:
    """`<Response></Response>`: nothing more to do (hang-up callbacks)."""
    return _document("")


def keep_alive() -> str:
    """Keep the call up (silently) until a transfer brings the next instructions."""
    return _document(_WAIT)


def speak(text: str, language: str | None = None, voice: str | None = None, spoken_url: str | None = None) -> str:
    """Say `text`, then (with C{spoken_url}) tell us it was said by fetching that URL, then keep the call up."""
    if spoken_url is None:
        return _document(speak_element(text, language, voice) + _WAIT)
    return _document(speak_element(text, language, voice) + f'<Redirect method="POST">{escape(spoken_url)}</Redirect>')


def listen(
    action_url: str,
    language: str | None = None,
    prompt: str | None = None,
    voice: str | None = None,
    dtmf: bool = False,
) -> str:
    """
    Listen for speech (with `dtmf`, keys too: `inputType="dtmf speech"`, the keys posted as
    `Digits`) and post what was heard to `action_url`; with `prompt`, say it first, inside the
    `<GetInput>` (one document per turn). `redirect="false"`: the answer to the action does not
    drive the call, the keep-alive after the GetInput does (and also runs when nothing was heard).
    """
    lang = escape(language or DEFAULT_LANGUAGE)
    inner = speak_element(prompt, language, voice) if prompt else ""
    inputs = "dtmf speech" if dtmf else "speech"
    return _document(
        f'<GetInput inputType="{inputs}" method="POST" action="{escape(action_url)}" '
        f'language="{lang}" executionTimeout="{EXECUTION_TIMEOUT}" '
        f'speechEndTimeout="{SPEECH_END_TIMEOUT}" redirect="false">'
        f"{inner}</GetInput>{_WAIT}"
    )


def wait_for_beep(seconds: int, beep_url: str) -> str:
    """
    Wait (silently) for an answering machine's beep, at most `seconds` (`<Wait beep="true">`),
    then fetch `beep_url`: the greeting is over, a message left now is recorded whole.
    """
    return _document(f'<Wait length="{int(seconds)}" beep="true" /><Redirect method="POST">{escape(beep_url)}</Redirect>')


def dial(to: str, caller_id: str | None = None) -> str:
    """
    Connect the call to `to`: `<Dial><Number>` for a phone number, `<User>` for a `sip:` URI,
    showing `caller_id` (Plivo's default: the caller's own number). The call ends with the Dial.
    """
    noun = "User" if to.lower().startswith("sip:") else "Number"
    caller = f' callerId="{escape(caller_id)}"' if caller_id else ""
    return _document(f"<Dial{caller}><{noun}>{escape(to)}</{noun}></Dial>")
