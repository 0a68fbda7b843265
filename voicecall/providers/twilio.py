# -*- test-case-name: tests.test_twilio -*-
"""
Twilio Programmable Voice (SPEC §7.1, PROVIDERS.md §1).

REST through an injected treq client: create a call (status callbacks for initiated, ringing,
answered, completed), live-update it with TwiML, hang up, ask its status. Webhooks are verified
with `X-Twilio-Signature` (HMAC-SHA1 with the auth token, or HMAC-SHA256 with a SharedKey) and
parsed into normalised events; the answer is the TwiML of §7.1.3 with DESIGN.md's decisions:

- a notify call's TwiML (`<Say>` then `<Hangup/>`) is stored and served once, on the first
  TwiML fetch, which consumes the initial message: it is never spoken twice;
- without a media stream a turn is one document: `<Say>` the prompt, `<Gather input="speech">`
  whose action carries the turn token, then `<Redirect>` so silence re-prompts instead of
  ending the document (Twilio hangs up when a document ends);
- with a media stream (wired by tap.py) the stream TwiML carries a one-time token in a
  `<Parameter>`, and after its `</Connect>` a `<Redirect>` to the call's resume URL
  (`resume_base_url()` with `callId`, `flow=resume` and a nonce: unique per document, so each
  resume is a request of its own). Twilio runs it when the socket closes (the daemon restarted,
  stopped, or the network dropped the socket), and the daemon that answers gives the same call a
  fresh stream with a new token; a call that is over gets `<Hangup/>`, and a daemon that is
  stopping sends Twilio back a second later, to its successor. The builder gets the fetch's
  verified request key, so a replayed fetch mints nothing (DESIGN.md threat model);
- `speak` resolves when the message has been said, not when the live update is accepted: its
  document is `<Say>` then a `<Redirect>` to `flow=spoken&n=<nonce>`, whose fetch ends the wait
  (and is answered with the listen loop, so listening without a turn token afterwards, as
  after the greeting, sends no second live update: replacing that `<Gather>` by an identical
  one cut off a caller who spoke at once); so do a newer update, or `base.speak_timeout`. The
  call's end before that fails the speak (`base.NOT_PLAYED`): a message cut off is not
  reported, nor recorded, as said. The manager queues later commands behind it, so a `continue` sent
  while the greeting plays no longer cuts the greeting off.

Issue 17 (contract in domain/carrier.py): answering-machine detection is async AMD with
DetectMessageEnd, its verdict posted to the webhook with `type=amd` (a `call.machine` event; a
`machine_end_*` verdict is a machine whose greeting has ended); keypad tones are a live update
`<Play digits>` followed by what the call was doing (`_doing`: its listen loop with the same turn
token, or a Redirect to a fresh stream); a Gather taking keys (`input="speech dtmf"`) posts them
as a `call.dtmf` event with its turn token; a transfer is a live update `<Dial>`; a recording is
started through the REST API and reported to the webhook with `type=recording` (`call.recording`
events, often after the hang-up); `recording_source` says where its audio is downloaded from.
"""
from __future__ import annotations

import base64
import hmac
import re
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

import attrs
import secrets
from typing import Any, Callable, Mapping

from attrs import define, field
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from voicecall.domain.carrier import NO_OPTIONS, DialOptions, InitiatedCall, ProviderCallStatus, ProviderError
from voicecall.domain.model import CallEvent, CallRecord, Direction, EventType, identity_key
from voicecall.providers import twiml
from voicecall.providers.base import (
    NOT_PLAYED,
    TERMINAL_STATUS_REASONS,
    ParsedWebhook,
    Verification,
    WebhookContext,
    WebhookResponse,
    normalize_status,
    wait_until_played,
)
from voicecall.infra.jsonhttp import ApiClient
from voicecall.providers.signatures import parse_form, replace_origin, verify_twilio

API_VERSION = "2010-04-01"
#: Twilio error 21220: the call is not in progress yet (a live update came too early).
NOT_IN_PROGRESS = 21220
RETRY_DELAYS = (0.25, 0.75)
#: Per-call state the provider keeps (TwiML, tokens, URLs) is capped like every map outside input grows.
MAX_CALL_STATE = 10_000
_XML = {"Content-Type": "application/xml"}
_DECIMAL = re.compile(r"^\s*(?:\d+(?:\.\d*)?|\.\d+)\s*$")
_PROGRESS = {"initiated": EventType.INITIATED, "ringing": EventType.RINGING, "in-progress": EventType.ANSWERED}
#: Answering-machine detection's `AnsweredBy` (PROVIDERS.md §1.2) -> (answered_by, machine_done).
#: With DetectMessageEnd a machine is reported once its greeting has ended (`machine_end_*`).
ANSWERED_BY = {
    "human": ("human", False),
    "machine_start": ("machine", False),
    "machine_end_beep": ("machine", True),
    "machine_end_silence": ("machine", True),
    "machine_end_other": ("machine", True),
    "fax": ("fax", False),
    "unknown": ("unknown", False),
}
#: A recording callback's `RecordingStatus` -> ours (`absent`: nothing was heard, no audio kept).
RECORDING_STATUS = {"in-progress": "in-progress", "completed": "completed", "absent": "failed", "failed": "failed"}
#: The recording events we ask Twilio to report (the SDK's documented values: there is no `failed` event).
RECORDING_EVENTS = ("in-progress", "completed", "absent")
#: The `type` query of the callbacks that only report (answered with empty TwiML, never a fetch).
CALLBACK_TYPES = ("status", "amd", "recording")


def _bounded_put(mapping: dict, key: str, value: Any) -> None:
    mapping.pop(key, None)
    mapping[key] = value
    while len(mapping) > MAX_CALL_STATE:
        del mapping[next(iter(mapping))]


def _xml(body: str, status: int = 200) -> WebhookResponse:
    return WebhookResponse(status, body.encode("utf-8"), _XML)


@define(repr=False)
class TwilioProvider:
    """The Twilio adapter: call control, native speech (`<Say>`/`<Gather>`) and webhooks."""

    _http: Any  # treq HTTPClient
    _clock: IReactorTime
    _account_sid: str
    _auth_token: str = field(repr=False)
    _base_url: str = "https://api.twilio.com"
    _signing_keys: Mapping[str, str] = field(factory=dict, repr=False)
    _public_url: str | None = None
    _webhook_url: str | None = None
    _language: str | None = None
    #: Builds a call's stream TwiML when a media stream can be used (the bridge's, from tap.py),
    #: else None. Called as (CallSid, direction, request_key=the fetch's verified key,
    #: resume_url=where Twilio asks again once the stream ends, resuming=whether this fetch is
    #: such a resume).
    _stream_twiml: Callable[..., "str | None"] | None = None
    #: Whether another call's stream is active (inbound callers then wait in the hold queue).
    _stream_busy: Callable[[], bool] | None = None
    #: The inbound policy (from tap.py): False for a caller to turn away with <Reject/>.
    _inbound_screen: Callable[["str | None"], bool] | None = None
    #: Where a stream's resume Redirect leads (a webhook URL; None: this daemon's webhook URL).
    #: A cluster points it at the URL that reaches any live node.
    _resume_base_url: str | None = None
    name: str = "twilio"
    uses_turn_tokens: bool = True
    _api: ApiClient = field(init=False)
    _call_urls: dict[str, str] = field(factory=dict, init=False)  # CallSid -> URL Twilio fetches TwiML from
    _notify_twiml: dict[str, str] = field(factory=dict, init=False)  # our callId -> one-shot TwiML
    #: our callId -> (Deferred, message): fired with the message when its notify TwiML is served.
    _notify_served: dict[str, tuple[Deferred, str]] = field(factory=dict, init=False)
    _rejected: dict[str, None] = field(factory=dict, init=False)  # CallSids turned away with <Reject/>
    #: CallSid -> (nonce, Deferred) of the `<Say>` being said: fires when its Redirect is fetched.
    _speaking: dict[str, tuple[str, Deferred]] = field(factory=dict, init=False)
    #: CallSids whose last TwiML was our listen loop without a turn token, served on a fetch
    #: (the greeting's Redirect, a Gather's action) with no live update since: listening again
    #: without a token would only replace that Gather with the same one, cutting off a caller
    #: who started talking.
    _listening: dict[str, None] = field(factory=dict, init=False)
    #: Timers bounding the waits for a `<Say>` to end (cancelled by L{stop}).
    _speak_timers: set = field(factory=set, init=False)
    #: CallSid -> what the call was last told to do, to go back to after keypad tones:
    #: ("stream",) or ("listen", turn token or None, dtmf).
    _doing: dict[str, tuple] = field(factory=dict, init=False)
    _log = Logger()

    def __attrs_post_init__(self) -> None:
        self._api = ApiClient(
            http=self._http,
            base=f"{self._base_url.rstrip('/')}/{API_VERSION}/Accounts/{self._account_sid}",
            prefix="Twilio API error",
            clock=self._clock,
            auth=(self._account_sid, self._auth_token),
            error=ProviderError,
        )

    def set_public_url(self, url: str | None) -> None:
        self._public_url = url

    @property
    def public_url(self) -> str | None:
        return self._public_url

    def set_webhook_url(self, url: str | None) -> None:
        self._webhook_url = url

    def resume_base_url(self) -> str | None:
        """The one place a stream's way back is decided: the base of every resume URL."""
        return self._resume_base_url or self._webhook_url

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
        return Deferred.fromCoroutine(
            self._initiate(call_id, from_number, to_number, webhook_url, notify_message, voice, options)
        )

    async def _initiate(self, call_id, from_number, to_number, webhook_url, notify_message, voice, options) -> InitiatedCall:
        url = twiml.with_query(webhook_url, callId=call_id)
        detect = options.answering_machine != "ignore"
        form = [
            ("To", to_number),
            ("From", from_number),
            ("Url", url),
            ("StatusCallback", twiml.with_query(webhook_url, callId=call_id, type="status")),
            *(("StatusCallbackEvent", e) for e in ("initiated", "ringing", "answered", "completed")),
            ("StatusCallbackMethod", "POST"),
            ("Timeout", "30"),
        ]
        if detect:
            # Async AMD: the call's TwiML runs at once (the listen loop or the stream holds the
            # line, saying nothing) and the verdict is posted to us; DetectMessageEnd waits for
            # a machine's greeting to end, so "machine" comes when a message can be left.
            form += [
                ("MachineDetection", "DetectMessageEnd"),
                ("AsyncAmd", "true"),
                ("AsyncAmdStatusCallback", twiml.with_query(webhook_url, callId=call_id, type="amd")),
                ("AsyncAmdStatusCallbackMethod", "POST"),
            ]
            notify_message = None  # said by the manager once it knows who answered: never consumed
        served: Deferred | None = None
        if notify_message:
            served = Deferred()
            _bounded_put(self._notify_twiml, call_id, twiml.notify(notify_message, voice))
            _bounded_put(self._notify_served, call_id, (served, notify_message))
        try:
            answer = await self._api.request("POST", "/Calls.json", form=form)
        except ProviderError:
            self._forget(None, call_id)
            raise
        answer = answer if isinstance(answer, dict) else {}
        sid = answer.get("sid")
        if not isinstance(sid, str) or not sid:
            self._forget(None, call_id)
            raise ProviderError("Twilio API error: call create returned no sid")
        _bounded_put(self._call_urls, sid, url)
        status = "queued" if answer.get("status") == "queued" else "initiated"
        return InitiatedCall(sid, status, consumes_initial_message=bool(notify_message), served=served)

    def hangup_call(self, call: CallRecord, reason: str) -> Deferred[None]:
        return Deferred.fromCoroutine(self._hangup(call))

    async def _hangup(self, call: CallRecord) -> None:
        sid = call.provider_call_id
        self._forget(sid, call.call_id)
        if sid in self._rejected:
            return  # already turned away by our <Reject/>: hanging up again would be a second hang-up
        if sid:
            await self._api.request("POST", f"/Calls/{sid}.json", form=[("Status", "completed")], allow_not_found=True)

    def answer_call(self, call: CallRecord) -> Deferred[None]:
        """Twilio answers inbound calls through the TwiML we return: nothing to do."""
        return Deferred.fromCoroutine(_nothing())

    def get_call_status(self, provider_call_id: str) -> Deferred[ProviderCallStatus]:
        return Deferred.fromCoroutine(self._status(provider_call_id))

    async def _status(self, sid: str) -> ProviderCallStatus:
        try:
            answer = await self._api.request("GET", f"/Calls/{sid}.json", allow_not_found=True)
        except ProviderError:
            return ProviderCallStatus("error", is_terminal=False, is_unknown=True)
        if answer is None:
            return ProviderCallStatus("not-found", is_terminal=True)
        status = normalize_status(answer.get("status"))
        return ProviderCallStatus(status, is_terminal=status in TERMINAL_STATUS_REASONS)

    def repoint_call(self, call: CallRecord, webhook_url: str) -> Deferred[None]:
        """
        A live call another node ran is now ours (adoption): a call update (`Url`) makes Twilio
        fetch this node's TwiML for it at once (a fresh stream, or the listen loop), and moves
        its status callback here (Twilio then sends the final `completed`, as documented for an
        update without StatusCallbackEvent).
        """
        sid = call.provider_call_id or ""
        outbound = call.direction is Direction.OUTBOUND
        url = twiml.with_query(webhook_url, callId=call.call_id) if outbound else webhook_url
        self._listening.pop(sid, None)
        _bounded_put(self._call_urls, sid, url)
        form = [
            ("Url", twiml.with_query(url, n=secrets.token_hex(6))),  # a request of its own (replay guard)
            ("Method", "POST"),
            ("StatusCallback", twiml.with_query(webhook_url, callId=call.call_id, type="status")),
            ("StatusCallbackMethod", "POST"),
        ]
        return Deferred.fromCoroutine(self._repoint(sid, form))

    async def _repoint(self, sid: str, form: list[tuple[str, str]]) -> None:
        await self._api.request("POST", f"/Calls/{sid}.json", form=form)

    async def _update(self, sid: str, document: str) -> None:
        """A live update with TwiML, retried while Twilio says the call is not in progress yet."""
        for delay in (*RETRY_DELAYS, None):
            try:
                await self._api.request("POST", f"/Calls/{sid}.json", form=[("Twiml", document)])
                return
            except ProviderError as e:
                if e.code != NOT_IN_PROGRESS or delay is None:
                    raise
            await deferLater(self._clock, delay, lambda: None)

    def _forget(self, sid: str | None, call_id: str | None) -> None:
        if sid:
            self._call_urls.pop(sid, None)
            self._listening.pop(sid, None)
            self._doing.pop(sid, None)
            self._said(sid, cut_off=True)  # the call is over: a `<Say>` still playing was not heard to its end
        if call_id:
            self._notify_twiml.pop(call_id, None)
            self._notify_served.pop(call_id, None)

    # -- speech without a media stream (Voice) ------------------------------------------------------

    def _call_url(self, call: CallRecord) -> str:
        url = self._call_urls.get(call.provider_call_id or "")
        if url is None and call.provider_call_id and self._webhook_url:
            # A call restored after a restart: its URL is the daemon's, as initiate built it.
            outbound = call.direction is Direction.OUTBOUND
            url = twiml.with_query(self._webhook_url, callId=call.call_id) if outbound else self._webhook_url
            _bounded_put(self._call_urls, call.provider_call_id, url)
        if url is None:
            raise ProviderError("Missing webhook URL for this call (provider state not initialized)")
        return url

    def stop(self) -> None:
        """The daemon is stopping: drop the timers of messages still being said (their calls live on)."""
        timers, self._speak_timers = self._speak_timers, set()
        for timer in timers:
            if timer.active():
                timer.cancel()

    def speak(self, call: CallRecord, text: str, voice: str | None) -> Deferred[None]:
        """`<Say>` then a Redirect back to us; fires once Twilio has said it (the Redirect's fetch)."""
        self._log.debug("Using TwiML <Say> fallback - telephony TTS not configured or media stream not active")
        url = self._call_url_or_fail(call)
        if isinstance(url, Deferred):
            return url
        sid = call.provider_call_id or ""
        nonce, played = secrets.token_hex(6), Deferred()
        self._said(sid)  # a newer update replaces whatever the call was saying
        self._listening.pop(sid, None)
        _bounded_put(self._speaking, sid, (nonce, played))
        document = twiml.say(text, voice, self._language, redirect_url=twiml.with_query(url, flow="spoken", n=nonce))
        return Deferred.fromCoroutine(self._say(sid, document, nonce, played, text))

    async def _say(self, sid: str, document: str, nonce: str, played: Deferred, text: str) -> None:
        try:
            await self._update(sid, document)
        except BaseException:
            self._said(sid, nonce)
            played.addErrback(lambda _: None)  # the update's own failure is the one reported
            raise
        await wait_until_played(self._clock, self._speak_timers, played, text, lambda: self._said(sid, nonce))

    def _said(self, sid: str, nonce: str | None = None, cut_off: bool = False) -> None:
        """
        Stop waiting for the call's `<Say>` (the one with C{nonce}, or whichever it is); with
        C{cut_off} (the call ended first) its speak fails with `NOT_PLAYED`.
        """
        entry = self._speaking.get(sid)
        if entry is None or (nonce is not None and not hmac.compare_digest(entry[0].encode(), nonce.encode())):
            return
        del self._speaking[sid]
        if not entry[1].called:
            if cut_off:
                entry[1].errback(ProviderError(NOT_PLAYED))
            else:
                entry[1].callback(None)

    def prompt(
        self, call: CallRecord, text: str, voice: str | None, turn_token: str | None, dtmf: bool = False
    ) -> Deferred[None]:
        return self._turn(call, text, voice, turn_token, dtmf)

    def start_listening(self, call: CallRecord, turn_token: str | None, dtmf: bool = False) -> Deferred[None]:
        if turn_token is None and not dtmf and (call.provider_call_id or "") in self._listening:
            return Deferred.fromCoroutine(_nothing())  # the call already listens, as asked
        return self._turn(call, None, None, turn_token, dtmf)

    def _turn(
        self, call: CallRecord, text: str | None, voice: str | None, turn_token: str | None, dtmf: bool = False
    ) -> Deferred[None]:
        """Say `text` (if any), listen, and come back on silence: one live update."""
        url = self._call_url_or_fail(call)
        if isinstance(url, Deferred):
            return url
        sid = call.provider_call_id or ""
        self._said(sid)  # this update replaces a `<Say>` still playing
        self._listening.pop(sid, None)
        _bounded_put(self._doing, sid, ("listen", turn_token, dtmf))
        document = self._listen_loop(url, text, voice, turn_token, dtmf)
        return Deferred.fromCoroutine(self._update(call.provider_call_id, document))

    def _listen_loop(
        self, url: str, text: str | None, voice: str | None, turn_token: str | None, dtmf: bool = False, before: str = ""
    ) -> str:
        """
        `<Say>`, `<Gather>`, `<Redirect>` back to us. Each URL handed out carries a fresh nonce:
        Twilio signs a Redirect or Gather action exactly like an earlier one to the same URL,
        and the replay guard would (rightly) answer an identical request with empty TwiML.
        A Gather taking keys waits only seconds for one (its `timeout` is also the wait between
        keys): its Redirect (`flow=listen`) listens again for the same turn, keys included.
        """
        action = twiml.with_query(url, turnToken=turn_token, n=secrets.token_hex(6))
        if dtmf:
            redirect = twiml.with_query(url, flow="listen", listen=turn_token, n=secrets.token_hex(6))
        else:
            redirect = twiml.with_query(url, n=secrets.token_hex(6))
        return twiml.say_and_gather(text, voice, self._language, action, redirect, dtmf=dtmf, before=before)

    # -- keypad tones, transfer, recording (CallControl) ---------------------------------------------

    def send_dtmf(self, call: CallRecord, digits: str) -> Deferred[None]:
        """
        `<Play digits>` in a live update, then back to what the call was doing: its stream (a
        Redirect to the resume URL, which gives it a fresh one) or its listen loop, with the
        same turn token (a `continue` waiting for an answer still gets it).
        """
        sid = call.provider_call_id or ""
        doing = self._doing.get(sid, ("listen", None, False))
        tones = twiml.play_digits(digits)
        resume = None
        if doing[0] == "stream":
            resume = self._resume_url(call.call_id if call.direction is Direction.OUTBOUND else "")
        if resume is not None:
            document = twiml.then_redirect(tones, resume)
        else:
            url = self._call_url_or_fail(call)
            if isinstance(url, Deferred):
                return url
            _, token, dtmf = doing if doing[0] == "listen" else ("listen", None, False)
            document = self._listen_loop(url, None, None, token, dtmf, before=tones)
        self._said(sid)  # (the manager sends tones only once a message has played)
        self._listening.pop(sid, None)
        return Deferred.fromCoroutine(self._update(sid, document))

    def transfer_call(self, call: CallRecord, to: str) -> Deferred[None]:
        """
        A live update with `<Dial>` (`<Sip>` for a `sip:` target): the callee is connected to
        `to`, seeing our number (an outbound call's caller id) or, on an inbound call, the
        caller's own; the call ends when either hangs up. Our part of the call is over.
        """
        sid = call.provider_call_id or ""
        caller_id = call.from_number if call.direction is Direction.OUTBOUND else None
        return Deferred.fromCoroutine(self._transfer(sid, call.call_id, twiml.dial(to, caller_id)))

    async def _transfer(self, sid: str, call_id: str, document: str) -> None:
        await self._update(sid, document)
        self._forget(sid, call_id)

    def start_recording(self, call: CallRecord) -> Deferred[dict | None]:
        """
        `POST /Calls/{sid}/Recordings.json`, both parties on their own channels; Twilio reports
        it (in progress, then completed with its URL and duration, or absent) to this call's
        webhook URL with `type=recording`, signed like every callback, often after the hang-up.
        """
        url = self._call_url_or_fail(call)
        if isinstance(url, Deferred):
            return url
        form = [
            ("RecordingStatusCallback", twiml.with_query(url, type="recording")),
            *(("RecordingStatusCallbackEvent", e) for e in RECORDING_EVENTS),
            ("RecordingStatusCallbackMethod", "POST"),
            ("RecordingChannels", "dual"),
        ]
        return Deferred.fromCoroutine(self._record(call.provider_call_id or "", form))

    async def _record(self, sid: str, form: list[tuple[str, str]]) -> dict | None:
        answer = await self._api.request("POST", f"/Calls/{sid}/Recordings.json", form=form)
        rid = answer.get("sid") if isinstance(answer, dict) else None
        if not isinstance(rid, str) or not rid:
            return None
        recording: dict[str, Any] = {"id": rid, "status": "in-progress"}
        started = _epoch_ms(answer.get("start_time"))
        if started is not None:
            recording["startedAt"] = started
        return recording

    def stop_listening(self, call: CallRecord) -> Deferred[None]:
        """A `<Gather>` ends by itself."""
        return Deferred.fromCoroutine(_nothing())

    def wants_turn_token(self, call: CallRecord) -> bool:
        return True

    def _call_url_or_fail(self, call: CallRecord) -> str | Deferred:
        try:
            return self._call_url(call)
        except ProviderError as e:
            d: Deferred = Deferred()
            d.errback(e)
            return d

    # -- webhooks ---------------------------------------------------------------------------------

    def has_signature_headers(self, headers: Mapping[str, str]) -> bool:
        return bool(headers.get("x-twilio-signature"))

    def _params(self, ctx: WebhookContext) -> list[tuple[str, str]]:
        content_type = (ctx.header("content-type") or "").split(";", 1)[0].strip().lower()
        if ctx.method == "POST" and content_type in ("", "application/x-www-form-urlencoded"):
            return parse_form(ctx.raw_body)
        return []

    def verify_webhook(self, ctx: WebhookContext, public_url: str | None = None) -> Verification:
        origin = public_url or self._public_url
        url = replace_origin(origin, ctx.url) if origin else ctx.url
        result = verify_twilio(
            url=url,
            params=self._params(ctx),
            signature=ctx.header("x-twilio-signature"),
            auth_token=self._auth_token,
            settings_header=ctx.header("x-twilio-webhooks-signature-settings"),
            signing_keys=self._signing_keys,
        )
        return Verification(result.ok, result.reason, result.request_key)

    def call_refs(self, ctx: WebhookContext) -> tuple[str, ...]:
        try:
            sid = dict(self._params(ctx)).get("CallSid", "")
        except (ValueError, UnicodeDecodeError):
            sid = ""
        return tuple(ref.strip() for ref in (ctx.query.get("callId") or "", sid) if ref.strip())

    def replay_response(self, ctx: WebhookContext) -> WebhookResponse:
        """A replay gets empty TwiML: the builder never runs, so no stream token is minted."""
        return WebhookResponse(200, twiml.empty().encode(), {"Content-Type": "text/xml"})

    def parse_webhook(self, ctx: WebhookContext, request_key: str) -> ParsedWebhook:
        try:
            params = dict(reversed(self._params(ctx)))
        except (ValueError, UnicodeDecodeError):
            return ParsedWebhook((), WebhookResponse(400, b"Bad Request", {"Content-Type": "text/plain"}))
        sid = params.get("CallSid", "").strip()
        query_call_id = (ctx.query.get("callId") or "").strip()
        callback = ctx.query.get("type")
        callback = callback if callback in CALLBACK_TYPES else None
        event = self._event(params, sid, query_call_id, ctx.query.get("turnToken"), request_key, callback) if sid else None
        resuming = ctx.query.get("flow") == "resume" and callback is None
        if event is not None:
            event = _with_identity(event, ctx, params, request_key)
            if resuming:
                # A resume names a call we placed or took: recorded with it, it never creates one.
                event = attrs.evolve(event, direction=None)
        if sid and event is not None and event.type is not EventType.ENDED and event.direction is Direction.INBOUND:
            if sid not in self._call_urls and self._webhook_url:
                _bounded_put(self._call_urls, sid, self._webhook_url)
        events = (event,) if event is not None else ()
        is_status = callback is not None
        first_inbound = (
            event is not None
            and event.type in (EventType.INITIATED, EventType.RINGING)
            and event.direction is Direction.INBOUND
            and not is_status
        )
        if first_inbound and self._inbound_screen is not None and not self._inbound_screen(event.from_number):
            _bounded_put(self._rejected, sid, None)
            return ParsedWebhook(events, _xml(twiml.reject()))
        relisten = (ctx.query.get("listen") or "") if ctx.query.get("flow") == "listen" else None
        body = self._twiml_for(params, sid, query_call_id, is_status, request_key, resuming, relisten)
        if sid and ctx.query.get("flow") == "spoken":
            # The `<Say>` before this Redirect has been said. Only now that its answer is
            # chosen (the listen loop): what the speak's waiter does next knows it.
            self._said(sid, ctx.query.get("n") or "")
        if first_inbound and body != twiml.hold_queue():
            # Twilio answers an inbound call as soon as it gets TwiML to run: say so, so the
            # greeting is spoken and the max-duration timer starts (no status callback follows).
            events = (
                event,
                attrs.evolve(
                    event,
                    type=EventType.ANSWERED,
                    id=event.id + ":answered",
                    dedupe_key=event.key + ":answered",
                    aliases=tuple(a + ":answered" for a in event.aliases),
                ),
            )
        if event is not None and event.type is EventType.ENDED:
            self._forget(sid, query_call_id)
        if resuming:
            # The stream's WebSocket follows on a connection of its own; and a daemon that is
            # stopping must not get Twilio's next request on this one.
            return ParsedWebhook(events, WebhookResponse(200, body.encode("utf-8"), {**_XML, "Connection": "close"}))
        return ParsedWebhook(events, _xml(body))

    def _event(
        self, params: dict, sid: str, call_id: str, turn_token: str | None, key: str, callback: str | None = None
    ) -> CallEvent | None:
        direction = params.get("Direction", "")
        common: dict[str, Any] = dict(
            call_id=call_id or sid,
            id=key,
            timestamp=int(self._clock.seconds() * 1000),
            dedupe_key=key,
            provider_call_id=sid,
            turn_token=turn_token,
            direction="inbound" if direction == "inbound" else "outbound" if direction.startswith("outbound") else None,
            from_number=params.get("From") or None,
            to_number=params.get("To") or None,
        )
        if callback == "amd":
            verdict = ANSWERED_BY.get(params.get("AnsweredBy", ""))
            if verdict is None:
                return None
            return CallEvent(type=EventType.MACHINE, answered_by=verdict[0], machine_done=verdict[1], **common)
        if callback == "recording":
            recording = _recording(params)
            return None if recording is None else CallEvent(type=EventType.RECORDING, recording=recording, **common)
        speech = params.get("SpeechResult", "")
        if speech.strip():
            confidence = params.get("Confidence", "")
            value = float(confidence) if _DECIMAL.match(confidence) else 0.9
            return CallEvent(type=EventType.SPEECH, transcript=speech.strip(), is_final=True, confidence=value, **common)
        if params.get("Digits"):
            return CallEvent(type=EventType.DTMF, digits=params["Digits"], **common)
        status = normalize_status(params.get("CallStatus"))
        if status in _PROGRESS:
            return CallEvent(type=_PROGRESS[status], **common)
        if status in TERMINAL_STATUS_REASONS:
            return CallEvent(type=EventType.ENDED, reason=TERMINAL_STATUS_REASONS[status], **common)
        if direction == "inbound":
            return CallEvent(type=EventType.INITIATED, **common)
        return None

    def _twiml_for(
        self,
        params: dict,
        sid: str,
        call_id: str,
        is_status: bool,
        request_key: str = "",
        resuming: bool = False,
        relisten: str | None = None,
    ) -> str:
        """SPEC §7.1.3: what Twilio should do next."""
        direction = params.get("Direction", "")
        if not is_status:
            self._listening.pop(sid, None)  # whatever we answer replaces the call's TwiML
        if resuming:
            way = Direction.INBOUND if direction == "inbound" else Direction.OUTBOUND
            return self._stream_or_pause(sid, way, request_key, call_id, resuming=True)
        if relisten is not None and not is_status and sid:
            # A Gather taking keys heard none: listen again for the same turn (a daemon restarted
            # since rebuilds the call's URL as initiate did).
            url = self._call_urls.get(sid)
            if url is None and self._webhook_url:
                url = twiml.with_query(self._webhook_url, callId=call_id or None)
                _bounded_put(self._call_urls, sid, url)
            if url is not None:
                _bounded_put(self._doing, sid, ("listen", relisten or None, True))
                return self._listen_loop(url, None, None, relisten or None, True)
        if call_id and not is_status:
            stored = self._notify_twiml.pop(call_id, None)
            if stored is not None:
                served = self._notify_served.pop(call_id, None)
                if served is not None and not served[0].called:
                    served[0].callback(served[1])  # the message is being said: into the transcript
                return stored
            if direction.startswith("outbound"):
                return self._stream_or_pause(sid, Direction.OUTBOUND, request_key, call_id)
        if is_status:
            return twiml.empty()
        if direction == "inbound":
            if self._stream_busy is not None and self._stream_busy():
                return twiml.hold_queue()
            return self._stream_or_pause(sid, Direction.INBOUND, request_key, call_id)
        if normalize_status(params.get("CallStatus")) != "in-progress":
            return twiml.empty()
        return self._stream_or_pause(sid, Direction.OUTBOUND, request_key, call_id)

    def _stream_or_pause(
        self, sid: str, direction: Direction, request_key: str = "", call_id: str = "", resuming: bool = False
    ) -> str:
        if sid and self._stream_twiml is not None:
            document = self._stream_twiml(
                sid, direction, request_key=request_key or None, resume_url=self._resume_url(call_id), resuming=resuming
            )
            if document is not None:
                _bounded_put(self._doing, sid, ("stream",))
                return document
        url = self._call_urls.get(sid)
        if url is not None:
            _bounded_put(self._doing, sid, ("listen", None, False))
            # Listen, and come back when the Gather times out: the call stays up between turns
            # (bounded by maxDurationSeconds) instead of hanging up when a <Pause> runs out.
            _bounded_put(self._listening, sid, None)
            return self._listen_loop(url, None, None, None)
        return twiml.pause()

    def _resume_url(self, call_id: str) -> str | None:
        """
        Where Twilio goes when a stream's `<Connect>` ends: `resume_base_url()` naming the call
        (our `callId` when the fetch carried it, as an outbound call's do; else the CallSid that
        Twilio posts names it) with `flow=resume` and a nonce that makes each resume a request of
        its own (the same URL and parameters would be the same signature, and the second resume
        would be taken for a replay).
        """
        base = self.resume_base_url()
        if not base:
            return None
        return twiml.with_query(base, callId=call_id or None, flow="resume", n=secrets.token_hex(6))


IDEMPOTENCY_HEADER = "i-twilio-idempotency-token"


def _with_identity(event: CallEvent, ctx: WebhookContext, params: dict, request_key: str) -> CallEvent:
    """
    `event` with the identity every delivery of it shares (DESIGN.md, delivery semantics).
    A status callback is its call's SequenceNumber, a Gather result its turn token and the
    Gather's one-time nonce: the same however the retry is signed (e.g. over the URL with its
    default port written out). The verified request key stays an alias, so a replay of the very
    request is known too. Twilio's ``I-Twilio-Idempotency-Token`` (the same on every retry of a
    request) is an alias only: it is not covered by the signature, so it can make a delivery a
    redelivery but never make a replayed request new.
    """
    sid = event.provider_call_id
    primary = None
    if event.type in (EventType.SPEECH, EventType.DTMF):
        nonce = ctx.query.get("n")
        if nonce or event.turn_token:
            primary = identity_key("twilio:gather", sid, event.turn_token, nonce)
    elif event.type is EventType.MACHINE:
        primary = identity_key("twilio:amd", sid, params.get("AnsweredBy"))
    elif event.type is EventType.RECORDING:
        primary = identity_key("twilio:recording", sid, params.get("RecordingSid"), params.get("RecordingStatus"))
    elif params.get("SequenceNumber") and (ctx.query.get("type") == "status" or params.get("CallbackSource")):
        primary = identity_key("twilio:status", sid, params["SequenceNumber"], normalize_status(params.get("CallStatus")))
    aliases = [] if primary is None else [request_key]
    token = ctx.header(IDEMPOTENCY_HEADER)
    if token:
        aliases.append(identity_key("twilio:idem", token))
    if primary is None and not aliases:
        return event
    return attrs.evolve(event, dedupe_key=primary or event.key, aliases=tuple(aliases))


async def _nothing() -> None:
    return None


def _epoch_ms(value: object) -> int | None:
    """An RFC 2822 date (Twilio's `start_time`, `RecordingStartTime`) in epoch milliseconds."""
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        return int(parsedate_to_datetime(value).timestamp() * 1000)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _recording(params: Mapping[str, str]) -> dict[str, Any] | None:
    """A recording status callback as a recording (model.RECORDING_KEYS), or None if it names none."""
    rid = params.get("RecordingSid", "").strip()
    status = RECORDING_STATUS.get(params.get("RecordingStatus", ""))
    if not rid or status is None:
        return None
    recording: dict[str, Any] = {"id": rid, "status": status}
    url = params.get("RecordingUrl", "").strip()
    if url and status == "completed":
        recording["url"] = url
    duration = params.get("RecordingDuration", "")
    if duration.isdigit():
        recording["durationSeconds"] = int(duration)
    started = _epoch_ms(params.get("RecordingStartTime"))
    if started is not None:
        recording["startedAt"] = started
    return recording


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    port = parts.port or {"https": 443, "http": 80}.get(scheme)
    return scheme, (parts.hostname or "").lower(), port


def recording_source(
    http: Any, recording: Mapping[str, Any], *, base_url: str, account_sid: str, auth_token: str
) -> Deferred[tuple[str, dict[str, str]]]:
    """
    Where to GET a Twilio recording's audio (`voicecall recording fetch`): its `RecordingUrl`
    with `.mp3`, with HTTP Basic auth. The URL came from a webhook, so the credentials go only
    to `twilio.baseUrl`'s origin: a recording on any other host is refused (ValueError).
    """
    url = recording.get("url")
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"recording {recording.get('id')} has no URL yet (Twilio reports it once completed)")
    url = url.strip()
    scheme, host, _ = origin = _origin(url)
    if scheme not in ("http", "https") or not host or origin != _origin(base_url):
        raise ValueError(
            f"refusing to send Twilio credentials to {scheme}://{host}: a recording URL must be on "
            f"twilio.baseUrl's origin ({base_url})"
        )
    if not url.endswith((".mp3", ".wav")):
        url += ".mp3"
    token = base64.b64encode(f"{account_sid}:{auth_token}".encode()).decode("ascii")
    return succeed((url, {"Authorization": f"Basic {token}"}))


def stream_token() -> str:
    """16 random bytes, base64url without padding (SPEC §7.1.3); one per stream TwiML document."""
    return base64.urlsafe_b64encode(secrets.token_bytes(16)).rstrip(b"=").decode()
