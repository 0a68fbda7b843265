"""
Each config key is declared once: as a field of voicecall.config.model whose metadata (`Key`) the
reader walks. These tests fail when a field lacks its declaration, when a key is declared a second
time (two fields with one JSON name, or a key name written out again in the reader's modules), when
README's key tables and the declarations disagree, and when a declaration's env fallback, secrecy
or requirement does not reach the reader's behaviour.
"""
from __future__ import annotations

import ast
import os
import re

import attrs
from twisted.trial.unittest import SynchronousTestCase

import voicecall.config
from voicecall.config import ConfigError, parse_config
from voicecall.config.checks import ListOf, MapOf
from voicecall.config.model import KEY, TelnyxConfig, VoiceCallConfig, declaration, json_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.dirname(voicecall.config.__file__)
P = "plugins.entries.voice-call.config"


def declared_keys(cls=VoiceCallConfig, prefix=""):
    """(dotted JSON path, attribute, Key) of every declared field, sections included, in order."""
    for a in attrs.fields(cls):
        key = declaration(a)
        if key is None:
            continue
        path = prefix + json_name(a)
        yield path, a, key
        if key.section:
            yield from declared_keys(key.section, path + ".")


def leaf_keys():
    return {path: (a, key) for path, a, key in declared_keys() if not key.section}


def sections(cls=VoiceCallConfig):
    yield cls
    for a in attrs.fields(cls):
        key = a.metadata.get(KEY)
        if key is not None and key.section:
            yield from sections(key.section)


class DeclarationTests(SynchronousTestCase):
    def test_every_field_is_declared(self):
        """Every field of every section carries a `Key`; only ``warnings`` is set by no JSON key."""
        undeclared, unset = [], []
        for cls in sections():
            for a in attrs.fields(cls):
                if KEY not in a.metadata:
                    undeclared.append(f"{cls.__name__}.{a.name}")
                elif a.metadata[KEY] is None:
                    unset.append(f"{cls.__name__}.{a.name}")
        self.assertEqual(undeclared, [])
        self.assertEqual(unset, ["VoiceCallConfig.warnings"])

    def test_every_leaf_has_a_check(self):
        """A value's check is a callable or a list/map of one; secrets stay out of the repr."""
        for path, (a, key) in leaf_keys().items():
            check = key.check.check if isinstance(key.check, (ListOf, MapOf)) else key.check
            self.assertTrue(callable(check) and not isinstance(check, type), path)
            self.assertEqual(a.repr, not key.secret and path != "store", path)  # the store URL may hold a password
        self.assertEqual(len(leaf_keys()), 119)

    def test_no_key_declared_twice(self):
        """No two fields of a section share a JSON key, and each section class is used once."""
        for cls in sections():
            names = [json_name(a) for a in attrs.fields(cls) if declaration(a) is not None]
            self.assertEqual(len(names), len(set(names)), cls.__name__)
        classes = [cls.__name__ for cls in sections()]
        self.assertEqual(len(classes), len(set(classes)))

    def test_no_second_table(self):
        """
        The reader's modules never write a declared key's name as a literal (a dict key or a
        string of its own): keys come from the declarations. ``outputFormat`` is ElevenLabs' key
        in OpenClaw's TTS layout, which calls ignore, not voicecall's ``tts.edge.outputFormat``.
        """
        names = {json_name(a) for _, a, _ in declared_keys() if re.search("[A-Z]", json_name(a))}
        allowed = {("validate.py", "outputFormat")}
        found = []
        for module in sorted(os.listdir(CONFIG_DIR)):
            if not module.endswith(".py") or module == "model.py":
                continue
            with open(os.path.join(CONFIG_DIR, module), encoding="utf-8") as f:
                tree = ast.parse(f.read())
            docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                          if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(node)}  # fmt: skip
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and node.value in names and id(node) not in docstrings:
                    if (module, node.value) not in allowed:
                        found.append(f"{module}:{node.lineno}: {node.value}")
        self.assertEqual(found, [])


def readme_keys():
    """The keys README's tables list (``a.b`` / ``.c`` is ``a.c``; ``…Suffix`` extends the key before)."""
    with open(os.path.join(ROOT, "README.rst"), encoding="utf-8") as f:
        text = f.read()
    section = text[text.index("Every key, with its default") : text.index("\nRunning the daemon\n")]
    keys, in_table = set(), False
    for line in section.splitlines():
        if re.fullmatch(r"=+(  +=+)*", line):
            in_table = not in_table
            continue
        first = re.match(r"^(``\S.*?)(\s{2,}|$)", line)
        if not in_table or not first:
            continue
        previous = ""
        for token in re.findall(r"``([^`]+)``", first.group(1)):
            if token.startswith("…"):
                key = previous + token[1:]
            elif token.startswith("."):
                key = previous.rsplit(".", 1)[0] + token
            else:
                key = token
            keys.add(key)
            previous = key
    return keys


class DocumentationTests(SynchronousTestCase):
    def test_readme_lists_every_key(self):
        """README's config tables list exactly the declared keys."""
        self.assertEqual(sorted(readme_keys() - set(leaf_keys())), [])
        self.assertEqual(sorted(set(leaf_keys()) - readme_keys()), [])


class BehaviourTests(SynchronousTestCase):
    """What a declaration says reaches the reader."""

    def test_env_fallbacks(self):
        """Each declared env variable fills its absent key, only for its provider."""
        for path, (_, key) in leaf_keys().items():
            for variable in key.env:
                for provider in ("twilio", "telnyx", "plivo", "mock"):
                    env = {"HOME": "/h", variable: "+15550001234"}
                    try:
                        config = parse_config({"provider": provider}, env)
                    except ConfigError as e:
                        config = e.config
                    value = config
                    for part in path.split("."):
                        value = getattr(value, next(b.name for b in attrs.fields(type(value)) if json_name(b) == part))
                    expected = "+15550001234" if key.provider in (None, provider) else None
                    section_provider = path.split(".")[0]
                    if section_provider in ("twilio", "telnyx", "plivo") and section_provider != provider:
                        expected = None
                    if path == "store":  # a directory is made absolute, as the file's value is
                        expected = os.path.abspath(expected)
                    self.assertEqual(value, expected, (path, variable, provider))

    def test_secrets_never_shown(self):
        """A refused value of a secret key is described, never shown, in `ConfigError.lines`."""
        for path, (_, key) in leaf_keys().items():
            if not key.secret:
                continue
            raw, value = {}, ({"sid": 12345} if isinstance(key.check, MapOf) else 12345)
            node = raw
            for part in path.split(".")[:-1]:
                node = node.setdefault(part, {})
            node[path.split(".")[-1]] = value
            e = self.assertRaises(ConfigError, parse_config, raw, {"HOME": "/h"})
            refused = [line for line in e.lines() if line.startswith(path)]
            self.assertEqual(len(refused), 1, (path, e.lines()))
            self.assertIn("(got a hidden number)", refused[0])
            self.assertNotIn("12345", refused[0])

    def test_required_keys(self):
        """Each key declared required is asked for, with its env variable, when its provider is selected."""
        config = {"fromNumber": "+15550001234"}
        for a in attrs.fields(VoiceCallConfig):
            key = declaration(a)
            if key is None or not key.section or key.provider is None:
                continue
            problems = self.assertRaises(ConfigError, parse_config, {**config, "provider": key.provider}, {}).problems
            expected = [f"{P}.{json_name(a)}.{json_name(b)} is required (or set {declaration(b).env[0]} env)"
                        for b in attrs.fields(key.section) if declaration(b).required]  # fmt: skip
            self.assertEqual(problems, expected, key.provider)
            self.assertGreaterEqual(len(expected), 2)
        waived = [b.name for b in attrs.fields(TelnyxConfig) if declaration(b).waived_by]
        self.assertEqual(waived, ["public_key"])
        problems = self.assertRaises(
            ConfigError, parse_config, {**config, "provider": "telnyx", "skipSignatureVerification": True}, {}
        ).problems
        self.assertEqual(len(problems), 2)
