"""
Frozen behaviour of the config reader: tests/config_expectations.json holds 361 configs (picked
to cover every key, every message kind, typo suggestions, secrets, legacy shapes, env fallbacks
and OpenClaw's whole-file and TTS layouts) with what the reader made of each before its keys were
declared once (issue 15): the problems (SPEC strings) and `ConfigError.lines()` of a refusal, or
the attributes an accepted config sets beyond the defaults. ``$`` stands for the plugin config's
path, ``plugins.entries.voice-call.config``.
"""
from __future__ import annotations

import json
import os
import types

import attrs
from twisted.trial.unittest import SynchronousTestCase

from voicecall.config import ConfigError, parse_config

HERE = os.path.dirname(os.path.abspath(__file__))
P = "plugins.entries.voice-call.config"


def _plain(value):
    if isinstance(value, (dict, types.MappingProxyType)):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _flat(config, prefix=""):
    """The config's attributes as dotted names (``twilio.signing_keys`` stays one mapping)."""
    out = {}
    for name, value in config.items():
        if isinstance(value, dict) and value and prefix + name != "twilio.signing_keys":
            out.update(_flat(value, f"{prefix}{name}."))
        else:
            out[prefix + name] = value
    return out


def _attributes(config):
    return _flat(_plain(attrs.asdict(config, value_serializer=lambda i, a, v: _plain(v))))


class FrozenExpectationsTests(SynchronousTestCase):
    def test_every_case_reads_as_frozen(self):
        """Each config is accepted with the same values, or refused with the same problems and lines."""
        with open(os.path.join(HERE, "config_expectations.json"), encoding="utf-8") as f:
            fixture = json.load(f)
        defaults = fixture["defaults"]
        self.assertEqual(_attributes(parse_config({}, {"HOME": "/home/t"})), defaults)
        self.assertGreater(len(fixture["cases"]), 300)
        for case in fixture["cases"]:
            where = json.dumps(case["input"])[:300]
            env = fixture["envs"][case["env"]]
            try:
                config = parse_config(case["input"], env)
            except ConfigError as e:
                self.assertNotIn("config", case, where)
                self.assertEqual([p.replace(P, "$") for p in e.problems], case["problems"], where)
                self.assertEqual([line.replace(P, "$") for line in e.lines()], case["lines"], where)
                self.assertEqual(list(e.config.warnings) if e.config else [], case.get("warnings", []), where)
                continue
            self.assertIn("config", case, where)
            got = {k: v for k, v in _attributes(config).items() if defaults.get(k) != v}
            self.assertEqual(got, case["config"], where)
