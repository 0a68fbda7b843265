"""`voicecall doctor`: each check, through run_checks and through the real CLI."""
from __future__ import annotations

import json
import os
import socket
import tempfile

import json5
import psycopg

from click.testing import CliRunner
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint, UNIXServerEndpoint
from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from voicecall.config import ConfigError, parse_config
from voicecall.control.cli import main
from voicecall.domain.pgstore import latest_version
from voicecall.control.doctor import MAX_HEALTH_BYTES, render, run_checks
from tests.harness import free_port, make_workdir, run_cli, spawn_daemon
from tests.pgserver import postgres_server

TWILIO = {"provider": "twilio", "fromNumber": "+15550000000", "twilio": {"accountSid": "AC1", "authToken": "t"}}


class DoctorChecksTests(SynchronousTestCase):
    def checks(self, config: dict) -> dict:
        directory = tempfile.mkdtemp(prefix="vc-doc-", dir="/tmp")
        self.addCleanup(os.system, f"rm -rf {directory}")
        path = os.path.join(directory, "voicecall.json")
        with open(path, "w") as f:
            json.dump({"store": directory, "serve": {"port": 1}, **config}, f)
        return {c.name: c for c in run_checks(path, os.path.join(directory, "s.sock"), {}, directory)}

    def test_mock_defaults_pass(self):
        """The mock provider needs no credentials and no public URL."""
        checks = self.checks({"provider": "mock"})
        self.assertNotIn("public URL", checks)
        self.assertTrue(checks["credentials"].ok)
        self.assertTrue(checks["state directory"].ok)

    def test_private_public_url_fails(self):
        """A loopback or private publicUrl fails with the fix."""
        for url in ("http://127.0.0.1:3334/voice/webhook", "https://10.0.0.5/voice/webhook", "https://localhost/x"):
            check = self.checks({**TWILIO, "publicUrl": url})["public URL"]
            self.assertFalse(check.ok, url)
            self.assertIn("publicUrl", check.fix)

    def test_missing_public_url_fails(self):
        """A real provider without publicUrl or a tunnel cannot be reached."""
        self.assertFalse(self.checks(TWILIO)["public URL"].ok)
        self.assertTrue(self.checks({**TWILIO, "tunnel": {"provider": "ngrok"}})["public URL"].ok)

    def test_https_public_url_passes(self):
        """A public HTTPS URL passes; plain HTTP does not."""
        self.assertTrue(self.checks({**TWILIO, "publicUrl": "https://voice.example.com/voice/webhook"})["public URL"].ok)
        self.assertFalse(self.checks({**TWILIO, "publicUrl": "http://voice.example.com/voice/webhook"})["public URL"].ok)

    def test_port_in_use(self):
        """A port another program holds fails the port check."""
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            port = holder.getsockname()[1]
            check = self.checks({"provider": "mock", "serve": {"port": port}})["port"]
        self.assertFalse(check.ok)
        self.assertIn("in use", check.detail)

    def test_bad_config(self):
        """A bad config is a failing line per problem, credentials apart, and the CLI exits 1."""
        directory = tempfile.mkdtemp(prefix="vc-doc-", dir="/tmp")
        self.addCleanup(os.system, f"rm -rf {directory}")
        path = os.path.join(directory, "bad.json")
        with open(path, "w") as f:
            json.dump({"provider": "twilio", "bogus": 1, "store": directory}, f)
        result = CliRunner().invoke(main, ["--config", path, "doctor", "--json"])
        self.assertEqual(result.exit_code, 1)
        report = json.loads(result.output)
        self.assertFalse(report["ok"])
        failed = [(c["name"], c["detail"]) for c in report["checks"] if not c["ok"]]
        self.assertEqual(
            failed[:5],
            [("config", f"{path}: bogus: unknown key"),
             ("credentials", f"{path}: fromNumber is required (or set TWILIO_FROM_NUMBER env)"),
             ("credentials", f"{path}: twilio.accountSid is required (or set TWILIO_ACCOUNT_SID env)"),
             ("credentials", f"{path}: twilio.authToken is required (or set TWILIO_AUTH_TOKEN env)"),
             ("public URL", "none: carriers cannot reach the webhook")],
        )  # fmt: skip

    def test_config_error_hides_nothing(self):
        """With a config error, the public URL, port and state directory are still checked and reported."""
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            port = holder.getsockname()[1]
            checks = run_checks_list(self, {**TWILIO, "serve": {"port": port, "bnd": "x"},
                                            "publicUrl": "http://127.0.0.1/voice/webhook", "store": "/dev/null/state"})  # fmt: skip
        failed = {c.name: c.detail for c in checks if not c.ok}
        self.assertIn('serve.bnd: unknown key (did you mean "bind"?)', failed["config"])
        self.assertIn("loopback or private", failed["public URL"])
        self.assertIn("in use", failed["port"])
        self.assertIn("state directory", failed)

    def test_unparseable_config_does_not_stop_the_other_checks(self):
        """A file that cannot be parsed is one failing line with its line and column; the port,
        socket and state directory are still checked, with the built-in defaults, saying so."""
        directory = tempfile.mkdtemp(prefix="vc-doc-", dir="/tmp")
        self.addCleanup(os.system, f"rm -rf {directory}")
        path = os.path.join(directory, "voicecall.json5")
        with open(path, "w") as f:
            f.write("{provider: }")
        checks = run_checks(path, os.path.join(directory, "s.sock"), {"HOME": directory}, directory)
        self.assertEqual((checks[0].name, checks[0].ok, checks[0].detail), ("config", False, f"{path}:1:12: not valid JSON or JSON5: Unexpected \"}}\""))
        self.assertEqual([c.name for c in checks[1:]], ["port", "socket", "state directory"])
        self.assertTrue(all("defaults" in c.detail for c in checks[1:]), [c.detail for c in checks[1:]])

    def test_deprecations_are_warnings(self):
        """Legacy keys are WARN lines naming their replacement; the report stays ok."""
        checks = run_checks_list(self, {"provider": "log"})
        warns = [c for c in checks if c.warn]
        self.assertEqual([c.detail for c in warns], ['provider "log" is deprecated; use "mock" instead'])
        self.assertTrue(all(c.ok for c in warns))
        self.assertIn('WARN  config: provider "log" is deprecated; use "mock" instead', render(checks))
        self.assertEqual(warns[0].to_json()["warn"], True)

    def test_writable_config_fails_readable_secrets_warn(self):
        """A config others can write is a FAIL; secrets everyone can read are a WARN with chmod 600."""
        checks = run_checks_list(self, {"provider": "mock"}, mode=0o666)
        self.assertIn("writable by other users", [c for c in checks if not c.ok][0].detail)
        checks = run_checks_list(self, TWILIO, mode=0o644)
        self.assertEqual(len([c for c in checks if c.warn and "chmod 600" in c.detail]), 1)

    def test_writable_config_fix_is_chmod(self):
        """The fix doctor names for a config others can write is the chmod that cures it, not "edit" the file."""
        directory = tempfile.mkdtemp(prefix="vc-doc-", dir="/tmp")
        self.addCleanup(os.system, f"rm -rf {directory}")
        path = os.path.join(directory, "voicecall.json")
        with open(path, "w") as f:
            json.dump({"store": directory, "provider": "mock"}, f)
        os.chmod(path, 0o666)
        result = CliRunner().invoke(main, ["--config", path, "--socket", os.path.join(directory, "s.sock"), "doctor"])
        self.assertEqual(result.exit_code, 1, result.output)
        lines = result.stdout.splitlines()
        refused = next(i for i, line in enumerate(lines) if "writable by other users" in line)
        self.assertEqual(lines[refused + 1].strip(), f"fix: chmod go-w {path}")


EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
#: No carrier credential from the environment: doctor reads only the file.
NO_ENV = {name: None for name in ("TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "TWILIO_FROM_NUMBER", "TELNYX_API_KEY",
                                  "TELNYX_CONNECTION_ID", "TELNYX_PUBLIC_KEY", "PLIVO_AUTH_ID", "PLIVO_AUTH_TOKEN",
                                  "OPENAI_API_KEY", "VOICECALL_CONFIG", "VOICECALL_SOCKET")}  # fmt: skip


def doctor_report(testcase, config: dict) -> dict:
    """`voicecall --config F doctor --json` on `config` (its store a fresh directory), through the CLI."""
    directory = tempfile.mkdtemp(prefix="vc-doc-", dir="/tmp")
    testcase.addCleanup(os.system, f"rm -rf {directory}")
    path = os.path.join(directory, "voicecall.json")
    with open(path, "w") as f:
        json.dump({**config, "store": directory}, f)
    os.chmod(path, 0o600)
    args = ["--config", path, "--socket", os.path.join(directory, "s.sock"), "doctor", "--json"]
    return json.loads(CliRunner().invoke(main, args, env=NO_ENV).stdout)


def example(name: str) -> dict:
    with open(os.path.join(EXAMPLES, name)) as f:
        return json5.load(f)


class DoctorAdviceTests(SynchronousTestCase):
    """What doctor says matches the daemon and README: current keys, the daemon's problems, placeholders."""

    def test_streaming_fix_names_the_current_key(self):
        """Without an STT key, the fix names streaming.providers.openai.apiKey, not the deprecated streaming.openaiApiKey."""
        report = doctor_report(self, {**TWILIO, "publicUrl": "https://voice.example.com/voice/webhook", "streaming": {"enabled": True}})
        [streaming] = [c for c in report["checks"] if c["name"] == "streaming"]
        self.assertEqual(streaming["fix"], "set streaming.providers.openai.apiKey or OPENAI_API_KEY")

    def test_bad_from_number_said_once(self):
        """A fromNumber that is not E.164 is the daemon's one problem; doctor does not add "fromNumber is required"."""
        config = {**TWILIO, "fromNumber": "555"}
        daemon = self.assertRaises(ConfigError, parse_config, config, {}).problems
        report = doctor_report(self, config)
        failed = [c["detail"] for c in report["checks"] if not c["ok"] and c["name"] in ("config", "credentials")]
        self.assertEqual(len(failed), len(daemon), failed)
        self.assertIn("fromNumber: Expected E.164 format", failed[0])

    def test_misspelt_plugin_entry_fails(self):
        """A whole OpenClaw file whose voice-call entry is misspelt fails the config check, not "OK (provider mock)"."""
        report = doctor_report(self, {"plugins": {"entries": {"voicecall": {"config": {"provider": "twilio"}}}}})
        [config] = [c for c in report["checks"] if c["name"] == "config"]
        self.assertFalse(config["ok"])
        self.assertTrue(config["detail"].endswith('plugins.entries.voicecall: unknown key (did you mean "voice-call"?)'), config)

    def test_example_placeholders_warn(self):
        """The examples' placeholder credentials are a WARN naming each key to replace, not "OK credentials present"."""
        cases = {
            "twilio.json5": ["twilio.accountSid", "twilio.authToken"],
            "twilio-streaming.json5": ["twilio.accountSid", "twilio.authToken"],
            "telnyx.json5": ["telnyx.apiKey", "telnyx.connectionId", "telnyx.publicKey"],
            "plivo.json5": ["plivo.authId", "plivo.authToken"],
        }
        for name, keys in cases.items():
            report = doctor_report(self, example(name))
            [credentials] = [c for c in report["checks"] if c["name"] == "credentials"]
            self.assertEqual((credentials["ok"], credentials.get("warn")), (True, True), name)
            self.assertEqual(credentials["detail"], f"still the examples' placeholders, replace them: {', '.join(keys)}")

    def test_real_looking_credentials_pass(self):
        """Credentials that are not the placeholders, and the fake carriers' examples (a local baseUrl), pass without a WARN."""
        config = example("twilio.json5")
        config["twilio"] = {"accountSid": "AC" + "3f" * 16, "authToken": "9b" * 16}
        reports = {"real": doctor_report(self, config)}
        for name in ("twilio-fake.json5", "telnyx-fake.json5", "plivo-fake.json5"):
            reports[name] = doctor_report(self, example(name))
        for name, report in reports.items():
            [credentials] = [c for c in report["checks"] if c["name"] == "credentials"]
            self.assertEqual((credentials["ok"], "warn" in credentials), (True, False), (name, credentials))


def run_checks_list(testcase, config: dict, mode: int = 0o600) -> list:
    directory = tempfile.mkdtemp(prefix="vc-doc-", dir="/tmp")
    testcase.addCleanup(os.system, f"rm -rf {directory}")
    path = os.path.join(directory, "voicecall.json")
    with open(path, "w") as f:
        json.dump({"store": directory, **config}, f)
    os.chmod(path, mode)
    return run_checks(path, os.path.join(directory, "s.sock"), {}, directory)


class DoctorWithDaemonTests(TestCase):
    timeout = 40

    async def test_running_daemon(self):
        """With the daemon running, doctor reports it and its port and socket as OK."""
        workdir = make_workdir(self)
        await spawn_daemon(self, workdir)
        result = await run_cli(self, workdir, "doctor")
        self.assertEqual(result.code, 0, result.err)
        self.assertIn("OK    daemon: running", result.out)

    async def test_bad_config_through_the_cli(self):
        """`voicecall doctor` as a subprocess: a config error and the other failures, each a line, exit 1."""
        workdir = make_workdir(self, {"provider": "twilio", "fromNumbr": "+15550000000", "publicUrl": "http://127.0.0.1/x"})
        result = await run_cli(self, workdir, "doctor")
        self.assertEqual(result.code, 1, result.err)
        lines = result.out.splitlines()
        self.assertIn(f'FAIL  config: {workdir.config_path}: fromNumbr: unknown key (did you mean "fromNumber"?)', lines)
        self.assertIn(f"FAIL  credentials: {workdir.config_path}: twilio.accountSid is required (or set TWILIO_ACCOUNT_SID env)", lines)
        self.assertIn("FAIL  public URL: http://127.0.0.1/x is loopback or private: carriers cannot reach it", lines)
        self.assertNotIn("Traceback", result.out + result.err)

    async def test_syntax_error_through_the_cli(self):
        """`voicecall doctor` on a config with a JSON syntax error reports it and goes on to the port, socket and store."""
        workdir = make_workdir(self, raw='{\n  provider: "mock",\n  serve: {port: @},\n}\n')
        result = await run_cli(self, workdir, "doctor", env={"HOME": workdir.path})
        self.assertEqual(result.code, 1, result.err)
        lines = result.out.splitlines()
        self.assertEqual(lines[0], f'FAIL  config: {workdir.config_path}:3:17: not valid JSON or JSON5: Unexpected "@"')
        checked = [line[6:].split(":", 1)[0] for line in lines[1:] if not line.startswith(" ")]
        self.assertEqual(checked, ["port", "socket", "state directory"], result.out)
        self.assertNotIn("Traceback", result.out + result.err)


@implementer(IPullProducer)
class _EndlessLine(Protocol):
    """Answers anything with a line that never ends: 64 KiB more each time the client has read the last."""

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, False)

    def resumeProducing(self) -> None:
        self.transport.write(b"x" * 65536)

    def stopProducing(self) -> None:
        pass


class DoctorAgainstAStrangerTests(TestCase):
    timeout = 40

    async def test_an_endless_answer_on_the_socket(self):
        """
        Something on the daemon's socket that answers with an endless line: `voicecall doctor`
        reads at most MAX_HEALTH_BYTES of it and fails the daemon check saying so (it used to read
        for ever, its memory growing), and still checks the port and the state directory.
        """
        workdir = make_workdir(self)
        port = await UNIXServerEndpoint(reactor, workdir.rpc_path).listen(Factory.forProtocol(_EndlessLine))
        self.addCleanup(port.stopListening)
        result = await run_cli(self, workdir, "doctor", timeout=15)
        self.assertEqual(result.code, 1, result.err)
        lines = result.out.splitlines()
        self.assertIn(
            f"FAIL  daemon: {workdir.rpc_path} answered with more than {MAX_HEALTH_BYTES // 1024} KiB:"
            " not a voicecall daemon's health answer",
            lines,
        )
        checked = [line[6:].split(":", 1)[0] for line in lines if not line.startswith(" ")]
        self.assertEqual(checked[-3:], ["daemon", "port", "state directory"], result.out)
        self.assertNotIn("Traceback", result.out + result.err)

    async def test_a_json_answer_that_is_not_an_object(self):
        """An answer on the socket that is JSON but not an object, or whose result is not one, is no daemon's: doctor reports on, without a traceback."""
        for answer in (_ListAnswer, _NumberResult, _DeepAnswer):
            workdir = make_workdir(self)
            port = await UNIXServerEndpoint(reactor, workdir.rpc_path).listen(Factory.forProtocol(answer))
            self.addCleanup(port.stopListening)
            result = await run_cli(self, workdir, "doctor", timeout=15)
            self.assertNotIn("Traceback", result.out + result.err)
            checked = [line[6:].split(":", 1)[0] for line in result.out.splitlines() if not line.startswith(" ")]
            self.assertEqual(checked[-3:], ["port", "socket", "state directory"], result.out)


class _ListAnswer(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"[1]\n")


class _DeepAnswer(Protocol):
    """JSON nested deeper than Python's parser recurses, within doctor's 64 KiB."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"[" * 60_000 + b"\n")


class _NumberResult(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b'{"jsonrpc":"2.0","id":1,"result":5}\n')


#: A password that would show in any line that repeats the store's URL.
PG_SECRET = "s3cretPW"


class _RefusingPostgres(Protocol):
    """A PostgreSQL server that refuses every login with a wrong-password FATAL (SQLSTATE 28P01)."""

    def connectionMade(self) -> None:
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 8 and len(self.buffer) >= int.from_bytes(self.buffer[:4], "big"):
            length = int.from_bytes(self.buffer[:4], "big")
            code, self.buffer = int.from_bytes(self.buffer[4:8], "big"), self.buffer[length:]
            if code in (80877103, 80877104):  # SSLRequest, GSSENCRequest: not spoken here
                self.transport.write(b"N")
                continue
            fields = b"SFATAL\0VFATAL\0C28P01\0" + b'Mpassword authentication failed for user "vc"\0' + b"\0"
            self.transport.write(b"E" + (4 + len(fields)).to_bytes(4, "big") + fields)
            self.transport.loseConnection()
            return


class DoctorStoreTests(TestCase):
    """
    `voicecall doctor` on a PostgreSQL store connects to it (it said "OK store" for any URL without
    trying): each failure named with its fix, the password never shown.
    """

    timeout = 60

    async def doctor(self, url: str) -> str:
        workdir = make_workdir(self, raw=json.dumps({"provider": "mock", "store": url, "publicUrl": "https://a.example/voice/webhook",
                                                     "serve": {"port": free_port()}}))  # fmt: skip
        result = await run_cli(self, workdir, "doctor", env={"HOME": workdir.path})
        self.assertNotIn(PG_SECRET, result.out + result.err)
        self.assertNotIn("Traceback", result.out + result.err)
        [line] = [line for line in result.out.splitlines() if line[6:].startswith("store:")]
        self.assertEqual(result.code, 0 if line.startswith("OK") else 1, result.out)
        return line

    async def test_unreachable(self):
        line = await self.doctor(f"postgresql://vc:{PG_SECRET}@127.0.0.1:{free_port()}/calls")
        self.assertRegex(line, r"^FAIL  store: PostgreSQL postgresql://vc:\*\*\*@127\.0\.0\.1:\d+/calls: server unreachable \(.*refused")

    async def test_authentication_failed(self):
        listener = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(_RefusingPostgres))
        self.addCleanup(listener.stopListening)
        line = await self.doctor(f"postgresql://vc:{PG_SECRET}@127.0.0.1:{listener.getHost().port}/calls")
        self.assertIn(': authentication failed (', line)
        self.assertIn('password authentication failed for user "vc"', line)

    async def test_database_missing(self):
        url = postgres_server(self).url("no_such_db", password=PG_SECRET)
        line = await self.doctor(url)
        self.assertIn(": the database does not exist (", line)

    async def test_schema_newer_than_this_code(self):
        url = postgres_server(self).new_database(self).replace("voicecall@", f"voicecall:{PG_SECRET}@")
        with psycopg.connect(url) as conn:
            conn.execute("CREATE TABLE schema_migrations (version int PRIMARY KEY)")
            conn.execute("INSERT INTO schema_migrations VALUES (%s)", (latest_version() + 1,))
        line = await self.doctor(url)
        self.assertIn(f": schema version {latest_version() + 1} is newer than this voicecall's ({latest_version()})", line)

    async def test_reachable(self):
        url = postgres_server(self).new_database(self).replace("voicecall@", f"voicecall:{PG_SECRET}@")
        line = await self.doctor(url)
        self.assertRegex(line, r"^OK    store: PostgreSQL postgresql://voicecall:\*\*\*@127\.0\.0\.1:\d+/vc_\w+: reachable, empty")
