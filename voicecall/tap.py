# -*- test-case-name: tests.test_tap,tests.test_wiring -*-
"""
`twistd voicecall`: the options and `makeService`, the only place that turns config into
components and wires them together.

    twistd -n voicecall [--config PATH] [--webhook ENDPOINT] [--rpc ENDPOINT]

The service it returns (service.py) runs the start sequence: open the store, restore the calls
that were live (checking each with the carrier), listen for webhooks, then open the RPC socket
and start the reaper. A bad config stops
the daemon in option parsing, before anything is bound: its problems are printed to stderr, one
line each, and twistd exits 1 (no usage text, no traceback). A config with ``enabled: false``
exits with `DISABLED_EXIT_STATUS`, which the systemd unit does not restart. A failure later in
the sequence is one line on stderr (a listening address in use says so) and exit status 1.
"""
from __future__ import annotations

import os
import re
import socket
import sys
from typing import Any, Awaitable, Callable

from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor
from twisted.logger import Logger
from twisted.python import usage

from voicecall.control.expose import legacy_tailscale, start_tunnel
from voicecall.config import DISABLED_MESSAGE, ConfigError, find_config_path, load_config, parse_config
from voicecall.infra.httpclient import build_http_client
from voicecall.infra.logs import stdout_log_observer
from voicecall.domain.calllog import CallLog
from voicecall.domain.manager import CallManager, ManagerSettings
from voicecall.control.metrics import Metrics, MetricsSite, VoicecallCollector
from voicecall.domain.model import Mode
from voicecall.domain.policy import inbound_decision
from voicecall.providers.mock import MockProvider
from voicecall.providers.twilio import TwilioProvider
from voicecall.providers.signatures import skip_request_key, verify_twilio
from voicecall.domain.reaper import StaleCallReaper
from voicecall.control.protocol import default_socket_path
from voicecall.control.report import ReportDelivery, Reporter
from voicecall.control.rpc import GatewayResponders, RpcFactory, RpcMethods
from voicecall.speech.responder import AutoResponder, ChatResponder
from voicecall.speech.stt import RealtimeTranscriber
from voicecall.speech.tts import ElevenLabsSpeech, OpenAISpeech, TelephonyTts
from voicecall.media.bridge import StreamBridge
from voicecall.media.sockets import Admission
from voicecall.media.stream import MediaStreamServer
from voicecall.infra.private.ws import neutralise_autobahn_log_formatting
from voicecall.domain.store import CallStore
from voicecall.cluster.adopt import Adopter
from voicecall.cluster.events import ClusterEvents
from voicecall.cluster.router import Router, owner_command_timeouts
from voicecall.cluster.urls import SignedUrls
from voicecall.providers.base import SPEAK_TIMEOUT_MAX
from voicecall.cluster.nodes import FencedCarrier, NodeRegistry
from voicecall.infra.dbwriter import ThreadedWriter
from voicecall.web.limits import ScreenedSite
from voicecall.web.replay import ReplayCache, ResponseCache
from voicecall.web.security import ForwardingPolicy
from voicecall.web.webhook import RootResource, WebhookResource, WebhookScreen, normalize_path
from voicecall.service import ListenerService, VoicecallService, unix_path

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
            # A cluster's calls get the entry URL (any live node) rather than the dialling node's.
            dial_webhook_url=cfg.cluster.entry_url if cfg.store_is_postgres else None,
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
            # A dropped stream's way back reaches a live node even when this one is gone.
            resume_base_url=cfg.cluster.entry_url,
            inbound_screen=lambda caller: inbound_decision(cfg.inbound_policy, cfg.allow_from, caller) is None,
        )
    return MockProvider(clock=reactor)


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
    if description.startswith("unix:") and not unix_path(description):
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
        self["rpc"] = unix_endpoint(self["rpc"] or "unix:" + default_socket_path(config.state_dir, env))


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


def build_media_server(cfg, reactor, bridge: StreamBridge, forwarding: ForwardingPolicy) -> MediaStreamServer:
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
        allowed_from_numbers=tuple(cfg.allowed_from_numbers),
        answering_machine=cfg.outbound.answering_machine,
        transfer_allow_to=tuple(cfg.transfer.allow_to),
        recording_enabled=cfg.recording.enabled,
        recording_announcement=cfg.recording.announcement,
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
            clock=reactor,
        ),
        timeout_ms=cfg.response_timeout_ms,
    )


def build_reporter(cfg, reactor, http, manager: CallManager) -> Reporter:
    """
    The report after each call this node ends: a `call.summary` event always; POSTed, signed, to
    `report.url` when set; with a short LLM summary (the built-in responder's chat client) when
    `report.summarize` (config validation made sure its key is there).
    """
    report = cfg.report
    delivery = None if report.url is None else ReportDelivery(http=http, clock=reactor, url=report.url, secret=report.secret)
    summarize = None
    if report.summarize:
        summarize = ChatResponder(
            http=http,
            base_url=cfg.response_base_url,
            api_key=cfg.response_api_key,
            model=cfg.response_model,
            timeout_ms=cfg.response_timeout_ms,
            clock=reactor,
        ).summarize
    return Reporter(
        clock=reactor,
        subscribe=manager.subscribe,
        publish=manager.publish,
        get_call=manager.get_call,
        delivery=delivery,
        summarize=summarize,
        summary_timeout=cfg.response_timeout_ms / 1000.0,
    )


def build_webhook(
    cfg, reactor, provider, manager: CallManager, forwarding: ForwardingPolicy, serve_path: str, router: Router | None = None, signed_urls=None
) -> WebhookResource:
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
        route=None if router is None else router.route,
        signed_urls=signed_urls,
    )


def build_routing(cfg, reactor, store, manager: CallManager, serve: dict, adopt: Callable[[str], Any]):
    """
    Any node serves any request, when the store is shared (PostgreSQL): (Router, ClusterEvents,
    SignedUrls), or (None, None, None) on a single node. `serve` maps a forwarded request's kind
    to the handler that runs it here; `adopt(call_id)` takes a dead node's call.
    """
    if not cfg.store_is_postgres:
        return None, None, None
    # A forwarded continue waits for the caller as long as a local one (its prompt spoken first);
    # a command that plays something first waits for it; any other, and a webhook, is answered
    # at once by a live owner.
    turn = cfg.transcript_timeout_ms / 1000 + SPEAK_TIMEOUT_MAX
    router = Router(
        reactor=reactor,
        pool=store.pool,
        node_id=store.node_id,
        lease_seconds=cfg.cluster.lease_seconds,
        handlers=serve,
        is_local=lambda ref: manager.find(ref) is not None,
        adopt=adopt,
        timeouts={"webhook": 10.0, "rpc": 30.0, **owner_command_timeouts(rpc=30.0, turn=turn, playback=SPEAK_TIMEOUT_MAX)},
    )
    events = ClusterEvents(pool=store.pool, local_subscribe=manager.subscribe, events_after=store.events_after, last_events=store.last_events)
    urls = SignedUrls(pool=store.pool, own=cfg.public_url, entry=cfg.cluster.entry_url)
    return router, events, urls


def build_metrics_listener(
    cfg, reactor, metrics: Metrics, manager: CallManager, webhook: WebhookResource, media, node=None, adopter=None
) -> ListenerService:
    """The loopback-by-default Prometheus listener, reading the components' counts at scrape time."""
    media_counts = cluster = None
    if media is not None:
        media_counts = lambda: {"open": media.active_count + media.pending_count, "refused": dict(media.counts)}  # noqa: E731
    if node is not None:
        cluster = lambda: {  # noqa: E731
            "node": node.node_id,
            "nodes": [n.to_json() for n in node.snapshot],
            "adopted": adopter.adopted,
            "failedBeats": node.failed_beats,
        }
    metrics.add_collector(
        VoicecallCollector(cfg.provider, manager.active_calls, webhook.counts, manager.ended_counts, media_counts, cluster)
    )
    interface = _endpoint_text(cfg.metrics.bind)
    return ListenerService("metrics", reactor, f"tcp:{cfg.metrics.port}:interface={interface}", MetricsSite(metrics))


def build_liveness(cfg, reactor, store, manager: CallManager, provider, webhook_url: Callable[[], "str | None"], on_change=None, on_beat=None):
    """
    A cluster node's liveness and adoption (cluster/nodes.py, adopt.py) when the store is shared
    (PostgreSQL): (NodeRegistry, Adopter), each heartbeat and each node leaving running the
    adopter's sweep (and `on_change(event)`, when given, on a join or leave; `on_beat(node)`,
    when given, after each heartbeat); (None, None) on a single node. The heartbeats (and the
    check for calls taken from this node) run on a pool of their own, one connection, so a queue
    of webhook writes never delays them past the lease.
    """
    if not cfg.store_is_postgres:
        return None, None
    from voicecall.infra.pg import PgPool

    lease = cfg.cluster.lease_seconds
    adopter = Adopter(store.pool, store, manager, provider, store.node_id, lease, webhook_url, fenced=lambda: node.fenced, steady=lambda: node.steady)
    node: NodeRegistry = NodeRegistry(
        reactor, PgPool(reactor, cfg.store, max_size=1), store.node_id, cfg.public_url or "", lease,
        on_beat=adopter.sweep if on_beat is None else lambda: (adopter.sweep(), on_beat(node)),
        on_change=adopter.sweep if on_change is None else lambda event: (adopter.sweep(event), on_change(event)),
        held=lambda: [call.call_id for call in manager.active_calls()],
        on_taken=manager.release,
        # Every call a dead node placed or adopted has ended by then (maxDurationSeconds).
        keep_seconds=cfg.max_duration_seconds + 2 * lease + 60,
    )
    return node, adopter


def build_store(cfg, reactor, writer: ThreadedWriter):
    """
    The call store, opened as this node (``cluster.nodeId``, else the host name), which it records
    as the owner of the calls it writes: SQLite in the store directory (on `writer`), or, for a
    postgresql:// URL, the store shared by a cluster's nodes.
    """
    node_id = cfg.cluster.node_id or host_node_id()
    if not cfg.store_is_postgres:
        return CallStore(cfg.store, writer, node_id=node_id)
    try:
        from voicecall.domain.pgstore import PgCallStore
        from voicecall.infra.pg import PgPool
    except ImportError as e:
        raise SystemExit(
            f"voicecall: the store is PostgreSQL ({cfg.store_shown}) but {e.name} is not installed:"
            " pip install 'voicecall[postgresql]'"
        ) from None
    return PgCallStore(PgPool(reactor, cfg.store), node_id=node_id)


def host_node_id() -> str:
    """The host name as a node id (``cluster.nodeId``'s default): other characters become '-', at most 48."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).lstrip("._-")[:48]
    return name or "node"


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
    store = build_store(cfg, reactor, writer)
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
    voice = provider if bridge is None else bridge
    carrier = provider
    if cfg.store_is_postgres:
        # A node whose lease may have run out does not act at the carrier (cluster/nodes.py).
        fenced = lambda: node.fenced  # noqa: E731  (node: built below, read when a call acts)
        carrier = FencedCarrier(provider, fenced, store.node_id)
        voice = FencedCarrier(voice, fenced, store.node_id)
    manager = CallManager(
        provider=carrier,
        voice=voice,
        store=store,
        clock=reactor,
        settings=manager_settings(cfg),
        on_utterance=lambda call, text: auto.on_utterance(call, text),
        on_turn_latency=metrics.observe_turn_latency if metrics is not None else None,
    )
    manager.subscribe(CallLog(_api_root(cfg)))
    reporter = build_reporter(cfg, reactor, http, manager)
    responders = GatewayResponders()
    auto = build_responder(cfg, reactor, http, manager, responders)
    media = None if bridge is None else build_media_server(cfg, reactor, bridge, forwarding)
    # Another node's forwarded requests run here as local ones (the handlers are built below).
    serve = {"webhook": lambda request: webhook.serve_forwarded(request), "rpc": lambda request: methods.serve_forwarded(request)}
    router, events, urls = build_routing(cfg, reactor, store, manager, serve, lambda call_id: adopter.adopt_call(call_id))
    webhook = build_webhook(cfg, reactor, provider, manager, forwarding, serve_path, router, urls)
    site = ScreenedSite(
        RootResource(webhook=webhook, stream_path=stream_path, stream=media.resource if media else None),
        clock=reactor,
        screen=WebhookScreen(provider=provider, path=serve_path, skip_signature=cfg.skip_signature_verification, client_ip=forwarding.client_ip),
        on_refused=lambda status: webhook.counts.update((str(status),)),
    )
    # A node that leaves or dies fails the forwards waiting for it at once (they are routed again).
    node, adopter = build_liveness(
        cfg, reactor, store, manager, provider, lambda: service.webhook_url,
        on_change=None if router is None else lambda event: (urls.refresh(event), router.recheck()),
        on_beat=None if router is None else lambda node: router.recheck({n.node_id for n in node.snapshot if n.alive}),
    )
    methods = RpcMethods(
        manager=manager,
        clock=reactor,
        default_to=cfg.to_number,
        provider_name=cfg.provider,
        webhook_url=lambda: service.webhook_url,
        started_at=reactor.seconds(),
        route=None if router is None else router.route,
        cluster_nodes=None if node is None else lambda: node.nodes().addCallback(lambda nodes: [n.to_json() for n in nodes]),
    )

    # The service: starts them in sequence, stops them in reverse.
    service = VoicecallService(
        reactor,
        writer=writer,
        store=store,
        manager=manager,
        webhook=ListenerService("webhook", reactor, options["webhook"], site),
        rpc=ListenerService("rpc", reactor, options["rpc"], RpcFactory(methods.table(), manager.subscribe if events is None else events.subscribe, responders, clock=reactor)),
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
        metrics=None if metrics is None else build_metrics_listener(cfg, reactor, metrics, manager, webhook, media, node, adopter),
        media=media,
        bridge=bridge,
        stdout_observer=stdout_log_observer(getattr(options, "parent", None), os.environ),
        node=node,
        adopter=adopter,
        routing=() if router is None else (router, events, urls),
        reporter=reporter,
    )
    return service
