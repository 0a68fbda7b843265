# -*- test-case-name: tests.test_tap,tests.test_wiring -*-
"""
The daemon's lifecycle: `VoicecallService` runs the start sequence in order (store, cluster
node, restore, routing, webhook, public URL, adoption, RPC socket, metrics, reaper, ready) and stops it in
reverse; each listening endpoint is a `ListenerService`. It is handed every component, built and
wired by tap.py, and imports none of them: only what it catches (a store or a tunnel that says
why it failed) and systemd's notification.
"""
from __future__ import annotations

import errno
import os
import sys
from typing import Any, Awaitable, Callable, Sequence

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized

from voicecall.control.expose import ExposeError
from voicecall.domain.store import StoreLockedError
from voicecall.infra import sdnotify


def unix_path(description: str) -> str | None:
    """The socket path of a `unix:` endpoint string (None: another kind of endpoint)."""
    if not description.startswith("unix:"):
        return None
    rest = description[len("unix:") :]
    first = rest.split(":", 1)[0]
    return first[len("address=") :] if first.startswith("address=") else first




def _in_use(error: CannotListenError, description: str) -> str:
    """One line for an address another program holds."""
    path = unix_path(description)
    if path is not None:
        what = f"RPC socket {path}"
    else:
        what = f"port {error.port} on {error.interface or '0.0.0.0'}"
    return f"{what} is in use (another voicecall? check `voicecall status`)"


class StartFailed(Exception):
    """A start-up failure whose message says it all (no traceback is logged for it)."""


class ListenerService(Service):
    """One listening endpoint; `listen()` is called by the parent, in its start sequence."""

    def __init__(self, name: str, reactor, description: str, factory) -> None:
        self.setName(name)
        self._reactor = reactor
        self.description = description
        self._factory = factory
        self.port = None

    async def listen(self):
        path = unix_path(self.description)
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
        try:
            self.port = await serverFromString(self._reactor, self.description).listen(self._factory)
        except CannotListenError as e:
            held = getattr(e.socketError, "errno", None) == errno.EADDRINUSE
            if held or (path and str(e.socketError) == "Cannot acquire lock"):  # lockfile=1: a live owner
                raise StartFailed(_in_use(e, self.description)) from None
            reason = getattr(e.socketError, "strerror", None) or e.socketError
            raise StartFailed(f"cannot listen on {self.description}: {reason}") from None
        self.running = 1
        return self.port

    def stopService(self):
        Service.stopService(self)
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
        return None


class VoicecallService(MultiService):
    """
    The daemon: runs the start sequence in order and stops it in reverse.

    With a shared store, `node` (cluster/nodes.py) registers this node before its calls are
    restored and gives its lease up once it serves nothing more, and `adopter` (cluster/adopt.py)
    takes over dead nodes' calls from the end of restore to the start of the stop. `routing`
    (the router, the cluster-wide event feed, the signed-URL list) serves other nodes' forwarded
    requests from before the webhook listens until the webhook and the RPC socket are closed.

    `public_url` is the configured one (None: `open_tunnel(port)`, when given, exposes the webhook
    port and fires with the tunnel, whose `public_url` is used). `set_public_url` is the adapter's,
    for a carrier that verifies signatures against a tunnel's URL. `stdout_observer` is installed
    as twistd's log observer (`stdout_log_observer`): a start failure is then said on stderr only.
    """

    _log = Logger()

    def __init__(
        self,
        reactor,
        *,
        writer,
        store,
        manager,
        webhook,
        rpc,
        reaper,
        serve_path: str,
        provider,
        pool,
        public_url: str | None = None,
        open_tunnel: Callable[[int], Awaitable[Any]] | None = None,
        set_public_url: Callable[[str], None] | None = None,
        warnings: Sequence[str] = (),
        config_path: str | None = None,
        metrics=None,
        media=None,
        bridge=None,
        stdout_observer=None,
        node=None,
        adopter=None,
        routing: Sequence[Any] = (),
        reporter=None,
    ) -> None:
        super().__init__()
        self.setName("voicecall")
        self._reactor = reactor
        self._writer = writer
        self._store = store
        self.manager = manager
        self._webhook = webhook
        self._rpc = rpc
        self._reaper = reaper
        self._serve_path = serve_path
        self._provider = provider
        self._pool = pool
        self._public_url = public_url
        self._open_tunnel = open_tunnel
        self._set_public_url = set_public_url
        self._warnings = tuple(warnings)
        self.webhook_url: str | None = None
        self._metrics = metrics
        self._media = media
        self._bridge = bridge
        self._tunnel = None
        self._config_path = config_path
        self._stdout_observer = stdout_observer
        self._node = node
        self._adopter = adopter
        #: The cluster's routing parts (cluster/router.py, events.py, urls.py): start()ed once
        #: this node's calls are restored, before the webhook listens; stop()ped in reverse
        #: once the webhook and the RPC socket are closed.
        self._routing = tuple(routing)
        #: The call reports (control/report.py): listening before restore (a restored call closed
        #: then is reported too), stopped (its retries cancelled) before the store closes.
        self._reporter = reporter
        self._logs_to_stdout = False
        self.ready: Deferred = Deferred()
        for child in (webhook, rpc, reaper, metrics):
            if child is not None:
                child.setServiceParent(self)

    def setServiceParent(self, parent) -> None:
        # twistd adds the plugin's service to a new Application, then starts logging with the
        # Application's ILogObserver component when it has one (twisted.application.app.AppLogger).
        if self._stdout_observer is not None and isinstance(parent, Componentized):
            if parent.getComponent(ILogObserver, None) is None:
                parent.setComponent(ILogObserver, self._stdout_observer)
                self._logs_to_stdout = True
        super().setServiceParent(parent)

    def startService(self) -> None:
        Service.startService(self)
        d = Deferred.fromCoroutine(self._start())
        d.addCallbacks(self.ready.callback, self._failed)

    async def _start(self) -> None:
        for warning in self._warnings:
            self._log.warn("config {path}: {problem}", path=self._config_path or "(none)", problem=warning)
        await self._writer.start()
        await self._store.open()
        if self._node is not None:
            await self._node.start()  # a fresh heartbeat before restoring: nobody adopts our calls now
        if self._reporter is not None:
            self._reporter.start()
        await self.manager.restore()
        for part in self._routing:
            await part.start()
        port = await self._webhook.listen()
        host = port.getHost()
        bound = f"[{host.host}]" if ":" in host.host else host.host
        local_url = f"http://{bound}:{host.port}{self._serve_path}"
        public_url = self._public_url or await self._expose(host.port)
        self.webhook_url = public_url or local_url
        self.manager.set_webhook_url(self.webhook_url)
        if hasattr(self._provider, "set_webhook_url"):
            self._provider.set_webhook_url(self.webhook_url)
        if public_url and self._set_public_url is not None:
            self._set_public_url(public_url)
        if self._adopter is not None:
            await self._adopter.start()  # now that adopted calls can be re-pointed here
        await self._rpc.listen()
        if self._metrics is not None:
            await self._metrics.listen()
            self._log.info("Metrics: {endpoint}", endpoint=self._metrics.description)
        self._reaper.startService()
        self._log.info("Webhook URL: {url}", url=local_url)
        if public_url:
            self._log.info("Public URL: {url}", url=public_url)
        self._log.info("RPC socket: {rpc}", rpc=self._rpc.description)
        sdnotify.notify(f"READY=1\nSTATUS=listening on {local_url}")
        # The real stdout: twistd turns print() into a timestamped "[stdout#info]" log line.
        rpc = unix_path(self._rpc.description) or self._rpc.description
        print(f"voicecall ready: webhook {self.webhook_url}  rpc {rpc}", file=sys.__stdout__, flush=True)

    async def _expose(self, port: int) -> str | None:
        """SPEC §1 step 6: a tunnel or a legacy Tailscale route; a failure is logged, not fatal."""
        if self._open_tunnel is None:
            return None
        try:
            self._tunnel = await self._open_tunnel(port)
        except ExposeError as e:
            self._log.error("[voice-call] Tunnel setup failed: {error}", error=str(e))
            return None
        return self._tunnel.public_url if self._tunnel is not None else None

    def _failed(self, failure) -> None:
        if failure.check(StartFailed, StoreLockedError):
            if not self._logs_to_stdout:  # a log file or the syslog keeps it; a terminal sees stderr
                self._log.error("voicecall failed to start: {why}", why=failure.getErrorMessage())
        else:
            self._log.failure("voicecall failed to start", failure)
        print(f"voicecall failed to start: {failure.getErrorMessage()}", file=sys.__stderr__, flush=True)
        self.ready.errback(failure)
        self.ready.addErrback(lambda _: None)
        if getattr(self._reactor, "running", False):
            self._reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
            self._reactor.stop()

    async def _stop(self) -> None:
        sdnotify.notify("STOPPING=1")
        # Stop accepting first: with the port held by systemd (systemd/voicecall-web.socket) new
        # connections now wait in its queue for the next process. Then close the media streams
        # (1001): Twilio follows each stream's resume Redirect at once, over a new connection,
        # and the next process answers it with a fresh stream for the same call.
        await _maybe(self._webhook.stopService())
        if self._media is not None:
            self._bridge.stop()
            self._media.shutdown()
            await self._bridge.stop()  # the STT sessions the closed streams were feeding
        tunnel, self._tunnel = self._tunnel, None
        if tunnel is not None:
            await tunnel.stop()
        self._reaper.stopService()
        if self._metrics is not None:
            await _maybe(self._metrics.stopService())
        await _maybe(self._rpc.stopService())
        for part in reversed(self._routing):
            await _maybe(part.stop())
        if self._reporter is not None:
            self._reporter.stop()
        self.manager.stop()
        if self._adopter is not None:
            await self._adopter.stop()
        if self._node is not None:
            await self._node.stop()  # its lease given up: the live nodes adopt this node's calls at once
        stop_provider = getattr(self._provider, "stop", None)
        if stop_provider is not None:
            stop_provider()
        await self._store.close()
        await self._writer.stop()
        await self._pool.closeCachedConnections()

    def stopService(self):
        if not self.running:
            return None
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop())


async def _maybe(result: Any) -> Any:
    if isinstance(result, Deferred):
        return await result
    return result
