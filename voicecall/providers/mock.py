# -*- test-case-name: tests.test_mock_provider -*-
"""
The `mock` provider (SPEC §7.4 [H]): no carrier and no network. Calls get the id
`mock-<callId>`; speech is recorded, not played; events arrive as JSON webhooks, which is how a
developer (or a test) plays the carrier's part:

    {"event": {"type": "call.answered", "callId": "<id>"}}
    {"events": [{"type": "call.speech", "callId": "<id>", "transcript": "yes"}]}

Issue 17's carrier news is posted the same way: who answered (`{"type": "call.machine",
"callId": ..., "answeredBy": "machine", "machineDone": true}`), keys the person pressed
(`call.dtmf` with `digits`), a recording's progress (`{"type": "call.recording", "callId": ...,
"recording": {"id": "mock-rec-1", "status": "completed", "url": ..., "durationSeconds": 12}}`,
accepted after the call ended too). Keypad tones, transfers and recordings the manager asks for
are recorded in `actions` (`dtmf`, `transfer`, `record`; `start_recording` names the recording
`mock-rec-<n>`, which has no audio).

Each payload's verified request key is a hash of its bytes, so a redelivered payload is a replay;
an event with an `id` is applied once per id (its identity, as a carrier's event id), however the
payload around it is written.

Speech takes `speak_seconds_per_char` per character on the injected clock (0 by default:
played at once), like a carrier's playback; `speak` fires when it has been played and records
`("spoken", id, text)` then. A call's playbacks queue one behind the other (as Telnyx's do).

The mock is a development tool, so a payload it cannot use is refused whole (nothing applied)
with a one-line reason: 400 for a malformed body or event (no `event`/`events`, an unknown type,
an unknown (misspelt) field, a wrongly typed field, a non-finite number, an inbound event without `providerCallId`/`from`/`to`),
404 for a callId no call has, 409 for a call that has ended or an event `id` already used by an
event that said something else. Like a carrier, it knows its calls:
those it placed, answered or was asked the status of (a restored call), and inbound calls created
by an event; the set is bounded.
"""
from __future__ import annotations

import difflib
import json
import math
import uuid
from collections import OrderedDict
from typing import Any, Mapping

from attrs import define, field
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import deferLater
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from voicecall.domain.carrier import NO_OPTIONS, DialOptions, InitiatedCall, ProviderCallStatus
from voicecall.domain.model import (
    ANSWERED_BY,
    END_REASONS,
    RECORDING_KEYS,
    RECORDING_STATUSES,
    CallEvent,
    CallRecord,
    EventType,
    identity_key,
)
from voicecall.providers.base import (
    ParsedWebhook,
    Verification,
    WebhookContext,
    WebhookResponse,
)
from voicecall.providers.signatures import mock_request_key

#: How many call ids (ours and the carrier's) the mock remembers as live or ended.
MAX_TRACKED_CALLS = 10_000
_SHAPE = 'the body must be {"event": {...}} or {"events": [{...}, ...]}'
_TYPES = ", ".join(t.value for t in EventType)
_TYPE_VALUES = frozenset(t.value for t in EventType)
_MAX_INT = 2**53  # timestamps and durations stay exact in JSON and SQLite
#: Optional fields and the JSON types they take (bool is not a number here).
_FIELDS: dict[str, tuple[type, ...]] = {
    "id": (str, int),
    "providerCallId": (str,),
    "turnToken": (str,),
    "from": (str,),
    "to": (str,),
    "text": (str,),
    "transcript": (str,),
    "digits": (str,),
    "error": (str,),
    "isFinal": (bool,),
    "retryable": (bool,),
    "confidence": (int, float),
    "timestamp": (int,),
    "durationMs": (int,),
    "answeredBy": (str,),
    "machineDone": (bool,),
    "recording": (dict,),
}

#: Every field an event may have.
_KNOWN = ("type", "callId", *_FIELDS, "reason", "direction")


class _Refused(Exception):
    """A payload the mock cannot use: the status and the one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def _refusal(status: int, reason: str) -> ParsedWebhook:
    body = reason.replace("\n", " ")[:500].encode("utf-8", "replace") + b"\n"
    return ParsedWebhook((), WebhookResponse(status, body, {"Content-Type": "text/plain; charset=utf-8"}))


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"non-finite number {text}")
    return value


def _no_constant(name: str) -> float:
    raise ValueError(f"non-finite number {name}")


def _quote(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)[:80]


#: The fields that say what an event is (not when it was sent, nor how sure the recogniser was).
_SAYS = ("type", "callId", "providerCallId", "direction", "from", "to", "text", "transcript", "digits", "reason", "error",
         "answeredBy", "machineDone", "recording")


def _what(item: dict) -> tuple:
    return tuple(item.get(name) for name in _SAYS)


def _describe(what: tuple) -> str:
    return " ".join(f"{name} {_quote(value)}" for name, value in zip(_SAYS, what, strict=True) if value is not None and name != "callId")


@define(repr=False)
class MockProvider:
    """A provider that places no real calls; it records what it was asked to do."""

    _clock: IReactorTime
    name: str = "mock"
    uses_turn_tokens: bool = False
    #: What the manager asked of the carrier, in order: (action, provider_call_id, detail).
    actions: list[tuple[str, str | None, Any]] = field(factory=list)
    #: The calls it knows, by our id and its own: True while live, False once ended (bounded).
    _calls: OrderedDict[str, bool] = field(factory=OrderedDict, repr=False)
    #: Seconds each character of speech takes to play (0: at once).
    speak_seconds_per_char: float = 0.0
    #: provider_call_id -> clock time its queued playback ends (bounded like `_calls`).
    _playing_until: dict[str, float] = field(factory=dict, repr=False)
    #: event id -> what that event said (`_what`), to tell a retry from an id used again (bounded).
    _event_ids: OrderedDict[str, tuple] = field(factory=OrderedDict, repr=False)
    _recordings: int = 0
    _log = Logger()

    # -- webhooks ---------------------------------------------------------------------------------

    def has_signature_headers(self, headers: Mapping[str, str]) -> bool:
        return True

    def verify_webhook(self, ctx: WebhookContext, public_url: str | None = None) -> Verification:
        return Verification(ok=True, request_key=mock_request_key(ctx.raw_body))

    def call_refs(self, ctx: WebhookContext) -> tuple[str, ...]:
        try:
            items = self._items(ctx.raw_body)
        except _Refused:
            return ()
        return tuple(dict.fromkeys(i["callId"] for i in items if isinstance(i, dict) and isinstance(i.get("callId"), str) and i["callId"]))

    def replay_response(self, ctx: WebhookContext) -> WebhookResponse | None:
        return None

    def parse_webhook(self, ctx: WebhookContext, request_key: str) -> ParsedWebhook:
        try:
            items = self._items(ctx.raw_body)
            known = dict[str, bool]()  # calls this payload creates (inbound) or ends
            for index, item in enumerate(items):
                where = f"events[{index}]" if len(items) > 1 or index else "event"
                self._check(item, where, known)
            said = self._check_ids(items)
        except _Refused as e:
            return _refusal(e.status, str(e))
        for event_id, what in said.items():
            self._event_ids[event_id] = what
            self._event_ids.move_to_end(event_id)
        while len(self._event_ids) > MAX_TRACKED_CALLS:
            self._event_ids.popitem(last=False)
        events = []
        for index, item in enumerate(items):
            event = self._event(item, f"{request_key}:{index}")
            if event is not None:
                events.append(event)
        for call_id, live in known.items():
            if live:
                self._track(call_id, live)
        return ParsedWebhook(tuple(events))

    @staticmethod
    def _items(raw_body: bytes) -> list:
        try:
            body = json.loads(raw_body, parse_float=_finite, parse_constant=_no_constant)
        except ValueError as e:
            if "non-finite number" in str(e):
                raise _Refused(400, f"{e}: numbers must be finite (no NaN, Infinity or 1e309)") from None
            raise _Refused(400, f"invalid JSON ({e}); {_SHAPE}") from None
        except RecursionError:
            raise _Refused(400, f"invalid JSON (nested too deeply); {_SHAPE}") from None
        if not isinstance(body, dict):
            raise _Refused(400, _SHAPE)
        if "events" in body:
            items = body["events"]
            if not isinstance(items, list) or not items:
                raise _Refused(400, f'"events" must be a non-empty list; {_SHAPE}')
            return items
        if "event" in body:
            return [body["event"]]
        raise _Refused(400, f'no "event" or "events"; {_SHAPE}')

    def _check(self, item: object, where: str, known: dict[str, bool]) -> None:
        """Refuse `item` unless it is an event the manager can use, for a call that exists."""
        if not isinstance(item, dict):
            raise _Refused(400, f"{where} must be an object with a \"type\" and a \"callId\"")
        kind = item.get("type")
        if kind is None:
            raise _Refused(400, f'{where} has no "type" (one of {_TYPES})')
        if not isinstance(kind, str) or kind not in _TYPE_VALUES:
            raise _Refused(400, f"{where}: unknown event type {_quote(kind)} (one of {_TYPES})")
        call_id = item.get("callId")
        if not isinstance(call_id, str) or not call_id:
            raise _Refused(400, f'{where}: "callId" must be a non-empty string (ours, or the carrier\'s mock-<callId>)')
        for name in item:
            if name not in _KNOWN:
                # A misspelt field would otherwise be ignored and its default used in its place.
                guess = difflib.get_close_matches(str(name), _KNOWN, n=1, cutoff=0.6)
                hint = f' (did you mean "{guess[0]}"?)' if guess else f" (fields: {', '.join(_KNOWN)})"
                raise _Refused(400, f"{where}: unknown field {_quote(name)}{hint}")
        for name, types in _FIELDS.items():
            value = item.get(name)
            if value is None:
                continue
            if isinstance(value, bool) and bool not in types or not isinstance(value, types):
                kind_name = " or ".join({"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false"}[t.__name__] for t in types)
                raise _Refused(400, f'{where}: "{name}" must be {kind_name}, not {_quote(value)}')
            if name in ("timestamp", "durationMs") and not 0 <= value < _MAX_INT:
                raise _Refused(400, f'{where}: "{name}" must be between 0 and 2**53, not {_quote(value)}')
        reason = item.get("reason")
        if reason is not None and reason not in END_REASONS:
            raise _Refused(400, f'{where}: "reason" {_quote(reason)} is not one of {", ".join(sorted(END_REASONS))}')
        answered_by = item.get("answeredBy")
        if answered_by is not None and answered_by not in ANSWERED_BY:
            raise _Refused(400, f'{where}: "answeredBy" must be one of {", ".join(ANSWERED_BY)}, not {_quote(answered_by)}')
        if item.get("recording") is not None:
            self._check_recording(item["recording"], where)
        elif kind == EventType.RECORDING.value:
            raise _Refused(400, f'{where}: a call.recording event needs "recording": {{"id": ..., "status": ..., "url": ...}}')
        direction = item.get("direction")
        if direction is not None and direction not in ("inbound", "outbound"):
            raise _Refused(400, f'{where}: "direction" must be "inbound" or "outbound", not {_quote(direction)}')
        ids = [i for i in (call_id, item.get("providerCallId")) if i]
        state = next((s for s in (known.get(i, self._calls.get(i)) for i in ids) if s is not None), None)
        if state is None and direction == "inbound":
            missing = [f'"{n}"' for n in ("providerCallId", "from", "to") if not item.get(n)]
            if missing:
                raise _Refused(400, f"{where}: an inbound event for a new call needs {', '.join(missing)}")
            state = True
            # The new call is the carrier's providerCallId and gets an id of ours: the callId this
            # event carries names no call, and a later event sent to it is a 404, not ignored.
            ids = [item["providerCallId"]]
        if state is None:
            raise _Refused(404, f"{where}: unknown callId {_quote(call_id)}: no call has this id (ours or mock-<callId>)")
        if state is False and kind != EventType.RECORDING.value:
            # (A carrier saves a recording after the hang-up: news of it still comes.)
            raise _Refused(409, f"{where}: call {_quote(call_id)} has ended")
        live = kind != EventType.ENDED.value
        for i in ids:
            known[i] = live

    @staticmethod
    def _check_recording(recording: dict, where: str) -> None:
        for name in recording:
            if name not in RECORDING_KEYS:
                raise _Refused(400, f'{where}: unknown recording field {_quote(name)} (fields: {", ".join(RECORDING_KEYS)})')
        if not isinstance(recording.get("id"), str) or not recording["id"]:
            raise _Refused(400, f'{where}: "recording" needs an "id" (a non-empty string)')
        status = recording.get("status")
        if status is not None and status not in RECORDING_STATUSES:
            raise _Refused(400, f'{where}: recording "status" must be one of {", ".join(RECORDING_STATUSES)}, not {_quote(status)}')
        for name, types in (("url", (str,)), ("durationSeconds", (int, float)), ("startedAt", (int,))):
            value = recording.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
                raise _Refused(400, f'{where}: recording "{name}" has the wrong type: {_quote(value)}')
        duration = recording.get("durationSeconds")
        if duration is not None and not (math.isfinite(duration) and duration >= 0):
            raise _Refused(400, f'{where}: recording "durationSeconds" must be a number >= 0')

    def _check_ids(self, items: list) -> dict[str, tuple]:
        """
        Refuse an event whose `id` an event saying something else already had: a repeated id is
        the carrier's retry of that event and would be dropped, so a new event posted with an old
        id (a copied body with a new transcript) would change nothing, silently. What the event
        says (`_what`) is compared, not its timestamp or confidence, which a retry may change.
        """
        said: dict[str, tuple] = {}
        for index, item in enumerate(items):
            if item.get("id") is None:
                continue
            event_id = str(item["id"])
            what = _what(item)
            before = said.get(event_id, self._event_ids.get(event_id))
            if before is not None and before != what:
                where = f"events[{index}]" if len(items) > 1 or index else "event"
                raise _Refused(
                    409,
                    f"{where}: id {_quote(event_id)} was already used by another event ({_describe(before)}); "
                    "a repeated id is taken for the carrier's retry of that event and changes nothing: give this event a new id",
                )
            said[event_id] = what
        return said

    def _track(self, call_id: str | None, live: bool) -> None:
        if not call_id:
            return
        self._calls[call_id] = live
        self._calls.move_to_end(call_id)
        while len(self._calls) > MAX_TRACKED_CALLS:
            self._calls.popitem(last=False)

    def _ended_callback(self, kind: EventType, *ids: object) -> Any:
        if kind is not EventType.ENDED:
            return None
        return lambda: [self._track(i, False) for i in ids if isinstance(i, str) and i]

    def _event(self, item: object, dedupe_key: str) -> CallEvent | None:
        if not isinstance(item, dict):
            return None
        try:
            kind = EventType(item.get("type"))
        except ValueError:
            return None
        call_id = item.get("callId")
        if not isinstance(call_id, str) or not call_id:
            return None

        def get(key: str, default: Any) -> Any:
            value = item.get(key)
            return default if value is None else value

        reason = get("reason", "completed")
        direction = item.get("direction")
        try:
            return CallEvent(
                type=kind,
                call_id=call_id,
                id=str(get("id", str(uuid.uuid4()))),
                timestamp=int(get("timestamp", int(self._clock.seconds() * 1000))),
                dedupe_key=identity_key("mock:event", item["id"]) if item.get("id") is not None else dedupe_key,
                # The call counts as ended once the manager has applied its end: a retry of an end
                # answered 500 (not stored) is still for a live call.
                on_applied=self._ended_callback(kind, call_id, item.get("providerCallId")),
                provider_call_id=item.get("providerCallId"),
                turn_token=item.get("turnToken"),
                direction=direction if direction in ("inbound", "outbound") else None,
                from_number=item.get("from"),
                to_number=item.get("to"),
                text=str(get("text", "")),
                transcript=str(get("transcript", "")),
                is_final=bool(get("isFinal", True)),
                confidence=item.get("confidence"),
                duration_ms=int(get("durationMs", 0)),
                digits=str(get("digits", "")),
                reason=reason if reason in END_REASONS else "completed",
                error=str(get("error", "unknown error")),
                retryable=bool(get("retryable", False)),
                answered_by=item.get("answeredBy"),
                machine_done=bool(get("machineDone", False)),
                recording=item.get("recording"),
            )
        except (TypeError, ValueError):
            return None

    # -- call control -----------------------------------------------------------------------------

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
        pid = f"mock-{call_id}"
        self.actions.append(("initiate", pid, to_number))
        if options.answering_machine != "ignore":
            # Detection's verdict is the developer's to post: {"type": "call.machine", "answeredBy": ...}.
            self.actions.append(("detect-machine", pid, options.answering_machine))
        self._track(call_id, True)
        self._track(pid, True)
        return succeed(InitiatedCall(provider_call_id=pid))

    def hangup_call(self, call: CallRecord, reason: str) -> Deferred[None]:
        self.actions.append(("hangup", call.provider_call_id, reason))
        self._track(call.call_id, False)
        self._track(call.provider_call_id, False)
        return succeed(None)

    def answer_call(self, call: CallRecord) -> Deferred[None]:
        self.actions.append(("answer", call.provider_call_id, None))
        self._track(call.call_id, True)
        self._track(call.provider_call_id, True)
        return succeed(None)

    def repoint_call(self, call: CallRecord, webhook_url: str) -> Deferred[None]:
        self.actions.append(("repoint", call.provider_call_id, webhook_url))
        return succeed(None)

    def send_dtmf(self, call: CallRecord, digits: str) -> Deferred[None]:
        self.actions.append(("dtmf", call.provider_call_id, digits))
        return succeed(None)

    def transfer_call(self, call: CallRecord, to: str) -> Deferred[None]:
        self.actions.append(("transfer", call.provider_call_id, to))
        return succeed(None)

    def start_recording(self, call: CallRecord) -> Deferred[dict | None]:
        """A recording without audio: its completion is the developer's to post (a call.recording event)."""
        self._recordings += 1
        recording = {"id": f"mock-rec-{self._recordings}", "status": "in-progress", "startedAt": int(self._clock.seconds() * 1000)}
        self.actions.append(("record", call.provider_call_id, recording["id"]))
        return succeed(recording)

    def get_call_status(self, provider_call_id: str) -> Deferred[ProviderCallStatus]:
        bare = provider_call_id[len("mock-") :] if provider_call_id.startswith("mock-") else provider_call_id
        hung_up = self._calls.get(provider_call_id) is False or self._calls.get(bare) is False
        if hung_up or any(word in provider_call_id for word in ("stale", "ended", "completed")):
            # A call hung up here is over at the "carrier", even if its end was never stored.
            return succeed(ProviderCallStatus("completed", is_terminal=True))
        # Asked about a call restored from the store: it is one of ours, and live.
        self._track(provider_call_id, True)
        if provider_call_id.startswith("mock-"):
            self._track(provider_call_id[len("mock-") :], True)
        return succeed(ProviderCallStatus("in-progress", is_terminal=False))

    # -- speech (Voice) ---------------------------------------------------------------------------

    def speak(self, call: CallRecord, text: str, voice: str | None) -> Deferred[None]:
        """Fires once `text` has played (at once unless `speak_seconds_per_char` is set)."""
        self.actions.append(("speak", call.provider_call_id, text))
        pid = call.provider_call_id
        seconds = len(text) * self.speak_seconds_per_char
        if seconds <= 0:
            self.actions.append(("spoken", pid, text))
            return succeed(None)
        now = self._clock.seconds()
        end = max(now, self._playing_until.pop(pid or "", now)) + seconds
        self._playing_until[pid or ""] = end
        while len(self._playing_until) > MAX_TRACKED_CALLS:
            del self._playing_until[next(iter(self._playing_until))]
        return deferLater(self._clock, end - now, self.actions.append, ("spoken", pid, text))

    def prompt(
        self, call: CallRecord, text: str, voice: str | None, turn_token: str | None, dtmf: bool = False
    ) -> Deferred[None]:
        played = self.speak(call, text, voice)
        self.actions.append(("listen+dtmf" if dtmf else "listen", call.provider_call_id, turn_token))
        return played

    def start_listening(self, call: CallRecord, turn_token: str | None, dtmf: bool = False) -> Deferred[None]:
        self.actions.append(("listen+dtmf" if dtmf else "listen", call.provider_call_id, turn_token))
        return succeed(None)

    def stop_listening(self, call: CallRecord) -> Deferred[None]:
        self.actions.append(("stop-listening", call.provider_call_id, None))
        return succeed(None)

    def wants_turn_token(self, call: CallRecord) -> bool:
        return False
