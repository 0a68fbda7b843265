"""
Constructor wiring (DESIGN.md, rules of the house): tap.py builds every component with its
collaborators and assigns no attribute on another object afterwards; config becomes keyword
values there, so no component holds a config object; and the HTTP pool's connection chatter is
dropped by the stdout log filter, through public log-event fields rather than a private factory.
"""
from __future__ import annotations

import ast
import inspect
import json
import os

import attrs
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import PredicateResult, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data

from voicecall import tap

STREAMING_TWILIO = {
    "provider": "twilio",
    "fromNumber": "+15550000000",
    "twilio": {"accountSid": "AC" + "0" * 32, "authToken": "token"},
    "publicUrl": "https://voice.example.com/voice/webhook",
    "streaming": {"enabled": True, "openaiApiKey": "sk-stt"},
    "tts": {"provider": "openai", "openai": {"apiKey": "sk-tts"}},
    "tunnel": {"provider": "ngrok"},
    "metrics": {"enabled": True},
}


def _attributes(obj) -> list:
    if attrs.has(type(obj)):
        return [getattr(obj, f.name, None) for f in attrs.fields(type(obj))]
    return list(getattr(obj, "__dict__", {}).values())


reached: set[str] = set()


def config_holders(root) -> list[str]:
    """The voicecall objects reachable from `root` through attributes that hold a config object."""
    found, seen, todo = [], set(), [root]
    reached.clear()
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, (list, tuple, set, frozenset)):
            todo.extend(obj)
            continue
        if isinstance(obj, dict):
            todo.extend(obj.values())
            continue
        if inspect.ismethod(obj):  # a component handed another's bound method (TTS's synthesize)
            todo.append(obj.__self__)
            continue
        module = type(obj).__module__
        if not module.startswith("voicecall.") and not isinstance(obj, Site):
            continue
        reached.add(type(obj).__name__)
        for value in _attributes(obj):
            if type(value).__module__.startswith("voicecall.config"):
                found.append(f"{type(obj).__name__} holds a {type(value).__name__}")
            else:
                todo.append(value)
    return found


class CompositionRootTests(SynchronousTestCase):
    def make_service(self, config: dict) -> tap.VoicecallService:
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "voicecall.json")
        with open(path, "w") as f:
            json.dump({**config, "store": directory}, f)
        options = tap.Options()
        options.parseOptions(["--config", path, "--webhook", "tcp:0", "--rpc", f"unix:{directory}/rpc.sock"])
        return tap.makeService(options, MemoryReactorClock())

    def test_no_component_holds_a_config_object(self):
        """Config becomes keyword values in tap.py: the service, TTS and the rest hold values, never a config section."""
        service = self.make_service(STREAMING_TWILIO)
        self.assertEqual(config_holders(service), [])
        for component in ("CallManager", "StreamBridge", "TelephonyTts", "TwilioProvider", "WebhookResource", "MediaStreamServer"):
            self.assertIn(component, reached)

    def test_tap_assigns_no_attribute_on_another_object(self):
        """Cycles close through constructor arguments, not by setting an attribute on a component after building it."""
        tree = ast.parse(inspect.getsource(tap))
        assigned = []
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                targets = [node.target]
            for target in targets:
                for part in ast.walk(target):
                    if isinstance(part, ast.Attribute) and not (isinstance(part.value, ast.Name) and part.value.id == "self"):
                        assigned.append(f"line {part.lineno}: {ast.unparse(part)}")
        self.assertEqual(assigned, [])


class HttpPoolChatterTests(TestCase):
    async def test_connection_chatter_is_dropped_by_the_stdout_filter(self):
        """The pool's connections say "Starting/Stopping factory" (Twisted's own noisy default); the stdout filter drops exactly those."""
        root = Resource()
        root.putChild(b"x", Data(b"ok", "text/plain"))
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(root))
        self.addCleanup(port.stopListening)
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        http, pool = tap.build_http_client(reactor)
        response = await http.get(f"http://127.0.0.1:{port.getHost().port}/x")
        self.assertEqual(await response.content(), b"ok")
        await pool.closeCachedConnections()
        chatter = [e for e in events if e.get("log_namespace") == tap._HTTP_FACTORY]
        self.assertIn("Starting factory {factory!r}", [e["log_format"] for e in chatter])
        self.assertEqual({tap._drop_chatter(e) for e in chatter}, {PredicateResult.no})
        self.assertEqual(tap._drop_chatter({"log_namespace": "voicecall.tap", "log_format": "Starting factory {factory!r}"}), PredicateResult.maybe)
