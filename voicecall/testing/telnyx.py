# -*- test-case-name: tests.test_fake_telnyx -*-
"""
A faithful fake Telnyx (Call Control v2) on loopback, for tests, benchmarks and trying the daemon
without an account: the REST API (telnyx_api), the carrier that drives each call and posts
Ed25519-signed webhooks (telnyx_driver), and a standalone entry point:

    python -m voicecall.testing.telnyx --port 8081 --api-key KEY --answer-questions-only --say "It's Alice"

which prints the base URL to put into `telnyx.baseUrl` and the public key for
`telnyx.publicKey`. `--chaos` (or the finer `--chaos-*` flags) gives the carrier's worst day:
redelivered, reordered and delayed webhooks, real-time speech, a callee talking over prompts. Give `--signing-seed` (64 hex digits) to keep the same key across runs.

Issue 17's callee: `--machine` (an answering machine: its greeting lasts `--greeting-seconds`,
then it beeps unless `--no-beep`; `--fax` for a fax), `--press 1` (keys pressed instead of
speaking at the next turn; repeatable, "" speaks), `--detection-seconds` (when detection's
verdict comes), `--recording-delay` (seconds from a recording's end, e.g. the hang-up, to its
`call.recording.saved`).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

from voicecall.testing import chaos as _chaos
from voicecall.testing import standalone
from voicecall.testing.chaos import Chaos
from voicecall.testing.telnyx_api import FakeTelnyx, RecordedRequest, error_body
from voicecall.testing.telnyx_driver import (
    Carrier,
    FakeCall,
    FakeRecording,
    Scenario,
    Signer,
    SpeakRecord,
    Webhook,
    envelope,
    iso8601,
)

__all__ = [
    "Carrier",
    "Chaos",
    "FakeCall",
    "FakeRecording",
    "FakeTelnyx",
    "RecordedRequest",
    "Scenario",
    "Signer",
    "SpeakRecord",
    "Webhook",
    "envelope",
    "error_body",
    "iso8601",
    "main",
]


def _seed(text: str) -> bytes:
    try:
        seed = bytes.fromhex(text)
    except ValueError:
        seed = b""
    if len(seed) != 32:
        raise argparse.ArgumentTypeError("the signing seed is 64 hex digits")
    return seed


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = standalone.parser("telnyx", "Run a fake Telnyx Call Control API and carrier on this machine.", 8081)
    parser.add_argument("--api-key", default=os.environ.get("TELNYX_API_KEY"), help="API key (default: $TELNYX_API_KEY)")
    parser.add_argument("--connection-id", default=None, help="the only connection_id a dial may name (default: any)")
    parser.add_argument("--webhook-url", default=None, help="the application's webhook URL (for dials without one)")
    parser.add_argument("--signing-seed", type=_seed, default=None, help="Ed25519 seed, 64 hex digits (default: a new key)")
    standalone.add_callee_arguments(
        parser,
        outcomes=("answer", "no-answer", "busy"),
        answer_after="seconds from dial to answer",
        turn="turn",
        questions_only="stay silent except after a question (a prompt ending in '?'), answering each once",
        seconds_per_char="--say-seconds-per-char",
        speech="",
        hangup_after="callee hangs up N seconds after answering",
    )
    callee = parser.add_mutually_exclusive_group()
    callee.add_argument("--machine", dest="callee", action="store_const", const="machine", default="person",
                        help="an answering machine answers (a greeting, then a beep)")
    callee.add_argument("--fax", dest="callee", action="store_const", const="fax", help="a fax machine answers")
    parser.add_argument("--greeting-seconds", type=float, default=6.0, help="how long the machine's greeting lasts")
    parser.add_argument("--no-beep", dest="beep", action="store_false", help="the machine's greeting ends without a beep")
    parser.add_argument("--detection-seconds", type=float, default=2.0, help="seconds from answer to the answering-machine verdict")
    parser.add_argument("--press", dest="presses", action="append", default=[],
                        help='keys the callee presses at each turn, in order (repeatable; "" speaks that turn)')
    parser.add_argument("--recording-delay", type=float, default=2.0, help="seconds from a recording's end to its call.recording.saved")
    args = parser.parse_args(argv)
    if not args.api_key:
        parser.error("--api-key (or $TELNYX_API_KEY) is required")
    return args


def scripted_utterances(args: argparse.Namespace) -> Any:
    """
    What the callee says: the --say phrases at each turn of every call (a turn is each time the
    bot falls silent while transcription runs, so how many there are before a question depends on
    when the daemon starts transcribing), or, with --answer-questions-only, one phrase after each
    question the bot asked; every call starts again at the first phrase.
    """
    said = [u or None for u in args.utterances]
    if not args.answer_questions_only:
        return said  # each call keeps its own position in the list
    answered: dict[str, Any] = {}  # call -> the prompt it answered last

    def asked(call: Any) -> bool:
        prompt = call.speaks[-1] if call.speaks else None
        if prompt is None or not prompt.text.rstrip().endswith("?") or answered.get(call.call_control_id) is prompt:
            return False
        answered.pop(call.call_control_id, None)
        answered[call.call_control_id] = prompt
        while len(answered) > standalone.MAX_SCRIPTED_CALLS:
            del answered[next(iter(answered))]
        return True

    return standalone.answers_per_call(said, asked=asked, key=lambda call: call.call_control_id)


def _build(args: argparse.Namespace) -> Any:
    scenario = Scenario(
        outcome=args.outcome,
        answer_after=args.answer_after,
        utterances=scripted_utterances(args),
        hangup_after=args.hangup_after,
        say_seconds_per_char=args.say_seconds_per_char,
        presses=[p or None for p in args.presses],
        callee=args.callee,
        greeting_seconds=args.greeting_seconds,
        beep=args.beep,
        detection_seconds=args.detection_seconds,
        recording_delay=args.recording_delay,
    )
    signer = Signer.from_seed(args.signing_seed) if args.signing_seed else Signer.generate()
    chaos = _chaos.from_arguments(args)
    return lambda reactor, http: FakeTelnyx(
        reactor,
        args.api_key,
        http,
        connection_id=args.connection_id,
        webhook_url=args.webhook_url,
        signer=signer,
        scenario=scenario,
        chaos=chaos,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Run the fake Telnyx until interrupted (Ctrl-C)."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    standalone.run(args, "Telnyx", _build(args), lambda fake: [f"telnyx.publicKey: {fake.public_key}"])


if __name__ == "__main__":
    main()
