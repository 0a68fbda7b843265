"""
Issue 17's CLI commands: `call`/`start` with per-call choices, `continue --input`, `dtmf`,
`transfer`, `end --message` and `recording fetch`. The first tier runs the CLI with click's
CliRunner against a real RpcFactory over a real CallManager (tests.test_cli's seam), the
recording's carrier served by a StubTreq resource; the second runs the real `voicecall` script
in a child process against a local HTTP server, the daemon down (the call read from the store),
including Ctrl-C in the middle of a download.
"""
from __future__ import annotations

import base64
import glob
import os

from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from tests.harness import eventually, make_workdir, run_cli, spawn_cli
from tests.test_cli import TO, CliTestsBase
from voicecall.control import cli, recording
from voicecall.domain.model import CallRecord
from voicecall.domain.store import CallStore
from voicecall.infra.dbwriter import SynchronousWriter

SID = "AC" + "0" * 32
TOKEN = "tw-token"
AUDIO = b"ID3" + bytes(range(256)) * 64
AGENT = "+15550009999"


def recording_path(sid: str = SID, rid: str = "RE1") -> str:
    return f"/2010-04-01/Accounts/{sid}/Recordings/{rid}"


class TwilioMedia(Resource):
    """A carrier's recording media: `AUDIO` at `<recording path>.mp3`, only with the account's Basic auth."""

    isLeaf = True

    def __init__(self, body: bytes = AUDIO, chunked: bool = False) -> None:
        super().__init__()
        self.body = body
        self.chunked = chunked
        self.requests: list[tuple[bytes, bytes | None]] = []

    def render_GET(self, request):
        self.requests.append((request.path, request.getHeader(b"authorization")))
        expected = b"Basic " + base64.b64encode(f"{SID}:{TOKEN}".encode())
        if request.getHeader(b"authorization") != expected:
            request.setResponseCode(401)
            return b"unauthorized"
        if request.path != recording_path().encode() + b".mp3":
            request.setResponseCode(404)
            return b"not found"
        request.setHeader(b"content-type", b"audio/mpeg")
        if self.chunked:
            for start in range(0, len(self.body), 4096):
                request.write(self.body[start:start + 4096])
            request.finish()
            return NOT_DONE_YET
        return self.body


def twilio_call(call_id: str, recordings: list[dict], provider: str = "twilio", **kw) -> CallRecord:
    return CallRecord(
        call_id=call_id,
        provider=provider,
        direction="outbound",
        state="completed",
        from_number="+15550000000",
        to_number=TO,
        started_at=1_700_000_000_000,
        ended_at=1_700_000_060_000,
        end_reason="hangup-bot",
        provider_call_id=f"CA{call_id}",
        metadata={"recordings": recordings},
        **kw,
    )


def completed(rid: str = "RE1", base: str = "https://api.twilio.com", **extra) -> dict:
    return {"id": rid, "status": "completed", "url": base + recording_path(rid=rid), "durationSeconds": 12, **extra}


class CommandTests(CliTestsBase):
    """The new commands and options, sent to a daemon over RPC."""

    config_extra = {"transfer": {"allowTo": [AGENT]}, "allowedFromNumbers": ["+15550000001"]}

    def setUp(self):
        super().setUp()
        self.start_daemon(transfer_allow_to=(AGENT,), allowed_from_numbers=("+15550000001",))

    def test_call_choices(self):
        """`call` passes --from/--voice/--greeting/--objective/--max-duration/--answering-machine/--record to initiate."""
        output = self.ok(
            "call", "--to", TO, "-m", "Your order is ready",
            "--voice", "alloy", "--greeting", "Hi, the shop here.", "--objective", "Confirm pickup",
            "--max-duration", "120", "--answering-machine", "leave-message", "--record",
        )
        metadata = self.manager.find(output["callId"]).metadata
        self.assertEqual(
            {k: metadata.get(k) for k in ("voice", "greeting", "objective", "maxDurationSeconds", "answeringMachine", "record")},
            {"voice": "alloy", "greeting": "Hi, the shop here.", "objective": "Confirm pickup",
             "maxDurationSeconds": 120, "answeringMachine": "leave-message", "record": True},
        )

    def test_start_choices_and_defaults(self):
        """`start` takes the same options; without them the call has the config's defaults (no choice sent)."""
        plain = self.ok("start", "--to", TO)["callId"]
        self.assertEqual(self.manager.find(plain).metadata, {"mode": "conversation"})
        chosen = self.ok("start", "--to", TO, "--answering-machine", "hang-up", "--no-record")["callId"]
        self.assertEqual(self.manager.find(chosen).metadata.get("answeringMachine"), "hang-up")
        self.assertNotIn("record", self.manager.find(chosen).metadata)

    def test_manager_refusals_shown(self):
        """A choice the config does not allow fails with the manager's text on stderr, exit 1, no call."""
        result = self.fails("call", "--to", TO, "-m", "Hi", "--from", "+15557777777")
        self.assertEqual(
            (result.exit_code, result.stderr.strip()),
            (1, "Error: from number not allowed: +15557777777 (use fromNumber or one of allowedFromNumbers)"),
        )
        result = self.fails("call", "--to", TO, "-m", "Hi", "--max-duration", "100000")
        self.assertIn("maxDurationSeconds must be an integer from 1 to", result.stderr)
        self.assertEqual(self.manager.active_calls(), [])

    def test_bad_options_refused_before_connecting(self):
        """Unknown choices are usage errors (exit 2) that reach no daemon."""
        for args in (
            ("call", "--to", TO, "-m", "Hi", "--answering-machine", "voicemail"),
            ("call", "--to", TO, "-m", "Hi", "--max-duration", "1e3"),
            ("call", "--to", TO, "-m", "Hi", "--voice", " "),
            ("continue", "--call-id", "x", "-m", "Hi", "--input", "keys"),
            ("dtmf", "--call-id", "x"),
            ("dtmf", "--call-id", "x", "--digits", ""),
            ("transfer", "--call-id", "x"),
            ("end", "--call-id", "x", "--message", " "),
            ("recording", "fetch", "--call-id", "x"),
        ):
            result = self.invoke(*args)
            self.assertEqual(result.exit_code, 2, (args, result.stdout, result.stderr))
        self.assertEqual(self.connects, [])

    def test_continue_with_keys(self):
        """`continue --input "speech dtmf"` prints the keys pressed, with `"input": "dtmf"`."""
        call_id = self.place()
        self.on_idle = lambda: self.event("call.dtmf", call_id, digits="42#")
        output = self.ok("continue", "--call-id", call_id, "-m", "Enter your code", "--input", "speech dtmf")
        self.assertEqual(output, {"success": True, "transcript": "42#", "input": "dtmf"})

    def test_dtmf(self):
        """`dtmf` plays the keys and prints {success: true}; bad digits fail with the manager's text."""
        call_id = self.place()
        self.assertEqual(self.ok("dtmf", "--call-id", call_id, "--digits", "1w2#"), {"success": True})
        self.assertIn(("dtmf", f"mock-{call_id}", "1w2#"), self.provider.actions)
        result = self.fails("dtmf", "--call-id", call_id, "--digits", "12x")
        self.assertEqual(result.stderr.strip(), "Error: digits may only contain 0-9, *, # and w (a half-second pause)")

    def test_transfer(self):
        """`transfer --message` says it, then connects the caller; the record ends transferred."""
        call_id = self.place()
        self.assertEqual(self.ok("transfer", "--call-id", call_id, "--to", AGENT, "-m", "Connecting you"), {"success": True})
        actions = self.provider.actions
        self.assertLess(actions.index(("spoken", f"mock-{call_id}", "Connecting you")), actions.index(("transfer", f"mock-{call_id}", AGENT)))
        record = self.ok("status", "--call-id", call_id)
        self.assertEqual((record["endReason"], record["transferTarget"]), ("transferred", AGENT))

    def test_transfer_refused(self):
        """A target not in transfer.allowTo is refused; the call goes on."""
        call_id = self.place()
        result = self.fails("transfer", "--call-id", call_id, "--to", "+15556666666")
        self.assertIn("Transfer target not allowed: +15556666666", result.stderr)
        self.assertIsNotNone(self.manager.find(call_id))

    def test_ended_call_says_it_ended(self):
        """`dtmf`/`transfer` on an ended call say it ended and why."""
        call_id = self.place()
        self.event("call.ended", call_id, reason="hangup-user")
        for args in (("dtmf", "--digits", "1"), ("transfer", "--to", AGENT)):
            result = self.fails(args[0], "--call-id", call_id, *args[1:])
            self.assertEqual(result.stderr.strip(), f"Error: Call {call_id} has ended (hangup-user)", args)

    def test_end_with_goodbye(self):
        """`end --message` plays the goodbye, then hangs up."""
        call_id = self.place()
        self.assertEqual(self.ok("end", "--call-id", call_id, "--message", "Goodbye"), {"success": True})
        actions = self.provider.actions
        self.assertLess(actions.index(("spoken", f"mock-{call_id}", "Goodbye")), actions.index(("hangup", f"mock-{call_id}", "hangup-bot")))


class FetchTests(CliTestsBase):
    """`recording fetch` against a daemon: the call from RPC status, the audio from a stub carrier."""

    config_extra = {"twilio": {"accountSid": SID, "authToken": TOKEN}}

    def setUp(self):
        super().setUp()
        self.start_daemon()
        self.media = TwilioMedia()
        self.stub = StubTreq(self.media)
        self.patch(cli, "_download_client", lambda reactor: self.stub)
        self.out = os.path.join(self.home, "call.mp3")

    def store_call(self, recordings: list[dict], call_id: str = "c1", **kw) -> None:
        self.successResultOf(self.open_store().write(twilio_call(call_id, recordings, **kw), event_keys=[f"key-{call_id}"]))

    def test_fetch(self):
        """The last completed recording is written to --out; JSON says what was written."""
        self.store_call([completed("RE0", status="failed"), completed()])
        output = self.ok("recording", "fetch", "--call-id", "c1", "--out", self.out)
        self.assertEqual(output, {"callId": "c1", "recordingId": "RE1", "file": self.out, "bytes": len(AUDIO), "durationSeconds": 12})
        with open(self.out, "rb") as f:
            self.assertEqual(f.read(), AUDIO)
        self.assertEqual(glob.glob(os.path.join(self.home, ".*.part")), [])

    def test_refuses_to_overwrite(self):
        """An existing --out is kept unless --force; with --force it is replaced."""
        self.store_call([completed()])
        with open(self.out, "wb") as f:
            f.write(b"mine")
        result = self.fails("recording", "fetch", "--call-id", "c1", "--out", self.out)
        self.assertEqual(result.stderr.strip(), f"Error: {self.out} exists: pass --force to replace it")
        self.assertEqual(self.media.requests, [])
        with open(self.out, "rb") as f:
            self.assertEqual(f.read(), b"mine")
        self.ok("recording", "fetch", "--call-id", "c1", "--out", self.out, "--force")
        with open(self.out, "rb") as f:
            self.assertEqual(f.read(), AUDIO)

    def test_recording_id(self):
        """--recording-id picks that recording; an unknown one is named with the call's recordings."""
        self.store_call([completed(), completed("RE2")])
        result = self.fails("recording", "fetch", "--call-id", "c1", "--out", self.out, "--recording-id", "RE9")
        self.assertEqual(result.stderr.strip(), "Error: call c1 has no recording RE9 (its recordings: RE1, RE2)")
        self.ok("recording", "fetch", "--call-id", "c1", "--out", self.out, "--recording-id", "RE1")
        self.assertEqual(self.media.requests[-1][0], recording_path().encode() + b".mp3")

    def test_errors(self):
        """No call, no recording, not completed, mock audio, HTTP errors, a URL off the carrier's origin: clear errors, no file."""
        self.store_call([], call_id="none")
        self.store_call([{"id": "RE1", "status": "in-progress"}], call_id="busy")
        self.store_call([{"id": "mock-rec-1", "status": "completed", "url": "http://x/mock"}], call_id="mock", provider="mock")
        self.store_call([completed("RE404")], call_id="gone")
        self.store_call([completed(base="https://evil.example")], call_id="evil")
        for call_id, text in (
            ("nope", "no call nope"),
            ("none", "call none has no recording"),
            ("busy", "recording RE1 of call busy is not completed yet (in-progress)"),
            ("mock", "the mock provider's recordings have no audio"),
            ("gone", f"https://api.twilio.com{recording_path(rid='RE404')}.mp3 answered HTTP 404 Not Found"),
            ("evil", "refusing to send Twilio credentials to https://evil.example"),
        ):
            result = self.fails("recording", "fetch", "--call-id", call_id, "--out", self.out)
            self.assertEqual(result.exit_code, 1, call_id)
            self.assertIn(text, result.stderr, call_id)
        self.assertEqual([path for path, _ in self.media.requests], [recording_path(rid="RE404").encode() + b".mp3"])
        self.assertEqual(os.listdir(self.home), [n for n in os.listdir(self.home) if n != "call.mp3" and not n.endswith(".part")])

    def test_missing_credentials(self):
        """A Twilio call's recording needs the Twilio credentials in the config: it says which."""
        with open(self.config, "w") as f:
            f.write('{"store": "%s"}' % self.store_dir)
        self.store_call([completed()])
        result = self.fails("recording", "fetch", "--call-id", "c1", "--out", self.out)
        self.assertIn("fetching its recordings needs twilio.accountSid and twilio.authToken in the config", result.stderr)


class FetchUnitTests(SynchronousTestCase):
    """recording.fetch itself: the body streamed to disk, the progress bar fed, nothing left on failure."""

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.out = os.path.join(self.dir, "r.mp3")

    def run_fetch(self, media: Resource, recordings: list[dict], progress=None):
        from voicecall.providers.twilio import recording_source

        stub = StubTreq(media)
        source = lambda rec: recording_source(stub, rec, base_url="https://api.twilio.com", account_sid=SID, auth_token=TOKEN)  # noqa: E731
        d = Deferred.fromCoroutine(recording.fetch(
            twilio_call("c1", recordings).to_json(), out=self.out, recording_id=None, force=False, source=source, http=stub, progress=progress,
        ))
        stub.flush()
        return d

    def test_progress_without_length(self):
        """A chunked body (no Content-Length) feeds the bar by bytes with an unknown length."""
        bars = []

        class Bar:
            def __init__(self, length, label):
                self.length, self.label, self.updates = length, label, []
                bars.append(self)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def update(self, n):
                self.updates.append(n)

        result = self.successResultOf(self.run_fetch(TwilioMedia(chunked=True), [completed()], progress=Bar))
        self.assertEqual(result["bytes"], len(AUDIO))
        (bar,) = bars
        self.assertEqual((bar.length, bar.label, sum(bar.updates)), (None, "recording RE1", len(AUDIO)))

    def test_unauthorized_leaves_nothing(self):
        """An HTTP error writes no file, not even a temporary one."""
        class Refusing(Resource):
            isLeaf = True

            def render_GET(self, request):
                request.setResponseCode(403)
                return b"no"

        failure = self.failureResultOf(self.run_fetch(Refusing(), [completed()]), recording.RecordingError)
        self.assertIn("answered HTTP 403 Forbidden", str(failure.value))
        self.assertEqual(os.listdir(self.dir), [])


class SlowMedia(Resource):
    """Announces a large body, sends its first part, then holds the rest (for a Ctrl-C mid-download)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.started = Deferred()

    def render_GET(self, request):
        request.setHeader(b"content-length", b"10000000")
        request.write(b"ID3" + b"\0" * 65536)
        if not self.started.called:
            self.started.callback(None)
        return NOT_DONE_YET


class ScriptFetchTests(TestCase):
    """The real `voicecall` script, the daemon down: the call read from the store, audio from a local server."""

    timeout = 60

    async def serve(self, resource: Resource) -> str:
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(resource))
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}"

    async def workdir_with_call(self, base: str, recordings: list[dict]):
        work = make_workdir(self, {"provider": "twilio", "fromNumber": "+15550000000",
                                   "twilio": {"accountSid": SID, "authToken": TOKEN, "baseUrl": base}})
        writer = SynchronousWriter()
        store = CallStore(work.path, writer)
        await writer.start()
        await store.open()
        await store.write(twilio_call("c1", recordings), event_keys=["key-c1"])
        await store.close()
        return work

    async def test_fetch_from_the_store(self):
        """Daemon down: `recording fetch` reads the call from the store and writes the audio."""
        base = await self.serve(TwilioMedia())
        work = await self.workdir_with_call(base, [completed(base=base)])
        out = os.path.join(work.path, "call.mp3")
        result = await run_cli(self, work, "recording", "fetch", "--call-id", "c1", "--out", out)
        self.assertEqual(result.code, 0, result.err)
        self.assertEqual(result.json()["bytes"], len(AUDIO))
        self.assertIn("daemon not running", result.err)
        with open(out, "rb") as f:
            self.assertEqual(f.read(), AUDIO)

    async def test_ctrl_c_leaves_no_file(self):
        """Ctrl-C in the middle of a download exits 130 quietly and leaves neither the file nor a part of it."""
        media = SlowMedia()
        base = await self.serve(media)
        work = await self.workdir_with_call(base, [completed(base=base)])
        out = os.path.join(work.path, "call.mp3")
        child = spawn_cli(self, work, "recording", "fetch", "--call-id", "c1", "--out", out)
        await media.started
        await eventually(lambda: glob.glob(os.path.join(work.path, ".call.mp3.*.part")), 10, "the partial download")
        child.send_signal("INT")
        await child.ended()
        self.assertEqual(child.exit_code, 130, child.describe())
        self.assertNotIn("Traceback", child.stderr)
        self.assertEqual([n for n in os.listdir(work.path) if "call.mp3" in n], [])


class TelnyxMedia(Resource):
    """Telnyx: `GET /v2/recordings/{id}` (Bearer key) names a presigned URL on a storage host, which needs no credentials."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[bytes, bytes, bytes | None]] = []

    def render_GET(self, request):
        self.requests.append((request.getRequestHostname(), request.path, request.getHeader(b"authorization")))
        if request.path == b"/v2/recordings/rec-1":
            if request.getHeader(b"authorization") != b"Bearer KEY123":
                request.setResponseCode(401)
                return b"{}"
            request.setHeader(b"content-type", b"application/json")
            return b'{"data": {"id": "rec-1", "download_urls": {"mp3": "https://storage.example/rec-1.mp3?X-Amz-Signature=secret"}}}'
        if request.path == b"/rec-1.mp3" and request.args.get(b"X-Amz-Signature") == [b"secret"]:
            return AUDIO
        request.setResponseCode(404)
        return b"no"


class TelnyxFetchTests(SynchronousTestCase):
    def test_fresh_presigned_url(self):
        """A Telnyx recording is looked up with the API key; its fresh presigned URL is fetched without it."""
        media = TelnyxMedia()
        stub = StubTreq(media)
        out = os.path.abspath(self.mktemp())
        os.makedirs(os.path.dirname(out), exist_ok=True)
        call = twilio_call("c1", [{"id": "rec-1", "status": "completed", "url": "https://expired.example/old.mp3"}], provider="telnyx").to_json()
        source = recording.source_for("telnyx", stub, base_url="https://api.telnyx.com", credentials={"api_key": "KEY123"})
        d = Deferred.fromCoroutine(recording.fetch(call, out=out, recording_id=None, force=False, source=source, http=stub))
        stub.flush()
        self.assertEqual(self.successResultOf(d)["bytes"], len(AUDIO))
        with open(out, "rb") as f:
            self.assertEqual(f.read(), AUDIO)
        self.assertEqual(
            [(host, path, auth) for host, path, auth in media.requests],
            [(b"api.telnyx.com", b"/v2/recordings/rec-1", b"Bearer KEY123"), (b"storage.example", b"/rec-1.mp3", None)],
        )
