"""
The ``store`` value and the ``cluster`` section, as the daemon's start and the parser see them:
a PostgreSQL URL is checked at config load as libpq would read it (psycopg's parser, which is
libpq's, is the oracle), a URL-like typo is refused rather than taken for a directory, and no
message ever shows the URL's password.
"""
from __future__ import annotations

import json
import os
from urllib.parse import quote

from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg.conninfo import conninfo_to_dict
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.harness import BASE_CONFIG, daemon_argv, make_workdir, spawn
from voicecall.config import ConfigError, parse_config

#: A password that would show in any message that repeats the URL.
SECRET = "s3cretPW"
PUBLIC = {"publicUrl": "https://a.example/voice/webhook"}
ENV = {"HOME": "/h"}

#: Mistyped stores the attack found starting a node wrongly, each with the password in it.
TYPOS = {
    "a % that is no escape": f"postgresql://voicecall:{SECRET}%zz@127.0.0.1:55432/vc",
    "one slash": f"postgresql:/voicecall:{SECRET}@127.0.0.1:55432/vc",
    "a leading space": f" postgresql://voicecall:{SECRET}@127.0.0.1:55432/vc",
    "an unescaped @ in the password": f"postgresql://voicecall:{SECRET}@x@127.0.0.1:55432/vc",
    "an unescaped / in the password": f"postgresql://voicecall:{SECRET}/x@127.0.0.1:55432/vc",
    "no database": f"postgresql://voicecall:{SECRET}@127.0.0.1:55432",
    "a misspelt scheme": f"postgressql://voicecall:{SECRET}@127.0.0.1:55432/vc",
    "a misspelt scheme, one slash": f"postgresq:/voicecall:{SECRET}@127.0.0.1:55432/vc",
    "a password with a #": f"postgresql://voicecall:{SECRET}#x@127.0.0.1:55432/vc",
}


def refusal(store: str) -> str:
    """The lines `parse_config` refuses `store` with (fails if it is accepted)."""
    try:
        cfg = parse_config({"store": store, **PUBLIC}, ENV)
    except ConfigError as e:
        return "\n".join(e.lines() + e.problems)
    raise AssertionError(f"accepted: {cfg.store_shown}")


class StoreUrlTests(SynchronousTestCase):
    def test_typos_refused_without_the_password(self):
        for why, store in TYPOS.items():
            text = refusal(store)
            self.assertIn("store", text, why)
            self.assertNotIn(SECRET, text, why)

    def test_scheme_in_any_case(self):
        """``PostgreSQL://`` is a PostgreSQL URL, handed to libpq in the lower case it requires."""
        cfg = parse_config({"store": f"PostgreSQL://voicecall:{SECRET}@db/vc", **PUBLIC}, ENV)
        self.assertEqual(cfg.store, f"postgresql://voicecall:{SECRET}@db/vc")
        self.assertEqual(conninfo_to_dict(cfg.store)["password"], SECRET)

    def test_repr_hides_the_password(self):
        """A config printed in a traceback or a debugger shows no store password (nor the store)."""
        cfg = parse_config({"store": f"postgresql://voicecall:{SECRET}@db/vc", **PUBLIC}, ENV)
        self.assertNotIn(SECRET, repr(cfg))

    def test_other_schemes_and_plain_directories(self):
        self.assertIn('not a "mysql" URL', refusal(f"mysql://vc:{SECRET}@db/vc"))
        self.assertIn('not a "file" URL', refusal("file:/srv/vc"))
        self.assertEqual(parse_config({"store": "calls:2026"}, ENV).store, os.path.abspath("calls:2026"))

    def test_socket_host_in_the_query(self):
        cfg = parse_config({"store": "postgresql:///vc?host=/run/postgresql", **PUBLIC}, ENV)
        self.assertEqual(conninfo_to_dict(cfg.store)["host"], "/run/postgresql")
        self.assertIn("expected a host", refusal("postgresql:///vc"))

    @settings(max_examples=300, deadline=None)
    @given(st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FF), min_size=1, max_size=12))
    def test_libpq_reads_what_is_accepted(self, password):
        """
        A password as written: accepted only if libpq reads that very password from the URL;
        refused without showing it. Escaped, any password is accepted and read back.
        """
        url = f"postgresql://vc:{password}@db.example:5433/calls"
        try:
            cfg = parse_config({"store": url, **PUBLIC}, ENV)
        except ConfigError as e:
            text = "\n".join(e.lines() + e.problems)
            self.assertNotIn(f"vc:{password}@", text)
        else:
            info = conninfo_to_dict(cfg.store)
            self.assertEqual((info.get("password"), info["host"], info["dbname"]), (password, "db.example", "calls"))
        escaped = parse_config({"store": f"postgresql://vc:{quote(password, safe='')}@db.example/calls", **PUBLIC}, ENV)
        self.assertEqual(conninfo_to_dict(escaped.store)["password"], password)


class ClusterSectionTests(SynchronousTestCase):
    def test_entry_url_path_is_the_webhook_path(self):
        store = {"store": "postgresql://vc@db/calls", **PUBLIC}
        e = self.assertRaises(ConfigError, parse_config, {**store, "cluster": {"entryUrl": "https://voice.example/voice/webhok"}}, ENV)
        self.assertEqual(
            e.problems,
            ['plugins.entries.voice-call.config.cluster.entryUrl must end in the webhook path serve.path ("/voice/webhook"), not "/voice/webhok"'],
        )
        ok = parse_config({**store, "serve": {"path": "/hook"}, "cluster": {"entryUrl": "https://voice.example/hook"}}, ENV)
        self.assertEqual(ok.cluster.entry_url, "https://voice.example/hook")

    def test_cluster_section_with_a_directory_warns(self):
        cfg = parse_config({"store": "/srv/vc", "cluster": {"nodeId": "a"}}, ENV)
        self.assertEqual(len(cfg.warnings), 1)
        self.assertIn("cluster is set but the store is a directory (SQLite): this node runs alone", cfg.warnings[0])
        self.assertEqual(parse_config({"store": "/srv/vc"}, ENV).warnings, ())

    def test_refused_store_is_not_also_a_directory(self):
        e = self.assertRaises(ConfigError, parse_config, {"store": TYPOS["one slash"], **PUBLIC, "cluster": {"nodeId": "a"}}, ENV)
        self.assertEqual([p.split(":")[0] for p in e.problems], ["plugins.entries.voice-call.config.store"])
        self.assertEqual(e.config.warnings, ())


class DaemonStartTests(TestCase):
    timeout = 120

    async def test_mistyped_store_refused_at_start(self):
        """
        `twistd voicecall` with each mistyped store: refused at config load, in a line naming
        ``store``, without the password, and without a SQLite directory named after the URL.
        """
        for why, store in TYPOS.items():
            workdir = make_workdir(self, raw=json.dumps({**BASE_CONFIG, **PUBLIC, "store": store}))
            before = set(os.listdir(workdir.path))
            child = spawn(self, daemon_argv(workdir), cwd=workdir.path)
            await child.ended(30)
            output = child.stdout + child.stderr
            self.assertNotEqual(child.exit_code, 0, why)
            self.assertIn("store", output, why)
            self.assertNotIn(SECRET, output, why)
            self.assertNotIn("voicecall ready", output, why)
            self.assertEqual(set(os.listdir(workdir.path)), before, why)

    async def test_scheme_in_capitals_reaches_the_server(self):
        """
        ``PostgreSQL://`` (libpq knows the scheme in lower case only, and logged the whole URL with
        its password, 'missing "=" after ...', four times): the daemon reaches the server, here to
        be told the database does not exist, and no line shows the password.
        """
        from tests.pgserver import postgres_server

        url = postgres_server(self).url("no_such_db", password=SECRET).replace("postgresql://", "PostgreSQL://")
        workdir = make_workdir(self, raw=json.dumps({**BASE_CONFIG, **PUBLIC, "store": url}))
        child = spawn(self, daemon_argv(workdir), cwd=workdir.path)
        await child.ended(60)
        output = child.stdout + child.stderr
        self.assertNotEqual(child.exit_code, 0)
        self.assertIn('database "no_such_db" does not exist', output)
        self.assertNotIn(SECRET, output)
        self.assertNotIn('missing "="', output)
