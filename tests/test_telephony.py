"""
Issue 17's telephony actions in the CallManager (voicecall.domain.manager and the rules of
voicecall.domain.telephony), driven through the manager's public operations and normalised
carrier events, with a Clock, the mock provider (whose playback takes time on that clock) and the
real store. The carriers' side of each action is tested per carrier (tests/test_*_actions.py), the
RPC and CLI in tests/test_rpc_actions.py and tests/test_cli_actions.py.
"""
from __future__ import annotations

import uuid

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from voicecall.domain.manager import CallError
from voicecall.domain.model import Answer, CallEvent, CallOptions, CallState
from voicecall.providers.mock import MockProvider

from tests.fixtures import manager_rig

TO = "+15550001234"
TRANSFER_TO = "+15550009999"


class TelephonyTestsBase(SynchronousTestCase):
    SETTINGS = dict(
        max_concurrent_calls=4,
        max_duration_seconds=300,
        transcript_timeout_ms=120_000,
        notify_hangup_delay_sec=3,
        default_mode="conversation",
        allowed_from_numbers=("+15550000001",),
        transfer_allow_to=(TRANSFER_TO, "sip:desk@pbx.example.com"),
        recording_announcement="This call is recorded.",
    )

    def setUp(self):
        rig = manager_rig(self, lambda clock: MockProvider(clock=clock, speak_seconds_per_char=0.01), **self.SETTINGS)
        self.clock, self.store, self.provider, self.manager = rig.clock, rig.store, rig.provider, rig.manager
        self.entries = []
        self.manager.subscribe(self.entries.append)

    def go(self, coro):
        return self.successResultOf(Deferred.fromCoroutine(coro))

    def fails(self, coro) -> str:
        return str(self.failureResultOf(Deferred.fromCoroutine(coro), CallError).value)

    def event(self, kind, call_id, **fields):
        fields.setdefault("id", str(uuid.uuid4()))
        fields.setdefault("timestamp", int(self.clock.seconds() * 1000))
        self.go(self.manager.process_event(CallEvent(type=kind, call_id=call_id, **fields)))

    def stored(self, call_id):
        return self.successResultOf(self.store.get_call(call_id))

    def did(self, *kinds):
        """What the carrier was asked to do, of `kinds`, as (kind, detail)."""
        return [(a[0], a[2]) for a in self.provider.actions if a[0] in kinds]

    def place(self, message="Hi there", mode="conversation", **options):
        return self.go(self.manager.initiate(TO, message, mode, options=CallOptions(**options)))

    def answered(self, message="Hi there", mode="conversation", **options):
        call_id = self.place(message, mode, **options)
        self.event("call.answered", call_id)
        self.clock.advance(5)
        return call_id


class CallOptionsTests(TelephonyTestsBase):
    def test_from_must_be_owned(self):
        """A `from` that is neither fromNumber nor in allowedFromNumbers is refused; nothing is dialled."""
        message = self.fails(self.manager.initiate(TO, "Hi", options=CallOptions(from_number="+15557770000")))
        self.assertEqual(message, "from number not allowed: +15557770000 (use fromNumber or one of allowedFromNumbers)")
        self.assertEqual(self.provider.actions, [])
        call_id = self.place(from_number="+15550000001")
        self.assertEqual(self.stored(call_id).from_number, "+15550000001")

    def test_max_duration_at_most_the_config(self):
        """maxDurationSeconds above the config's is refused; a shorter one ends the call then."""
        self.assertEqual(
            self.fails(self.manager.initiate(TO, "Hi", options=CallOptions(max_duration_seconds=301))),
            "maxDurationSeconds must be an integer from 1 to 300",
        )
        call_id = self.answered(max_duration_seconds=20)
        self.clock.advance(14)
        self.assertEqual(self.stored(call_id).state, CallState.LISTENING)
        self.clock.advance(2)
        record = self.stored(call_id)
        self.assertEqual((record.state, record.end_reason), (CallState.TIMEOUT, "timeout"))

    def test_greeting_voice_objective(self):
        """The greeting is said before the message; voice and objective are kept with the call."""
        call_id = self.answered(greeting="Hello, this is Ann's assistant.", voice="nova", objective="Book a table")
        self.assertEqual(self.did("speak"), [("speak", "Hello, this is Ann's assistant. Hi there")])
        meta = self.stored(call_id).metadata
        self.assertEqual((meta["voice"], meta["objective"]), ("nova", "Book a table"))

    def test_bad_answering_machine_policy(self):
        message = self.fails(self.manager.initiate(TO, "Hi", options=CallOptions(answering_machine="hangup")))
        self.assertEqual(message, 'answeringMachine must be one of "ignore", "leave-message", "hang-up"')
        self.assertEqual(self.provider.actions, [])


class AnsweringMachineTests(TelephonyTestsBase):
    def test_nothing_is_said_before_the_verdict_then_a_person_hears_it(self):
        """With detection on, the call waits for the verdict; a person then hears the message."""
        call_id = self.answered(answering_machine="hang-up")
        self.assertEqual(self.did("detect-machine"), [("detect-machine", "hang-up")])
        self.assertEqual(self.did("speak"), [])
        self.event("call.machine", call_id, answered_by="human")
        self.clock.advance(5)
        self.assertEqual(self.did("speak", "hangup"), [("speak", "Hi there")])
        record = self.stored(call_id)
        self.assertEqual(record.to_json()["answeredBy"], "human")
        self.assertIn("call.machine", [e["type"] for e in self.entries])

    def test_hang_up_on_a_machine(self):
        """hang-up: a machine is hung up on without a word; the call ends voicemail, answeredBy machine."""
        call_id = self.answered(answering_machine="hang-up")
        self.event("call.machine", call_id, answered_by="machine")
        self.assertEqual(self.did("speak", "hangup"), [("hangup", "voicemail")])
        record = self.stored(call_id)
        self.assertEqual((record.state, record.answered_by), (CallState.VOICEMAIL, "machine"))

    def test_leave_message_after_the_beep(self):
        """leave-message: the message waits for the beep, is played whole, then the call hangs up."""
        call_id = self.answered(message="Your table is booked for eight.", mode="notify", answering_machine="leave-message")
        self.event("call.machine", call_id, answered_by="machine")
        self.clock.advance(10)
        self.assertEqual(self.did("speak"), [])
        self.event("call.machine", call_id, answered_by="machine", machine_done=True)
        self.assertEqual(self.did("speak", "hangup"), [("speak", "Your table is booked for eight.")])
        self.clock.advance(0.2)  # still playing (0.01 s a character)
        self.assertEqual(self.did("hangup"), [])
        self.clock.advance(1)
        self.assertEqual(self.did("spoken", "hangup"), [("spoken", "Your table is booked for eight."), ("hangup", "voicemail")])
        record = self.stored(call_id)
        self.assertEqual((record.state, record.answered_by), (CallState.VOICEMAIL, "machine"))
        self.assertEqual([t.text for t in record.transcript], ["Your table is booked for eight."])

    def test_conversation_leaves_its_first_message_too(self):
        """A conversation call answered by a machine leaves its first message and hangs up."""
        call_id = self.answered(answering_machine="leave-message")
        self.event("call.machine", call_id, answered_by="machine", machine_done=True)
        self.clock.advance(2)
        self.assertEqual(self.did("speak", "hangup"), [("speak", "Hi there"), ("hangup", "voicemail")])

    def test_verdict_before_the_answer(self):
        """A verdict delivered before the answer (reordered callbacks) is acted on at the answer."""
        call_id = self.place(answering_machine="leave-message")
        self.event("call.machine", call_id, answered_by="machine", machine_done=True)
        self.assertEqual(self.did("speak"), [])
        self.event("call.answered", call_id)
        self.clock.advance(2)
        self.assertEqual(self.did("speak", "hangup"), [("speak", "Hi there"), ("hangup", "voicemail")])

    def test_no_verdict_goes_on_as_a_person(self):
        """No verdict within the wait: answeredBy unknown, the call goes on as if a person answered."""
        call_id = self.answered(answering_machine="hang-up")  # (5 s after the answer)
        self.clock.advance(29)
        self.assertEqual(self.did("speak"), [])
        self.clock.advance(2)
        self.assertEqual(self.did("speak"), [("speak", "Hi there")])
        self.assertEqual(self.stored(call_id).answered_by, "unknown")

    def test_no_beep_leaves_the_message_anyway(self):
        call_id = self.answered(answering_machine="leave-message")
        self.event("call.machine", call_id, answered_by="machine")
        self.clock.advance(41)
        self.clock.advance(2)
        self.assertEqual(self.did("speak", "hangup"), [("speak", "Hi there"), ("hangup", "voicemail")])

    def test_fax_is_hung_up_on(self):
        call_id = self.answered(answering_machine="leave-message")
        self.event("call.machine", call_id, answered_by="fax")
        self.assertEqual(self.did("speak", "hangup"), [("hangup", "voicemail")])
        self.assertEqual(self.stored(call_id).answered_by, "fax")

    def test_a_continue_waits_for_the_verdict(self):
        """A continue sent at once waits behind the first words; a machine ends it with the call."""
        call_id = self.place(answering_machine="hang-up")
        turn = Deferred.fromCoroutine(self.manager.continue_call(call_id, "Is now a good time?"))
        self.event("call.answered", call_id)
        self.clock.advance(3)
        self.assertNoResult(turn)
        self.event("call.machine", call_id, answered_by="machine")
        self.assertEqual(str(self.failureResultOf(turn, CallError).value), "Call has ended")
        self.assertEqual(self.did("speak"), [])

    def test_words_before_the_verdict_get_no_automatic_reply(self):
        """A machine's greeting heard before the verdict is recorded, not answered by the responder."""
        heard = []
        self.manager = type(self.manager)(
            provider=self.provider, voice=self.provider, store=self.store, clock=self.clock,
            settings=self.manager._settings, on_utterance=lambda call, text: heard.append(text),
        )  # fmt: skip
        self.manager.set_webhook_url("https://example.com/voice/webhook")
        call_id = self.answered(answering_machine="hang-up")
        self.event("call.speech", call_id, transcript="Hi, you've reached Bob, leave a message")
        self.assertEqual(heard, [])
        self.event("call.machine", call_id, answered_by="human")
        self.event("call.speech", call_id, transcript="Hello?")
        self.assertEqual(heard, ["Hello?"])

    def test_redelivered_verdict_acts_once(self):
        call_id = self.answered(answering_machine="hang-up")
        same = str(uuid.uuid4())
        self.event("call.machine", call_id, answered_by="human", id=same)
        self.event("call.machine", call_id, answered_by="human", id=same)
        self.clock.advance(5)
        self.assertEqual(self.did("speak"), [("speak", "Hi there")])


class KeypadTests(TelephonyTestsBase):
    def test_continue_answered_by_keys(self):
        """A continue listening for "speech dtmf" returns keys pressed, marked as dtmf."""
        call_id = self.answered()
        turn = Deferred.fromCoroutine(self.manager.continue_turn(call_id, "Press 1 to confirm", "speech dtmf"))
        self.clock.advance(1)
        self.assertEqual(self.did("listen+dtmf"), [("listen+dtmf", None)])
        self.event("call.dtmf", call_id, digits="1")
        self.assertEqual(self.successResultOf(turn), Answer("1", "dtmf"))
        record = self.stored(call_id)
        self.assertEqual(record.transcript[-1].text, "[dtmf] 1")
        self.assertIn({"digits": "1", "type": "call.dtmf"}, [{k: e[k] for k in ("type", "digits")} for e in self.entries if e["type"] == "call.dtmf"])

    def test_keys_do_not_answer_a_speech_turn(self):
        call_id = self.answered()
        turn = Deferred.fromCoroutine(self.manager.continue_turn(call_id, "Who is this?"))
        self.clock.advance(1)
        self.event("call.dtmf", call_id, digits="5")
        self.assertNoResult(turn)
        self.event("call.speech", call_id, transcript="It's Bob")
        self.assertEqual(self.successResultOf(turn), Answer("It's Bob", "speech"))

    def test_bad_input(self):
        call_id = self.answered()
        self.assertEqual(self.fails(self.manager.continue_turn(call_id, "Hi", "keys")), 'input must be "speech", "dtmf" or "speech dtmf"')

    def test_send_dtmf_while_a_continue_waits(self):
        """Tones sent while a continue waits go out; the continue still gets its answer."""
        call_id = self.answered()
        turn = Deferred.fromCoroutine(self.manager.continue_call(call_id, "Which option?"))
        self.clock.advance(1)
        self.go(self.manager.send_dtmf(call_id, "1w2#"))
        self.assertEqual(self.did("dtmf"), [("dtmf", "1w2#")])
        self.event("call.speech", call_id, transcript="the second one")
        self.assertEqual(self.successResultOf(turn), "the second one")
        self.assertIn("[dtmf] 1w2#", [t.text for t in self.stored(call_id).transcript])

    def test_bad_digits_change_nothing(self):
        call_id = self.answered()
        self.assertEqual(self.fails(self.manager.send_dtmf(call_id, "12a")), "digits may only contain 0-9, *, # and w (a half-second pause)")
        self.assertEqual(self.fails(self.manager.send_dtmf(call_id, "1" * 65)), "too many digits (at most 64)")
        self.assertEqual(self.fails(self.manager.send_dtmf(call_id, "")), "digits required")
        self.assertEqual(self.did("dtmf"), [])

    def test_dtmf_needs_an_answered_live_call(self):
        call_id = self.place()
        self.assertEqual(self.fails(self.manager.send_dtmf(call_id, "1")), "Call not answered yet")
        self.event("call.answered", call_id)
        self.event("call.ended", call_id, reason="hangup-user")
        self.assertEqual(self.fails(self.manager.send_dtmf(call_id, "1")), "Call not found")


class TransferTests(TelephonyTestsBase):
    def test_transfer_after_the_message(self):
        """The message plays whole, then the caller is connected; the record ends transferred."""
        call_id = self.answered()
        turn = Deferred.fromCoroutine(self.manager.continue_call(call_id, "Anything else?"))
        self.clock.advance(1)
        done = Deferred.fromCoroutine(self.manager.transfer(call_id, TRANSFER_TO, "Putting you through."))
        self.assertEqual(self.did("transfer"), [])
        self.clock.advance(1)
        self.successResultOf(done)
        self.assertEqual(self.did("spoken", "transfer")[-2:], [("spoken", "Putting you through."), ("transfer", TRANSFER_TO)])
        record = self.stored(call_id)
        self.assertEqual((record.state, record.end_reason), (CallState.TRANSFERRED, "transferred"))
        self.assertEqual(record.to_json()["transferTarget"], TRANSFER_TO)
        self.assertEqual(str(self.failureResultOf(turn, CallError).value), "Call ended: transferred")
        self.assertEqual(self.manager.active_calls(), [])

    def test_target_not_allowed(self):
        call_id = self.answered()
        self.assertEqual(
            self.fails(self.manager.transfer(call_id, "+15551112222")),
            "Transfer target not allowed: +15551112222 (transfer.allowTo lists the numbers a call may be transferred to)",
        )
        self.assertEqual(self.did("transfer"), [])
        self.assertEqual(self.stored(call_id).state, CallState.LISTENING)

    def test_transfer_not_configured(self):
        self.manager = type(self.manager)(
            provider=self.provider, voice=self.provider, store=self.store, clock=self.clock,
            settings=type(self.manager._settings)(provider_name="mock"),
        )  # fmt: skip
        self.assertIn("transfer.allowTo", self.fails(self.manager.transfer("x", TRANSFER_TO)))


class GoodbyeTests(TelephonyTestsBase):
    def test_hang_up_only_after_the_goodbye_played(self):
        call_id = self.answered()
        done = Deferred.fromCoroutine(self.manager.end_call(call_id, message="Thanks, goodbye!"))
        self.clock.advance(0.1)
        self.assertEqual(self.did("hangup"), [])
        self.clock.advance(0.1)
        self.successResultOf(done)
        self.assertEqual(self.did("spoken", "hangup")[-2:], [("spoken", "Thanks, goodbye!"), ("hangup", "hangup-bot")])
        record = self.stored(call_id)
        self.assertEqual(record.state, CallState.HANGUP_BOT)
        self.assertEqual(record.transcript[-1].text, "Thanks, goodbye!")

    def test_goodbye_waits_for_the_greeting(self):
        """A goodbye sent while the greeting plays is said after it, not over it."""
        call_id = self.place(message="A long greeting that takes a while to play.")
        self.event("call.answered", call_id)
        done = Deferred.fromCoroutine(self.manager.end_call(call_id, message="Bye"))
        self.clock.pump([0.1] * 20)
        self.successResultOf(done)
        self.assertEqual([d for _, d in self.did("spoken", "hangup")], ["A long greeting that takes a while to play.", "Bye", "hangup-bot"])

    def test_caller_hangs_up_during_the_goodbye(self):
        call_id = self.answered()
        done = Deferred.fromCoroutine(self.manager.end_call(call_id, message="Thanks for calling, goodbye!"))
        self.event("call.ended", call_id, reason="hangup-user")
        self.clock.advance(1)
        self.successResultOf(done)
        self.assertEqual(self.stored(call_id).end_reason, "hangup-user")


class RecordingTests(TelephonyTestsBase):
    def test_announcement_then_recording_then_greeting(self):
        call_id = self.answered(record=True)
        self.assertEqual(self.did("speak", "record"), [("speak", "This call is recorded."), ("record", "mock-rec-1"), ("speak", "Hi there")])
        recordings = self.stored(call_id).to_json()["recordings"]
        self.assertEqual([(r["id"], r["status"]) for r in recordings], [("mock-rec-1", "in-progress")])

    def test_recording_completed_after_the_end(self):
        """The carrier's news of a recording saved after the hang-up is kept with the ended call."""
        call_id = self.answered(record=True)
        self.event("call.ended", call_id, reason="hangup-user")
        self.event("call.recording", call_id, recording={"id": "mock-rec-1", "status": "completed", "url": "https://x/r.mp3", "durationSeconds": 12})
        record = self.stored(call_id)
        self.assertEqual(record.state, CallState.HANGUP_USER)
        self.assertEqual(record.recordings, [{"id": "mock-rec-1", "status": "completed", "url": "https://x/r.mp3", "durationSeconds": 12, "startedAt": record.recordings[0]["startedAt"]}])
        self.assertEqual(self.entries[-1]["type"], "call.recording")

    def test_late_in_progress_does_not_undo_completed(self):
        call_id = self.answered(record=True)
        self.event("call.recording", call_id, recording={"id": "mock-rec-1", "status": "completed"})
        self.event("call.recording", call_id, recording={"id": "mock-rec-1", "status": "in-progress"})
        self.assertEqual(self.stored(call_id).recordings[0]["status"], "completed")

    def test_not_recorded_unless_asked(self):
        self.answered()
        self.assertEqual(self.did("record"), [])

    def test_machine_is_not_recorded(self):
        call_id = self.answered(record=True, answering_machine="leave-message")
        self.event("call.machine", call_id, answered_by="machine", machine_done=True)
        self.clock.advance(2)
        self.assertEqual(self.did("speak", "record", "hangup"), [("speak", "Hi there"), ("hangup", "voicemail")])


class PublishTests(TelephonyTestsBase):
    def test_publish_on_an_ended_call(self):
        call_id = self.answered()
        self.event("call.ended", call_id, reason="hangup-user")
        self.go(self.manager.publish(call_id, "call.summary", outcome="hangup-user"))
        self.assertEqual({k: self.entries[-1][k] for k in ("type", "callId", "outcome")}, {"type": "call.summary", "callId": call_id, "outcome": "hangup-user"})
        self.assertEqual(self.fails(self.manager.publish("nope", "call.summary")), "Call not found")
