"""
One daemon per store (issue 12 item 8): an open store holds an exclusive lock on
``<store>/voicecall.lock``; a second store (a second daemon) on the same directory refuses to
open with a one-line error naming the holder's pid and changes nothing there, while the CLI's
read-only store access (``voicecall status`` with the daemon unreachable) keeps working.
"""
from __future__ import annotations

import hashlib
import os
import re
import sqlite3

from twisted.trial.unittest import SynchronousTestCase, TestCase

from voicecall.domain.store import LOCK_FILENAME, CallStore, StoreLockedError, open_readonly
from voicecall.infra.dbwriter import SynchronousWriter

from tests.harness import daemon_argv, make_workdir, rpc, run_cli, spawn, spawn_daemon


def snapshot(directory: str) -> dict[str, str]:
    """Every file in `directory` with a hash of its bytes."""
    result = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                result[name] = hashlib.sha256(f.read()).hexdigest()
        else:
            result[name] = "dir" if os.path.isdir(path) else "other"
    return result


class StoreLockTests(SynchronousTestCase):
    """CallStore.open takes the store's lock; a second open on the same directory fails cleanly."""

    def store(self, directory: str) -> CallStore:
        writer = SynchronousWriter()
        self.successResultOf(writer.start())
        return CallStore(directory, writer)

    def test_second_store_refused(self):
        """A second store on a held directory fails with StoreLockedError naming our pid, and changes nothing."""
        directory = self.mktemp()
        first = self.store(directory)
        self.successResultOf(first.open())
        self.addCleanup(lambda: self.successResultOf(first.close()))
        before = snapshot(directory)
        second = self.store(directory)
        error = self.failureResultOf(second.open(), StoreLockedError).value
        self.assertEqual(error.pid, os.getpid())
        self.assertEqual(
            str(error), f"the store {os.path.abspath(directory)} is in use by another voicecall daemon (pid {os.getpid()})"
        )
        self.assertEqual(snapshot(directory), before)
        self.successResultOf(second.close())
        self.assertEqual(snapshot(directory), before)

    def test_released_on_close(self):
        """Once the holder closes, another store opens."""
        directory = self.mktemp()
        first = self.store(directory)
        self.successResultOf(first.open())
        self.successResultOf(first.close())
        second = self.store(directory)
        self.successResultOf(second.open())
        self.successResultOf(second.close())

    def test_lock_file_names_holder(self):
        """The lock file is private and holds the holder's pid."""
        directory = self.mktemp()
        first = self.store(directory)
        self.successResultOf(first.open())
        self.addCleanup(lambda: self.successResultOf(first.close()))
        path = os.path.join(directory, LOCK_FILENAME)
        with open(path) as f:
            self.assertEqual(f.read(), f"{os.getpid()}\n")
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)

    def test_readonly_access_while_held(self):
        """open_readonly (the CLI while the daemon is down) works while a store holds the lock."""
        directory = self.mktemp()
        first = self.store(directory)
        self.successResultOf(first.open())
        self.addCleanup(lambda: self.successResultOf(first.close()))
        with open_readonly(directory) as store:
            self.assertEqual(store.load_active(), [])


def calls_table(directory: str) -> list[tuple]:
    """Every row of the calls table, read-only."""
    uri = "file:" + os.path.join(directory, "voicecall.sqlite3") + "?mode=ro"
    conn = sqlite3.connect(uri, uri=True)
    try:
        return conn.execute("SELECT * FROM calls ORDER BY call_id").fetchall()
    finally:
        conn.close()


class SecondDaemonTests(TestCase):
    """Two real daemons (twistd) on one store: the second exits 1 with one line and touches nothing."""

    timeout = 90

    async def test_second_daemon_refuses_to_start(self):
        """
        A second daemon on the store of a running one (its own RPC socket and port) exits 1 with
        `... is in use by another voicecall daemon (pid N)`, no traceback; the first daemon's live
        call stays live, in memory and on disk, and `voicecall status` still reads the store.
        """
        workdir = make_workdir(self, {"outbound": {"notifyHangupDelaySec": 1}})
        first = await spawn_daemon(self, workdir)
        call_id = (await rpc(first.rpc_path, "voicecall.initiate", {"to": "+15550001234", "message": "Hi", "mode": "conversation"}))["callId"]
        rows = calls_table(workdir.path)
        names = sorted(os.listdir(workdir.path))

        argv = daemon_argv(workdir)
        argv[argv.index("unix:" + workdir.rpc_path)] = "unix:" + os.path.join(workdir.path, "second.sock")
        second = spawn(self, argv, cwd=workdir.path)
        await second.until(lambda c: not c.running or b"voicecall ready" in c.out, 30, "exit or start")
        self.assertFalse(second.running, "the second daemon started: " + second.describe())
        self.assertEqual(second.exit_code, 1, second.describe())
        pid = first.process.transport.pid
        line = f"the store {workdir.path} is in use by another voicecall daemon (pid {pid})"
        errors = [text for text in second.stderr.splitlines() if text.strip()]
        self.assertEqual(len(errors), 1, second.describe())
        self.assertIn(line, errors[0])
        self.assertNotIn("Traceback", second.stdout + second.stderr)
        # Logging to stdout (twistd -n), the failure is said once, on stderr only.
        self.assertEqual(len(re.findall("in use by another voicecall daemon", second.stdout)), 0, second.stdout)

        self.assertEqual(sorted(os.listdir(workdir.path)), names)
        self.assertEqual(calls_table(workdir.path), rows)
        record = (await rpc(first.rpc_path, "voicecall.status", {"callId": call_id}))["call"]
        self.assertNotIn("endReason", record)
        self.assertNotIn(record["state"], ("completed", "failed", "hangup-bot", "error"))

        # The CLI, finding no daemon on its socket, reads the store the running daemon holds.
        status = await run_cli(self, workdir, "--socket", os.path.join(workdir.path, "nobody.sock"), "status", "--call-id", call_id)
        self.assertEqual(status.code, 0, status.err)
        self.assertIn(call_id, status.out)
        self.assertIn("read the store", status.err)
