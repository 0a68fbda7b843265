# -*- test-case-name: tests.test_mock_provider -*-
"""
The `mock` provider (SPEC §7.4 [H]): no carrier and no network. Calls get the id
`mock-<callId>`; speech is recorded, not played; events arrive as JSON webhooks, which is how a
developer (or a test) plays the carrier's part:

    {"event": {"type": "call.answered", "callId": "<id>"}}
    {"events": [{"type": "call.speech", "callId": "<id>", "transcript": "yes"}]}

Each payload's verified request key is a hash of its bytes, so a redelivered payload is a replay.
"""
from __future__ import annotations

import json
import uuid
from typing import Any, Mapping

from attrs import define, field
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from voicecall.model import END_REASONS, CallEvent, CallRecord, EventType
from voicecall.providers.base import (
    InitiatedCall,
    ParsedWebhook,
    ProviderCallStatus,
    Verification,
    WebhookContext,
    WebhookResponse,
)
from voicecall.providers.signatures import mock_request_key

_BAD_REQUEST = WebhookResponse(400, b"Bad Request", {"Content-Type": "text/plain"})


@define
class MockProvider:
    """A provider that places no real calls; it records what it was asked to do."""

    _clock: IReactorTime
    name: str = "mock"
    uses_turn_tokens: bool = False
    #: What the manager asked of the carrier, in order: (action, provider_call_id, detail).
    actions: list[tuple[str, str | None, Any]] = field(factory=list)
    _log = Logger()

    # -- webhooks ---------------------------------------------------------------------------------

    def has_signature_headers(self, headers: Mapping[str, str]) -> bool:
        return True

    def verify_webhook(self, ctx: WebhookContext) -> Verification:
        return Verification(ok=True, request_key=mock_request_key(ctx.raw_body))

    def replay_response(self, ctx: WebhookContext) -> WebhookResponse | None:
        return None

    def parse_webhook(self, ctx: WebhookContext, request_key: str) -> ParsedWebhook:
        try:
            body = json.loads(ctx.raw_body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return ParsedWebhook((), _BAD_REQUEST)
        if not isinstance(body, dict):
            return ParsedWebhook((), _BAD_REQUEST)
        raw = body.get("events")
        if raw is None:
            raw = [body["event"]] if "event" in body else []
        if not isinstance(raw, list):
            return ParsedWebhook((), _BAD_REQUEST)
        events = []
        for index, item in enumerate(raw):
            event = self._event(item, f"{request_key}:{index}")
            if event is not None:
                events.append(event)
        return ParsedWebhook(tuple(events))

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
                dedupe_key=dedupe_key,
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
    ) -> Deferred[InitiatedCall]:
        pid = f"mock-{call_id}"
        self.actions.append(("initiate", pid, to_number))
        return succeed(InitiatedCall(provider_call_id=pid))

    def hangup_call(self, call: CallRecord, reason: str) -> Deferred[None]:
        self.actions.append(("hangup", call.provider_call_id, reason))
        return succeed(None)

    def answer_call(self, call: CallRecord) -> Deferred[None]:
        self.actions.append(("answer", call.provider_call_id, None))
        return succeed(None)

    def get_call_status(self, provider_call_id: str) -> Deferred[ProviderCallStatus]:
        if any(word in provider_call_id for word in ("stale", "ended", "completed")):
            return succeed(ProviderCallStatus("completed", is_terminal=True))
        return succeed(ProviderCallStatus("in-progress", is_terminal=False))

    # -- speech (Voice) ---------------------------------------------------------------------------

    def speak(self, call: CallRecord, text: str, voice: str | None) -> Deferred[None]:
        self.actions.append(("speak", call.provider_call_id, text))
        return succeed(None)

    def prompt(
        self, call: CallRecord, text: str, voice: str | None, turn_token: str | None
    ) -> Deferred[None]:
        self.actions.append(("speak", call.provider_call_id, text))
        self.actions.append(("listen", call.provider_call_id, turn_token))
        return succeed(None)

    def start_listening(self, call: CallRecord, turn_token: str | None) -> Deferred[None]:
        self.actions.append(("listen", call.provider_call_id, turn_token))
        return succeed(None)

    def stop_listening(self, call: CallRecord) -> Deferred[None]:
        self.actions.append(("stop-listening", call.provider_call_id, None))
        return succeed(None)

    def wants_turn_token(self, call: CallRecord) -> bool:
        return False
