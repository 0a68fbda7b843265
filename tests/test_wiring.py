"""
Constructor wiring (DESIGN.md, rules of the house): tap.py builds every component with its
collaborators, and no module of the daemon assigns an attribute on another object afterwards
(outside a short list of records and documented idioms); config becomes keyword values there,
so no component holds a config object; and the HTTP pool's connections log nothing, through
public APIs rather than a private factory.
"""
from __future__ import annotations

import ast
import inspect
import json
import os
from fnmatch import fnmatchcase
from pathlib import Path

import attrs
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data

import voicecall
from voicecall import service, tap
from voicecall.domain import calllog
from voicecall.infra import httpclient, logs

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


#: Assignments to another object's attribute that are not wiring: (module, target pattern) -> why.
ALLOWED_ASSIGNMENTS = {
    ("domain/manager.py", "call.*"): "the manager moves its call records (domain/model.py) through their states",
    ("domain/manager.py", "queue.*"): "the manager's own per-call speech queue records",
    ("media/playback.py", "entry.*"): "Playback's own utterance entries (_Entry), filled as the utterance plays",
    ("web/replay.py", "entry.*"): "the replay cache's own entries, completed when the answer is known",
    ("providers/plivo.py", "pending.*"): "the provider's own pending-document records (_Pending)",
    ("config/__init__.py", "e.*"): "a ConfigError from parse_config, completed with the file it came from",
    ("control/cli.py", "click_ctx.obj"): "click's context object, set as click documents",
    ("domain/reaper.py", "self._loop.clock"): "LoopingCall.clock, Twisted's documented way to give it a clock",
    ("control/cli.py", "watch.clock"): "LoopingCall.clock (tail's stdout-reader watch), as above",
    ("infra/audio.py", "*.flags.writeable"): "numpy's documented way to make a lookup table read-only",
    ("media/sockets.py", "request.channel.persistent"): "twisted.web's way to close the connection after a refusal",
    ("web/limits.py", "request.early_*"): "the request line, kept on Twisted's Request for refusals before its body ends",
    ("infra/private/ws.py", "*"): "the one guarded package for autobahn's and Twisted's private names (DESIGN.md)",
    ("infra/private/http.py", "*"): "the one guarded package for autobahn's and Twisted's private names (DESIGN.md)",
}


def _assigned_attributes(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, target) of every assignment to an attribute of anything but `self` itself."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            todo = list(node.targets)
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            todo = [node.target]
        else:
            continue
        while todo:
            target = todo.pop()
            if isinstance(target, (ast.Tuple, ast.List)):
                todo.extend(target.elts)
            elif isinstance(target, ast.Starred):
                todo.append(target.value)
            elif isinstance(target, ast.Attribute) and not (isinstance(target.value, ast.Name) and target.value.id == "self"):
                found.append((target.lineno, ast.unparse(target)))
    return found


def wiring_assignments(package: Path) -> tuple[list[str], set]:
    """
    The assignments to another object's attribute in the daemon's modules under `package`
    (voicecall/testing, the fakes, is not the daemon) that no allow-list entry covers, and the
    allow-list entries that matched.
    """
    unexplained, used = [], set()
    for path in sorted(package.rglob("*.py")):
        module = path.relative_to(package).as_posix()
        if module.startswith("testing/"):
            continue
        for line, target in _assigned_attributes(ast.parse(path.read_text(), str(path))):
            allowed = [key for key in ALLOWED_ASSIGNMENTS if key[0] == module and fnmatchcase(target, key[1])]
            used.update(allowed)
            if not allowed:
                unexplained.append(f"{module}:{line}: {target}")
    return unexplained, used


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
    def make_service(self, config: dict) -> service.VoicecallService:
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

    def test_no_module_assigns_an_attribute_on_another_object(self):
        """
        Cycles close through constructor arguments (or a method of the object's own), not by
        setting an attribute on a component after it was built: in tap.py and every other module
        of the daemon; each exception on the allow-list says why it is not wiring, and is used.
        """
        unexplained, used = wiring_assignments(Path(voicecall.__file__).parent)
        self.assertEqual(unexplained, [])
        self.assertEqual(set(ALLOWED_ASSIGNMENTS) - used, set())
        # The composition root and what moved out of it, with no allow-list: the service it builds,
        # the log set-up, the HTTP client, the call log.
        for module in (tap, service, logs, httpclient, calllog):
            self.assertEqual([t for _, t in _assigned_attributes(ast.parse(inspect.getsource(module)))], [], module.__name__)

    def test_the_check_sees_wiring(self):
        """Attribute, tuple, augmented and chained targets on another object are found; `self`'s own are not."""
        tree = ast.parse(
            "bridge.manager = m\n"
            "a, proto._end = 1, end\n"
            "client._on_notification += x\n"
            "self._to_daemon.target = t\n"
            "self.ok = 1\n"
            "self.counts['x'] += 1\n"
        )
        self.assertEqual(
            _assigned_attributes(tree),
            [(1, "bridge.manager"), (2, "proto._end"), (3, "client._on_notification"), (4, "self._to_daemon.target")],
        )


class HttpPoolChatterTests(TestCase):
    async def test_connections_log_nothing(self):
        """
        The pool's connections do not say "Starting/Stopping factory" (Twisted's noisy default) at
        any level, so no log destination sees it; requests on a kept-alive connection work.
        """
        root = Resource()
        root.putChild(b"x", Data(b"ok", "text/plain"))
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(root))
        self.addCleanup(port.stopListening)
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        http, pool = httpclient.build_http_client(reactor)
        url = f"http://127.0.0.1:{port.getHost().port}/x"
        for _ in range(2):
            response = await http.get(url)
            self.assertEqual(await response.content(), b"ok")
        await pool.closeCachedConnections()
        self.assertEqual([e["log_format"] for e in events if "factory" in e.get("log_format", "")], [])
