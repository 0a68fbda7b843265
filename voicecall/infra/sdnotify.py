# -*- test-case-name: tests.test_sdnotify -*-
"""
The systemd notify protocol (`Type=notify`): a datagram to `$NOTIFY_SOCKET` saying READY=1 once
the daemon listens, STOPPING=1 when it stops. twistd has no such support of its own.

One non-blocking `sendto` on a UNIX datagram socket: it cannot stall the reactor.
"""
from __future__ import annotations

import os
import socket
from typing import Mapping

from twisted.logger import Logger

_log = Logger()


def notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send `state` (e.g. "READY=1\\nSTATUS=listening") to systemd; False when not under systemd."""
    path = (env if env is not None else os.environ).get("NOTIFY_SOCKET")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.sendto(state.encode("utf-8"), address)
    except OSError as e:
        _log.warn("could not notify systemd ({error})", error=str(e))
        return False
    return True
