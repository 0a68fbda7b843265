"""
The tree's layers, as imports (DESIGN.md "Dependencies point one way"; README "Development",
Layout): every import under voicecall/, absolute or relative, at module level or inside a
function, is checked against the table below, one rule a line with its reason.

Read it as: a module whose name starts with one of IMPORTERS may only import, of voicecall, what
the rule allows. "voicecall" itself (the package: a docstring and __version__) is always allowed.
That the daemon never imports voicecall.testing is tests/test_testing_isolation.py's (this module
reuses its way of reading an import, so both read the same spelling the same way).
"""
from __future__ import annotations

import ast
import os
from pathlib import Path
from typing import Iterator

from attrs import frozen
from twisted.trial.unittest import SynchronousTestCase

import voicecall
from tests.test_testing_isolation import _module_name, _names

PACKAGE = Path(voicecall.__file__).parent

#: The server side, which a CLI command never loads at module level (issue 15 item 4).
SERVER_SIDE = ("domain", "control.rpc", "web", "media", "providers", "speech")
#: What a CLI run imports at module level, and what a gateway imports (voicecall.client).
CLI_SIDE = ("control.cli", "control.doctor", "control.tool", "control.protocol", "client")


@frozen
class Rule:
    importers: tuple[str, ...]  # names under voicecall. these modules' names start with
    only: tuple[str, ...] | None = None  # what they may import of voicecall (None: all but `never`)
    never: tuple[str, ...] = ()  # what they must not import
    module_level: bool = False  # True: only what importing the module loads counts, transitively
    #: Importers (under voicecall.) the rule is not about: by default testing/, which stands with
    #: tests/ outside the layers (its stack.py wires a daemon as tap.py does).
    exempt: tuple[str, ...] = ("testing",)
    why: str = ""


# fmt: off
RULES = (
    Rule(("",), never=("tap",), exempt=("tap",), why="tap.py is the composition root: it imports everything, nothing imports it"),
    Rule(("",), never=("service",), exempt=("service", "tap"), why="the daemon's service is built by tap.py alone"),
    Rule(("service",), only=("infra", "domain.store", "control.expose"),
         why="the service is handed every component it starts: it imports only the errors it catches and sdnotify"),
    Rule(("infra",), only=("infra",), why="infra/ is plumbing that knows nothing of calls"),
    Rule(("config",), only=("config",), why="config/ is values and their validation: it imports nothing of ours"),
    Rule(("",), never=("config",), exempt=("config", "tap", "control.cli", "control.doctor", "testing"),
         why="config becomes keyword arguments once, in tap.py (the CLI and doctor read the file too)"),
    Rule(("domain",), only=("domain", "infra"),
         why="the domain drives carriers and speaks through interfaces it defines (domain/carrier.py, voice.py); tap.py wires the adapters in"),
    Rule(("providers",), never=("web", "media", "control", "speech", "domain.manager", "domain.store", "domain.reaper", "domain.policy"),
         why="a provider is handed a WebhookContext and returns values: it knows neither the surfaces nor the manager"),
    Rule(("speech",), never=("media", "web", "control", "domain.manager", "domain.store", "domain.reaper", "domain.policy"),
         why="TTS yields audio chunks with their format; media/ converts and paces them, tap.py wires STT to the manager"),
    Rule(("speech",), never=("providers",),
         why="speech is no carrier's: its JSON HTTP client is infra/jsonhttp.py"),
    Rule(("web", "media"), never=("control",), why="surfaces reach the manager and the providers, never the people's and gateway's surface"),
    Rule(("web",), never=("media",), why="one surface does not import another; tap.py wires them"),
    Rule(("media",), never=("web",), why="one surface does not import another; tap.py wires them"),
    Rule(("cluster",), only=("cluster", "domain", "infra"),
         why="the cluster coordinates nodes through the store: the surfaces hand it JSON-able requests and handlers (tap.py wires them)"),
    Rule(("",), never=("cluster",), exempt=("cluster", "tap", "control.cli"),
         why="web/ and control/ reach the cluster only through the callables tap.py hands them"
             " (the CLI reads the nodes from the store while its daemon is down)"),
    Rule(CLI_SIDE, never=SERVER_SIDE, module_level=True,
         why="a CLI run and a gateway load only what they use: the socket path and error codes are in control/protocol.py"),
)
# fmt: on


@frozen
class Import:
    importer: str
    line: int
    names: tuple[str, ...]  # what the statement may load (the module, and module.attribute)
    runtime: bool  # executed when the importer is imported (not in a function or under TYPE_CHECKING)


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING"


def _walk(node: ast.AST, runtime: bool) -> Iterator[tuple[ast.AST, bool]]:
    for child in ast.iter_child_nodes(node):
        yield child, runtime
        deferred = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        yield from _walk(child, runtime and not deferred and not (isinstance(child, ast.If) and _type_checking(child)))


def imports(root: Path) -> list[Import]:
    """Every import of voicecall under root (a voicecall/ directory), in file and line order."""
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d != "__pycache__")
        for filename in sorted(f for f in files if f.endswith(".py")):
            path = Path(directory) / filename
            importer = _module_name(path, root)
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            for node, runtime in _walk(tree, True):
                names = _names(node, importer, filename == "__init__.py")
                ours = tuple(n for n in names if n == "voicecall" or n.startswith("voicecall."))
                if ours:
                    found.append(Import(importer, node.lineno, ours, runtime))
    return found


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    """Whether voicecall.<name> is, or is inside, one of voicecall.<prefix>."""
    full = [f"voicecall.{p}" if p else "voicecall" for p in prefixes]
    return any(name == p or name.startswith(p + ".") for p in full)


def _forbidden(rule: Rule, name: str) -> bool:
    if name == "voicecall" or name.startswith("voicecall.__"):
        return False  # the package itself: a docstring and __version__
    if rule.only is not None and not _under(name, rule.only):
        return True
    return _under(name, rule.never)


def _loads(found: list[Import], module: str) -> set[str]:
    """The voicecall modules importing `module` loads, transitively (module-level imports only)."""
    by_importer: dict[str, list[Import]] = {}
    for imp in found:
        if imp.runtime:
            by_importer.setdefault(imp.importer, []).append(imp)
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        # Importing a.b.c runs a, a.b and a.b.c (names that are not modules load nothing).
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            step = ".".join(parts[:i])
            if step not in seen:
                seen.add(step)
                todo.extend(n for imp in by_importer.get(step, ()) for n in imp.names)
    return seen - {module}


def violations(root: Path, rules=RULES) -> list[str]:
    """`file:line importer -> imported  (why)` for each import a rule forbids."""
    found = imports(root)
    modules = {imp.importer for imp in found} | {
        _module_name(Path(d) / f, root) for d, _, fs in os.walk(root) for f in fs if f.endswith(".py")
    }
    out = []
    for rule in rules:
        for module in sorted(modules):
            if not _under(module, rule.importers) or _under(module, rule.exempt):
                continue
            if rule.module_level:
                bad = sorted(n for n in _loads(found, module) & modules if _forbidden(rule, n))
                out.extend(f"{module} loads {n}  ({rule.why})" for n in bad)
                continue
            for imp in found:
                if imp.importer != module:
                    continue
                hit = next((n for n in imp.names if _forbidden(rule, n)), None)
                if hit is not None:
                    out.append(f"{module}:{imp.line} -> {hit}  ({rule.why})")
    return out


class LayerTests(SynchronousTestCase):
    """The daemon's own tree keeps its layers."""

    def test_the_tree_keeps_its_layers(self):
        """No import under voicecall/ breaks a rule of the table: the rules have no exceptions."""
        self.assertEqual(violations(PACKAGE), [])

    def test_the_walk_sees_the_tree(self):
        """The walk reads the real tree: it finds tap.py's imports and the CLI's deferred ones."""
        found = imports(PACKAGE)
        tap = {n for imp in found if imp.importer == "voicecall.tap" for n in imp.names}
        self.assertIn("voicecall.domain.manager", tap)
        self.assertIn("voicecall.web.webhook", tap)
        deferred = {n for imp in found if imp.importer == "voicecall.control.cli" and not imp.runtime for n in imp.names}
        self.assertIn("voicecall.domain.store", deferred)


class RuleTests(SynchronousTestCase):
    """Each rule reports an import it forbids, whatever its spelling, and only those."""

    def _tree(self, files: dict[str, str]) -> Path:
        root = Path(self.mktemp()) / "voicecall"
        packages = {"__init__.py": "", **{f"{p}/__init__.py": "" for p in
                    ("infra", "config", "domain", "providers", "speech", "web", "media", "control", "testing")}}
        for name, text in {**packages, **files}.items():
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        return root

    def _lines(self, files: dict[str, str]) -> list[str]:
        return sorted(v.split("  (")[0] for v in violations(self._tree(files)))

    def test_a_clean_tree(self):
        """Imports the layers allow are not reported."""
        self.assertEqual(
            self._lines(
                {
                    "tap.py": "from voicecall.web import webhook\nfrom voicecall.config import load\nimport voicecall.control.rpc\n",
                    "infra/bounded.py": "from . import audio\nfrom voicecall import __version__\n",
                    "domain/manager.py": "from voicecall.domain.model import CallRecord\nfrom ..infra.bounded import BoundedSet\n",
                    "providers/twilio.py": "from voicecall.domain.model import CallEvent\nfrom .base import Provider\n",
                    "speech/tts.py": "from voicecall.infra import audio\nfrom voicecall.domain.model import Speaker\n",
                    "media/bridge.py": "from voicecall.providers import twilio\nfrom voicecall.domain.model import CallRecord\n",
                    "web/webhook.py": "from voicecall.providers.base import WebhookContext\n",
                    "control/cli.py": "from voicecall.control import tool\ndef status():\n    from voicecall.domain import store\n",
                    "control/rpc.py": "from voicecall.domain.manager import CallManager\n",
                    "control/doctor.py": "from voicecall.config import load\n",
                    "client.py": "from voicecall.control.protocol import RpcError\n",
                }
            ),
            [],
        )

    def test_nothing_imports_tap(self):
        """tap.py is imported by nothing under voicecall/, in any spelling, at any depth."""
        self.assertEqual(
            self._lines(
                {
                    "tap.py": "",
                    "control/rpc.py": "def f():\n    from voicecall import tap\n",
                    "web/webhook.py": "from .. import tap\n",
                    "media/stream.py": "import voicecall.tap\n",
                }
            ),
            ["voicecall.control.rpc:2 -> voicecall.tap", "voicecall.media.stream:1 -> voicecall.tap", "voicecall.web.webhook:1 -> voicecall.tap"],
        )

    def test_the_service_is_handed_its_components(self):
        """service.py imports only the errors it catches and infra, no component it is handed; only tap.py imports it."""
        self.assertEqual(
            self._lines(
                {
                    "tap.py": "from voicecall.service import VoicecallService\n",
                    "service.py": "from voicecall.domain.store import StoreLockedError\nfrom voicecall.control.expose import ExposeError\n"
                    "from voicecall.infra import sdnotify\nfrom voicecall.domain.manager import CallManager\n"
                    "def f():\n    from voicecall.control import rpc\n",
                    "control/rpc.py": "from .. import service\n",
                }
            ),
            [
                "voicecall.control.rpc:1 -> voicecall.service",
                "voicecall.service:4 -> voicecall.domain.manager",
                "voicecall.service:6 -> voicecall.control",
            ],
        )

    def test_testing_stands_outside_the_layers(self):
        """testing/ may wire a daemon from its parts as tap.py does, but it does not import tap.py either."""
        self.assertEqual(
            self._lines({"tap.py": "", "testing/stack.py": "from voicecall.domain.manager import CallManager\nfrom voicecall.config import load\n",
                         "testing/gateway.py": "from voicecall import tap\n"}),
            ["voicecall.testing.gateway:1 -> voicecall.tap"],
        )

    def test_infra_imports_only_infra(self):
        """infra/ imports nothing of ours outside infra/."""
        self.assertEqual(
            self._lines({"infra/dbwriter.py": "from ..domain import model\n", "infra/audio.py": "def f():\n    import voicecall.web\n"}),
            ["voicecall.infra.audio:2 -> voicecall.web", "voicecall.infra.dbwriter:1 -> voicecall.domain"],
        )

    def test_config_imports_only_config(self):
        """config/ imports nothing of ours outside config/, not even infra."""
        self.assertEqual(self._lines({"config/model.py": "from voicecall.infra.bounded import BoundedSet\n"}),
                         ["voicecall.config.model:1 -> voicecall.infra.bounded"])

    def test_only_tap_and_the_cli_read_config(self):
        """Below tap.py nothing sees the config (the CLI and doctor read the file themselves)."""
        self.assertEqual(
            self._lines({"speech/tts.py": "from voicecall.config.model import TtsConfig\n", "control/doctor.py": "import voicecall.config\n"}),
            ["voicecall.speech.tts:1 -> voicecall.config.model"],
        )

    def test_domain_imports_domain_and_infra(self):
        """The domain imports no adapter, surface, config or composition root."""
        self.assertEqual(
            self._lines(
                {
                    "domain/manager.py": "from voicecall.providers.base import Provider\n"
                    "def f():\n    from voicecall.speech import tts\n    from ..media import playback\n",
                    "domain/store.py": "from voicecall.control import rpc\nimport voicecall.web.webhook\n",
                }
            ),
            [
                "voicecall.domain.manager:1 -> voicecall.providers.base",
                "voicecall.domain.manager:3 -> voicecall.speech",
                "voicecall.domain.manager:4 -> voicecall.media",
                "voicecall.domain.store:1 -> voicecall.control",
                "voicecall.domain.store:2 -> voicecall.web.webhook",
            ],
        )

    def test_providers_know_no_surface_nor_manager(self):
        """providers/ imports neither web/, media/, control/, speech/ nor the manager."""
        self.assertEqual(
            self._lines(
                {
                    "providers/twilio.py": "from voicecall.web.security import x\nfrom ..media import stream\n",
                    "providers/plivo.py": "def f():\n    from voicecall.domain.manager import CallManager\n",
                    "providers/telnyx.py": "import voicecall.control.rpc\nfrom voicecall.speech import tts\n",
                }
            ),
            [
                "voicecall.providers.plivo:2 -> voicecall.domain.manager",
                "voicecall.providers.telnyx:1 -> voicecall.control.rpc",
                "voicecall.providers.telnyx:2 -> voicecall.speech",
                "voicecall.providers.twilio:1 -> voicecall.web.security",
                "voicecall.providers.twilio:2 -> voicecall.media",
            ],
        )

    def test_speech_knows_no_media(self):
        """speech/ imports neither media/, web/, control/ nor the manager."""
        self.assertEqual(
            self._lines({"speech/tts.py": "from voicecall.media.playback import Playback\nfrom ..domain import manager\n",
                         "speech/stt.py": "from voicecall.web import webhook\nimport voicecall.control.rpc\n"}),
            ["voicecall.speech.stt:1 -> voicecall.web", "voicecall.speech.stt:2 -> voicecall.control.rpc",
             "voicecall.speech.tts:1 -> voicecall.media.playback", "voicecall.speech.tts:2 -> voicecall.domain.manager"],
        )

    def test_speech_knows_no_carrier(self):
        """speech/ imports nothing of providers/, in any spelling, at any depth."""
        self.assertEqual(
            self._lines({"speech/responder.py": "from voicecall.providers.http import ApiClient\nfrom voicecall.infra.jsonhttp import ApiClient\n",
                         "speech/tts.py": "def f():\n    from ..providers import base\n"}),
            ["voicecall.speech.responder:1 -> voicecall.providers.http", "voicecall.speech.tts:2 -> voicecall.providers"],
        )

    def test_surfaces_keep_to_themselves(self):
        """web/ and media/ import neither control/ nor each other."""
        self.assertEqual(
            self._lines({"web/webhook.py": "from voicecall.control import metrics\nfrom ..media import stream\n",
                         "media/stream.py": "def f():\n    import voicecall.control.rpc\nfrom voicecall.web import limits\n"}),
            ["voicecall.media.stream:2 -> voicecall.control.rpc", "voicecall.media.stream:3 -> voicecall.web",
             "voicecall.web.webhook:1 -> voicecall.control", "voicecall.web.webhook:2 -> voicecall.media"],
        )

    def test_the_cli_loads_no_server_side(self):
        """What the CLI side loads at import, transitively, holds no server-side module; deferred and type-only imports do not count."""
        self.assertEqual(
            self._lines(
                {
                    "control/protocol.py": "",
                    "control/tool.py": "from voicecall.control import helper\n",
                    "control/helper.py": "from voicecall.domain.store import Store\n",
                    "domain/store.py": "",
                    "speech/tts.py": "",
                    "providers/base.py": "",
                    "control/cli.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from voicecall.media import stream\n"
                    "def f():\n    from voicecall.web import webhook\nclass C:\n    import voicecall.speech.tts\n",
                    "client.py": "from voicecall.control.protocol import X\nfrom voicecall.providers import base\n",
                }
            ),
            [
                "voicecall.client loads voicecall.providers",
                "voicecall.client loads voicecall.providers.base",
                "voicecall.control.cli loads voicecall.speech",
                "voicecall.control.cli loads voicecall.speech.tts",
                "voicecall.control.tool loads voicecall.domain",
                "voicecall.control.tool loads voicecall.domain.store",
            ],
        )
