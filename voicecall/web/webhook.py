# -*- test-case-name: tests.test_webhook -*-
"""
The webhook resource: SPEC §8.1's pipeline for carrier callbacks.

    hold music -> path -> method -> signature headers present (before the body) -> in-flight
    slot while the body arrives (per client, proxy-aware) -> capped, time-boxed body -> verify ->
    replay? -> parse -> CallManager

Screening before the body lives in web/limits.py (its docstring explains the slots); this module
supplies the screen and the resources. Every method and path gets a deliberate answer: the
webhook path takes POST (other methods 405 with ``Allow: POST``), the hold music GET, HEAD and
POST, the media-stream path a GET upgrade (a GET or HEAD without one 426, other methods 405),
anything else 404; HEAD gets the status GET would get and no body. (Twisted logs the resource's
repr when a HEAD answer has a body; nothing here has a repr that shows call state anyway.) A replay (same verified request key within 10 minutes) is answered 200 and changes
nothing: Twilio replays get empty TwiML without running the TwiML builder; other providers get
the answer of the original request. If applying an event fails, the answer is 500 and the
request key is forgotten, so the carrier's retry is processed rather than taken for a replay.
"""
from __future__ import annotations

from base64 import b64decode, b64encode
from collections import Counter
from typing import Any, Awaitable, Callable, Sequence
from urllib.parse import parse_qsl

from attrs import define, field
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from voicecall.providers.base import Provider, WebhookContext, WebhookResponse
from voicecall.providers.twiml import hold_music
from voicecall.web.limits import InFlightLimiter, Refusal, ScreenedRequest, clip

HOLD_MUSIC_PATH = "/voice/hold-music"
_TEXT = {"Content-Type": "text/plain; charset=utf-8"}


def normalize_path(path: str) -> str:
    """SPEC §8.1 step 3: trim, add a leading `/`, drop one trailing `/` unless root."""
    path = path.strip()
    if not path.startswith("/"):
        path = "/" + path
    if len(path) > 1 and path.endswith("/"):
        path = path[:-1]
    return path


def request_headers(request) -> dict[str, str]:
    """Lower-case header names -> first value (SPEC §7 header lookup)."""
    out: dict[str, str] = {}
    for name, values in request.requestHeaders.getAllRawHeaders():
        key = name.decode("latin-1").lower()
        if key not in out and values:
            out[key] = values[0].decode("latin-1")
    return out


def remote_ip(request) -> str | None:
    return getattr(request.getClientAddress(), "host", None)


def _refusal_log(request):
    """The Site's `RefusalLog` (None for a request outside a `ScreenedSite`)."""
    return getattr(getattr(request, "site", None), "refusal_log", None)


def _peer_ip(headers, peer: str | None) -> str:
    return peer or ""


def forwarding_headers(request) -> dict[str, str]:
    """
    ``X-Forwarded-For`` (every line, joined: a proxy may add its own line after the client's)
    and the last ``X-Real-IP``, for `ForwardingPolicy.client_ip`.
    """
    out = {}
    forwarded = request.requestHeaders.getRawHeaders(b"x-forwarded-for")
    if forwarded:
        out["x-forwarded-for"] = b",".join(forwarded[-8:]).decode("latin-1")
    real = request.requestHeaders.getRawHeaders(b"x-real-ip")
    if real:
        out["x-real-ip"] = real[-1].decode("latin-1")
    return out


@define(repr=False)
class WebhookScreen:
    """Decides, from a request's headers alone, whether its body is worth reading."""

    _provider: Provider
    _path: str
    _skip_signature: bool
    #: (forwarding headers, socket peer) -> the client address slots are counted by.
    _client_ip: Callable[[dict, "str | None"], str] = _peer_ip
    _limiter: InFlightLimiter = field(factory=InFlightLimiter)

    def __call__(self, request: ScreenedRequest, length: int | None) -> Refusal | None:
        path = request.early_uri.split(b"?", 1)[0].decode("latin-1")
        if path == HOLD_MUSIC_PATH or normalize_path(path) != self._path or request.early_method != b"POST":
            # Its answer (hold music, 404, 405, 426) does not depend on the body, and it takes no
            # slot: a slow body here must hold nothing (20,000 of them held 1.2 GB).
            request.discard_body()
            return None
        headers = request_headers(request)
        if not self._skip_signature and not self._provider.has_signature_headers(headers):
            return Refusal(401, b"Unauthorized")
        request.needs_slot(self._limiter, lambda: self._client_ip(forwarding_headers(request), remote_ip(request)))
        return None


@define(repr=False)
class WebhookResource(Resource):
    """The carrier webhook (a leaf: it answers every path that reaches it)."""

    _provider: Provider
    _manager: Any  # voicecall.domain.manager.CallManager
    _reconstruct_url: Callable[[str, dict, "str | None"], str]
    _path: str
    _replays: Any  # voicecall.web.replay.ReplayCache
    _responses: Any  # voicecall.web.replay.ResponseCache
    _skip_key: Callable[[WebhookContext], str] | None = None
    #: In a cluster (tap.py: voicecall.cluster.router.Router.route): applies a verified request
    #: here, or forwards it to the node that owns its call and answers with that node's answer.
    _route: Callable[..., Awaitable[tuple[WebhookResponse, str]]] | None = None
    #: In a cluster: the other public URLs a carrier may have signed a request for (the entry
    #: URL, the other nodes'), tried when the signature does not match this node's publicUrl.
    #: The cluster's other URLs a carrier may have signed, those on the request's Host first.
    _signed_urls: Callable[[str | None], Sequence[str]] | None = None
    #: Webhook outcomes by label (ok, 401, 404, 405, 413, 429, replay, 500, ...), for metrics.
    counts: Counter = field(factory=Counter)
    isLeaf = True
    _log = Logger()

    def __attrs_post_init__(self) -> None:
        Resource.__init__(self)

    def render(self, request):
        path = request.path.decode("latin-1")
        if path == HOLD_MUSIC_PATH:
            if request.method not in (b"GET", b"HEAD", b"POST"):
                return self._answer(request, WebhookResponse(405, b"Method Not Allowed", {**_TEXT, "Allow": "GET, HEAD, POST"}), "405")
            return self._answer(request, WebhookResponse(200, hold_music().encode(), {"Content-Type": "text/xml"}), "hold-music")
        if normalize_path(path) != self._path:
            return self._answer(request, WebhookResponse(404, b"Not Found", _TEXT), "404")
        if request.method != b"POST":
            return self._answer(request, WebhookResponse(405, b"Method Not Allowed", {**_TEXT, "Allow": "POST"}), "405")
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        d = Deferred.fromCoroutine(self._handle(request))

        def failed(f):
            self._log.failure("webhook failed", f)
            return WebhookResponse(500, b"Internal Server Error", _TEXT), "500"

        d.addErrback(failed)
        d.addCallback(lambda result: None if gone else self._answer(request, *result, finish=True))
        d.addErrback(lambda f: self._log.failure("could not answer a webhook", f))
        return NOT_DONE_YET

    def _answer(self, request, response: WebhookResponse, label: str, finish: bool = False):
        self.counts[label] += 1
        request.setResponseCode(response.status)
        headers = dict(response.headers)
        headers.setdefault("Content-Type", "text/plain; charset=utf-8")
        for name, value in headers.items():
            request.setHeader(name, value)
        if request.method == b"HEAD":
            # GET's status and length, no body (Twisted logs the resource when one is given).
            request.setHeader("Content-Length", str(len(response.body)))
            return b""
        if not finish:
            return response.body
        # A length, not chunked framing: one write, and the carrier reads a plain body.
        request.setHeader("Content-Length", str(len(response.body)))
        request.write(response.body)
        request.finish()
        return None

    def context(self, request) -> WebhookContext:
        uri = request.uri.decode("latin-1")
        query = uri.split("?", 1)[1] if "?" in uri else ""
        headers = request_headers(request)
        ip = remote_ip(request)
        params: dict[str, str] = {}
        for k, v in parse_qsl(query, keep_blank_values=True):
            params.setdefault(k, v)
        return WebhookContext(
            method=request.method.decode("latin-1"),
            path=request.path.decode("latin-1"),
            path_and_query=uri,
            query=params,
            headers=headers,
            raw_body=request.content.read(),
            remote_ip=ip,
            url=self._reconstruct_url(uri, headers, ip),
        )

    async def _handle(self, request) -> tuple[WebhookResponse, str]:
        ctx = self.context(request)
        if self._skip_key is not None:
            key = self._skip_key(ctx)
        else:
            verdict = self._provider.verify_webhook(ctx)
            if not verdict.ok and self._signed_urls is not None:
                for url in self._signed_urls(ctx.headers.get("host")):
                    other = self._provider.verify_webhook(ctx, url)
                    if other.ok:
                        verdict = other
                        break
            if not verdict.ok or not verdict.request_key:
                refusals = _refusal_log(request)
                reason = f"{self._provider.name}: {verdict.reason or 'no verified request key'}"
                if refusals is not None:
                    refusals.refused(401, ctx.remote_ip, request.method, request.uri, reason)
                else:
                    self._log.warn("webhook rejected: {reason}", reason=clip(reason))
                return WebhookResponse(401, b"Unauthorized", _TEXT), "401"
            key = verdict.request_key
        if self._route is not None:
            # Checked for a replay here, before routing: a replayed request costs no forward.
            route, refs = self._route, self._provider.call_refs(ctx)
            here = lambda: self._apply(ctx, key)  # noqa: E731
            routed = lambda: route(refs, "webhook", forwarded_request(ctx, key), here, forwarded_answer)  # noqa: E731
            return await self.apply_verified(ctx, key, _refusal_log(request), routed)
        return await self.apply_verified(ctx, key, _refusal_log(request))

    async def serve_forwarded(self, request: dict) -> dict:
        """A verified request another node forwarded here (its call is ours): applied as if received here."""
        ctx, key = forwarded_context(request)
        try:
            answer, label = await self.apply_verified(ctx, key)
        except CancelledError:
            raise  # its sender gave up: its apply goes on (shared through the response cache), unread
        except Exception:
            self._log.failure("a forwarded webhook failed")
            answer, label = WebhookResponse(500, b"Internal Server Error", _TEXT), "500"
        return {"status": answer.status, "body": b64encode(answer.body).decode(), "headers": dict(answer.headers), "label": label}

    async def apply_verified(
        self, ctx: WebhookContext, key: str, refusals=None, routed: Callable[[], Awaitable[WebhookResponse]] | None = None
    ) -> tuple[WebhookResponse, str]:
        """
        A verified request (its request key `key`): a replay's answer, or its events applied.
        `refusals`: the site's `RefusalLog`, which counts replays (None: not counted). `routed`:
        in a cluster, applies it where its call is (here or forwarded to the owner), an answer
        of 500 or more meaning nothing was applied (the carrier's retry is then not a replay).
        """
        if self._replays.check_and_record(key):
            # Rate limited: one captured signed request replayed in a loop must not grow the log.
            if refusals is not None:
                refusals.replayed(self._provider.name)
            answer = self._provider.replay_response(ctx)
            if answer is None:
                answer = await self._responses.get_or_build(key, lambda: self._replay_miss(ctx, key))
            else:
                # A retry that overtakes its original is acknowledged only once the original
                # is durable (or fails, like it: a 500 the carrier retries again).
                fixed = answer
                await self._responses.get_or_build(key, lambda: fixed)
            return answer, "replay"
        apply = (lambda: self._apply(ctx, key)) if routed is None else (lambda: _applied(routed()))
        try:
            answer = await self._responses.get_or_build(key, lambda: Deferred.fromCoroutine(apply()))
        except _NotApplied as e:
            self._replays.discard(key)
            return e.answer, str(e.answer.status)
        except Exception:
            self._replays.discard(key)
            raise
        # A body the provider refused after reading it (a 4xx) is counted under its status.
        return answer, "ok" if answer.status < 400 else str(answer.status)

    async def _apply(self, ctx: WebhookContext, key: str) -> WebhookResponse:
        parsed = self._provider.parse_webhook(ctx, key)
        for event in parsed.events:
            await self._manager.process_event(event)
        return parsed.response

    def _replay_miss(self, ctx: WebhookContext, key: str) -> Deferred:
        """A replay whose original answer is gone: rebuild the answer, apply nothing."""
        return Deferred.fromCoroutine(self._rebuild(ctx, key))

    async def _rebuild(self, ctx: WebhookContext, key: str) -> WebhookResponse:
        return self._provider.parse_webhook(ctx, key).response


def forwarded_request(ctx: WebhookContext, key: str) -> dict:
    """A verified request as JSON, for its call's owner (`WebhookResource.serve_forwarded`)."""
    return {
        "method": ctx.method,
        "path": ctx.path,
        "pathAndQuery": ctx.path_and_query,
        "query": dict(ctx.query),
        "headers": dict(ctx.headers),
        "body": b64encode(ctx.raw_body).decode(),
        "remoteIp": ctx.remote_ip,
        "url": ctx.url,
        "key": key,
    }


def forwarded_context(request: dict) -> tuple[WebhookContext, str]:
    ctx = WebhookContext(
        method=request["method"],
        path=request["path"],
        path_and_query=request["pathAndQuery"],
        query=request["query"],
        headers=request["headers"],
        raw_body=b64decode(request["body"]),
        remote_ip=request["remoteIp"],
        url=request["url"],
    )
    return ctx, request["key"]


def forwarded_answer(reply: dict) -> WebhookResponse:
    """The owner's answer to a forwarded request, as the answer here."""
    if "status" not in reply:  # the forward itself failed on the owner's side
        return WebhookResponse(503, b"Service Unavailable", _TEXT)
    return WebhookResponse(reply["status"], b64decode(reply["body"]), reply["headers"])


class _NotApplied(Exception):
    """A routed request's answer of 500 or more: nothing was applied, so it is not kept for replays."""

    def __init__(self, answer: WebhookResponse) -> None:
        super().__init__(answer.status)
        self.answer = answer


async def _applied(answer: Awaitable[WebhookResponse]) -> WebhookResponse:
    result = await answer
    if result.status >= 500:
        raise _NotApplied(result)
    return result


@define(repr=False)
class RootResource(Resource):
    """
    Routes a WebSocket upgrade (GET) on the media-stream path to its resource, answers any other
    request for that path itself, and sends everything else to the webhook.
    """

    _webhook: Resource
    _stream_path: str | None = None
    _stream: Resource | None = None
    _not_upgrade: Resource = field(init=False, factory=lambda: _StreamPathAnswer())

    def __attrs_post_init__(self) -> None:
        Resource.__init__(self)

    def getChildWithDefault(self, path, request):
        if self._stream is not None and normalize_path(request.path.decode("latin-1")) == self._stream_path:
            upgrade = request.getHeader(b"upgrade") or b""
            if request.method == b"GET" and upgrade.lower() == b"websocket":
                return self._stream
            return self._not_upgrade
        return self._webhook

    def render(self, request):
        return self._webhook.render(request)


class _StreamPathAnswer(Resource):
    """The media-stream path without a WebSocket upgrade: 426 for GET and HEAD, 405 otherwise."""

    isLeaf = True

    def render(self, request):
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        if request.method in (b"GET", b"HEAD"):
            request.setResponseCode(426)
            request.setHeader(b"upgrade", b"websocket")
            body = b"Upgrade Required"
        else:
            request.setResponseCode(405)
            request.setHeader(b"allow", b"GET")
            body = b"Method Not Allowed"
        if request.method == b"HEAD":
            request.setHeader(b"content-length", b"%d" % len(body))
            return b""
        return body
