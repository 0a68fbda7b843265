# -*- test-case-name: tests.test_tap,tests.test_wiring -*-
"""
`twistd voicecall`: the options and `makeService`, the only place that turns config into
components and wires them together.

    twistd -n voicecall [--config PATH] [--webhook ENDPOINT] [--rpc ENDPOINT]

Start sequence: open the store, restore the calls that were live (checking each with the
carrier), listen for webhooks, then open the RPC socket and start the reaper. A bad config stops
the daemon in option parsing, before anything is bound: its problems are printed to stderr, one
line each, and twistd exits 1 (no usage text, no traceback). A config with ``enabled: false``
exits with `DISABLED_EXIT_STATUS`, which the systemd unit does not restart. A failure later in
the sequence is one line on stderr (a listening address in use says so) and exit status 1.
"""
from __future__ import annotations

import errno
import os
import re
import sys
from typing import Any, Awaitable, Callable, Sequence

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactor
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    InvalidLogLevelError,
    LogLevel,
    LogLevelFilterPredicate,
    Logger,
    PredicateResult,
    textFileLogObserver,
)
from twisted.python.components import Componentized
from twisted.python import usage
from twisted.web.client import Agent, HTTPConnectionPool
from treq.client import HTTPClient

from voicecall.control.expose import ExposeError, legacy_tailscale, start_tunnel
from voicecall.config import DISABLED_MESSAGE, ConfigError, find_config_path, load_config, parse_config
from voicecall.infra import sdnotify
from voicecall.domain.manager import CallManager, ManagerSettings
from voicecall.control.metrics import Metrics, MetricsSite, VoicecallCollector
from voicecall.domain.model import Mode
from voicecall.domain.policy import inbound_decision
from voicecall.providers.mock import MockProvider
from voicecall.providers.twilio import TwilioProvider
from voicecall.providers.signatures import skip_request_key, verify_twilio
from voicecall.domain.reaper import StaleCallReaper
from voicecall.control.protocol import default_socket_path
from voicecall.control.rpc import GatewayResponders, RpcFactory, RpcMethods
from voicecall.speech.responder import AutoResponder, ChatResponder
from voicecall.speech.stt import RealtimeTranscriber
from voicecall.speech.tts import ElevenLabsSpeech, OpenAISpeech, TelephonyTts
from voicecall.media.bridge import StreamBridge
from voicecall.media.sockets import Admission
from voicecall.media.stream import MediaStreamServer
from voicecall.infra.private.ws import neutralise_autobahn_log_formatting
from voicecall.domain.store import CallStore, StoreLockedError, ThreadedWriter
from voicecall.web.limits import ScreenedSite
from voicecall.web.replay import ReplayCache, ResponseCache
from voicecall.web.security import ForwardingPolicy
from voicecall.web.webhook import RootResource, WebhookResource, WebhookScreen, normalize_path

_LOOPBACK = {"127.0.0.1", "::1", "localhost"}
PROVIDERS = ("mock", "twilio", "telnyx", "plivo")

#: The exit status of a daemon whose config says ``enabled: false`` (LSB "program is not
#: configured"); systemd/voicecall.service lists it in RestartPreventExitStatus=.
DISABLED_EXIT_STATUS = 6


def build_provider(cfg, reactor, http, *, stream_twiml=None, stream_busy=None):
    """
    The carrier adapter the config names, with its credentials and API root. A Twilio adapter
    also gets the inbound policy and, when calls stream, the bridge's stream TwiML and
    busy check.
    """
    if cfg.provider == "telnyx":
        from voicecall.providers.telnyx import TelnyxProvider

        return TelnyxProvider(
            http=http,
            clock=reactor,
            api_key=cfg.telnyx.api_key,
            connection_id=cfg.telnyx.connection_id,
            public_key=cfg.telnyx.public_key,
            base_url=cfg.telnyx.base_url,
        )
    if cfg.provider == "plivo":
        from voicecall.providers.plivo import PlivoProvider

        return PlivoProvider(
            http=http,
            clock=reactor,
            auth_id=cfg.plivo.auth_id,
            auth_token=cfg.plivo.auth_token,
            base_url=cfg.plivo.base_url,
            allow_v2_signatures=cfg.plivo.allow_v2_signatures,
            public_url=cfg.public_url,
            ring_timeout_sec=max(1, cfg.ring_timeout_ms // 1000),
        )
    if cfg.provider == "twilio":
        return TwilioProvider(
            http=http,
            clock=reactor,
            account_sid=cfg.twilio.account_sid,
            auth_token=cfg.twilio.auth_token,
            base_url=cfg.twilio.base_url,
            signing_keys=dict(cfg.twilio.signing_keys),
            public_url=cfg.public_url,
            stream_twiml=stream_twiml,
            stream_busy=stream_busy,
            inbound_screen=lambda caller: inbound_decision(cfg.inbound_policy, cfg.allow_from, caller) is None,
        )
    return MockProvider(clock=reactor)


class _ApiPool(HTTPConnectionPool):
    """
    The connections to the carrier, TTS and chat APIs: a few kept open per host. What each says
    when it opens and closes is Twisted's chatter (`_drop_chatter`).
    """

    maxPersistentPerHost = 8


def build_http_client(reactor):
    """One treq client with its own connection pool for every outside HTTP API."""
    pool = _ApiPool(reactor, persistent=True)
    return HTTPClient(Agent(reactor, pool=pool, connectTimeout=10)), pool


def build_tts(tts, http, clock) -> TelephonyTts:
    """Call TTS from the config's `tts` section (SPEC §2.3)."""
    openai, eleven = tts.openai, tts.elevenlabs
    settings = eleven.voice_settings
    return TelephonyTts(
        http=http,
        clock=clock,
        openai=OpenAISpeech(
            api_key=openai.api_key,
            base_url=openai.base_url,
            model=openai.model,
            voice=openai.voice,
            speed=openai.speed,
            instructions=openai.instructions,
        ),
        elevenlabs=ElevenLabsSpeech(
            api_key=eleven.api_key,
            base_url=eleven.base_url,
            voice_id=eleven.voice_id,
            model_id=eleven.model_id,
            seed=eleven.seed,
            apply_text_normalization=eleven.apply_text_normalization,
            language_code=eleven.language_code,
            stability=settings.stability,
            similarity_boost=settings.similarity_boost,
            style=settings.style,
            use_speaker_boost=settings.use_speaker_boost,
            speed=settings.speed,
        ),
        provider=tts.provider,
        prefs_path=tts.prefs_path,
        max_text_length=tts.max_text_length,
        timeout_ms=tts.timeout_ms,
    )


def unix_endpoint(description: str) -> str:
    """A `unix:` endpoint made private: mode 600 and a lock file unless the string says otherwise."""
    if not description.startswith("unix:"):
        return description
    if ":mode=" not in description:
        description += ":mode=600"
    if ":lockfile=" not in description:
        description += ":lockfile=1"
    return description


def _bad_endpoint(option: str, description: str) -> str | None:
    """The line refusing an endpoint string Twisted cannot parse (None: it parses)."""
    example = "tcp:3334:interface=127.0.0.1" if option == "webhook" else "unix:/path/to/voicecall.sock"
    if description.startswith("unix:") and not _unix_path(description):
        return f'voicecall: --{option} "{description}": a UNIX endpoint needs a path, e.g. {example}'
    try:
        serverFromString(MemoryReactor(), description)  # parses only: nothing is bound
    except Exception as e:  # Twisted's parsers raise ValueError, TypeError, KeyError, IndexError...
        unknown = re.match(r"Unknown endpoint type: '(.*)'", str(e))
        number = re.match(r"invalid literal for int\(\) with base 10: (.*)", str(e))
        if unknown:
            why = f'unknown endpoint type "{unknown.group(1)}"'
        elif number:
            why = f"{number.group(1)} is not a number"
        else:
            why = f"not a valid endpoint ({e})"
        return f'voicecall: --{option} "{description}": {why}, e.g. {example}'
    return None


def _endpoint_text(value: str) -> str:
    """`value` as one argument of an endpoint string (an IPv6 address has colons)."""
    return value.replace("\\", "\\\\").replace(":", "\\:")


def _unix_path(description: str) -> str | None:
    if not description.startswith("unix:"):
        return None
    rest = description[len("unix:") :]
    first = rest.split(":", 1)[0]
    return first[len("address=") :] if first.startswith("address=") else first


class Options(usage.Options):
    synopsis = "[--config PATH] [--webhook ENDPOINT] [--rpc ENDPOINT]"
    longdesc = (
        "Run the voicecall telephony daemon. Without --config the first of $VOICECALL_CONFIG, "
        "./voicecall.json5, ./voicecall.json, ~/.config/voicecall/voicecall.json5 and "
        "/etc/voicecall/voicecall.json5 that exists is used (none: the mock provider's defaults)."
    )
    optParameters = [
        ["config", "c", None, "Config file (JSON or JSON5): the voice-call config or a whole OpenClaw config."],
        ["webhook", None, None, "Webhook endpoint (default: tcp:<serve.port>:interface=<serve.bind>)."],
        ["rpc", None, None, "RPC endpoint (default: unix:$VOICECALL_SOCKET or unix:<store>/voicecall.sock, mode 600)."],
    ]

    def postOptions(self) -> None:
        env = os.environ
        path = find_config_path(self["config"], env, os.getcwd())
        try:
            config = parse_config({}, env) if path is None else load_config(path, env)
        except ConfigError as e:
            # SystemExit, not UsageError: twistd prints its whole usage text before a UsageError.
            raise SystemExit("\n".join(e.lines())) from None
        if not config.enabled:
            where = f"{path} says" if path else "the config says"
            print(
                f"voicecall: not starting: {where} enabled: false ({DISABLED_MESSAGE})",
                file=sys.stderr,
                flush=True,
            )
            raise SystemExit(DISABLED_EXIT_STATUS)
        if config.provider not in PROVIDERS:
            raise SystemExit(f'voicecall: provider "{config.provider}" is not available in this build yet')
        for option in ("webhook", "rpc"):
            if self[option] is not None:
                refusal = _bad_endpoint(option, self[option])
                if refusal:
                    raise SystemExit(refusal)
        self["config_path"] = path
        self["voicecall"] = config
        self["webhook"] = self["webhook"] or f"tcp:{config.serve.port}:interface={_endpoint_text(config.serve.bind)}"
        self["rpc"] = unix_endpoint(self["rpc"] or "unix:" + default_socket_path(config.store, env))


def _in_use(error: CannotListenError, description: str) -> str:
    """One line for an address another program holds."""
    path = _unix_path(description)
    if path is not None:
        what = f"RPC socket {path}"
    else:
        what = f"port {error.port} on {error.interface or '0.0.0.0'}"
    return f"{what} is in use (another voicecall? check `voicecall status`)"


def stdout_log_observer(twistd_options: Any, env: Any) -> Any:
    """
    The observer twistd would log to stdout with (``-n`` without ``--logfile``: the journal under
    systemd, the terminal for ``make run``), keeping only events at ``$VOICECALL_LOG_LEVEL``
    (default ``info``) and above: twistd has no level option and would print debug events. Unless
    the level is debug it also drops Twisted's chatter (`_drop_chatter`), and a start failure is not logged
    there: it is the one line on stderr.
    None (twistd's own choice stands) for a log file, syslog, ``--logger``, or outside twistd.
    """
    if not twistd_options or twistd_options.get("logger") or twistd_options.get("syslog"):
        return None
    logfile = twistd_options.get("logfile")
    if not (logfile == "-" or (twistd_options.get("nodaemon") and not logfile)):
        return None
    try:
        level = LogLevel.levelWithName(env.get("VOICECALL_LOG_LEVEL", "info").lower())
    except InvalidLogLevelError:
        level = LogLevel.info
    predicates = [LogLevelFilterPredicate(level)]
    if level > LogLevel.debug:
        predicates.append(_drop_chatter)
    return FilteringLogObserver(textFileLogObserver(sys.stdout), predicates)


#: What Twisted's ports say, unconditionally and at info, when they open and close
#: ("ScreenedSite starting on 3334", "(TCP Port 3334 Closed)"): debug chatter here, since the
#: ready line names what listens.
_PORT_CHATTER = re.compile(r"\S+ starting on .+|\((?:TCP |UNIX |UDP )?Port \S.* Closed\)")

#: twistd's own first two lines (its version and the reactor class): debug chatter too, so a
#: daemon that cannot start prints its one line on stderr and nothing else.
_TWISTD_START = ("twistd {version} ({exe} {pyVersion}) starting up.", "reactor class: {reactor}.")

#: What each connection of the HTTP client pool says when it opens and closes: nothing useful
#: (twisted/twisted#9330), and one pair per connection to a carrier or TTS API.
_HTTP_FACTORY = "twisted.web.client._HTTP11ClientFactory"
_FACTORY_CHATTER = ("Starting factory {factory!r}", "Stopping factory {factory!r}")


def _drop_chatter(event: dict) -> PredicateResult:
    if event.get("log_level", LogLevel.info) > LogLevel.info:
        return PredicateResult.maybe
    if event.get("log_format") in _TWISTD_START and "AppLogger" in event.get("log_namespace", ""):
        return PredicateResult.no
    if event.get("log_namespace") == _HTTP_FACTORY and event.get("log_format") in _FACTORY_CHATTER:
        return PredicateResult.no
    message = event.get("message")
    if message and len(message) == 1 and isinstance(message[0], str) and _PORT_CHATTER.fullmatch(message[0]):
        return PredicateResult.no
    return PredicateResult.maybe


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
        path = _unix_path(self.description)
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
        await self.manager.restore()
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
        rpc = _unix_path(self._rpc.description) or self._rpc.description
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
        await _maybe(self._webhook.stopService())
        self.manager.stop()
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


class CallLog:
    """
    The daemon's line per call milestone at the default level, from the manager's durable call
    events (the manager itself logs "placed"): answered, ended with its reason, and a call the
    carrier's API refused or never answered, naming that API's root (never a credential).
    """

    _log = Logger()

    def __init__(self, api_root: str | None) -> None:
        self._api_root = api_root
        self._refused: str | None = None  # the call whose "ended" line the refusal line replaces

    def __call__(self, entry: dict) -> None:
        kind, call_id = entry.get("type"), entry.get("callId")
        if kind == "call.state" and entry.get("state") == "answered":
            self._log.info("call {call_id} answered", call_id=call_id)
        elif kind == "call.state" and entry.get("state") == "failed" and entry.get("previous") == "initiated":
            self._refused = call_id
            self._log.warn(
                "call {call_id} failed at the carrier ({api})",
                call_id=call_id,
                api=self._api_root or "the carrier API",
            )
        elif kind == "call.ended":
            if self._refused == call_id:
                self._refused = None
                return
            self._log.info("call {call_id} ended: {reason}", call_id=call_id, reason=entry.get("reason"))


def _api_root(cfg) -> str | None:
    section = {"twilio": cfg.twilio, "telnyx": cfg.telnyx, "plivo": cfg.plivo}.get(cfg.provider)
    return section.base_url if section is not None else None


def forwarding_policy(cfg) -> ForwardingPolicy:
    """SPEC §9.1 [H] and §9.5: whose forwarded headers count."""
    security = cfg.webhook_security
    return ForwardingPolicy(
        allowed_hosts=tuple(security.allowed_hosts),
        trust_forwarding_headers=security.trust_forwarding_headers,
        trusted_proxy_ips=tuple(security.trusted_proxy_ips),
        ngrok_loopback_bypass=(
            cfg.tunnel.provider == "ngrok"
            and cfg.serve.bind in _LOOPBACK
            and cfg.tunnel.allow_ngrok_free_tier_loopback_bypass
        ),
    )


def stream_tts(cfg, reactor, http) -> TelephonyTts | None:
    """
    The TTS media streams speak with, when streaming is enabled and usable (Twilio, an STT key,
    TTS with a key); None, saying why, when calls use the carrier's own speech.
    """
    if not cfg.streaming.enabled or cfg.provider != "twilio":
        return None
    if not cfg.streaming.openai_api_key:
        Logger().warn("[voice-call] Streaming enabled but no OpenAI API key found")
        return None
    tts = build_tts(cfg.tts, http, reactor)
    if not tts.available():
        Logger().warn("Telephony TTS unavailable; streaming TTS disabled")
        return None
    return tts


def build_stream_bridge(cfg, reactor, tts: TelephonyTts, provider, manager, on_first_audio) -> StreamBridge:
    """The media-stream bridge: stream TwiML for the Twilio adapter, and the voice of streamed calls."""
    neutralise_autobahn_log_formatting()
    streaming = cfg.streaming

    def new_transcriber(**callbacks):
        return RealtimeTranscriber(
            reactor,
            streaming.openai_api_key,
            url=streaming.stt_base_url,
            model=streaming.stt_model,
            vad_threshold=streaming.vad_threshold,
            silence_duration_ms=streaming.silence_duration_ms,
            **callbacks,
        )

    return StreamBridge(
        clock=reactor,
        fallback=provider,
        synthesize=tts.synthesize,
        new_transcriber=new_transcriber,
        stream_path=normalize_path(streaming.stream_path),
        public_url=lambda: provider.public_url,
        manager=manager,
        max_streams=cfg.max_concurrent_calls,
        on_first_audio=on_first_audio,
    )


def build_media_server(cfg, reactor, bridge: StreamBridge, provider, forwarding: ForwardingPolicy) -> MediaStreamServer:
    streaming = cfg.streaming

    def verify(url: str, headers) -> bool:
        """Twilio signs the stream URL it was given (no parameters), PROVIDERS.md §1.5."""
        expected = bridge.stream_url()
        if expected is None:
            return False
        return verify_twilio(
            url=expected,
            params=[],
            signature=headers.get("x-twilio-signature"),
            auth_token=cfg.twilio.auth_token,
            settings_header=headers.get("x-twilio-webhooks-signature-settings"),
            signing_keys=dict(cfg.twilio.signing_keys),
            public_url=provider.public_url,
            host_header=headers.get("host"),
        ).ok

    admission = Admission(
        max_connections=streaming.max_connections,
        max_pending=streaming.max_pending_connections,
        max_pending_per_ip=streaming.max_pending_connections_per_ip,
        pre_start_timeout=streaming.pre_start_timeout_ms / 1000.0,
        client_ip=forwarding.client_ip,
        verify_upgrade=None if cfg.skip_signature_verification else verify,
    )
    return MediaStreamServer(reactor, bridge, admission=admission)


def manager_settings(cfg) -> ManagerSettings:
    return ManagerSettings(
        provider_name=cfg.provider,
        from_number=cfg.from_number,
        max_concurrent_calls=cfg.max_concurrent_calls,
        max_duration_seconds=cfg.max_duration_seconds,
        transcript_timeout_ms=cfg.transcript_timeout_ms,
        notify_hangup_delay_sec=cfg.outbound.notify_hangup_delay_sec,
        default_mode=Mode(cfg.outbound.default_mode),
        inbound_policy=cfg.inbound_policy,
        allow_from=tuple(cfg.allow_from),
        inbound_greeting=cfg.inbound_greeting,
        # The OpenAI voice name maps to a Polly voice for Twilio's <Say> (SPEC §4.5); the
        # other carriers' native voices use their own defaults.
        tts_voice=cfg.tts.openai.voice if cfg.provider == "twilio" else None,
    )


def build_responder(cfg, reactor, http, manager: CallManager, responders: GatewayResponders) -> AutoResponder:
    """Answers callers: through the gateway registered over RPC, else the built-in chat client."""
    return AutoResponder(
        manager=manager,
        clock=reactor,
        gateway=responders.ask,
        builtin=ChatResponder(
            http=http,
            base_url=cfg.response_base_url,
            api_key=cfg.response_api_key,
            model=cfg.response_model,
            system_prompt=cfg.response_system_prompt,
            timeout_ms=cfg.response_timeout_ms,
        ),
        timeout_ms=cfg.response_timeout_ms,
    )


def build_webhook(cfg, reactor, provider, manager: CallManager, forwarding: ForwardingPolicy, serve_path: str) -> WebhookResource:
    skip_key = None
    if cfg.skip_signature_verification:
        Logger().warn(
            "[voice-call] SECURITY WARNING: skipSignatureVerification=true disables webhook signature "
            "verification (development only). Do not use in production."
        )
        skip_key = lambda ctx: skip_request_key(provider.name, ctx.method, ctx.url, ctx.raw_body)  # noqa: E731
    for_twilio = cfg.provider == "twilio"
    return WebhookResource(
        provider=provider,
        manager=manager,
        reconstruct_url=lambda pq, headers, ip: forwarding.reconstruct_url(pq, headers, ip, for_twilio=for_twilio),
        path=serve_path,
        replays=ReplayCache(reactor),
        responses=ResponseCache(reactor),
        skip_key=skip_key,
    )


def build_metrics_listener(cfg, reactor, metrics: Metrics, manager: CallManager, webhook: WebhookResource, media) -> ListenerService:
    """The loopback-by-default Prometheus listener, reading the components' counts at scrape time."""
    media_counts = None
    if media is not None:
        media_counts = lambda: {"open": media.active_count + media.pending_count, "refused": dict(media.counts)}  # noqa: E731
    metrics.add_collector(VoicecallCollector(cfg.provider, manager.active_calls, webhook.counts, manager.ended_counts, media_counts))
    interface = _endpoint_text(cfg.metrics.bind)
    return ListenerService("metrics", reactor, f"tcp:{cfg.metrics.port}:interface={interface}", MetricsSite(metrics))


def tunnel_opener(cfg, reactor, serve_path: str) -> Callable[[int], Awaitable[Any]] | None:
    """SPEC §1 step 6: what exposes the webhook port (a tunnel, or a legacy Tailscale route), if anything."""
    tunnel, tailscale = cfg.tunnel, cfg.tailscale
    if tunnel.provider != "none":
        return lambda port: start_tunnel(
            reactor,
            provider=tunnel.provider,
            port=port,
            path=serve_path,
            ngrok_auth_token=tunnel.ngrok_auth_token,
            ngrok_domain=tunnel.ngrok_domain,
        )
    if tailscale.mode != "off":
        return lambda port: legacy_tailscale(reactor, mode=tailscale.mode, port=port, path=tailscale.path, serve_path=serve_path)
    return None


def makeService(options: Options, reactor=None) -> VoicecallService:
    """
    The start-up wiring, in one place: values from the config, then each component, in dependency
    order, given what it needs when it is built, then the service that starts them in sequence.

    Three object cycles close through callables over components built further down (each is
    called on carrier or caller traffic, never while building): the Twilio adapter asks the
    stream bridge for stream TwiML; the bridge, the voice of streamed calls, hands stream events
    to the manager; the manager hands callers' words to the auto-responder, which answers
    through the manager. The RPC status method likewise reads the webhook URL the service
    learns once it listens.
    """
    if reactor is None:
        from twisted.internet import reactor
    cfg = options["voicecall"]
    # Values.
    serve_path = normalize_path(cfg.serve.path)
    stream_path = normalize_path(cfg.streaming.stream_path)
    forwarding = forwarding_policy(cfg)

    # Components, in dependency order. These four are bound further down: the callables that
    # close the cycles above look them up when traffic arrives.
    bridge: StreamBridge | None
    manager: CallManager
    auto: AutoResponder
    service: VoicecallService
    writer = ThreadedWriter(reactor)
    store = CallStore(cfg.store, writer)
    http, pool = build_http_client(reactor)
    metrics = Metrics() if cfg.metrics.enabled else None
    tts = stream_tts(cfg, reactor, http)  # None: no media streams, calls use the carrier's speech
    provider = build_provider(
        cfg,
        reactor,
        http,
        stream_twiml=None if tts is None else lambda *args, **kwargs: bridge.stream_twiml(*args, **kwargs),
        stream_busy=None if tts is None else lambda: bridge.stream_busy(),
    )
    bridge = None
    if tts is not None:
        on_first_audio = metrics.observe_tts_first_audio if metrics is not None else None
        bridge = build_stream_bridge(cfg, reactor, tts, provider, lambda: manager, on_first_audio)
    manager = CallManager(
        provider=provider,
        voice=provider if bridge is None else bridge,
        store=store,
        clock=reactor,
        settings=manager_settings(cfg),
        on_utterance=lambda call, text: auto.on_utterance(call, text),
        on_turn_latency=metrics.observe_turn_latency if metrics is not None else None,
    )
    manager.subscribe(CallLog(_api_root(cfg)))
    responders = GatewayResponders()
    auto = build_responder(cfg, reactor, http, manager, responders)
    media = None if bridge is None else build_media_server(cfg, reactor, bridge, provider, forwarding)
    webhook = build_webhook(cfg, reactor, provider, manager, forwarding, serve_path)
    site = ScreenedSite(
        RootResource(webhook=webhook, stream_path=stream_path, stream=media.resource if media else None),
        clock=reactor,
        screen=WebhookScreen(provider=provider, path=serve_path, skip_signature=cfg.skip_signature_verification, client_ip=forwarding.client_ip),
        on_refused=lambda status: webhook.counts.update((str(status),)),
    )
    methods = RpcMethods(
        manager=manager,
        clock=reactor,
        default_to=cfg.to_number,
        provider_name=cfg.provider,
        webhook_url=lambda: service.webhook_url,
        started_at=reactor.seconds(),
    )

    # The service: starts them in sequence, stops them in reverse.
    service = VoicecallService(
        reactor,
        writer=writer,
        store=store,
        manager=manager,
        webhook=ListenerService("webhook", reactor, options["webhook"], site),
        rpc=ListenerService("rpc", reactor, options["rpc"], RpcFactory(methods.table(), manager.subscribe, responders)),
        reaper=StaleCallReaper(manager=manager, clock=reactor, max_age_seconds=cfg.stale_call_reaper_seconds),
        serve_path=serve_path,
        provider=provider,
        pool=pool,
        public_url=cfg.public_url,
        open_tunnel=tunnel_opener(cfg, reactor, serve_path),
        # SPEC §9.4: only Twilio verifies signatures against a tunnel's URL; Plivo uses publicUrl alone.
        set_public_url=provider.set_public_url if isinstance(provider, TwilioProvider) else None,
        warnings=cfg.warnings,
        config_path=options.get("config_path"),
        metrics=None if metrics is None else build_metrics_listener(cfg, reactor, metrics, manager, webhook, media),
        media=media,
        bridge=bridge,
        stdout_observer=stdout_log_observer(getattr(options, "parent", None), os.environ),
    )
    return service
