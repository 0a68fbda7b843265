# -*- test-case-name: tests.test_plivo -*-
"""
Plivo Voice API (SPEC §7.3, §9.4; PROVIDERS.md §3).

REST through an injected treq client (JSON, HTTP Basic with the Auth ID and Auth Token): make a
call, transfer its A-leg to new XML, hang it up, ask its status. Speech is native Plivo XML
served by our own webhook: to speak or listen the A-leg is transferred to
`<webhook>?provider=plivo&flow=xml-speak|xml-listen&callId=<id>&n=<nonce>`, and that fetch is
answered, once, with the document kept for the call (plivoxml builds them). Webhooks are
verified with Plivo's V3 signature (V2 only if `allow_v2_signatures`) and parsed into normalised events.

Choices beyond SPEC:

- A `continue` turn is ONE transfer, to `<GetInput inputType="speech"><Speak>prompt</Speak>
  </GetInput>` then the keep-alive: a second transfer would cut the prompt short. Plivo's XML
  allows Speak inside GetInput (the SDK's `GetInputElement` nests Speak, Play and Wait).
- Turn tokens, which SPEC uses for Twilio only: the GetInput action URL carries
  `turnToken=<t>` and `wants_turn_token` is True, so a late GetInput result of an earlier
  question cannot answer a newer one.
- Every URL handed to Plivo (transfer URLs, GetInput actions) carries a fresh nonce `n`, as
  the Twilio adapter does; a transfer URL's nonce also names the one document it may fetch.
  That URL fetched again (Plivo's retry, or a repeat that overtook the first fetch) gets the
  same document until Plivo has gone past it (played, GetInput answered) or the next transfer.
- `start_listening` right after `speak` (a conversation's greeting) does not transfer again
  while the speak document is still unfetched: it turns that document into speak-then-listen,
  so the greeting is not cut off.
- `speak` resolves when the message has been played, not when the transfer is accepted: the
  speak document is `<Speak>` then a `<Redirect>` to `flow=spoken` with the transfer's nonce,
  and Plivo fetching that URL ends the wait (so does a newer transfer, or
  `base.speak_timeout`). A notify call's hang-up delay thus counts from the end of its message.
  The call's end (its hang-up webhook, or our hang-up) before that fails the speak with
  `NOT_PLAYED`: a message cut off, or never fetched, is not reported (nor recorded) as said.
- An answer-URL fetch (`Event=StartApp`) is `call.answered` also for inbound calls, whose
  CallStatus there is still `ringing`: Plivo answers the call as it runs our XML. `timeout`
  and `cancel` hang-up statuses map to `no-answer` and `hangup-bot`.

Issue 17 (call control, domain/carrier.py):

- Answering machines: asynchronous detection (`machine_detection=true`; `hangup` would end the
  call as Plivo's, not ours with reason voicemail), its `Machine=true|false` posted to
  `flow=amd&amd=<policy>`. Plivo reports no greeting end: for leave-message the verdict's
  `on_applied` transfers to `<Wait beep="true">` + `<Redirect flow=beep>`, whose fetch is the
  `machine_done` event (a documented beep wait, bounded by BEEP_WAIT_SECONDS).
- Keys: the DTMF API, which plays beside the running XML: a GetInput in progress is not
  replaced, so its turn keeps listening with its token. `dtmf=True` listens with
  `inputType="dtmf speech"`; its `Digits` are a `call.dtmf` event with the turn token.
- Transfer: an A-leg transfer to `<Dial><Number>` (`<User>` for sip:); recording: the Record API
  with a `flow=recording` callback (snake_case `record_url`, `recording_id`, ...: Plivo's docs;
  the `<Record>` action's CamelCase is read too), and `recording_source` for downloads.
"""
from __future__ import annotations

import base64
import hmac
import re
import secrets
from typing import Any, Mapping
from urllib.parse import urlsplit

import attrs
from attrs import define, field
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from voicecall.domain.carrier import NO_OPTIONS, DialOptions, InitiatedCall, ProviderCallStatus, ProviderError
from voicecall.domain.model import CallEvent, CallRecord, Direction, EventType, identity_key
from voicecall.providers import plivoxml
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
from voicecall.providers.signatures import parse_form, replace_origin, verify_plivo

#: Per-call state kept here (URLs, ids, pending documents) is capped, oldest dropped first.
MAX_CALL_STATE = 10_000
#: `call_status` values of GET /Call/{id}/ that mean the call is over (SPEC §7.3).
TERMINAL_STATUSES = frozenset({"completed", "busy", "failed", "timeout", "no-answer", "cancel", "machine", "hangup"})
#: Hang-up CallStatus values and the end reason each maps to.
END_REASONS = {
    "completed": "completed",
    "busy": "busy",
    "no-answer": "no-answer",
    "failed": "failed",
    "timeout": "no-answer",
    "cancel": "hangup-bot",
}
#: Where a transcript may arrive, first non-blank wins (SPEC §7.3).
TRANSCRIPT_FIELDS = ("Speech", "Transcription", "TranscriptionText", "SpeechResult", "RecognizedSpeech", "Text")
#: How long asynchronous machine detection may listen (ms): Plivo's default, within its 2000-10000.
MACHINE_DETECTION_MS = 5000
#: How long a machine's greeting is waited through for its beep (`<Wait beep="true">`), within
#: the manager's own wait for it (telephony.MACHINE_GREETING_WAIT_SECONDS).
BEEP_WAIT_SECONDS = 30
#: A recording's `time_limit` (s): Plivo's default (60) would cut a call's recording short; this
#: is Plivo's own limit of a call's length (`time_limit` of a call, 4 hours).
RECORDING_TIME_LIMIT = 14400
_XML = {"Content-Type": "text/xml"}
_DECIMAL = re.compile(r"^\s*(?:\d+(?:\.\d*)?|\.\d+)\s*$")
_NOT_NUMBER = re.compile(r"[^+0-9]")


def _bounded_put(mapping: dict, key: str, value: Any) -> None:
    mapping.pop(key, None)
    mapping[key] = value
    while len(mapping) > MAX_CALL_STATE:
        del mapping[next(iter(mapping))]


def _xml(body: str) -> WebhookResponse:
    return WebhookResponse(200, body.encode("utf-8"), _XML)


def plivo_number(number: str) -> str:
    """A number as Plivo takes it: only `+` and digits, except that `sip:` URIs are kept."""
    number = number.strip()
    if number.lower().startswith("sip:"):
        return number
    return _NOT_NUMBER.sub("", number)


def _played(pending: _Pending | None) -> None:
    """Stop anyone waiting for C{pending}'s speech to be played."""
    if pending is not None and pending.played is not None and not pending.played.called:
        pending.played.callback(None)


def _not_played(pending: _Pending | None) -> None:
    """The call ended before C{pending}'s speech was played (to its end): its speak fails."""
    if pending is not None and pending.played is not None and not pending.played.called:
        pending.played.errback(ProviderError(NOT_PLAYED))


def _nonce() -> str:
    return secrets.token_hex(6)


#: Messages of replaced, never fetched documents carried into the next one (oldest dropped).
MAX_CARRIED = 8


def _preceded(document: str, earlier: tuple, language: str | None) -> str:
    """C{document} with a `<Speak>` of each earlier (text, voice) first: what it replaced unheard."""
    speaks = "".join(plivoxml.speak_element(text, language, voice) for text, voice in earlier)
    head = "<Response>"
    return head + speaks + document[len(head):] if document.startswith(head) else document


@define(repr=False)
class _Pending:
    """The document a call's next transfer fetch gets: speak `text`, and/or listen."""

    nonce: str
    text: str | None
    voice: str | None
    listen: bool
    turn_token: str | None
    #: For a speak: fires once Plivo has played it (the `flow=spoken` fetch) or we stop waiting.
    played: Deferred | None = None
    #: (text, voice) of the documents this one replaced before Plivo fetched them: said first.
    earlier: tuple = ()
    #: A listen that also takes keys (`inputType="dtmf speech"`).
    dtmf: bool = False
    #: A transfer's target and the caller id it sees (`<Dial>`), or a wait for a machine's beep.
    dial: str | None = None
    caller_id: str | None = None
    beep: bool = False


@define(repr=False)
class PlivoProvider:
    """The Plivo adapter: call control, native speech (transfer to Plivo XML) and webhooks."""

    _http: Any  # treq HTTPClient
    _clock: IReactorTime
    _auth_id: str
    _auth_token: str = field(repr=False)
    _base_url: str = "https://api.plivo.com"
    _public_url: str | None = None
    _ring_timeout_sec: int = 30
    _language: str | None = None
    _webhook_url: str | None = None
    #: Accept callbacks signed with V2 only (config ``plivo.allowV2Signatures``): V2 covers
    #: neither the body nor the query, see L{verify_plivo}.
    _allow_v2_signatures: bool = False
    name: str = "plivo"
    uses_turn_tokens: bool = True
    _api: ApiClient = field(init=False)
    _requests: dict[str, str] = field(factory=dict, init=False)  # request_uuid we created -> callId
    _call_uuids: dict[str, str] = field(factory=dict, init=False)  # request_uuid -> CallUUID
    _call_bases: dict[str, str] = field(factory=dict, init=False)  # CallUUID -> webhook base Plivo used
    _call_urls: dict[str, str] = field(factory=dict, init=False)  # callId -> webhook URL of initiate
    _pending: dict[str, _Pending] = field(factory=dict, init=False)  # callId -> next transfer's document
    _playing: dict[str, _Pending] = field(factory=dict, init=False)  # callId -> speak fetched, not yet played
    #: callId -> (nonce, document) of the call's latest transfer, once fetched: a repeated fetch
    #: of that URL (Plivo's retry) gets the same document until Plivo has gone past it (its
    #: speech played, its GetInput answered) or the next transfer.
    _served: dict[str, tuple[str, str]] = field(factory=dict, init=False)
    #: Timers bounding the waits for speech to end (cancelled by L{stop}).
    _speak_timers: set = field(factory=set, init=False)
    #: callId -> nonce of the beep wait Plivo is running (its Redirect means the greeting is over).
    _beeping: dict[str, str] = field(factory=dict, init=False)
    _log = Logger()

    def __attrs_post_init__(self) -> None:
        self._api = ApiClient(
            http=self._http,
            base=f"{self._base_url.rstrip('/')}/v1/Account/{self._auth_id}",
            prefix="Plivo API error",
            clock=self._clock,
            auth=(self._auth_id, self._auth_token),
            error=ProviderError,
        )

    def set_webhook_url(self, url: str | None) -> None:
        """The daemon's webhook URL, once it listens (used for calls placed before a restart and inbound calls)."""
        self._webhook_url = url

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
        Dial; the message of a notify call is spoken on `call.answered` (SPEC §5.1). With an
        answering-machine policy, Plivo's asynchronous detection (`machine_detection=true`, not
        `hangup`: a hang-up is ours, with end reason voicemail) posts its verdict to
        `flow=amd&amd=<policy>`; the answer XML meanwhile holds the line silently.
        """
        return Deferred.fromCoroutine(self._initiate(call_id, from_number, to_number, webhook_url, options))

    async def _initiate(self, call_id: str, from_number: str, to_number: str, webhook_url: str, options: DialOptions) -> InitiatedCall:
        body: dict[str, Any] = {
            "from": plivo_number(from_number),
            "to": plivo_number(to_number),
            "answer_url": plivoxml.with_query(webhook_url, provider="plivo", callId=call_id, flow="answer"),
            "answer_method": "POST",
            "hangup_url": plivoxml.with_query(webhook_url, provider="plivo", callId=call_id, flow="hangup"),
            "hangup_method": "POST",
            "hangup_on_ring": int(self._ring_timeout_sec),
        }
        if options.answering_machine != "ignore":
            body.update(
                machine_detection="true",
                machine_detection_url=plivoxml.with_query(
                    webhook_url, provider="plivo", callId=call_id, flow="amd", amd=options.answering_machine
                ),
                machine_detection_method="POST",
                machine_detection_time=MACHINE_DETECTION_MS,
            )
        answer = await self._api.request("POST", "/Call/", body=body)
        uuid = answer.get("request_uuid") if isinstance(answer, dict) else None
        if isinstance(uuid, list):
            uuid = uuid[0] if uuid else None
        if not isinstance(uuid, str) or not uuid.strip():
            raise ProviderError("Plivo call create returned no request_uuid")
        uuid = uuid.strip()
        _bounded_put(self._requests, uuid, call_id)
        _bounded_put(self._call_urls, call_id, webhook_url)
        return InitiatedCall(uuid)

    def hangup_call(self, call: CallRecord, reason: str) -> Deferred[None]:
        return Deferred.fromCoroutine(self._hangup(call))

    async def _hangup(self, call: CallRecord) -> None:
        pid = call.provider_call_id
        if pid:
            uuid = self._call_uuids.get(pid) or (pid if pid in self._call_bases else None)
            if uuid is not None:
                await self._api.request("DELETE", f"/Call/{uuid}/", allow_not_found=True)
            else:
                # A request UUID (not answered yet) or a CallUUID we have not seen (restart).
                try:
                    await self._api.request("DELETE", f"/Call/{pid}/")
                except ProviderError as e:
                    if e.status != 404:
                        raise
                    await self._api.request("DELETE", f"/Request/{pid}/", allow_not_found=True)
        self._forget(call.call_id, pid)

    def answer_call(self, call: CallRecord) -> Deferred[None]:
        """Plivo answers an inbound call as it runs the XML we return: nothing to do."""
        return succeed(None)

    def get_call_status(self, provider_call_id: str) -> Deferred[ProviderCallStatus]:
        return Deferred.fromCoroutine(self._status(provider_call_id))

    async def _status(self, pid: str) -> ProviderCallStatus:
        uuid = self._call_uuids.get(pid, pid)
        try:
            answer = await self._api.request("GET", f"/Call/{uuid}/", allow_not_found=True)
        except ProviderError:
            return ProviderCallStatus("error", is_terminal=False, is_unknown=True)
        if answer is None:
            return ProviderCallStatus("not-found", is_terminal=True)
        status = normalize_status(answer.get("call_status") if isinstance(answer, dict) else None)
        return ProviderCallStatus(status, is_terminal=status in TERMINAL_STATUSES)

    def repoint_call(self, call: CallRecord, webhook_url: str) -> Deferred[None]:
        """
        A live call another node ran is now ours (adoption): transfer its A-leg to this node's
        listen document, so its next XML fetches and GetInput results come here. Plivo has no
        API to move a live call's hangup_url: that callback still goes to the old node's URL
        (a load balancer with the other nodes as its backups brings it to a live one).
        """
        _bounded_put(self._call_urls, call.call_id, webhook_url)
        return self._transfer(call, "xml-listen", "repoint", None, None, listen=True, turn_token=None)

    def _forget(self, call_id: str | None, *uuids: str | None) -> None:
        if call_id:
            # The call is over: a message not fetched yet, or still playing, was not heard
            # (to its end); its speak fails rather than claim it was said.
            self._call_urls.pop(call_id, None)
            self._served.pop(call_id, None)
            self._beeping.pop(call_id, None)
            _not_played(self._pending.pop(call_id, None))
            _not_played(self._playing.pop(call_id, None))
        for uuid in uuids:
            if uuid:
                self._requests.pop(uuid, None)
                self._call_bases.pop(self._call_uuids.pop(uuid, uuid), None)

    # -- speech (Voice) ---------------------------------------------------------------------------

    def stop(self) -> None:
        """The daemon is stopping: drop the timers of speeches still playing (their calls live on)."""
        timers, self._speak_timers = self._speak_timers, set()
        for timer in timers:
            if timer.active():
                timer.cancel()

    def speak(self, call: CallRecord, text: str, voice: str | None) -> Deferred[None]:
        """Transfer to `<Speak>` then the keep-alive; fires once Plivo has played it."""
        return self._transfer(call, "xml-speak", "speak", text, voice, listen=False, turn_token=None)

    def prompt(
        self, call: CallRecord, text: str, voice: str | None, turn_token: str | None, dtmf: bool = False
    ) -> Deferred[None]:
        """One transfer: the prompt inside a `<GetInput>` (keys too with `dtmf`) whose action carries the token."""
        return self._transfer(call, "xml-listen", "listen", text, voice, listen=True, turn_token=turn_token, dtmf=dtmf)

    def start_listening(self, call: CallRecord, turn_token: str | None, dtmf: bool = False) -> Deferred[None]:
        pending = self._pending.get(call.call_id)
        if pending is not None and not pending.listen and pending.dial is None and not pending.beep:
            # The speak document is not fetched yet: make it listen after speaking instead of
            # transferring again, which would cut the speech short.
            pending.listen = True
            pending.turn_token = turn_token
            pending.dtmf = dtmf
            return succeed(None)
        return self._transfer(call, "xml-listen", "listen", None, None, listen=True, turn_token=turn_token, dtmf=dtmf)

    def stop_listening(self, call: CallRecord) -> Deferred[None]:
        """A `<GetInput>` ends by itself."""
        return succeed(None)

    def wants_turn_token(self, call: CallRecord) -> bool:
        return True

    # -- keypad tones, transfer, recording (CallControl) ------------------------------------------

    def send_dtmf(self, call: CallRecord, digits: str) -> Deferred[None]:
        """
        Plivo's DTMF API on the A-leg (`w` is its half-second wait, as in `sendDigits`). It plays
        the tones beside the running XML, which it leaves alone: a GetInput listening for a
        turn's answer goes on listening (same action URL, same turn token).
        """
        try:
            uuid = self._call_uuid(call, "dtmf")
        except ProviderError as e:
            return fail(e)
        return Deferred.fromCoroutine(self._post(f"/Call/{uuid}/DTMF/", {"digits": digits, "leg": "aleg"}))

    async def _post(self, path: str, body: dict[str, Any]) -> None:
        await self._api.request("POST", path, body=body)

    def transfer_call(self, call: CallRecord, to: str) -> Deferred[None]:
        """
        An A-leg transfer to `<Dial><Number>` (`<User>` for a `sip:` target): the callee is
        connected to `to`, seeing our number (an outbound call's from) or, inbound, the caller's
        own (Plivo's default). Our part of the call is over once Plivo runs it.
        """
        caller_id = plivo_number(call.from_number) if call.direction is Direction.OUTBOUND and call.from_number else None
        return self._transfer(call, "xml-dial", "transfer", None, None, listen=False, turn_token=None, dial=plivo_number(to), caller_id=caller_id)

    def start_recording(self, call: CallRecord) -> Deferred[dict | None]:
        """
        `POST /Call/{uuid}/Record/` (mp3, both parties, up to RECORDING_TIME_LIMIT): Plivo names the
        recording at once (in progress); its `callback_url` (this call's webhook with
        `flow=recording`, signed like every callback) says when it is saved, usually after the
        hang-up, with its `record_url` and duration.
        """
        try:
            uuid = self._call_uuid(call, "recording")
            base = self._webhook_base(call, uuid)
        except ProviderError as e:
            return fail(e)
        body = {
            "time_limit": RECORDING_TIME_LIMIT,
            "file_format": "mp3",
            "callback_url": plivoxml.with_query(base, provider="plivo", callId=call.call_id, flow="recording"),
            "callback_method": "POST",
        }
        return Deferred.fromCoroutine(self._record(uuid, body))

    async def _record(self, uuid: str, body: dict[str, Any]) -> dict | None:
        started = int(self._clock.seconds() * 1000)
        answer = await self._api.request("POST", f"/Call/{uuid}/Record/", body=body)
        rid = answer.get("recording_id") if isinstance(answer, dict) else None
        if not isinstance(rid, str) or not rid.strip():
            return None
        return {"id": rid.strip(), "status": "in-progress", "startedAt": started}

    def _wait_for_beep(self, call_id: str, uuid: str, base: str) -> None:
        """A machine answered a leave-message call: wait for its beep (Plivo reports no greeting end)."""
        pending = _Pending(_nonce(), None, None, False, None, None, beep=True)
        d = self._transfer_to(call_id, uuid, base, "xml-beep", pending)
        d.addErrback(lambda f: self._log.warn("waiting for the beep on {call_id} failed: {why}", call_id=call_id, why=f.getErrorMessage()))

    # -- transfers to our XML -----------------------------------------------------------------------

    def _transfer(
        self,
        call: CallRecord,
        flow: str,
        op: str,
        text: str | None,
        voice: str | None,
        *,
        listen: bool,
        turn_token: str | None,
        dtmf: bool = False,
        dial: str | None = None,
        caller_id: str | None = None,
    ) -> Deferred[None]:
        try:
            uuid = self._call_uuid(call, op)
            base = self._webhook_base(call, uuid)
        except ProviderError as e:
            return fail(e)
        played = None if listen or dial is not None else Deferred()
        pending = _Pending(_nonce(), text, voice, listen, turn_token, played, dtmf=dtmf, dial=dial, caller_id=caller_id)
        return self._transfer_to(call.call_id, uuid, base, flow, pending)

    def _transfer_to(self, call_id: str, uuid: str, base: str, flow: str, pending: _Pending) -> Deferred[None]:
        # A newer transfer replaces whatever the call was doing: nothing waits on the old one.
        # A document Plivo has not fetched yet was not heard at all: its message is said first
        # in the new one (a continue's question, then the speak sent after it), so commands
        # still take effect in order.
        replaced = self._pending.pop(call_id, None)
        self._served.pop(call_id, None)
        self._beeping.pop(call_id, None)
        if replaced is not None:
            carried = replaced.earlier + (((replaced.text, replaced.voice),) if replaced.text else ())
            pending.earlier = carried[-MAX_CARRIED:]
        _played(replaced)
        _played(self._playing.pop(call_id, None))
        _bounded_put(self._pending, call_id, pending)
        url = plivoxml.with_query(base, provider="plivo", flow=flow, callId=call_id, n=pending.nonce)
        return Deferred.fromCoroutine(self._post_transfer(call_id, uuid, url, pending))

    async def _post_transfer(self, call_id: str, uuid: str, url: str, pending: _Pending) -> None:
        body = {"legs": "aleg", "aleg_url": url, "aleg_method": "POST"}
        try:
            await self._api.request("POST", f"/Call/{uuid}/", body=body)
        except ProviderError:
            if self._pending.get(call_id) is pending:
                del self._pending[call_id]
            _played(pending)
            if pending.played is not None:
                pending.played.addErrback(lambda _: None)  # the transfer's own failure is the one reported
            raise
        if pending.played is not None:
            await wait_until_played(
                self._clock, self._speak_timers, pending.played, pending.text or "", lambda: self._stop_waiting(call_id, pending)
            )

    def _stop_waiting(self, call_id: str, pending: _Pending) -> None:
        for waiting in (self._pending, self._playing):
            if waiting.get(call_id) is pending:
                del waiting[call_id]
        _played(pending)

    def _call_uuid(self, call: CallRecord, op: str) -> str:
        pid = call.provider_call_id
        if pid and pid in self._call_uuids:
            return self._call_uuids[pid]
        if not pid or pid in self._requests:
            raise ProviderError(f"Missing Plivo CallUUID for {op}")
        return pid

    def _webhook_base(self, call: CallRecord, uuid: str) -> str:
        base = self._call_urls.get(call.call_id) or self._webhook_url or self._call_bases.get(uuid)
        if not base:
            raise ProviderError("Missing webhook URL for this call (provider state missing)")
        return base

    def _document(self, ctx: WebhookContext) -> str:
        """The answer to a transfer fetch: the call's pending document, once; else keep-alive."""
        call_id = ctx.query.get("callId") or ""
        pending = self._pending.get(call_id)
        nonce = ctx.query.get("n") or ""
        if pending is None or not hmac.compare_digest(pending.nonce.encode(), nonce.encode()):
            served = self._served.get(call_id)
            if served is not None and hmac.compare_digest(served[0].encode(), nonce.encode()):
                return served[1]  # fetched again (a retry, or a repeat that overtook the first)
            return plivoxml.keep_alive()
        del self._pending[call_id]
        document = _preceded(self._own_document(call_id, pending, ctx), pending.earlier, self._language)
        _bounded_put(self._served, call_id, (pending.nonce, document))
        return document

    def _own_document(self, call_id: str, pending: _Pending, ctx: WebhookContext) -> str:
        base = self._call_urls.get(call_id) or self._webhook_url or self._verification_url(ctx).split("?", 1)[0]
        if pending.dial is not None:
            return plivoxml.dial(pending.dial, pending.caller_id)
        if pending.beep:
            _bounded_put(self._beeping, call_id, pending.nonce)
            beep = plivoxml.with_query(base, provider="plivo", flow="beep", callId=call_id, n=pending.nonce)
            return plivoxml.wait_for_beep(BEEP_WAIT_SECONDS, beep)
        if not pending.listen:
            _bounded_put(self._playing, call_id, pending)
            spoken = plivoxml.with_query(base, provider="plivo", flow="spoken", callId=call_id, n=pending.nonce)
            return plivoxml.speak(pending.text or "", self._language, pending.voice, spoken_url=spoken)
        _played(pending)  # a speak turned into speak-then-listen: nothing waits for its end
        action = plivoxml.with_query(
            base, provider="plivo", flow="getinput", callId=call_id, turnToken=pending.turn_token, n=_nonce()
        )
        return plivoxml.listen(action, self._language, pending.text, pending.voice, dtmf=pending.dtmf)

    def _spoken(self, ctx: WebhookContext) -> None:
        """Plivo reached the `<Redirect>` after a `<Speak>`: that message has been played."""
        call_id = ctx.query.get("callId") or ""
        playing = self._playing.get(call_id)
        nonce = ctx.query.get("n") or ""
        if playing is not None and hmac.compare_digest(playing.nonce.encode(), nonce.encode()):
            del self._playing[call_id]
            self._served.pop(call_id, None)
            _played(playing)

    # -- webhooks ---------------------------------------------------------------------------------

    def has_signature_headers(self, headers: Mapping[str, str]) -> bool:
        """The pre-auth gate: a V3 signature with its nonce, or a V2 pair if V2 is allowed."""
        v3 = headers.get("x-plivo-signature-v3") and headers.get("x-plivo-signature-v3-nonce")
        v2 = headers.get("x-plivo-signature-v2") and headers.get("x-plivo-signature-v2-nonce")
        return bool(v3 or (v2 and self._allow_v2_signatures))

    def _verification_url(self, ctx: WebhookContext) -> str:
        return replace_origin(self._public_url, ctx.url) if self._public_url else ctx.url

    def _params(self, ctx: WebhookContext) -> list[tuple[str, str]]:
        content_type = (ctx.header("content-type") or "").split(";", 1)[0].strip().lower()
        if ctx.method == "POST" and content_type in ("", "application/x-www-form-urlencoded"):
            return parse_form(ctx.raw_body)
        return []

    def verify_webhook(self, ctx: WebhookContext, public_url: str | None = None) -> Verification:
        result = verify_plivo(
            method=ctx.method,
            url=replace_origin(public_url, ctx.url) if public_url else self._verification_url(ctx),
            params=self._params(ctx),
            headers=ctx.headers,
            auth_token=self._auth_token,
            allow_v2=self._allow_v2_signatures,
        )
        return Verification(result.ok, result.reason, result.request_key)

    def call_refs(self, ctx: WebhookContext) -> tuple[str, ...]:
        try:
            params = dict(self._params(ctx))
        except (ValueError, UnicodeDecodeError):
            params = {}
        refs = (
            ctx.query.get("callId") or "",
            params.get("CallUUID", "") or params.get("call_uuid", ""),
            params.get("RequestUUID", ""),
        )
        return tuple(ref.strip() for ref in refs if ref.strip())

    def replay_response(self, ctx: WebhookContext) -> WebhookResponse | None:
        """Replays get the cached answer of the original request."""
        return None

    def parse_webhook(self, ctx: WebhookContext, request_key: str) -> ParsedWebhook:
        params = dict(reversed(self._params(ctx)))
        call_uuid = params.get("CallUUID", "").strip()
        request_uuid = params.get("RequestUUID", "").strip()
        if call_uuid:
            _bounded_put(self._call_bases, call_uuid, self._verification_url(ctx).split("?", 1)[0])
            if request_uuid and request_uuid != call_uuid:
                _bounded_put(self._call_uuids, request_uuid, call_uuid)
        flow = ctx.query.get("flow") or ""
        if flow in ("xml-speak", "xml-listen", "xml-dial", "xml-beep"):
            return ParsedWebhook((), _xml(self._document(ctx)))
        if flow == "spoken":
            self._spoken(ctx)
            return ParsedWebhook((), _xml(plivoxml.keep_alive()))
        if flow == "getinput":
            self._served.pop(ctx.query.get("callId") or "", None)  # past the GetInput: not served again
        if flow == "recording":
            call_uuid = call_uuid or params.get("call_uuid", "").strip()
        event = self._event(ctx, params, flow, call_uuid or request_uuid, request_key)
        if event is not None:
            event = _with_identity(event, ctx, request_key)
        # A fetch whose answer the call follows (a notification callback's answer is ignored).
        answer_fetch = flow in ("answer", "getinput", "beep") or (not flow and params.get("Event") == "StartApp")
        if event is not None and event.type is EventType.ENDED:
            self._forget(ctx.query.get("callId"), request_uuid, call_uuid)
        return ParsedWebhook(
            (event,) if event is not None else (),
            _xml(plivoxml.keep_alive() if answer_fetch else plivoxml.empty()),
        )

    def _event(self, ctx: WebhookContext, params: dict, flow: str, pid: str, key: str) -> CallEvent | None:
        direction = params.get("Direction", "").strip().lower()
        common: dict[str, Any] = dict(
            call_id=(ctx.query.get("callId") or "").strip() or pid,
            id=key,
            timestamp=int(self._clock.seconds() * 1000),
            dedupe_key=key,
            provider_call_id=pid or None,
            turn_token=ctx.query.get("turnToken") or None,
            direction=direction if direction in ("inbound", "outbound") else None,
            from_number=params.get("From") or None,
            to_number=params.get("To") or None,
        )
        if not common["call_id"]:
            return None
        if flow in ("amd", "beep", "recording"):
            return self._news(ctx, params, flow, common)
        digits = params.get("Digits", "").strip()
        if digits:
            return CallEvent(type=EventType.DTMF, digits=digits, **common)
        transcript = next((params[f].strip() for f in TRANSCRIPT_FIELDS if params.get(f, "").strip()), None)
        if transcript is not None:
            score = params.get("SpeechConfidenceScore", "")
            confidence = float(score) if _DECIMAL.match(score) else None
            return CallEvent(type=EventType.SPEECH, transcript=transcript, is_final=True, confidence=confidence, **common)
        if flow == "getinput":
            return None  # nothing heard: the call is as it was
        status = normalize_status(params.get("CallStatus"))
        if status in END_REASONS:
            return CallEvent(type=EventType.ENDED, reason=END_REASONS[status], **common)
        if flow == "hangup" or params.get("Event") == "Hangup":
            return CallEvent(type=EventType.ENDED, reason="completed", **common)
        if params.get("Event") == "StartApp" and params.get("CallUUID", "").strip():
            return CallEvent(type=EventType.ANSWERED, **common)
        if status == "ringing":
            return CallEvent(type=EventType.RINGING, **common)
        if status == "in-progress":
            return CallEvent(type=EventType.ANSWERED, **common)
        return None

    def _news(self, ctx: WebhookContext, params: dict, flow: str, common: dict[str, Any]) -> CallEvent | None:
        """A detection verdict (`flow=amd`), a machine's beep (`flow=beep`), a saved recording."""
        call_id = common["call_id"]
        if flow == "recording":
            recording = recording_of(params)
            return None if recording is None else CallEvent(type=EventType.RECORDING, recording=recording, **common)
        if flow == "beep":
            nonce = self._beeping.get(call_id)
            if nonce is None or not hmac.compare_digest(nonce.encode(), (ctx.query.get("n") or "").encode()):
                return None  # not the beep wait this call runs (replaced, or already heard)
            del self._beeping[call_id]
            self._served.pop(call_id, None)
            return CallEvent(type=EventType.MACHINE, answered_by="machine", machine_done=True, **common)
        machine = params.get("Machine", "").strip().lower()
        if machine not in ("true", "false"):
            return None
        if machine == "false":
            return CallEvent(type=EventType.MACHINE, answered_by="human", **common)
        uuid = common["provider_call_id"]
        on_applied = None
        if ctx.query.get("amd") == "leave-message" and uuid:
            base = self._call_urls.get(call_id) or self._webhook_url or self._verification_url(ctx).split("?", 1)[0]
            on_applied = lambda: self._wait_for_beep(call_id, uuid, base)  # noqa: E731
        return CallEvent(type=EventType.MACHINE, answered_by="machine", on_applied=on_applied, **common)


def _with_identity(event: CallEvent, ctx: WebhookContext, request_key: str) -> CallEvent:
    """
    `event` with the identity every delivery of it shares (DESIGN.md, delivery semantics).
    Plivo sends no event id, and a retry is signed afresh (a new V3 nonce, so a new request
    key). So: the caller's input is its GetInput's one-time nonce (``n`` in the action URL
    we built), and any other event is its type on its call (a call rings, is answered and
    ends once). The verified request key stays an alias.
    """
    pid = event.provider_call_id
    if event.type is EventType.RECORDING and event.recording:
        primary = identity_key("plivo:recording", event.recording["id"], event.recording["status"])
        return attrs.evolve(event, dedupe_key=primary, aliases=(request_key,))
    if not pid:
        return event
    if event.type is EventType.MACHINE:
        primary = identity_key("plivo:call.machine" + (".done" if event.machine_done else ""), pid)
    elif event.type in (EventType.SPEECH, EventType.DTMF):
        nonce = ctx.query.get("n")
        if not nonce:
            return event
        primary = identity_key("plivo:input", pid, nonce)
    else:
        primary = identity_key("plivo:" + event.type.value, pid)
    return attrs.evolve(event, dedupe_key=primary, aliases=(request_key,))


def _number(value: str | None) -> int | None:
    value = (value or "").strip()
    return int(value) if value.isdigit() else None


def recording_of(params: Mapping[str, str]) -> dict[str, Any] | None:
    """
    A recording (model.RECORDING_KEYS) from the Record API's callback (`recording_id`,
    `record_url`, `recording_duration`, `recording_duration_ms`, `recording_start_ms`: Plivo's
    docs) or the `<Record>` action's spelling (`RecordingID`, `RecordUrl`, ...): completed with its
    URL, failed without one; None without an id.
    """

    def first(*names: str) -> str:
        return next((params[n].strip() for n in names if (params.get(n) or "").strip()), "")

    rid = first("recording_id", "RecordingID")
    if not rid:
        return None
    url = first("record_url", "RecordUrl")
    recording: dict[str, Any] = {"id": rid, "status": "completed" if url else "failed"}
    if url:
        recording["url"] = url
    seconds = _number(first("recording_duration", "RecordingDuration"))
    millis = _number(first("recording_duration_ms", "RecordingDurationMs"))
    if seconds is not None:
        recording["durationSeconds"] = seconds
    elif millis is not None:
        recording["durationSeconds"] = millis / 1000
    started = _number(first("recording_start_ms", "RecordingStartMs"))
    if url and started is not None:
        recording["startedAt"] = started
    return recording


#: Where Plivo serves recordings besides the API's own origin (`record_url` of its callbacks).
MEDIA_ORIGINS = (("https", "media.plivo.com", 443),)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    return scheme, (parts.hostname or "").lower(), port or {"https": 443, "http": 80}.get(scheme)


def recording_source(
    http: Any, recording: Mapping[str, Any], *, base_url: str, auth_id: str, auth_token: str
) -> Deferred[tuple[str, dict[str, str]]]:
    """
    Where to GET a Plivo recording's audio (`voicecall recording fetch`): its `record_url`, with
    HTTP Basic auth (Auth ID and Auth Token). The URL came from a webhook, so the credentials go
    only to `plivo.baseUrl`'s origin or Plivo's media host (https://media.plivo.com): a recording
    on any other host is refused (ValueError).
    """
    url = recording.get("url")
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"recording {recording.get('id')} has no URL yet (Plivo reports it once the recording is saved)")
    url = url.strip()
    scheme, host, port = origin = _origin(url)
    if scheme not in ("http", "https") or not host or (origin != _origin(base_url) and origin not in MEDIA_ORIGINS):
        raise ValueError(
            f"refusing to send Plivo credentials to {scheme}://{host}: a recording URL must be on "
            f"plivo.baseUrl's origin ({base_url}) or https://media.plivo.com"
        )
    token = base64.b64encode(f"{auth_id}:{auth_token}".encode()).decode("ascii")
    return succeed((url, {"Authorization": f"Basic {token}"}))
