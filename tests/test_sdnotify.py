"""The systemd notify protocol: READY=1 once listening, STOPPING=1 on stop."""
from __future__ import annotations

import os
import socket
import tempfile

from twisted.trial.unittest import SynchronousTestCase, TestCase

from voicecall.infra import sdnotify
from tests.harness import make_workdir, spawn_daemon


def datagram_socket(testcase) -> tuple[socket.socket, str]:
    directory = tempfile.mkdtemp(prefix="vc-notify-", dir="/tmp")
    path = os.path.join(directory, "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    testcase.addCleanup(lambda: (sock.close(), os.unlink(path), os.rmdir(directory)))
    return sock, path


class NotifyTests(SynchronousTestCase):
    def test_sends_datagram(self):
        """notify sends the state as one datagram to $NOTIFY_SOCKET."""
        sock, path = datagram_socket(self)
        self.assertTrue(sdnotify.notify("READY=1", {"NOTIFY_SOCKET": path}))
        self.assertEqual(sock.recv(1024), b"READY=1")

    def test_not_under_systemd(self):
        """Without $NOTIFY_SOCKET nothing is sent."""
        self.assertFalse(sdnotify.notify("READY=1", {}))

    def test_unreachable_socket(self):
        """A socket path nobody listens on is logged, not raised."""
        self.assertFalse(sdnotify.notify("READY=1", {"NOTIFY_SOCKET": "/nonexistent/notify.sock"}))


class DaemonNotifyTests(TestCase):
    timeout = 40

    async def test_ready_and_stopping(self):
        """The real daemon says READY=1 once it listens and STOPPING=1 when it is stopped."""
        sock, path = datagram_socket(self)
        sock.setblocking(False)
        workdir = make_workdir(self)
        daemon = await spawn_daemon(self, workdir, env={"NOTIFY_SOCKET": path})
        ready = sock.recv(1024).decode()
        self.assertTrue(ready.startswith("READY=1\n"), ready)
        self.assertIn("STATUS=listening on http://127.0.0.1:", ready)
        await daemon.stop()
        self.assertEqual(sock.recv(1024), b"STOPPING=1")
