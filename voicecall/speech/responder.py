# -*- test-case-name: tests.test_responder -*-
"""
Automatic replies (SPEC §13 with DESIGN.md's decision): for each final caller utterance on an
inbound call or an outbound conversation call that no `continue` is waiting for, produce a reply
and speak it, then listen again.

Who answers: a gateway that registered itself over RPC (`voicecall.responder.register`) is asked
first; without one, the built-in client calls an OpenAI-compatible chat-completions API. A newer
utterance makes a reply still being generated stale: it is never spoken. A responder that fails
or times out is logged and the caller hears a short apology; the call goes on.
"""
from __future__ import annotations

import json
import re
from typing import Any, Callable, Sequence

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel

from voicecall.domain.model import CallRecord, Direction, Mode, Speaker, TranscriptEntry
from voicecall.infra.jsonhttp import ApiClient

APOLOGY = "Sorry, I'm having trouble answering right now. Could you say that again?"
DEFAULT_MODEL = "gpt-4o-mini"
#: SPEC §13's default prompt, less its sentence about tools: the built-in client offers none.
DEFAULT_PROMPT = (
    "You are {name}, a helpful voice assistant on a phone call. Keep responses brief and "
    "conversational (1-2 sentences max). Be natural and friendly. The caller's phone number is {caller}."
)
SPOKEN_CONTRACT = (
    '\n\nAnswer with JSON only, exactly {"spoken": "<the words to say to the caller>"}; '
    'use an empty string to say nothing.'
)
#: Transcript entries sent with a request (the most recent ones).
MAX_HISTORY = 40
#: What the model is asked for a call's summary (`report.summarize`).
SUMMARY_PROMPT = (
    "You summarise phone calls between an AI voice assistant and a person. In at most three short "
    "sentences of plain text, say what the call was about, what was agreed or learned, and any "
    "follow-up needed. Do not invent anything that is not in the transcript."
)
#: The most transcript text (characters, the latest) sent for a summary.
MAX_SUMMARY_INPUT = 20_000

_FENCED = re.compile(r"```(?:json)?\s*(\{.*?\})\s*```", re.S)
_INLINE = re.compile(r'"spoken"\s*:\s*("(?:[^"\\]|\\.)*")', re.S)
_META = re.compile(r"^\s*(?:\(|\[|\*|#|thinking|thought|plan|planning|reasoning|analysis|note|let me|i will|i'll|i should)", re.I)


def extract_spoken(content: str) -> str:
    """
    The words to say from a model's answer ([H] spoken-output contract): direct JSON, fenced JSON
    or an inline "spoken" key; otherwise the plain text less its leading planning paragraphs.
    """
    text = content.strip()
    for candidate in (text, *(m.group(1) for m in _FENCED.finditer(text))):
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(value, dict) and isinstance(value.get("spoken"), str):
            return value["spoken"].strip()
    match = _INLINE.search(text)
    if match:
        try:
            return json.loads(match.group(1)).strip()
        except ValueError:
            pass
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    while len(paragraphs) > 1 and _META.match(paragraphs[0]):
        paragraphs.pop(0)
    return "\n\n".join(paragraphs)


def system_prompt(call: CallRecord, custom: str | None, text: str | None = None, name: str = "assistant") -> str:
    """The system prompt with the conversation so far, less `text` (the words being answered)."""
    prompt = custom or DEFAULT_PROMPT.format(name=name, caller=call.from_number)
    objective = call.metadata.get("objective")
    if objective:
        # The call's own purpose (initiate's `objective`).
        prompt += f"\n\nThe objective of this call: {objective}"
    history = list(call.transcript)
    if history and history[-1].speaker is Speaker.USER and history[-1].text == text:
        history.pop()
    lines = [("You: " if t.speaker is Speaker.BOT else "Caller: ") + t.text for t in history[-MAX_HISTORY:]]
    if lines:
        prompt += "\n\nConversation so far:\n" + "\n".join(lines)
    return prompt + SPOKEN_CONTRACT


def model_name(response_model: str | None) -> str:
    """
    The model to ask for: `openai/gpt-4o-mini` -> `gpt-4o-mini`; a bare name: itself. Only the
    first slash separates the provider, so `openai/meta-llama/Llama-3` asks an OpenAI-compatible
    server (`responseBaseUrl`) for `meta-llama/Llama-3`. The built-in client speaks the OpenAI
    API only: another provider raises ValueError (config validation refuses it first, with the
    same text).
    """
    if not response_model:
        return DEFAULT_MODEL
    provider, slash, name = response_model.partition("/")
    if not slash:
        return response_model
    if provider.lower() != "openai":
        raise ValueError(
            f'provider "{provider}" is not supported: the built-in responder speaks the OpenAI API '
            '(use "openai/<model>", also for an OpenAI-compatible server at responseBaseUrl)'
        )
    if not name.strip():
        raise ValueError('expected a model name after "openai/"')
    return name


@define(repr=False)
class ChatResponder:
    """The built-in responder: one chat-completions request per caller utterance."""

    _http: Any
    _base_url: str = "https://api.openai.com/v1"
    _api_key: str | None = field(default=None, repr=False)
    _model: str | None = None
    _system_prompt: str | None = None
    _timeout_ms: int = 30_000
    #: Bounds the answer's body as well as its headers (without one, only the headers).
    _clock: IReactorTime | None = None
    _api: ApiClient = field(init=False)

    def __attrs_post_init__(self) -> None:
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        self._api = ApiClient(
            http=self._http,
            base=self._base_url,
            prefix="Response API error",
            headers=headers,
            timeout=self._timeout_ms / 1000.0,
            clock=self._clock,
        )

    @property
    def usable(self) -> bool:
        return bool(self._api_key)

    def respond(self, call: CallRecord, text: str) -> Deferred[str]:
        return Deferred.fromCoroutine(self._respond(call, text))

    async def _respond(self, call: CallRecord, text: str) -> str:
        body = {
            "model": model_name(self._model),
            "messages": [
                {"role": "system", "content": system_prompt(call, self._system_prompt, text)},
                {"role": "user", "content": text},
            ],
            "max_completion_tokens": 300,
        }
        answer = await self._api.request("POST", "/chat/completions", body=body)
        try:
            content = answer["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError) as e:
            raise ValueError("Response API answer has no choices[0].message.content") from e
        return extract_spoken(content)

    def summarize(self, transcript: Sequence[TranscriptEntry]) -> Deferred[str]:
        """A few sentences summing up a call from its transcript (`report.summarize`), plain text."""
        return Deferred.fromCoroutine(self._summarize(transcript))

    async def _summarize(self, transcript: Sequence[TranscriptEntry]) -> str:
        lines = [("Assistant: " if t.speaker is Speaker.BOT else "Caller: ") + t.text for t in transcript]
        text = "\n".join(lines)[-MAX_SUMMARY_INPUT:]
        body = {
            "model": model_name(self._model),
            "messages": [{"role": "system", "content": SUMMARY_PROMPT}, {"role": "user", "content": text}],
            "max_completion_tokens": 200,
        }
        answer = await self._api.request("POST", "/chat/completions", body=body)
        try:
            return (answer["choices"][0]["message"]["content"] or "").strip()
        except (KeyError, IndexError, TypeError) as e:
            raise ValueError("Response API answer has no choices[0].message.content") from e


#: ask(call, text) -> Deferred[str] of the words to say, or None when that responder is absent.
Ask = Callable[[CallRecord, str], "Deferred[str] | None"]


@define(repr=False)
class AutoResponder:
    """Answers callers: `on_utterance` is the manager's hook for words no `continue` waits for (tap.py)."""

    _manager: Any  # voicecall.domain.manager.CallManager
    _clock: IReactorTime
    _gateway: Ask  # the RPC-registered gateway, if any
    _builtin: ChatResponder | None = None
    _timeout_ms: int = 30_000
    _generation: dict[str, int] = field(factory=dict)
    _log = Logger()

    def on_utterance(self, call: CallRecord, text: str) -> None:
        if call.direction is not Direction.INBOUND and call.mode is not Mode.CONVERSATION:
            return
        if self._manager.turn_pending(call.call_id):
            # A `continue` is queued behind what is playing: its question comes next, and a
            # reply spoken after it would talk over the turn the gateway is running.
            self._log.info("not answering {call_id}: a continue is next", call_id=call.call_id)
            return
        generation = self._generation.get(call.call_id, 0) + 1
        self._generation[call.call_id] = generation
        d = Deferred.fromCoroutine(self._answer(call, text, generation))
        d.addErrback(lambda f: self._log.failure("auto-reply on {call_id} failed", f, call_id=call.call_id))

    def _ask(self, call: CallRecord, text: str) -> Deferred[str] | None:
        asked = self._gateway(call, text)
        if asked is None and self._builtin is not None and self._builtin.usable:
            asked = self._builtin.respond(call, text)
        return asked

    async def _answer(self, call: CallRecord, text: str, generation: int) -> None:
        asked = self._ask(call, text)
        if asked is None:
            self._generation.pop(call.call_id, None)
            self._log.info("no responder (no gateway registered, no responseApiKey): not answering {call_id}", call_id=call.call_id)
            return
        asked.addTimeout(self._timeout_ms / 1000.0, self._clock)
        try:
            reply = await asked
            if not isinstance(reply, str):
                raise TypeError("the responder's reply is not a string")
        except Exception as e:
            # One line for the operator (a gateway that went away or was slow is routine); the
            # traceback only at debug level.
            why = f"{type(e).__name__}: {e}"[:200]
            self._log.warn("responder failed for {call_id} ({why}); apologising", call_id=call.call_id, why=why)
            self._log.failure("responder failure detail for {call_id}", call_id=call.call_id, level=LogLevel.debug)
            reply = APOLOGY
        if self._generation.get(call.call_id) != generation:
            self._log.info("dropping a stale reply on {call_id}: the caller spoke again", call_id=call.call_id)
            return
        del self._generation[call.call_id]
        if not reply.strip() or self._manager.find(call.call_id) is None:
            return
        if self._manager.turn_pending(call.call_id):
            self._log.info("dropping a reply on {call_id}: a continue started meanwhile", call_id=call.call_id)
            return
        await self._manager.reply(call.call_id, reply.strip())
