# -*- test-case-name: tests.test_fake_twilio -*-
"""
A faithful fake Twilio on loopback, for tests, benchmarks and trying the daemon without an
account: the REST API (twilio_api), the carrier that drives each call by following its TwiML
and posting signed webhooks (twilio_driver, twilio_carrier), and a standalone entry point:

    python -m voicecall.testing.twilio --port 8080 --account-sid AC... --auth-token ...

which prints the base URL to put into `twilio.baseUrl`. `--chaos` (or the finer `--chaos-*` flags)
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
from voicecall.testing.twilio_api import FakeTwilio, RecordedRequest, error_body
from voicecall.testing.twilio_carrier import (
    Carrier,
    GatherRecord,
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
    parser = argparse.ArgumentParser(
        prog="python -m voicecall.testing.twilio",
        description="Run a fake Twilio REST API and carrier on this machine.",
    )
    parser.add_argument("--port", type=int, default=8080, help="TCP port (0: any free port)")
    parser.add_argument("--interface", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--account-sid", default=os.environ.get("TWILIO_ACCOUNT_SID"), help="AC... account sid"
    )
    parser.add_argument(
        "--auth-token",
        default=os.environ.get("TWILIO_AUTH_TOKEN"),
        help="auth token (default: $TWILIO_AUTH_TOKEN)",
    )
    parser.add_argument(
        "--answer-after", type=float, default=1.0, help="seconds from ringing to answer"
    )
    parser.add_argument(
        "--outcome", default="answer", choices=["answer", "no-answer", "busy", "failed"]
    )
    parser.add_argument(
        "--say", dest="utterances", action="append", default=[],
        help='what the callee says at each Gather, in order (repeatable; "" is silence)',
    )
    parser.add_argument(
        "--answer-questions-only", action="store_true",
        help="stay silent except at the Gathers of a `continue` (those carrying a turn token)",
    )
    parser.add_argument(
        "--say-seconds-per-char", type=float, default=0.06,
        help="simulated speaking time of <Say> per character",
    )
    parser.add_argument(
        "--hangup-after", type=float, default=None, help="callee hangs up after N seconds"
    )
    _chaos.add_arguments(parser)
    args = parser.parse_args(argv)
    if not args.account_sid or not args.auth_token:
        parser.error("--account-sid and --auth-token (or $TWILIO_ACCOUNT_SID/$TWILIO_AUTH_TOKEN) are required")
    return args


#: How many calls' --say positions the standalone fakes remember (the oldest are forgotten).
MAX_SCRIPTED_CALLS = 1000


def answers_per_call(said: Sequence[Any], asked: Any, key: Any) -> Any:
    """
    `--answer-questions-only`: the callee answers each question (`asked(call)`) with the next
    `--say` phrase, starting again at the first for every call (`key(call)` names it), and is
    silent otherwise.
    """
    used: dict[str, int] = {}

    def utterances(call: Any) -> Any:
        if not asked(call):
            return None
        name = key(call)
        index = used.pop(name, 0)
        used[name] = index + 1
        while len(used) > MAX_SCRIPTED_CALLS:
            del used[next(iter(used))]
        return said[index] if index < len(said) else None

    return utterances


def scripted_utterances(args: argparse.Namespace) -> Any:
    """What the callee says: the --say phrases at each turn of every call, or (with
    --answer-questions-only) at each question only; every call starts again at the first."""
    said = [u or None for u in args.utterances]
    if not args.answer_questions_only:
        return said  # each call keeps its own position in the list
    return answers_per_call(said, asked=lambda call: "turnToken=" in (call.gathers[-1].action_url or "") if call.gathers else False, key=lambda call: call.sid)


async def listen_or_exit(reactor: Any, args: argparse.Namespace, site: Any, carrier: str) -> Any:
    """Listen on --interface:--port, or exit 1 with one line saying the port is taken (no traceback)."""
    from twisted.internet.endpoints import TCP4ServerEndpoint
    from twisted.internet.error import CannotListenError

    try:
        return await TCP4ServerEndpoint(reactor, args.port, interface=args.interface).listen(site)
    except CannotListenError as e:
        why = getattr(e.socketError, "strerror", None) or str(e.socketError)
        in_use = "is in use" if "in use" in why.lower() else f"cannot be listened on ({why})"
        print(
            f"fake {carrier}: {args.interface}:{args.port} {in_use}; another fake already running? "
            "stop it, or pick another --port (and the baseUrl in the daemon's config with it)",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(1) from None


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
        say_seconds_per_char=args.say_seconds_per_char,
    )
    fake = FakeTwilio(reactor, args.account_sid, args.auth_token, http, scenario=scenario, chaos=_chaos.from_arguments(args))
    site = Site(fake.resource())
    site.displayTracebacks = False
    port = await listen_or_exit(reactor, args, site, "Twilio")
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    address = port.getHost()
    print(f"twilio.baseUrl: http://{address.host}:{address.port}", flush=True)
    await Deferred()  # serve until interrupted


def main(argv: Sequence[str] | None = None) -> None:
    """Run the fake Twilio until interrupted (Ctrl-C)."""
    from twisted.internet.task import react

    args = _parse(sys.argv[1:] if argv is None else argv)
    react(lambda reactor: _serve(reactor, args))


if __name__ == "__main__":
    main()
