"""
The daemon's call path in memory, wired to a fake carrier on one `Clock`, for fast deterministic
chaos and stateful property tests (tests/test_chaos_*.py):

    gateway --(CallManager public API)--> CallManager --> provider --StubTreq--> fake REST API
    fake carrier --StubTreq--> WebhookResource --> provider.verify/parse --> CallManager --> store

The store is the real SQLite store on a synchronous writer; `restart()` drops the manager,
provider and webhook resource, re-opens the store and restores, as a daemon restart would,
while the fake carrier (and its calls) carries on. The person on the line answers the last question
they heard (a prompt ending in "?") with `answer_to(question)` when the call's `mood` is "talk",
and says nothing when it is "silent" (nor to statements).

`Stack.build("telnyx" | "twilio" | "plivo" | "mock", directory, chaos)`.
"""
from __future__ import annotations

import json
import sqlite3
from typing import Any, Callable

from attrs import define, field
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock

from voicecall.domain.manager import CallManager, ManagerSettings
from voicecall.domain.model import Mode
from voicecall.domain.store import CallStore
from voicecall.infra.dbwriter import SynchronousWriter
from voicecall.testing.chaos import Chaos
from voicecall.web.replay import ReplayCache, ResponseCache
from voicecall.web.webhook import WebhookResource

PUBLIC = "http://daemon.test"
PATH = "/voice/webhook"
WEBHOOK_URL = PUBLIC + PATH
API = "http://api.fake"
OURS = "+15550000000"
CALLEE = "+15550001234"
START = 1_700_000_000.0


def answer_to(question: str | None) -> str:
    """What the person says after hearing `question`."""
    return f"answer to {question}"


class FlakyStore(CallStore):
    """The real store, whose next `fail_writes` writes fail as a full disk would (nothing committed)."""

    fail_writes: int = 0

    def write(self, *args: Any, **kwargs: Any) -> Deferred:
        if self.fail_writes > 0:
            self.fail_writes -= 1
            return fail(sqlite3.OperationalError("database or disk is full"))
        return super().write(*args, **kwargs)


@define
class _ToDaemon:
    """The fake carrier's HTTP client: each request goes to the daemon's current webhook resource (a restart replaces it)."""

    _current: Callable[[], StubTreq]

    def request(self, *args: Any, **kwargs: Any) -> Any:
        return self._current().request(*args, **kwargs)


@define
class Carrier:
    """What the stack needs of one fake carrier: build it, and look at its calls."""

    name: str
    fake: Any
    make_provider: Callable[[Any], Any]
    spoken: Callable[[Any], list]  # fake call -> texts the carrier played, in order
    ended: Callable[[Any], bool]

    def calls(self) -> dict:
        """The fake's calls by the carrier's call id, oldest first."""
        return self.fake.calls

    def hang_up(self, call: Any) -> None:
        """The person on the line hangs up."""
        call.hangup_by_callee()

    def webhooks(self) -> list:
        """(status, error) of every webhook the carrier sent."""
        return [(h.status, h.error) for h in self.fake.webhooks]


@define(eq=False)
class Stack:
    """One in-memory daemon (restartable) and its fake carrier."""

    provider_name: str
    directory: str
    clock: Clock
    chaos: Chaos
    transcript_timeout_ms: int = 4000
    max_calls: int = 3
    moods: dict = field(factory=dict)  # provider call id -> "talk" | "silent"
    events: list = field(factory=list)  # every durable call event, across restarts
    posts: list = field(factory=list)  # mock: (status, body) of each webhook posted
    mock_actions: list = field(factory=list)  # mock: what the daemon asked of the carrier
    _answered: dict = field(factory=dict)  # provider call id -> prompts heard when last answering
    carrier: Carrier | None = field(init=False, default=None)
    manager: Any = field(init=False, default=None)
    provider: Any = field(init=False, default=None)
    store: Any = field(init=False, default=None)
    webhook: Any = field(init=False, default=None)
    _writer: Any = field(init=False, default=None)
    _to_webhook: StubTreq | None = field(init=False, default=None)  # the current webhook resource's client
    _to_daemon: _ToDaemon = field(init=False)
    _api: StubTreq | None = field(init=False, default=None)

    @classmethod
    def build(cls, provider: str, directory: str, chaos: Chaos | None = None, **kwargs: Any) -> Stack:
        clock = Clock()
        clock.advance(START)
        return cls(provider, directory, clock, chaos or Chaos(), **kwargs)

    def __attrs_post_init__(self) -> None:
        self._to_daemon = _ToDaemon(lambda: self._to_webhook)
        self.carrier = _CARRIERS[self.provider_name](self) if self.provider_name != "mock" else None
        self._api = StubTreq(self.carrier.fake.resource()) if self.carrier else None
        self._open()

    # -- the daemon ---------------------------------------------------------------------------

    def _open(self) -> None:
        self._writer = SynchronousWriter()
        self.store = FlakyStore(self.directory, self._writer)
        _now(self._writer.start())
        _now(self.store.open())
        if self.carrier is None:
            from voicecall.providers.mock import MockProvider

            self.provider = MockProvider(clock=self.clock, actions=self.mock_actions)  # kept across restarts
        else:
            self.provider = self.carrier.make_provider(self._api)
        if hasattr(self.provider, "set_webhook_url"):
            self.provider.set_webhook_url(WEBHOOK_URL)
        self.manager = CallManager(
            provider=self.provider,
            voice=self.provider,
            store=self.store,
            clock=self.clock,
            settings=ManagerSettings(
                provider_name=self.provider_name,
                from_number=OURS,
                max_concurrent_calls=self.max_calls,
                max_duration_seconds=600,
                transcript_timeout_ms=self.transcript_timeout_ms,
                notify_hangup_delay_sec=1,
                default_mode=Mode.CONVERSATION,
                inbound_policy="disabled",
                allow_from=(),
            ),
        )
        self.manager.set_webhook_url(WEBHOOK_URL)
        self.manager.subscribe(self.events.append)
        self.webhook = WebhookResource(
            provider=self.provider,
            manager=self.manager,
            reconstruct_url=lambda pq, headers, ip: PUBLIC + pq,
            path=PATH,
            replays=ReplayCache(self.clock),
            responses=ResponseCache(self.clock),
        )
        self._to_webhook = StubTreq(self.webhook)

    def restart(self) -> dict:
        """Stop the daemon, re-open the store and restore; returns restore's outcome."""
        self.manager.stop()
        if hasattr(self.provider, "stop"):
            self.provider.stop()
        _now(self.store.close())
        self._open()
        d = Deferred.fromCoroutine(self.manager.restore())
        self.pump()
        return _now(d)

    def close(self) -> None:
        self.manager.stop()
        if hasattr(self.provider, "stop"):
            self.provider.stop()
        if self.carrier is not None:
            for call in list(self.carrier.calls().values()):
                if hasattr(call, "shutdown"):
                    call.shutdown()
        _now(self.store.close())

    # -- time ---------------------------------------------------------------------------------

    def pump(self, rounds: int = 4) -> None:
        """Move every in-memory request and answer along (no clock time passes)."""
        for _ in range(rounds):
            if self._api is not None:
                self._api.flush()
            if self._to_webhook is not None:
                self._to_webhook.flush()
            self.clock.advance(0)

    def advance(self, seconds: float, step: float = 0.05) -> None:
        """Let `seconds` pass on the clock, in small steps, pumping requests at each."""
        end = self.clock.seconds() + seconds
        self.pump()
        while self.clock.seconds() < end:
            self.clock.advance(min(step, end - self.clock.seconds()))
            self.pump()

    # -- the person on the line ---------------------------------------------------------------

    def utterance(self, provider_call_id: str, prompts: list) -> str | None:
        """
        The person answers the last question (a prompt ending in "?") among the prompts they
        heard since they last spoke, once, or stays silent; statements get no answer.
        """
        heard = self._answered.get(provider_call_id, 0)
        questions = [p for p in prompts[heard:] if p.rstrip().endswith("?")]
        self._answered[provider_call_id] = len(prompts)
        if not questions or self.moods.get(provider_call_id, "talk") != "talk":
            return None
        return answer_to(questions[-1])

    # -- mock carrier: events posted through the webhook resource ------------------------------

    def post_mock(self, *events: dict) -> int:
        body = json.dumps({"events": list(events)}).encode()
        d = self._to_daemon.request("POST", WEBHOOK_URL, data=body, headers={"Content-Type": ["application/json"]})
        self.pump()
        response = _now(d)
        content = response.content()
        self.pump()
        self.posts.append((response.code, _now(content)))
        return response.code

    def webhook_statuses(self) -> list:
        if self.carrier is None:
            return [(code, None) for code, _ in self.posts]
        return self.carrier.webhooks()


def _now(d: Any) -> Any:
    """The result of a Deferred that has fired (raise its failure); plain values pass through."""
    if not isinstance(d, Deferred):
        return d
    box: list = []
    d.addBoth(box.append)
    if not box:
        raise AssertionError("Deferred has not fired")
    result = box[0]
    from twisted.python.failure import Failure

    if isinstance(result, Failure):
        result.raiseException()
    return result


# -- the carriers -------------------------------------------------------------------------------


def _telnyx(stack: Stack) -> Carrier:
    from voicecall.providers.telnyx import TelnyxProvider
    from voicecall.testing.telnyx import FakeTelnyx, Scenario

    key, connection = "KEY_fake_chaos", "conn-chaos"
    scenario = Scenario(
        answer_after=0.5,
        say_seconds_per_char=0.01,
        speech_delay=0.3,
        utterances=lambda call: stack.utterance(call.call_control_id, call.speak_texts),
    )
    fake = FakeTelnyx(stack.clock, key, stack._to_daemon, connection_id=connection, scenario=scenario, chaos=stack.chaos)

    def provider(api: Any) -> Any:
        return TelnyxProvider(
            http=api, clock=stack.clock, api_key=key, connection_id=connection, public_key=fake.public_key, base_url=API
        )

    return Carrier(
        "telnyx",
        fake,
        provider,
        spoken=lambda call: call.speak_texts,
        ended=lambda call: not call.is_alive,
    )


def _twilio(stack: Stack) -> Carrier:
    from voicecall.providers.twilio import TwilioProvider
    from voicecall.testing.twilio import FakeTwilio, Scenario

    sid, token = "AC" + "0" * 32, "chaos-token"

    def heard(call: Any) -> Any:
        return stack.utterance(call.sid, call.say_texts)

    scenario = Scenario(answer_after=0.5, say_seconds_per_char=0.01, speech_delay=0.3, silence=1.0, utterances=heard)
    fake = FakeTwilio(stack.clock, sid, token, stack._to_daemon, scenario=scenario, chaos=stack.chaos)

    def provider(api: Any) -> Any:
        return TwilioProvider(http=api, clock=stack.clock, account_sid=sid, auth_token=token, base_url=API, public_url=WEBHOOK_URL)

    return Carrier(
        "twilio",
        fake,
        provider,
        spoken=lambda call: call.say_texts,
        ended=lambda call: call.is_ended,
    )


def _plivo(stack: Stack) -> Carrier:
    from voicecall.providers.plivo import PlivoProvider
    from voicecall.testing.plivo import FakePlivo, Scenario

    auth_id, token = "MA" + "A" * 18, "chaos-token"

    def heard(call: Any) -> Any:
        return stack.utterance(call.call_uuid, call.speak_texts)

    scenario = Scenario(answer_after=0.5, speak_seconds_per_char=0.01, speech_delay=0.3, silence=1.0, utterances=heard)
    fake = FakePlivo(stack.clock, auth_id, token, stack._to_daemon, scenario=scenario, chaos=stack.chaos)

    def provider(api: Any) -> Any:
        return PlivoProvider(http=api, clock=stack.clock, auth_id=auth_id, auth_token=token, base_url=API, public_url=WEBHOOK_URL)

    return Carrier(
        "plivo",
        fake,
        provider,
        spoken=lambda call: call.speak_texts,
        ended=lambda call: call.is_ended,
    )


_CARRIERS: dict[str, Callable[[Stack], Carrier]] = {"telnyx": _telnyx, "twilio": _twilio, "plivo": _plivo}
