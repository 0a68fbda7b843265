# -*- test-case-name: tests.test_fake_twilio -*-
"""
A faithful fake Twilio on loopback, for tests, benchmarks and trying the daemon without an
account: the REST API (twilio_api), the carrier that drives each call by following its TwiML
and posting signed webhooks (twilio_driver, twilio_carrier), and a standalone entry point:

    python -m voicecall.testing.twilio --port 8080 --account-sid AC... --auth-token ...

which prints the base URL to put into `twilio.baseUrl`. `--chaos` (or the finer `--chaos-*` flags)
gives the carrier's worst day: duplicated, reordered and delayed callbacks, late and repeated
fetches, real-time speech, a callee talking over prompts. `--machine` makes every callee an
answering machine (`--greeting-seconds` long, then a beep: answering-machine detection reports
`machine_end_beep`), `--press 1` a person who presses 1 at the first `<Gather>` taking keys, and
`--recording-delay` how long after the hang-up a recording is reported completed; recordings are
served at their `RecordingUrl` + `.mp3` to the account's Basic auth.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

from voicecall.testing import chaos as _chaos
from voicecall.testing import standalone
from voicecall.testing.chaos import Chaos
from voicecall.testing.twilio_api import FakeTwilio, RecordedRequest, error_body
from voicecall.testing.twilio_carrier import (
    Carrier,
    DialRecord,
    GatherRecord,
    RecordingRecord,
    SayRecord,
    Scenario,
    StreamRecord,
    Webhook,
    sign_request,
)
from voicecall.testing.twilio_driver import FakeCall

__all__ = [
    "Chaos",
    "Carrier",
    "DialRecord",
    "RecordingRecord",
    "FakeCall",
    "FakeTwilio",
    "GatherRecord",
    "RecordedRequest",
    "SayRecord",
    "Scenario",
    "StreamRecord",
    "Webhook",
    "error_body",
    "main",
    "sign_request",
]


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = standalone.parser("twilio", "Run a fake Twilio REST API and carrier on this machine.", 8080)
    parser.add_argument(
        "--account-sid", default=os.environ.get("TWILIO_ACCOUNT_SID"), help="AC... account sid"
    )
    parser.add_argument(
        "--auth-token",
        default=os.environ.get("TWILIO_AUTH_TOKEN"),
        help="auth token (default: $TWILIO_AUTH_TOKEN)",
    )
    standalone.add_callee_arguments(
        parser,
        outcomes=("answer", "no-answer", "busy", "failed"),
        answer_after="seconds from ringing to answer",
        turn="Gather",
        questions_only="stay silent except at the Gathers of a `continue` (those carrying a turn token)",
        seconds_per_char="--say-seconds-per-char",
        speech=" of <Say>",
        hangup_after="callee hangs up after N seconds",
    )
    parser.add_argument("--machine", action="store_true", help="every callee is an answering machine")
    parser.add_argument(
        "--greeting-seconds", type=float, default=4.0, help="how long the machine's greeting lasts before its beep"
    )
    parser.add_argument("--press", default=None, help="keys the callee presses at the first Gather that takes keys")
    parser.add_argument(
        "--recording-delay", type=float, default=2.0, help="seconds after the hang-up before a recording is completed"
    )
    args = parser.parse_args(argv)
    if not args.account_sid or not args.auth_token:
        parser.error("--account-sid and --auth-token (or $TWILIO_ACCOUNT_SID/$TWILIO_AUTH_TOKEN) are required")
    return args


def scripted_utterances(args: argparse.Namespace) -> Any:
    """What the callee says: the --say phrases at each turn of every call, or (with
    --answer-questions-only) at each question only; every call starts again at the first."""
    said = [u or None for u in args.utterances]
    if not args.answer_questions_only:
        return said  # each call keeps its own position in the list
    return standalone.answers_per_call(
        said,
        asked=lambda call: "turnToken=" in (call.gathers[-1].action_url or "") if call.gathers else False,
        key=lambda call: call.sid,
    )


def _build(args: argparse.Namespace) -> Any:
    scenario = Scenario(
        outcome=args.outcome,
        ring_after=0.5,
        answer_after=args.answer_after,
        utterances=scripted_utterances(args),
        hangup_after=args.hangup_after,
        say_seconds_per_char=args.say_seconds_per_char,
        machine=args.machine,
        greeting_seconds=args.greeting_seconds,
        press=args.press,
        recording_delay=args.recording_delay,
    )
    chaos = _chaos.from_arguments(args)
    return lambda reactor, http: FakeTwilio(
        reactor, args.account_sid, args.auth_token, http, scenario=scenario, chaos=chaos
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Run the fake Twilio until interrupted (Ctrl-C)."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    standalone.run(args, "Twilio", _build(args))


if __name__ == "__main__":
    main()
