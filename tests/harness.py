"""
An in-process daemon for tests that need a carrier fake in the same reactor: the real
`makeService` on the real reactor, listening on loopback, driven through the RPC client.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site

from voicecall import tap
from voicecall.client import connect


def free_port() -> int:
    """A loopback port that was free a moment ago (for configs that must name their port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def workdir(testcase) -> str:
    path = tempfile.mkdtemp(prefix="vc-", dir="/tmp")
    testcase.addCleanup(shutil.rmtree, path, True)
    return path


async def start_daemon(testcase, config: dict, directory: str | None = None):
    """Start voicecall with `config` (store and RPC socket in a temp dir); returns (service, rpc client)."""
    directory = directory or workdir(testcase)
    config = {**config, "store": directory}
    path = os.path.join(directory, "voicecall.json")
    with open(path, "w") as f:
        json.dump(config, f)
    port = config.get("serve", {}).get("port")
    options = tap.Options()
    options.parseOptions(
        ["--config", path, "--rpc", f"unix:{directory}/rpc.sock"]
        + ([] if port else ["--webhook", "tcp:0:interface=127.0.0.1"])
    )
    service = tap.makeService(options, reactor)
    service.startService()
    testcase.addCleanup(service.stopService)
    await service.ready
    client = await connect(reactor, f"{directory}/rpc.sock")
    testcase.addCleanup(client.transport.loseConnection)
    return service, client


async def serve(testcase, resource) -> str:
    """Serve a twisted.web resource on loopback; returns its base URL."""
    site = Site(resource)
    site.noisy = False
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
    testcase.addCleanup(port.stopListening)
    return f"http://127.0.0.1:{port.getHost().port}"


def http_client(testcase) -> HTTPClient:
    """A treq client whose pool is closed at cleanup."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    testcase.addCleanup(pool.closeCachedConnections)
    return HTTPClient(Agent(reactor, pool=pool))


async def eventually(check, timeout: float = 5.0, what: str = "condition"):
    """Poll `check()` until it returns something truthy."""
    from twisted.internet.task import deferLater

    waited = 0.0
    while True:
        value = check()
        if value:
            return value
        if waited >= timeout:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.02, lambda: None)
        waited += 0.02


def sleep(seconds: float) -> Deferred:
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)


def raise_fd_limit(testcase, want: int = 4096) -> None:
    """Let a flood test open `want` descriptors (restored afterwards), if the hard limit allows."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want and (hard == resource.RLIM_INFINITY or hard >= want):
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        testcase.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))


async def speech_fakes(testcase, tts_key: str = "sk-tts", stt_key: str = "sk-stt", transcripts=()):
    """The fake OpenAI speech endpoint (its base URL) and fake realtime STT server, on loopback."""
    from voicecall.testing.openai_realtime import FakeRealtimeServer
    from voicecall.testing.speech import FakeOpenAISpeech

    speech = FakeOpenAISpeech(reactor, tts_key, chunk_bytes=960)
    speech_base = await serve(testcase, speech.resource())
    stt = FakeRealtimeServer(reactor, stt_key, script=list(transcripts))
    stt.listen()
    testcase.addCleanup(stt.stop)
    return speech, speech_base, stt
