"""The systemd units: they verify, and the RPC socket works when systemd hands it over."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile

from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from tests.harness import TWISTD, make_workdir, run_cli, spawn
from voicecall.tap import DISABLED_EXIT_STATUS

UNITS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "systemd")


def unit(name: str) -> str:
    with open(os.path.join(UNITS, name)) as f:
        return f.read()


class UnitFileTests(SynchronousTestCase):
    def test_service_shape(self):
        """The service runs twistd in the foreground without a pid file, as Type=notify, sandboxed."""
        text = unit("voicecall.service")
        for line in (
            "Type=notify",
            "User=voicecall",
            "RuntimeDirectory=voicecall",
            "StateDirectory=voicecall",
            "Restart=on-failure",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        ):
            self.assertIn(line + "\n", text)
        self.assertRegex(text, r"ExecStart=\S+/twistd --nodaemon --pidfile= voicecall ")

    def test_webhook_port_held_by_systemd(self):
        """
        The webhook port is voicecall-web.socket's: the service takes it by name and requires
        it, so the port stays open (and queues carriers' requests) while voicecall restarts.
        """
        service, socket_unit = unit("voicecall.service"), unit("voicecall-web.socket")
        self.assertIn("--webhook systemd:domain=INET:name=web", service)
        for line in ("Sockets=voicecall-web.socket", "Requires=voicecall-web.socket"):
            self.assertIn(line + "\n", service)
        for line in ("ListenStream=127.0.0.1:3334", "FileDescriptorName=web", "Service=voicecall.service"):
            self.assertIn(line + "\n", socket_unit)
        self.assertIn("FileDescriptorName=rpc\n", unit("voicecall.socket"))

    def test_twisted_default_reactor(self):
        """The service, `make run`, `make test` and `make soak` name no reactor: twistd and trial use Twisted's default."""
        with open(os.path.join(os.path.dirname(UNITS), "Makefile")) as f:
            makefile = f.read()
        for name, text in (("systemd/voicecall.service", unit("voicecall.service")), ("Makefile", makefile)):
            self.assertNotIn("--reactor", text, f"{name} chooses a reactor")

    def test_disabled_config_not_restarted(self):
        """The exit status of `enabled: false` is one Restart=on-failure does not restart."""
        self.assertIn(f"RestartPreventExitStatus={DISABLED_EXIT_STATUS}\n", unit("voicecall.service"))

    def test_systemd_analyze_verify(self):
        """systemd-analyze verify accepts the three units (with ExecStart pointed at an existing twistd)."""
        tool = shutil.which("systemd-analyze")
        if tool is None:
            raise SkipTest("systemd-analyze is not installed here")
        directory = tempfile.mkdtemp(prefix="vc-units-")
        self.addCleanup(shutil.rmtree, directory)
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        with open(os.path.join(directory, "voicecall.service"), "w") as f:
            f.write(unit("voicecall.service").replace("/opt/voicecall/venv/bin/twistd", twistd))
        for name in ("voicecall.socket", "voicecall-web.socket"):
            shutil.copy(os.path.join(UNITS, name), directory)
        result = subprocess.run(
            [tool, "verify", "voicecall.service", "voicecall.socket", "voicecall-web.socket"],
            cwd=directory, capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stderr)


class SocketActivationTests(TestCase):
    timeout = 40

    async def test_rpc_socket_from_systemd(self):
        """With --rpc systemd:domain=UNIX:index=0 the daemon serves RPC on the socket systemd passed.

        systemd 227+ always names passed sockets (LISTEN_FDNAMES), which Twisted requires;
        systemd-socket-activate does so only when given --fdname.
        """
        tool = shutil.which("systemd-socket-activate")
        if tool is None:
            raise SkipTest("systemd-socket-activate is not installed here")
        workdir = make_workdir(self)
        argv = [
            tool, "-l", workdir.rpc_path, "--fdname=rpc", *TWISTD, "--nodaemon", "--pidfile=", "voicecall",
            "--config", workdir.config_path, "--webhook", "tcp:0:interface=127.0.0.1",
            "--rpc", "systemd:domain=UNIX:index=0",
        ]
        activator = spawn(self, argv, cwd=workdir.path)
        await activator.until(lambda p: os.path.exists(workdir.rpc_path), 10, "the activation socket")
        result = await run_cli(self, workdir, "status")
        self.assertEqual(result.code, 0, result.err + activator.describe())
        self.assertEqual(result.json(), {"calls": []})
        await activator.wait_for_output(re.compile(rb"voicecall ready"), 10)
