# -*- test-case-name: tests.test_fake_plivo -*-
"""
A fake Plivo on loopback, for tests, benchmarks and trying the daemon without an account: the
REST API (plivo_api), the carrier that drives each call by following its XML and posting
signed callbacks (plivo_driver, plivo_carrier), and a standalone entry point:

    python -m voicecall.testing.plivo --port 8082 --auth-id MA... --auth-token ... --say "yes"

which prints the base URL to put into `plivo.baseUrl`. `--chaos` (or the finer `--chaos-*` flags)
gives the carrier's worst day: duplicated, reordered and delayed callbacks, late and repeated
fetches, real-time speech, a callee talking over prompts.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

from voicecall.testing import chaos as _chaos
from voicecall.testing.chaos import Chaos
from voicecall.testing.plivo_api import FakePlivo, RecordedRequest, error_body
from voicecall.testing.plivo_carrier import (
    Carrier,
    GetInputRecord,
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
    "FakeCall",
    "FakePlivo",
    "GetInputRecord",
    "RecordedRequest",
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
    parser = argparse.ArgumentParser(
        prog="python -m voicecall.testing.plivo",
        description="Run a fake Plivo REST API and carrier on this machine.",
    )
    parser.add_argument("--port", type=int, default=8082, help="TCP port (0: any free port)")
    parser.add_argument("--interface", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--auth-id", default=os.environ.get("PLIVO_AUTH_ID"), help="auth id (default: $PLIVO_AUTH_ID)")
    parser.add_argument(
        "--auth-token", default=os.environ.get("PLIVO_AUTH_TOKEN"), help="auth token (default: $PLIVO_AUTH_TOKEN)"
    )
    parser.add_argument("--answer-after", type=float, default=1.0, help="seconds from ringing to answer")
    parser.add_argument("--outcome", default="answer", choices=["answer", "no-answer", "busy", "failed"])
    parser.add_argument(
        "--say", dest="utterances", action="append", default=[],
        help='what the callee says at each GetInput, in order (repeatable; "" is silence)',
    )
    parser.add_argument(
        "--answer-questions-only", action="store_true",
        help="stay silent except at the GetInputs of a `continue` (those carrying a turn token)",
    )
    parser.add_argument(
        "--speak-seconds-per-char", type=float, default=0.06, help="simulated speaking time of <Speak> per character"
    )
    parser.add_argument("--hangup-after", type=float, default=None, help="callee hangs up after N seconds")
    parser.add_argument("--signature", default="v3", choices=["v3", "v2", "both"], help="callback signature scheme")
    _chaos.add_arguments(parser)
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
    from voicecall.testing.twilio import answers_per_call

    return answers_per_call(said, asked=lambda call: bool(call.inputs) and call.inputs[-1].turn_token is not None, key=lambda call: call.call_uuid)


async def _serve(reactor: Any, args: argparse.Namespace) -> None:
    from twisted.internet.defer import Deferred
    from twisted.logger import globalLogBeginner, textFileLogObserver
    from twisted.web.client import Agent, HTTPConnectionPool
    from twisted.web.server import Site
    from treq.client import HTTPClient

    http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor)))
    utterances = scripted_utterances(args)
    scenario = Scenario(
        outcome=args.outcome,
        ring_after=0.5,
        answer_after=args.answer_after,
        utterances=utterances,
        hangup_after=args.hangup_after,
        speak_seconds_per_char=args.speak_seconds_per_char,
    )
    fake = FakePlivo(reactor, args.auth_id, args.auth_token, http, scenario=scenario, chaos=_chaos.from_arguments(args), signature=args.signature)
    site = Site(fake.resource())
    site.displayTracebacks = False
    from voicecall.testing.twilio import listen_or_exit

    port = await listen_or_exit(reactor, args, site, "Plivo")
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    address = port.getHost()
    print(f"plivo.baseUrl: http://{address.host}:{address.port}", flush=True)
    await Deferred()  # serve until interrupted


def main(argv: Sequence[str] | None = None) -> None:
    """Run the fake Plivo until interrupted (Ctrl-C)."""
    from twisted.internet.task import react

    args = _parse(sys.argv[1:] if argv is None else argv)
    react(lambda reactor: _serve(reactor, args))


if __name__ == "__main__":
    main()
