# -*- test-case-name: tests.test_chaos_fakes -*-
"""
What the standalone fake carriers (`python -m voicecall.testing.twilio|telnyx|plivo`) share: the
command-line flags for where to listen, the person on the line and the carrier's worst day
(`--chaos*`), the callee who answers questions only, and serving the fake on loopback until
interrupted. Each carrier module keeps its credentials flags and builds its fake.

It imports nothing of the daemon.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Sequence

from voicecall.testing import chaos as _chaos

#: How many calls' --say positions the standalone fakes remember (the oldest are forgotten).
MAX_SCRIPTED_CALLS = 1000


def parser(carrier: str, description: str, port: int) -> argparse.ArgumentParser:
    """A parser for `python -m voicecall.testing.<carrier>` with --port and --interface."""
    parser = argparse.ArgumentParser(prog=f"python -m voicecall.testing.{carrier}", description=description)
    parser.add_argument("--port", type=int, default=port, help="TCP port (0: any free port)")
    parser.add_argument("--interface", default="127.0.0.1", help="address to listen on")
    return parser


def add_callee_arguments(
    parser: argparse.ArgumentParser,
    *,
    outcomes: Sequence[str],
    answer_after: str,
    turn: str,
    questions_only: str,
    seconds_per_char: str,
    speech: str,
    hangup_after: str,
) -> None:
    """
    The person on the line (--outcome, --answer-after, --say, --answer-questions-only, the
    speaking time per character, --hangup-after), in the carrier's words, then the --chaos* flags.
    """
    parser.add_argument("--answer-after", type=float, default=1.0, help=answer_after)
    parser.add_argument("--outcome", default="answer", choices=list(outcomes))
    parser.add_argument(
        "--say", dest="utterances", action="append", default=[],
        help=f'what the callee says at each {turn}, in order (repeatable; "" is silence)',
    )
    parser.add_argument("--answer-questions-only", action="store_true", help=questions_only)
    parser.add_argument(seconds_per_char, type=float, default=0.06, help=f"simulated speaking time{speech} per character")
    parser.add_argument("--hangup-after", type=float, default=None, help=hangup_after)
    _chaos.add_arguments(parser)


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


def _no_settings(fake: Any) -> Sequence[str]:
    return ()


async def serve(
    reactor: Any,
    args: argparse.Namespace,
    carrier: str,
    build: Callable[[Any, Any], Any],
    settings: Callable[[Any], Sequence[str]] = _no_settings,
) -> None:
    """
    Serve the fake `build(reactor, http)` makes on --interface:--port until interrupted, after
    printing `<carrier>.baseUrl: ...` and any further config lines `settings(fake)` gives.
    """
    from twisted.internet.defer import Deferred
    from twisted.logger import globalLogBeginner, textFileLogObserver
    from twisted.web.client import Agent, HTTPConnectionPool
    from twisted.web.server import Site
    from treq.client import HTTPClient

    http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor)))
    fake = build(reactor, http)
    site = Site(fake.resource())
    site.displayTracebacks = False
    port = await listen_or_exit(reactor, args, site, carrier)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    address = port.getHost()
    print(f"{carrier.lower()}.baseUrl: http://{address.host}:{address.port}", flush=True)
    for line in settings(fake):
        print(line, flush=True)
    await Deferred()  # serve until interrupted


def run(
    args: argparse.Namespace,
    carrier: str,
    build: Callable[[Any, Any], Any],
    settings: Callable[[Any], Sequence[str]] = _no_settings,
) -> None:
    """Run `serve` on the global reactor until interrupted (Ctrl-C)."""
    from twisted.internet.task import react

    react(lambda reactor: serve(reactor, args, carrier, build, settings))
