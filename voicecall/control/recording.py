# -*- test-case-name: tests.test_cli_actions -*-
"""
`voicecall recording fetch`: download a call's recording from its carrier into a file.

voicecall never downloads audio by itself: a call's record keeps its recordings' ids, statuses,
URLs and durations (model.RECORDING_KEYS). This command picks one (the last completed, or the
one named), asks the carrier's module where its audio is (`recording_source` of
providers/twilio.py, telnyx.py or plivo.py: the URL and the request headers, credentials sent only
to the carrier's own origin) and streams the body into a temporary file beside the target, renamed
into place once complete: an interrupted or failed download leaves no file, and an existing file
is only replaced with `force`. The body goes to disk chunk by chunk as it arrives, never held in
memory whole.

The CLI imports this module when the command runs (control.cli loads no server side at import);
it reads no config itself: the CLI hands it the carrier's base URL and credentials.
"""
from __future__ import annotations

import importlib
import os
import sys
import tempfile
from typing import IO, Any, Callable, ContextManager, Mapping
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

#: The carriers whose recordings have audio to fetch (each module has `recording_source`).
CARRIERS = ("twilio", "telnyx", "plivo")
#: Seconds to wait for the carrier's server to accept the connection.
CONNECT_TIMEOUT = 30.0


class RecordingError(Exception):
    """The fetch failed; the message says why, for a person."""


def pick(call: Mapping[str, Any], recording_id: str | None) -> dict:
    """The recording to fetch: `recording_id`'s, else the call's last completed one."""
    call_id = call.get("callId")
    recordings = [r for r in call.get("recordings") or () if isinstance(r, dict)]
    if not recordings:
        raise RecordingError(f"call {call_id} has no recording")
    if recording_id is not None:
        chosen = next((r for r in recordings if r.get("id") == recording_id), None)
        if chosen is None:
            known = ", ".join(str(r.get("id")) for r in recordings)
            raise RecordingError(f"call {call_id} has no recording {recording_id} (its recordings: {known})")
    else:
        completed = [r for r in recordings if r.get("status") == "completed"]
        chosen = completed[-1] if completed else recordings[-1]
    status = chosen.get("status")
    if status == "failed":
        raise RecordingError(f"recording {chosen.get('id')} of call {call_id} failed: the carrier has no audio for it")
    if status != "completed":
        raise RecordingError(
            f"recording {chosen.get('id')} of call {call_id} is not completed yet ({status}); "
            "the carrier reports it once it has processed the audio, shortly after the call ends"
        )
    return chosen


def source_for(provider: str, http: Any, *, base_url: str, credentials: Mapping[str, str]) -> Callable[[Mapping], Deferred]:
    """`recording -> Deferred[(url, headers)]` for the call's carrier."""
    if provider == "mock":
        raise RecordingError("the mock provider's recordings have no audio (nothing was recorded): there is nothing to fetch")
    if provider not in CARRIERS:
        raise RecordingError(f"recordings of provider {provider!r} cannot be fetched (only {', '.join(CARRIERS)})")
    module = importlib.import_module(f"voicecall.providers.{provider}")
    return lambda recording: module.recording_source(http, recording, base_url=base_url, **credentials)


def shown(url: str) -> str:
    """A URL as messages show it: no query (a presigned URL's signature is a credential), no user info."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"


def progress_bar(length: int | None, label: str) -> ContextManager:
    """A click progress bar on stderr, by bytes (`update(n)`); without a known length it counts what arrived."""
    import click

    if length is not None:
        return click.progressbar(length=length, label=label, file=sys.stderr)
    return click.progressbar((_ for _ in ()), label=label, file=sys.stderr, show_pos=True)


class _ToFile(Protocol):
    """A response body written to `file` as it arrives; `done` fires with the byte count."""

    def __init__(self, file: IO[bytes], on_bytes: Callable[[int], None]) -> None:
        self._file = file
        self._on_bytes = on_bytes
        self.received = 0
        self.done: Deferred[int] = Deferred(self._cancel)

    def _cancel(self, _: Deferred) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # Ctrl-C: stop reading; the caller removes the file

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        try:
            self._file.write(data)
        except OSError as e:  # a full disk: stop here
            self.transport.stopProducing()
            self.done.errback(RecordingError(f"cannot write the recording: {e.strerror or e}"))
            return
        self.received += len(data)
        self._on_bytes(len(data))

    def connectionLost(self, reason: Failure) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(self.received)
        else:
            self.done.errback(RecordingError(f"the download broke off after {self.received} bytes: {reason.getErrorMessage()}"))


def check_target(out: str, force: bool) -> str:
    """The absolute path to write, refused when it exists (without `force`), is a directory, or its directory is missing."""
    path = os.path.abspath(out)
    if os.path.isdir(path):
        raise RecordingError(f"{out} is a directory: name the file to write")
    if os.path.lexists(path) and not force:
        raise RecordingError(f"{out} exists: pass --force to replace it")
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise RecordingError(f"no directory {directory} to write {os.path.basename(path)} in")
    return path


async def fetch(
    call: Mapping[str, Any],
    *,
    out: str,
    recording_id: str | None,
    force: bool,
    source: Callable[[Mapping], Deferred],
    http: Any,
    progress: Callable[[int | None, str], ContextManager] | None = None,
) -> dict:
    """
    Download the chosen recording of `call` (its record as JSON) to `out`. `source` is the
    carrier's `recording_source` (see `source_for`), `http` a treq HTTPClient, `progress` a bar
    factory (`progress_bar`) or None. Returns what was written.
    """
    recording = pick(call, recording_id)
    path = check_target(out, force)
    try:
        url, headers = await source(recording)
    except ValueError as e:  # the carrier module's refusal: a URL off its origin, an id it cannot have made
        raise RecordingError(str(e)) from None
    except RecordingError:
        raise
    except Exception as e:  # the carrier's API refused the lookup (Telnyx): its message
        raise RecordingError(f"cannot locate recording {recording.get('id')}: {e}") from None
    try:
        response = await http.get(url, headers=headers, unbuffered=True)
    except Exception as e:
        raise RecordingError(f"cannot download {shown(url)}: {e}") from None
    if response.code != 200:
        response.deliverBody(_Discard())
        phrase = (response.phrase or b"").decode("latin-1", "replace")
        raise RecordingError(f"{shown(url)} answered HTTP {response.code} {phrase}".rstrip())
    lengths = response.headers.getRawHeaders(b"content-length") or []
    length = int(lengths[0]) if lengths and lengths[0].isdigit() else None
    fd, temp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as file:
            bar = progress(length, f"recording {recording.get('id')}") if progress is not None else None
            if bar is None:
                written = await _body(response, file, lambda n: None)
            else:
                with bar:
                    written = await _body(response, file, bar.update)
            if length is not None and written != length:
                raise RecordingError(f"the download ended early: {written} of {length} bytes")
            file.flush()
            os.fsync(file.fileno())
        _place(temp, path, force, out)
    finally:
        if os.path.lexists(temp):
            os.unlink(temp)
    result = {"callId": call.get("callId"), "recordingId": recording.get("id"), "file": path, "bytes": written}
    if recording.get("durationSeconds") is not None:
        result["durationSeconds"] = recording["durationSeconds"]
    return result


def _body(response, file: IO[bytes], on_bytes: Callable[[int], None]) -> Deferred[int]:
    receiver = _ToFile(file, on_bytes)
    response.deliverBody(receiver)
    return receiver.done


def _place(temp: str, path: str, force: bool, out: str) -> None:
    """Move the complete download into place: atomically, and without replacing a file that appeared meanwhile unless `force`."""
    if force:
        os.replace(temp, path)
        return
    try:
        os.link(temp, path)  # fails if `path` exists, unlike a rename
    except FileExistsError:
        raise RecordingError(f"{out} exists: pass --force to replace it") from None
    except OSError:  # no hard links on this filesystem
        if os.path.lexists(path):
            raise RecordingError(f"{out} exists: pass --force to replace it") from None
        os.replace(temp, path)


class _Discard(Protocol):
    """An error answer's body, read and dropped."""

    def dataReceived(self, data: bytes) -> None:
        pass
