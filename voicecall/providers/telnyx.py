# -*- test-case-name: tests.test_telnyx -*-
"""
Telnyx Call Control v2 (SPEC §7.2, PROVIDERS.md §2).

REST through an injected treq client with `Authorization: Bearer <API key>`: dial (our call id
travels as base64 `client_state`, echoed in every webhook of the call), answer an accepted
inbound call (Telnyx parks inbound calls until answered), hang up, speak, start and stop
transcription, and ask a call's status. Every command carries a fresh `command_id`.

The provider is also the call's `Voice`: `speak` is the `speak` command and resolves when Telnyx
reports it played (`call.speak.ended`), so a notify call's hang-up delay counts from the end of
the message; the call's end before that fails it (`base.NOT_PLAYED`: a message cut off is not
reported, nor recorded, as said); a `speak.ended` that never comes is waited for at most
`base.speak_timeout(text)`. `prompt` is `speak` followed by `transcription_start` (Telnyx has
no single command that speaks and then transcribes speech: `gather_using_speak` collects DTMF only), skipped when a
transcription we started is still running on the call; `start_listening` and `stop_listening`
are `transcription_start` and `transcription_stop`, neither of which fails on a call that is
already over (its `call.hangup` ends it).

Turn tokens travel in `client_state`, which Telnyx echoes in every later webhook of the call,
each command carrying one replacing it. Dial, answer and speak carry the plain form, base64 of
the call id (SPEC §7.2: callId = base64decode(client_state)); the listening command of a turn
(`transcription_start`, or `client_state_update` when transcription already runs) carries
base64 of the JSON object `{"c": <call id>, "t": <turn token>}` (`encode_client_state`). A
`call.transcription` thus carries the token of the turn the carrier was listening for when it
sent it: none for speech sent during or before the turn's prompt (a late answer to an earlier
question), which the manager ignores while a turn with a token waits. A decoded value that is
not such an object is a call id, so states set before this form existed still decode.

Issue 17's call control: a dial with an answering-machine policy asks for Telnyx's detection
(`answering_machine_detection`: `detect_beep` to leave a message after the beep, `detect` to hang
up), whose `call.machine.[premium.]detection.ended` verdict and `call.machine.[premium.]greeting.ended`
(the beep) become `call.machine` events; `send_dtmf` is the `send_dtmf` command (our `w` pause is
Telnyx's too) and carries no `client_state`, so a turn listening keeps its token and its
transcription; `transfer_call` stops our transcription and sends `transfer` (an outbound call
presents our number to the target); `start_recording` is `record_start` (mp3, dual channel), whose
`call.recording.saved` / `call.recording.error` become `call.recording` events, also after the
hang-up. `recording_source` looks a recording up (`GET /v2/recordings/{id}`) for a fresh presigned
download URL: the `recording_urls` of the webhook expire after 10 minutes.

Webhooks are JSON signed with Ed25519 (SPEC §9.3, verified by `signatures.verify_telnyx`) and are
answered `OK`. Both transcription shapes are read: the current `payload.transcription_data`
(PROVIDERS.md §2.2) and the flat `payload.transcription` / `payload.is_final` of SPEC §7.2.
"""
from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from collections import deque
from datetime import datetime
from typing import Any, Mapping
from urllib.parse import quote, urlsplit

from attrs import define, field
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from voicecall.domain.carrier import NO_OPTIONS, DialOptions, InitiatedCall, ProviderCallStatus, ProviderError
from voicecall.domain.model import CallEvent, CallRecord, Direction, EventType, identity_key
from voicecall.providers.base import (
    NOT_PLAYED,
    ParsedWebhook,
    Verification,
    WebhookContext,
    WebhookResponse,
    normalize_status,
    wait_until_played,
)
from voicecall.infra.jsonhttp import ApiClient
from voicecall.providers.signatures import verify_telnyx

API_VERSION = "v2"
ERROR_PREFIX = "Telnyx API error"
DIAL_TIMEOUT_SECS = 30
DEFAULT_VOICE = "female"
DEFAULT_LANGUAGE = "en-US"
TRANSCRIPTION_ENGINE = "Google"
#: Telnyx error code for a command on a call that is over (HTTP 422).
CALL_ENDED_CODE = "90018"
#: Per-call state kept here (running transcriptions) is capped like every map outside input grows.
MAX_CALL_STATE = 10_000
#: Bounds on what a `client_state` we read may hold (ours: a UUID call id and a UUID token).
MAX_CLIENT_STATE_CHARS = 1024
MAX_TURN_TOKEN_CHARS = 128
MAX_RECORDING_ID_CHARS = 128

#: `answering_machine_detection` per answering-machine policy: `detect_beep` also reports the end
#: of a machine's greeting when it beeps (`call.machine.greeting.ended`), time to leave a message.
AMD_MODES = {"leave-message": "detect_beep", "hang-up": "detect"}
#: How long Telnyx follows a machine's greeting for its beep: within the manager's own wait
#: (telephony.MACHINE_GREETING_WAIT_SECONDS, 40 s), which then leaves the message anyway.
AMD_GREETING_MILLIS = 35_000
#: Verdicts of `call.machine.detection.ended` and `call.machine.premium.detection.ended`.
MACHINE_RESULTS = {
    "human": "human",
    "human_residence": "human",
    "human_business": "human",
    "machine": "machine",
    "fax_detected": "fax",
    "silence": "unknown",
    "not_sure": "unknown",
}
#: Results of `call.machine[.premium].greeting.ended` that mean the greeting is over (time to speak).
GREETING_OVER = frozenset({"beep_detected", "ended", "no_beep_detected", "prompt_ended"})
_MACHINE_EVENTS = ("call.machine.detection.ended", "call.machine.premium.detection.ended")
_GREETING_EVENTS = ("call.machine.greeting.ended", "call.machine.premium.greeting.ended")
#: Each key sounds this long (`send_dtmf` `duration_millis`: 100 to 500).
DTMF_DURATION_MILLIS = 250
#: How a recording is made: one file, caller and callee on their own channel.
RECORDING_FORMAT = "mp3"
RECORDING_CHANNELS = "dual"
#: A Telnyx recording id as `GET /v2/recordings/{id}` takes it (a UUID); anything else is refused.
_RECORDING_ID = re.compile(r"[A-Za-z0-9-]{1,64}")

SIGNATURE_HEADER = "telnyx-signature-ed25519"
TIMESTAMP_HEADER = "telnyx-timestamp"

#: SPEC §7.2 hangup causes, plus the causes PROVIDERS.md §2.2 lists that SPEC does not:
#: `timeout` (nobody answered within `timeout_secs`), `time_limit` (Telnyx's own call length
#: limit), `not_found` and `unspecified`.
HANGUP_CAUSES = {
    "normal_clearing": "completed",
    "normal_unspecified": "completed",
    "unspecified": "completed",
    "originator_cancel": "hangup-bot",
    "call_rejected": "busy",
    "user_busy": "busy",
    "no_answer": "no-answer",
    "no_user_response": "no-answer",
    "timeout": "no-answer",
    "destination_out_of_order": "failed",
    "network_out_of_order": "failed",
    "service_unavailable": "failed",
    "recovery_on_timer_expire": "failed",
    "not_found": "failed",
    "machine_detected": "voicemail",
    "fax_detected": "voicemail",
    "user_hangup": "hangup-user",
    "subscriber_absent": "hangup-user",
    "time_limit": "timeout",
}

_PROGRESS = {
    "call.initiated": EventType.INITIATED,
    "call.ringing": EventType.RINGING,
    "call.answered": EventType.ANSWERED,
    "call.bridged": EventType.ACTIVE,
}
_DIRECTIONS = {"incoming": "inbound", "outgoing": "outbound"}
_BASIC_VOICES = ("female", "male")
_TEXT = {"Content-Type": "text/plain; charset=utf-8"}
_OK = WebhookResponse(200, b"OK", _TEXT)
_BAD_REQUEST = WebhookResponse(400, b"Bad Request", _TEXT)


def encode_client_state(call_id: str, turn_token: str | None = None) -> str:
    """
    Our call id as Telnyx wants `client_state` (base64): the call id itself, or with a turn
    token the JSON object `{"c": call_id, "t": turn_token}` (no call id is a JSON object: ours
    are UUIDs, and an inbound call's is its `call_control_id`).
    """
    text = call_id if turn_token is None else json.dumps({"c": call_id, "t": turn_token}, separators=(",", ":"))
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def decode_client_state_token(value: object) -> tuple[str | None, str | None]:
    """
    The call id and turn token in a `client_state`: `{"c", "t"}` JSON gives both; any other
    base64 text is the call id (no token); a value that does not decode is the call id raw.
    """
    if not isinstance(value, str) or not value.strip():
        return None, None
    value = value.strip()
    try:
        text = base64.b64decode(value, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return value, None
    if not text or not text.isprintable():
        return value, None
    if text.startswith("{") and len(text) <= MAX_CLIENT_STATE_CHARS:
        try:
            state = json.loads(text)
        except (ValueError, RecursionError):
            state = None
        call_id = state.get("c") if isinstance(state, dict) else None
        if isinstance(call_id, str) and call_id.strip():
            token = state.get("t")
            valid = isinstance(token, str) and 0 < len(token) <= MAX_TURN_TOKEN_CHARS and token.isprintable()
            return call_id.strip(), token if valid else None
    return text, None


def hangup_reason(cause: object) -> str | None:
    """The end reason for a `hangup_cause`, or None when Telnyx gave a cause we do not know."""
    return HANGUP_CAUSES.get(cause.strip().lower()) if isinstance(cause, str) else None


def telnyx_voice(voice: str | None) -> str:
    """
    A voice Telnyx accepts: `female`/`male`, or `<Provider>.<Model>.<Voice>` (anything with a
    dot). Other names (the OpenAI TTS voice the manager passes, e.g. `alloy`) become `female`.
    """
    value = (voice or "").strip()
    if value.lower() in _BASIC_VOICES:
        return value.lower()
    if "." in value and value.isprintable():
        return value
    return DEFAULT_VOICE


def error_code(error: ProviderError) -> str | None:
    """Telnyx's own code (`errors[0].code` of the error body), if it gave one."""
    return str(error.code) if error.code is not None else None


def _epoch_ms(value: object) -> int | None:
    """An ISO 8601 time (Telnyx's `recording_started_at`) as epoch milliseconds."""
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return int(when.timestamp() * 1000) if when.tzinfo is not None else None


def recording_of(kind: str, payload: Mapping[str, Any], event_id: object = None) -> dict[str, Any]:
    """
    A `call.recording.saved` or `call.recording.error` payload as a recording (model.RECORDING_KEYS).
    Its id is `recording_id` (what `GET /v2/recordings/{id}` takes); the API reference's example
    leaves it out, so without it the recording is named after its call leg and start time (the
    same for a redelivery). Its duration is the time between its start and its end.
    """
    rid = _text(payload.get("recording_id"))
    started = _epoch_ms(payload.get("recording_started_at"))
    if rid is None:
        leg = _text(payload.get("call_leg_id")) or _text(payload.get("call_control_id")) or "call"
        when = started if started is not None else (_text(event_id) if kind == "call.recording.error" else None)
        rid = f"{leg}@{when}" if when is not None else leg
    recording: dict[str, Any] = {"id": rid[:MAX_RECORDING_ID_CHARS]}
    if kind == "call.recording.error":
        recording["status"] = "failed"
        return recording
    recording["status"] = "completed"
    for urls in (payload.get("recording_urls"), payload.get("public_recording_urls")):
        url = next((u for u in (urls.get("mp3"), urls.get("wav")) if _text(u)), None) if isinstance(urls, dict) else None
        if url is not None:
            recording["url"] = url.strip()
            break
    ended = _epoch_ms(payload.get("recording_ended_at"))
    if started is not None:
        recording["startedAt"] = started
        if ended is not None and ended >= started:
            recording["durationSeconds"] = round((ended - started) / 1000, 3)
    return recording


def recording_source(http: Any, recording: Mapping[str, Any], *, base_url: str, api_key: str) -> Deferred[tuple[str, dict[str, str]]]:
    """
    Where to download a recording from (`voicecall recording fetch`): Telnyx's presigned
    `download_urls.mp3` (or wav) of `GET {base_url}/v2/recordings/{id}`, asked with the API key.
    The presigned URL needs no credentials (none are sent to it), and is fresh: the webhook's
    URLs expire after 10 minutes. Raises ValueError for a recording id Telnyx cannot have made.
    """
    rid = recording.get("id")
    if not isinstance(rid, str) or not _RECORDING_ID.fullmatch(rid):
        raise ValueError(f"not a Telnyx recording id: {_snippet(str(rid))} (only a recording named by Telnyx can be fetched)")
    return Deferred.fromCoroutine(_recording_source(http, rid, base_url, api_key))


async def _recording_source(http: Any, rid: str, base_url: str, api_key: str) -> tuple[str, dict[str, str]]:
    api = ApiClient(
        http=http,
        base=f"{base_url.rstrip('/')}/{API_VERSION}",
        prefix=ERROR_PREFIX,
        headers={"Authorization": f"Bearer {api_key}"},
        error=ProviderError,
    )
    answer = await api.request("GET", f"/recordings/{rid}")
    data = answer.get("data") if isinstance(answer, dict) else None
    urls = data.get("download_urls") if isinstance(data, dict) else None
    url = next((u for u in (urls.get("mp3"), urls.get("wav")) if _text(u)), None) if isinstance(urls, dict) else None
    if url is None or urlsplit(url.strip()).scheme not in ("https", "http"):
        raise ProviderError(f"{ERROR_PREFIX}: recording {rid} has no download URL")
    return url.strip(), {}


def _text(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    return value.strip() or None


def _snippet(text: str, limit: int = 64) -> str:
    clean = "".join(ch if ch.isprintable() else " " for ch in text)
    return clean if len(clean) <= limit else clean[: limit - 1] + "…"


@define(repr=False)
class TelnyxProvider:
    """The Telnyx adapter: call control, native speech (`speak`, transcription) and webhooks."""

    _http: Any  # treq HTTPClient
    _clock: IReactorTime
    _api_key: str | None = field(default=None, repr=False)
    _connection_id: str | None = None
    _public_key: str | None = None
    _base_url: str = "https://api.telnyx.com"
    _language: str = DEFAULT_LANGUAGE
    #: The webhook URL a dial hands Telnyx, when not the caller's (a cluster's entryUrl: any live
    #: node, so a call's webhooks outlive the node that placed it).
    _dial_webhook_url: str | None = None
    name: str = "telnyx"
    uses_turn_tokens: bool = True
    _api: ApiClient = field(init=False)
    #: call_control_id -> None, oldest first: the calls whose transcription we started.
    _transcribing: dict[str, None] = field(factory=dict, init=False)
    #: call_control_id -> the speaks Telnyx accepted and has not reported ended, oldest first.
    _speaking: dict[str, deque] = field(factory=dict, init=False)
    #: Timers bounding the waits for speech to end (cancelled by L{stop}).
    _speak_timers: set = field(factory=set, init=False)
    _log = Logger()

    def __attrs_post_init__(self) -> None:
        self._api = ApiClient(
            http=self._http,
            base=f"{self._base_url.rstrip('/')}/{API_VERSION}",
            prefix=ERROR_PREFIX,
            clock=self._clock,
            headers={"Authorization": f"Bearer {self._api_key or ''}"},
            error=ProviderError,
        )

    # -- REST -------------------------------------------------------------------------------------

    def initiate_call(
        self,
        *,
        call_id: str,
        from_number: str,
        to_number: str,
        webhook_url: str,
        notify_message: str | None = None,
        voice: str | None = None,
        options: DialOptions = NO_OPTIONS,
    ) -> Deferred[InitiatedCall]:
        """
        Dial; a notify message is spoken by the manager on `call.answered`. An answering-machine
        policy asks for detection (AMD_MODES), whose verdict arrives as webhooks.
        """
        return Deferred.fromCoroutine(self._dial(call_id, from_number, to_number, webhook_url, options))

    async def _dial(self, call_id: str, from_number: str, to_number: str, webhook_url: str, options: DialOptions) -> InitiatedCall:
        body: dict[str, Any] = {
            "connection_id": self._connection_id,
            "to": to_number,
            "from": from_number,
            "webhook_url": self._dial_webhook_url or webhook_url,
            "webhook_url_method": "POST",
            "client_state": encode_client_state(call_id),
            "timeout_secs": DIAL_TIMEOUT_SECS,
            "command_id": str(uuid.uuid4()),
        }
        mode = AMD_MODES.get(options.answering_machine)
        if mode is not None:
            body["answering_machine_detection"] = mode
            if mode == "detect_beep":
                body["answering_machine_detection_config"] = {"greeting_total_analysis_time_millis": AMD_GREETING_MILLIS}
        answer = await self._api.request("POST", "/calls", body=body)
        data = answer.get("data") if isinstance(answer, dict) else None
        control_id = data.get("call_control_id") if isinstance(data, dict) else None
        if not isinstance(control_id, str) or not control_id:
            raise ProviderError(f"{ERROR_PREFIX}: dial returned no call_control_id")
        return InitiatedCall(control_id, "initiated")

    async def _command(
        self, control_id: str | None, action: str, body: Mapping[str, Any], tolerate_gone: bool = False, method: str = "POST"
    ) -> bool:
        """
        Send one call command (POST; `client_state_update` is a PUT). With `tolerate_gone`, a
        call Telnyx does not know (404) or that already ended (422, code 90018) is not an
        error: the answer is then False.
        """
        if not control_id:
            raise ProviderError("Call not connected")
        path = f"/calls/{quote(control_id, safe=':')}/actions/{action}"
        try:
            await self._api.request(method, path, body={**body, "command_id": str(uuid.uuid4())})
        except ProviderError as e:
            gone = e.status == 404 or (e.status == 422 and error_code(e) == CALL_ENDED_CODE)
            if tolerate_gone and gone:
                return False
            raise
        return True

    def hangup_call(self, call: CallRecord, reason: str) -> Deferred[None]:
        """Hang up; a call Telnyx does not know (404) or that already ended (90018) is fine."""
        self._forget(call.provider_call_id)
        self._unspoken(call.provider_call_id)  # nothing more will be played
        return Deferred.fromCoroutine(self._done(self._command(call.provider_call_id, "hangup", {}, tolerate_gone=True)))

    def answer_call(self, call: CallRecord) -> Deferred[None]:
        """Answer a parked inbound call; its later webhooks then carry our call id."""
        body = {"client_state": encode_client_state(call.call_id)}
        return Deferred.fromCoroutine(self._done(self._command(call.provider_call_id, "answer", body)))

    def repoint_call(self, call: CallRecord, webhook_url: str) -> Deferred[None]:
        """Adoption: nothing to move, Telnyx sends a call's webhooks to its application's one URL."""
        return succeed(None)

    def send_dtmf(self, call: CallRecord, digits: str) -> Deferred[None]:
        """
        `send_dtmf` (digits already checked: 0-9, *, #, and `w`, Telnyx's half-second pause too).
        No `client_state`: the call's stays, so a turn listening keeps its token (and its transcription).
        """
        body = {"digits": digits, "duration_millis": DTMF_DURATION_MILLIS}
        return Deferred.fromCoroutine(self._done(self._command(call.provider_call_id, "send_dtmf", body)))

    def transfer_call(self, call: CallRecord, to: str) -> Deferred[None]:
        """
        `transfer` the caller to `to` (E.164 or a SIP URI). Our transcription stops first: what
        the caller and the target say is theirs. An outbound call presents our number to the
        target (Telnyx's default `from` is the original call's `to`: the callee's own number);
        an inbound call keeps that default (our number). The new leg gets no `client_state`, so
        its webhooks name no call of ours.
        """
        return Deferred.fromCoroutine(self._transfer(call, to))

    async def _transfer(self, call: CallRecord, to: str) -> None:
        control_id = call.provider_call_id
        if control_id and control_id in self._transcribing:
            try:
                await self._command(control_id, "transcription_stop", {}, tolerate_gone=True)
            except ProviderError as e:
                self._log.warn("could not stop transcribing before transferring {call_id}: {error}", call_id=call.call_id, error=str(e))
            self._forget(control_id)
        body: dict[str, Any] = {"to": to}
        if call.direction is Direction.OUTBOUND and call.from_number:
            body["from"] = call.from_number
        await self._command(control_id, "transfer", body)

    def start_recording(self, call: CallRecord) -> Deferred[dict | None]:
        """
        `record_start` (mp3, both parties on their own channel). Telnyx names the recording only
        in its `call.recording.saved` webhook (the command answers `{"result": "ok"}`): None.
        """
        body = {"format": RECORDING_FORMAT, "channels": RECORDING_CHANNELS}
        return Deferred.fromCoroutine(self._record(call.provider_call_id, body))

    async def _record(self, control_id: str | None, body: Mapping[str, Any]) -> None:
        await self._command(control_id, "record_start", body)

    def get_call_status(self, provider_call_id: str) -> Deferred[ProviderCallStatus]:
        return Deferred.fromCoroutine(self._status(provider_call_id))

    async def _status(self, control_id: str) -> ProviderCallStatus:
        try:
            answer = await self._api.request("GET", f"/calls/{quote(control_id, safe=':')}", allow_not_found=True)
        except ProviderError:
            return ProviderCallStatus("error", is_terminal=False, is_unknown=True)
        if answer is None:
            return ProviderCallStatus("not-found", is_terminal=True)
        data = answer.get("data") if isinstance(answer, dict) else None
        data = data if isinstance(data, dict) else {}
        alive = data.get("is_alive")
        state = data.get("state")
        status = normalize_status(state if isinstance(state, str) else None)
        if not isinstance(alive, bool):
            return ProviderCallStatus(status, is_terminal=False, is_unknown=True)
        if status == "unknown":
            status = "active" if alive else "ended"
        return ProviderCallStatus(status, is_terminal=not alive)

    # -- speech (Voice) ---------------------------------------------------------------------------

    def stop(self) -> None:
        """The daemon is stopping: drop the timers of speeches still playing (their calls live on)."""
        timers, self._speak_timers = self._speak_timers, set()
        for timer in timers:
            if timer.active():
                timer.cancel()

    def speak(self, call: CallRecord, text: str, voice: str | None) -> Deferred[None]:
        return Deferred.fromCoroutine(self._speak(call, text, voice))

    async def _speak(self, call: CallRecord, text: str, voice: str | None) -> None:
        # The plain client_state (no token): speech Telnyx sends from now until a turn listens
        # again is no answer to a turn that waits.
        body = {
            "payload": text,
            "voice": telnyx_voice(voice),
            "language": self._language,
            "client_state": encode_client_state(call.call_id),
        }
        control_id = call.provider_call_id
        ended: Deferred[None] = Deferred()
        # Waiting starts before the command is sent: Telnyx may report the end before it answers.
        waiters = self._speaking.pop(control_id, None) if control_id else None
        if control_id:
            waiters = waiters if waiters is not None else deque()
            waiters.append(ended)
            self._speaking[control_id] = waiters
            while len(self._speaking) > MAX_CALL_STATE:
                for d in self._speaking.pop(next(iter(self._speaking))):
                    d.callback(None)
        try:
            await self._command(control_id, "speak", body)
        except BaseException:
            self._speak_done(control_id, ended)
            ended.addErrback(lambda _: None)  # the command's own failure is the one reported
            raise
        await wait_until_played(self._clock, self._speak_timers, ended, text, lambda: self._speak_done(control_id, ended))

    def _speak_done(self, control_id: str | None, ended: Deferred[None], cut_off: bool = False) -> None:
        """Stop waiting for one speak (its end came, it failed, we gave up on it, or the call ended: C{cut_off})."""
        waiters = self._speaking.get(control_id) if control_id else None
        if waiters is not None and ended in waiters:
            waiters.remove(ended)
            if not waiters:
                del self._speaking[control_id]
        if not ended.called:
            if cut_off:
                ended.errback(ProviderError(NOT_PLAYED))
            else:
                ended.callback(None)

    def _unspoken(self, control_id: str | None) -> None:
        """The call ended: every speak still playing (or not started) on it fails with `NOT_PLAYED`."""
        waiters = self._speaking.get(control_id) if control_id else None
        while waiters:
            self._speak_done(control_id, waiters[0], cut_off=True)

    def _spoken(self, control_id: str | None, cut_off: bool = False) -> None:
        """Telnyx reported the oldest speak of the call ended (played, or C{cut_off})."""
        waiters = self._speaking.get(control_id) if control_id else None
        if waiters:
            self._speak_done(control_id, waiters[0], cut_off)

    def prompt(
        self, call: CallRecord, text: str, voice: str | None, turn_token: str | None, dtmf: bool = False
    ) -> Deferred[None]:
        """
        Speak, then make sure the caller's answer is transcribed, for the turn `turn_token`. Keys
        need nothing more (`dtmf`): Telnyx always reports them (`call.dtmf.received`), with the
        turn's token in their `client_state`.
        """
        return Deferred.fromCoroutine(self._prompt(call, text, voice, turn_token))

    async def _prompt(self, call: CallRecord, text: str, voice: str | None, turn_token: str | None) -> None:
        control_id = call.provider_call_id
        if turn_token is not None and control_id and control_id in self._transcribing:
            # Transcription still runs from before this turn (after the greeting): an answer
            # to an earlier question may be under way, and its transcript, sent once it ends,
            # would carry this turn's token. Stopped, it is never sent; the turn starts anew.
            try:
                await self._command(control_id, "transcription_stop", {}, tolerate_gone=True)
            except ProviderError as e:
                self._log.warn("could not stop transcribing before a turn on {call_id}: {error}", call_id=call.call_id, error=str(e))
            else:
                self._forget(control_id)
        await self._speak(call, text, voice)
        await self._listen(call, turn_token)

    def start_listening(self, call: CallRecord, turn_token: str | None, dtmf: bool = False) -> Deferred[None]:
        return Deferred.fromCoroutine(self._listen(call, turn_token))

    async def _listen(self, call: CallRecord, turn_token: str | None = None) -> None:
        """
        Transcribe the caller, the webhooks from now on carrying `turn_token` in their
        client_state: `transcription_start`, or only `client_state_update` when our
        transcription already runs (nothing to update without a token: the speak before
        this set the plain state).
        """
        control_id = call.provider_call_id
        state = encode_client_state(call.call_id, turn_token)
        if control_id and control_id in self._transcribing:
            if turn_token is not None:
                await self._command(control_id, "client_state_update", {"client_state": state}, tolerate_gone=True, method="PUT")
            return
        body = {
            "transcription_engine": TRANSCRIPTION_ENGINE,
            "transcription_engine_config": {"language": self._transcription_language(), "interim_results": False},
            "transcription_tracks": "inbound",
            "client_state": state,
        }
        if not await self._command(control_id, "transcription_start", body, tolerate_gone=True):
            return  # the call is over: nothing to listen to (its call.hangup ends it here)
        self._transcribing.pop(control_id, None)
        self._transcribing[control_id] = None
        while len(self._transcribing) > MAX_CALL_STATE:
            del self._transcribing[next(iter(self._transcribing))]

    def _transcription_language(self) -> str:
        return (self._language or DEFAULT_LANGUAGE).split("-", 1)[0].lower() or "en"

    def stop_listening(self, call: CallRecord) -> Deferred[None]:
        """Stop transcribing; a call that is gone (404, 90018) is fine."""
        self._forget(call.provider_call_id)
        return Deferred.fromCoroutine(self._done(self._command(call.provider_call_id, "transcription_stop", {}, tolerate_gone=True)))

    def wants_turn_token(self, call: CallRecord) -> bool:
        return True

    @staticmethod
    async def _done(command: Any) -> None:
        await command

    def _forget(self, control_id: str | None) -> None:
        if control_id:
            self._transcribing.pop(control_id, None)

    # -- webhooks ---------------------------------------------------------------------------------

    def has_signature_headers(self, headers: Mapping[str, str]) -> bool:
        return bool(headers.get(SIGNATURE_HEADER)) and bool(headers.get(TIMESTAMP_HEADER))

    def verify_webhook(self, ctx: WebhookContext, public_url: str | None = None) -> Verification:
        result = verify_telnyx(
            raw_body=ctx.raw_body,
            signature=ctx.header(SIGNATURE_HEADER),
            timestamp=ctx.header(TIMESTAMP_HEADER),
            public_key=self._public_key,
            now=self._clock.seconds(),
        )
        return Verification(result.ok, result.reason, result.request_key)

    def call_refs(self, ctx: WebhookContext) -> tuple[str, ...]:
        try:
            document = json.loads(ctx.raw_body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            return ()
        data = document.get("data") if isinstance(document, dict) else None
        payload = data.get("payload") if isinstance(data, dict) else None
        if not isinstance(payload, dict):
            return ()
        call_id, _ = decode_client_state_token(payload.get("client_state"))
        return tuple(ref for ref in (call_id, _text(payload.get("call_control_id"))) if ref)

    def replay_response(self, ctx: WebhookContext) -> WebhookResponse | None:
        """
        A replay gets the answer the original got (Telnyx's answer depends only on whether the
        body is a JSON document), built here without parsing it again: parsing has effects
        (a C{call.speak.ended} ends the oldest speech still playing) that a replay must not repeat.
        """
        try:
            json.loads(ctx.raw_body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            return _BAD_REQUEST
        return _OK

    def parse_webhook(self, ctx: WebhookContext, request_key: str) -> ParsedWebhook:
        try:
            document = json.loads(ctx.raw_body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            return ParsedWebhook((), _BAD_REQUEST)
        data = document.get("data") if isinstance(document, dict) else None
        if not isinstance(data, dict) or not isinstance(data.get("event_type"), str):
            return ParsedWebhook((), _OK)
        payload = data.get("payload")
        event = self._event(data, payload if isinstance(payload, dict) else {}, request_key)
        return ParsedWebhook((event,) if event is not None else (), _OK)

    def _event(self, data: dict, payload: dict, key: str) -> CallEvent | None:
        kind = data["event_type"]
        control_id = _text(payload.get("call_control_id"))
        call_id, turn_token = decode_client_state_token(payload.get("client_state"))
        call_id = call_id or control_id
        if call_id is None:
            return None
        event_id = data.get("id")
        has_id = isinstance(event_id, str) and bool(event_id.strip())
        common: dict[str, Any] = dict(
            call_id=call_id,
            id=event_id if has_id else str(uuid.uuid4()),
            timestamp=int(self._clock.seconds() * 1000),
            # A redelivery has the same `data.id` but a fresh timestamp and signature (and
            # `meta.attempt` + 1): the event id, not the request, is what is applied once.
            dedupe_key=identity_key("telnyx:event", event_id) if has_id else key,
            provider_call_id=control_id,
            from_number=_text(payload.get("from")),
            to_number=_text(payload.get("to")),
        )
        direction = _DIRECTIONS.get(payload.get("direction")) if isinstance(payload.get("direction"), str) else None
        if kind == "call.hangup":
            # No direction: the end of a call we do not know must never create an inbound call.
            self._forget(control_id)
            self._unspoken(control_id)
            return CallEvent(type=EventType.ENDED, reason=self._reason(payload.get("hangup_cause")), **common)
        common["direction"] = direction
        if kind in _PROGRESS:
            return CallEvent(type=_PROGRESS[kind], **common)
        if kind == "call.speak.started":
            return CallEvent(type=EventType.SPEAKING, text=_text(payload.get("text")), **common)
        if kind == "call.speak.ended":
            # Ends the oldest speech still playing: only once the manager has taken the event as
            # new (a redelivery, even after a restart, must not end the next speech early).
            # Its `status` says how: `completed`, or cut off (`call_hangup`, `cancelled_amd`),
            # which fails that speak (it was not heard to its end).
            status = _text(payload.get("status"))
            cut_off = status is not None and status != "completed"
            return CallEvent(type=EventType.SPOKEN, on_applied=lambda: self._spoken(control_id, cut_off), **common)
        if kind == "call.transcription":
            return self._speech(payload, {**common, "turn_token": turn_token})
        if kind == "call.dtmf.received":
            # One key per webhook; its client_state carries the turn it answers.
            digits = _text(payload.get("digit"))
            return CallEvent(type=EventType.DTMF, digits=digits, turn_token=turn_token, **common) if digits else None
        if kind in _MACHINE_EVENTS:
            result = _text(payload.get("result"))
            return CallEvent(type=EventType.MACHINE, answered_by=MACHINE_RESULTS.get(result or "", "unknown"), **common)
        if kind in _GREETING_EVENTS:
            # The machine's greeting is over (its beep, or silence): time to leave the message.
            # `not_sure` says nothing: the manager's own wait for the beep goes on.
            if _text(payload.get("result")) not in GREETING_OVER:
                return None
            return CallEvent(type=EventType.MACHINE, answered_by="machine", machine_done=True, **common)
        if kind in ("call.recording.saved", "call.recording.error"):
            return CallEvent(type=EventType.RECORDING, recording=recording_of(kind, payload, data.get("id")), **common)
        return None

    def _reason(self, cause: object) -> str:
        reason = hangup_reason(cause)
        if reason is None:
            shown = _snippet(cause) if isinstance(cause, str) else repr(cause)[:64]
            self._log.warn("Unknown hangup cause: {cause}", cause=shown)
            return "completed"
        return reason

    @staticmethod
    def _speech(payload: dict, common: dict[str, Any]) -> CallEvent | None:
        """A final transcript (interim results are dropped: nothing waits for them)."""
        result = payload.get("transcription_data")
        if not isinstance(result, dict):
            result = {**payload, "transcript": payload.get("transcription")}
        final = result.get("is_final")
        text = _text(result.get("transcript"))
        if not text or final not in (None, True):
            return None
        confidence = result.get("confidence")
        if isinstance(confidence, bool) or not isinstance(confidence, (int, float)):
            confidence = None
        return CallEvent(type=EventType.SPEECH, transcript=text, is_final=True, confidence=confidence, **common)
