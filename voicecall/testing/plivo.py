# -*- test-case-name: tests.test_fake_plivo -*-
"""
A fake Plivo on loopback, for tests, benchmarks and trying the daemon without an account: the
REST API (plivo_api), the carrier that drives each call by following its XML and posting
signed callbacks (plivo_driver, plivo_carrier), and a standalone entry point:

    python -m voicecall.testing.plivo --port 8082 --auth-id MA... --auth-token ... --say "yes"

which prints the base URL to put into `plivo.baseUrl`. `--chaos` (or the finer `--chaos-*` flags)
gives the carrier's worst day: duplicated, reordered and delayed callbacks, late and repeated
fetches, real-time speech, a callee talking over prompts. `--machine` makes every callee an
answering machine (`--greeting-seconds` long, then a beep; asynchronous machine detection posts
`Machine=true`), `--press 1` a person who presses 1 at the first `<GetInput>` taking keys, and
`--recording-delay` how long after a recording stops (the hang-up) its callback comes; recordings
are served at their `record_url` to the account's Basic auth.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

from voicecall.testing import chaos as _chaos
from voicecall.testing import standalone
from voicecall.testing.chaos import Chaos
from voicecall.testing.plivo_api import FakePlivo, RecordedRequest, error_body
from voicecall.testing.plivo_carrier import (
    Carrier,
    DialRecord,
    GetInputRecord,
    RecordingRecord,
    Scenario,
    SpeakRecord,
    Webhook,
    new_nonce,
    sign_v2,
    sign_v3,
    signature_headers,
    v3_string,
)
from voicecall.testing.plivo_driver import FakeCall

__all__ = [
    "Chaos",
    "Carrier",
    "DialRecord",
    "FakeCall",
    "FakePlivo",
    "GetInputRecord",
    "RecordedRequest",
    "RecordingRecord",
    "Scenario",
    "SpeakRecord",
    "Webhook",
    "error_body",
    "main",
    "new_nonce",
    "sign_v2",
    "sign_v3",
    "signature_headers",
    "v3_string",
]


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = standalone.parser("plivo", "Run a fake Plivo REST API and carrier on this machine.", 8082)
    parser.add_argument("--auth-id", default=os.environ.get("PLIVO_AUTH_ID"), help="auth id (default: $PLIVO_AUTH_ID)")
    parser.add_argument(
        "--auth-token", default=os.environ.get("PLIVO_AUTH_TOKEN"), help="auth token (default: $PLIVO_AUTH_TOKEN)"
    )
    standalone.add_callee_arguments(
        parser,
        outcomes=("answer", "no-answer", "busy", "failed"),
        answer_after="seconds from ringing to answer",
        turn="GetInput",
        questions_only="stay silent except at the GetInputs of a `continue` (those carrying a turn token)",
        seconds_per_char="--speak-seconds-per-char",
        speech=" of <Speak>",
        hangup_after="callee hangs up after N seconds",
    )
    parser.add_argument("--machine", action="store_true", help="every callee is an answering machine")
    parser.add_argument(
        "--greeting-seconds", type=float, default=4.0, help="how long the machine's greeting lasts before its beep"
    )
    parser.add_argument("--press", default=None, help="keys the callee presses at the first GetInput that takes keys")
    parser.add_argument(
        "--recording-delay", type=float, default=2.0, help="seconds after a recording stops before its callback"
    )
    parser.add_argument("--signature", default="v3", choices=["v3", "v2", "both"], help="callback signature scheme")
    args = parser.parse_args(argv)
    if not args.auth_id or not args.auth_token:
        parser.error("--auth-id and --auth-token (or $PLIVO_AUTH_ID/$PLIVO_AUTH_TOKEN) are required")
    return args


def scripted_utterances(args: argparse.Namespace) -> Any:
    """What the callee says: the --say phrases at each turn of every call, or (with
    --answer-questions-only) at each question only; every call starts again at the first."""
    said = [u or None for u in args.utterances]
    if not args.answer_questions_only:
        return said  # each call keeps its own position in the list
    return standalone.answers_per_call(
        said,
        asked=lambda call: bool(call.inputs) and call.inputs[-1].turn_token is not None,
        key=lambda call: call.call_uuid,
    )


def _build(args: argparse.Namespace) -> Any:
    scenario = Scenario(
        outcome=args.outcome,
        ring_after=0.5,
        answer_after=args.answer_after,
        utterances=scripted_utterances(args),
        hangup_after=args.hangup_after,
        speak_seconds_per_char=args.speak_seconds_per_char,
        machine=args.machine,
        greeting_seconds=args.greeting_seconds,
        press=args.press,
        recording_delay=args.recording_delay,
    )
    chaos = _chaos.from_arguments(args)
    return lambda reactor, http: FakePlivo(
        reactor, args.auth_id, args.auth_token, http, scenario=scenario, chaos=chaos, signature=args.signature
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Run the fake Plivo until interrupted (Ctrl-C)."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    standalone.run(args, "Plivo", _build(args))


if __name__ == "__main__":
    main()
