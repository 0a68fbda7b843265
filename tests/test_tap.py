"""
Tests for voicecall.tap and twisted/plugins/voicecall_plugin.py: `twistd voicecall` option parsing
(the whole parsed dict, STYLE.md §13), refusal of bad or disabled configs, private UNIX endpoints,
the service tree built on a MemoryReactorClock, and the plugin's discoverability.
"""
from __future__ import annotations

import json
import os

from twisted.application.service import IServiceMaker
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from voicecall import tap
from voicecall.config import DISABLED_MESSAGE, ServeConfig, VoiceCallConfig

P = "plugins.entries.voice-call.config"


class TapTestsBase(SynchronousTestCase):
    def setUp(self):
        self.home = os.path.abspath(self.mktemp())
        os.makedirs(self.home)
        self.env = {"HOME": self.home}
        self.patch(os, "environ", self.env)

    def write_config(self, data, name: str = "voicecall.json5") -> str:
        path = os.path.join(self.home, name)
        with open(path, "w") as f:
            f.write(data if isinstance(data, str) else json.dumps(data))
        return path

    def parse(self, *argv: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(list(argv))
        return options

    def refused(self, *argv: str) -> str:
        return str(self.assertRaises(usage.UsageError, self.parse, *argv))


class OptionsTests(TapTestsBase):
    """Options turns the command line and config file into the values makeService needs."""

    def test_whole_dict(self):
        """With --config only, the endpoints come from the config and the store, and nothing else is set."""
        store = os.path.join(self.home, "state")
        path = self.write_config(
            "// JSON5 is fine\n"
            f'{{provider: "mock", store: "{store}", toNumber: "+15550001234",'
            ' serve: {port: 4000, bind: "127.0.0.1"},}'
        )
        options = self.parse("--config", path)
        self.assertEqual(
            dict(options),
            {
                "config": path,
                "config_path": path,
                "webhook": "tcp:4000:interface=127.0.0.1",
                "rpc": f"unix:{store}/voicecall.sock:mode=600:lockfile=1",
                "voicecall": VoiceCallConfig(
                    provider="mock",
                    store=store,
                    to_number="+15550001234",
                    serve=ServeConfig(port=4000, bind="127.0.0.1"),
                ),
            },
        )

    def test_config_from_environment(self):
        """$VOICECALL_CONFIG names the config file when --config is absent."""
        path = self.write_config({"serve": {"port": 4100}}, "elsewhere.json")
        self.env["VOICECALL_CONFIG"] = path
        options = self.parse()
        self.assertEqual((options["config_path"], options["webhook"]), (path, "tcp:4100:interface=127.0.0.1"))

    def test_socket_from_environment(self):
        """$VOICECALL_SOCKET is the default RPC socket, made private."""
        self.env["VOICECALL_SOCKET"] = "/run/voicecall/rpc.sock"
        options = self.parse("--config", self.write_config({}))
        self.assertEqual(options["rpc"], "unix:/run/voicecall/rpc.sock:mode=600:lockfile=1")

    def test_explicit_endpoints(self):
        """--webhook is used as given; a --rpc UNIX endpoint without mode or lockfile gets mode=600 and lockfile."""
        options = self.parse(
            "--config", self.write_config({}), "--webhook", "tcp:0:interface=127.0.0.1", "--rpc", "unix:/tmp/vc.sock"
        )
        self.assertEqual(
            (options["webhook"], options["rpc"]), ("tcp:0:interface=127.0.0.1", "unix:/tmp/vc.sock:mode=600:lockfile=1")
        )

    def test_explicit_mode_and_lockfile_kept(self):
        """An explicit mode= or lockfile= on the UNIX endpoint is kept; only the missing one is added."""
        path = self.write_config({})
        self.assertEqual(self.parse("--config", path, "--rpc", "unix:/tmp/vc.sock:mode=660")["rpc"], "unix:/tmp/vc.sock:mode=660:lockfile=1")
        self.assertEqual(self.parse("--config", path, "--rpc", "unix:/tmp/vc.sock:lockfile=0")["rpc"], "unix:/tmp/vc.sock:lockfile=0:mode=600")
        self.assertEqual(
            self.parse("--config", path, "--rpc", "unix:/tmp/vc.sock:lockfile=0:mode=640")["rpc"],
            "unix:/tmp/vc.sock:lockfile=0:mode=640",
        )

    def test_non_unix_rpc_untouched(self):
        """A --rpc endpoint that is not UNIX is used unchanged."""
        self.assertEqual(self.parse("--config", self.write_config({}), "--rpc", "tcp:9000:interface=127.0.0.1")["rpc"], "tcp:9000:interface=127.0.0.1")

    def test_unix_endpoint_helper(self):
        """unix_endpoint privatises `unix:` strings (address= form too) and leaves others alone."""
        self.assertEqual(tap.unix_endpoint("unix:address=/tmp/a.sock"), "unix:address=/tmp/a.sock:mode=600:lockfile=1")
        self.assertEqual(tap.unix_endpoint("systemd:domain=UNIX:index=0"), "systemd:domain=UNIX:index=0")

    def test_malformed_config_lists_every_problem(self):
        """A config with several bad values is refused with one UsageError naming each of them."""
        path = self.write_config(
            {"provider": "carrier-pigeon", "serve": {"port": "x"}, "maxConcurrentCalls": 0, "fromNumber": "555"}
        )
        message = self.refused("--config", path)
        lines = message.splitlines()
        self.assertEqual(lines[0], "Invalid voice-call config:")
        self.assertEqual(len(lines), 5, message)
        for key in (f"{P}.provider:", f"{P}.serve.port:", f"{P}.maxConcurrentCalls:", f"{P}.fromNumber:"):
            self.assertEqual(len([line for line in lines if line.strip().startswith(key)]), 1, (key, message))
        self.assertIn("Expected E.164 format, e.g. +15550001234", message)

    def test_unparseable_config(self):
        """A file that is not JSON or JSON5 is refused with a UsageError naming the file."""
        path = self.write_config("{provider: ")
        message = self.refused("--config", path)
        self.assertIn(path, message)
        self.assertIn("not valid JSON or JSON5", message)

    def test_missing_config(self):
        """A --config that does not exist is refused with a UsageError naming the file."""
        path = os.path.join(self.home, "nope.json5")
        message = self.refused("--config", path)
        self.assertIn(path, message)
        self.assertIn("cannot read config file", message)

    def test_disabled(self):
        """`enabled: false` is refused with the SPEC's disabled message."""
        self.assertEqual(self.refused("--config", self.write_config({"enabled": False})), DISABLED_MESSAGE)
        self.assertEqual(DISABLED_MESSAGE, "Voice call disabled. Enable the plugin entry in config.")

    def test_disabled_plugin_entry(self):
        """A whole OpenClaw config whose voice-call entry is disabled is refused the same way."""
        path = self.write_config({"plugins": {"entries": {"voice-call": {"enabled": False, "config": {}}}}})
        self.assertEqual(self.refused("--config", path), DISABLED_MESSAGE)


class MakeServiceTests(TapTestsBase):
    """makeService wires a named service tree without touching the network."""

    def setUp(self):
        super().setUp()
        store = os.path.join(self.home, "state")
        self.options = self.parse(
            "--config",
            self.write_config({"store": store, "staleCallReaperSeconds": 120}),
            "--webhook",
            "tcp:9999:interface=127.0.0.1",
            "--rpc",
            f"unix:{store}/rpc.sock",
        )
        self.reactor = MemoryReactorClock()
        self.service = tap.makeService(self.options, reactor=self.reactor)

    def test_named_children(self):
        """The daemon is `voicecall` with the children `reaper`, `rpc` and `webhook`."""
        self.assertEqual(self.service.name, "voicecall")
        self.assertEqual(sorted(s.name for s in self.service), ["reaper", "rpc", "webhook"])

    def test_listeners_use_the_option_endpoints(self):
        """The webhook and RPC listeners are built from the parsed endpoint strings."""
        webhook = self.service.getServiceNamed("webhook")
        rpc = self.service.getServiceNamed("rpc")
        self.assertEqual(webhook.description, "tcp:9999:interface=127.0.0.1")
        self.assertEqual(rpc.description, f"unix:{self.home}/state/rpc.sock:mode=600:lockfile=1")

    def test_nothing_listens_before_start(self):
        """Building the service binds nothing and schedules nothing."""
        self.assertEqual((self.reactor.tcpServers, self.reactor.unixServers), ([], []))
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class PluginTests(SynchronousTestCase):
    """The twistd plugin is discoverable and points at voicecall.tap."""

    def test_plugin_discovered(self):
        """`voicecall` is among the IServiceMaker plugins twistd finds, backed by voicecall.tap."""
        makers = {p.tapname: p for p in getPlugins(IServiceMaker)}
        self.assertIn("voicecall", makers)
        maker = makers["voicecall"]
        self.assertIs(maker.options, tap.Options)
        self.assertEqual(maker.makeService, tap.makeService)
