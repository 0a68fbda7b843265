"""
A fake OpenAI-compatible chat-completions API (PROVIDERS.md §5.3) on loopback: checks the Bearer
key and the request body, answers `choices[0].message.content` from `reply(body)`, records every
request, and can fail or stall the next requests.
"""
from __future__ import annotations

import json
from collections import deque
from typing import Any, Callable

from attrs import define, field
from twisted.internet.defer import maybeDeferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET


@define
class FakeChatCompletions:
    api_key: str
    reply: Callable[[dict], Any] = lambda body: '{"spoken": "I heard you."}'
    requests: deque = field(factory=lambda: deque(maxlen=1000))
    _faults: deque = field(factory=deque)

    def fail_next(self, status: int = 500, message: str = "The server had an error", count: int = 1) -> None:
        self._faults.extend([("fail", status, message)] * count)

    def resource(self) -> Resource:
        """Serve it; its root URL + `/v1` is the `responseBaseUrl`."""
        fake = self

        class Completions(Resource):
            isLeaf = True

            def render_POST(self, request):
                return fake._handle(request)

        v1 = Resource()
        chat = Resource()
        chat.putChild(b"completions", Completions())
        v1.putChild(b"chat", chat)
        root = Resource()
        root.putChild(b"v1", v1)
        return root

    def _error(self, request, status: int, message: str, kind: str = "invalid_request_error") -> bytes:
        request.setResponseCode(status)
        request.setHeader("Content-Type", "application/json")
        return json.dumps({"error": {"message": message, "type": kind, "code": None}}).encode()

    def _handle(self, request) -> Any:
        if request.getHeader("Authorization") != f"Bearer {self.api_key}":
            return self._error(request, 401, "Incorrect API key provided.", "invalid_api_key")
        try:
            body = json.loads(request.content.read())
        except ValueError:
            return self._error(request, 400, "We could not parse the JSON body of your request.")
        if not isinstance(body, dict) or not body.get("model") or not isinstance(body.get("messages"), list):
            return self._error(request, 400, "'model' and 'messages' are required.")
        self.requests.append(body)
        if self._faults:
            _, status, message = self._faults.popleft()
            return self._error(request, status, message, "server_error")
        d = maybeDeferred(self.reply, body)

        def done(content):
            answer = {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
            request.setHeader("Content-Type", "application/json")
            request.write(json.dumps(answer).encode())
            request.finish()

        gone: list[bool] = []

        def failed(f):
            if not gone:
                request.setResponseCode(500)
                request.write(b"{}")
                request.finish()

        d.addCallback(lambda content: None if gone else done(content))
        d.addErrback(failed)
        request.notifyFinish().addErrback(lambda _: (gone.append(True), d.cancel()))
        return NOT_DONE_YET
