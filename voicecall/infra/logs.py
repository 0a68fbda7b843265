# -*- test-case-name: tests.test_tap,tests.test_wiring -*-
"""
The daemon's log observer set-up under twistd: the stdout observer (its level from
``$VOICECALL_LOG_LEVEL``) and the predicate that drops Twisted's port and start-up chatter there
(kept at debug). The HTTP pool's connection chatter is never logged at all (infra/httpclient.py).
Knows nothing of calls.
"""
from __future__ import annotations

import re
import sys
from typing import Any

from twisted.logger import (
    FilteringLogObserver,
    InvalidLogLevelError,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    textFileLogObserver,
)


def stdout_log_observer(twistd_options: Any, env: Any) -> Any:
    """
    The observer twistd would log to stdout with (``-n`` without ``--logfile``: the journal under
    systemd, the terminal for ``make run``), keeping only events at ``$VOICECALL_LOG_LEVEL``
    (default ``info``) and above: twistd has no level option and would print debug events. Unless
    the level is debug it also drops Twisted's chatter (`_drop_chatter`), and a start failure is not logged
    there: it is the one line on stderr.
    None (twistd's own choice stands) for a log file, syslog, ``--logger``, or outside twistd.
    """
    if not twistd_options or twistd_options.get("logger") or twistd_options.get("syslog"):
        return None
    logfile = twistd_options.get("logfile")
    if not (logfile == "-" or (twistd_options.get("nodaemon") and not logfile)):
        return None
    level = _level(env.get("VOICECALL_LOG_LEVEL", "info"))
    predicates = [LogLevelFilterPredicate(level)]
    if level > LogLevel.debug:
        predicates.append(_drop_chatter)
    return FilteringLogObserver(textFileLogObserver(sys.stdout), predicates)


def _level(name: str) -> LogLevel:
    """Twisted's level names, any case, and Python's `warning`; anything else is said on stderr
    (a typo must not silently change what the journal keeps) and means info."""
    wanted = name.strip().lower()
    try:
        return LogLevel.levelWithName("warn" if wanted == "warning" else wanted)
    except InvalidLogLevelError:
        names = ", ".join(level.name for level in LogLevel.iterconstants())
        print(f"voicecall: VOICECALL_LOG_LEVEL={name} is not a level ({names}); logging at info", file=sys.stderr)
        return LogLevel.info


#: What Twisted's ports say, unconditionally and at info, when they open and close
#: ("ScreenedSite starting on 3334", "(TCP Port 3334 Closed)"): debug chatter here, since the
#: ready line names what listens.
_PORT_CHATTER = re.compile(r"\S+ starting on .+|\((?:TCP |UNIX |UDP )?Port \S.* Closed\)")

#: twistd's own first two lines (its version and the reactor class): debug chatter too, so a
#: daemon that cannot start prints its one line on stderr and nothing else.
_TWISTD_START = ("twistd {version} ({exe} {pyVersion}) starting up.", "reactor class: {reactor}.")



def _drop_chatter(event: dict) -> PredicateResult:
    if event.get("log_level", LogLevel.info) > LogLevel.info:
        return PredicateResult.maybe
    if event.get("log_format") in _TWISTD_START and "AppLogger" in event.get("log_namespace", ""):
        return PredicateResult.no
    message = event.get("message")
    if message and len(message) == 1 and isinstance(message[0], str) and _PORT_CHATTER.fullmatch(message[0]):
        return PredicateResult.no
    return PredicateResult.maybe
