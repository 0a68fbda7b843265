# -*- test-case-name: tests.test_report -*-
"""
The summary of an ended call (issue 17, "a report after the call"): the fields of its
`call.summary` event, which subscribers get and `report.url` receives (control/report.py).

Pure: it reads a CallRecord and returns JSON-able values; nothing here does I/O.
"""
from __future__ import annotations

from typing import Any

from voicecall.domain.model import CallRecord, TranscriptEntry

#: The kind of the event the summary is published as.
SUMMARY_EVENT = "call.summary"
#: Transcript entries a summary carries at most (the last ones); `transcriptOmitted` counts the rest.
MAX_TRANSCRIPT_ENTRIES = 500
#: Characters of transcript text a summary carries at most (the last entries that fit), so that one
#: event stays well under the RPC socket's 1 MiB line limit.
MAX_TRANSCRIPT_CHARS = 200_000
#: The keys of a recording a summary shows (the carrier's id, where it serves the audio, how long).
SUMMARY_RECORDING_KEYS = ("id", "status", "url", "durationSeconds")


def duration_seconds(call: CallRecord) -> int:
    """Seconds from the answer to the end, rounded; 0 for a call never answered (or not ended)."""
    if call.answered_at is None or call.ended_at is None:
        return 0
    return max(0, round((call.ended_at - call.answered_at) / 1000))


def final_transcript(call: CallRecord) -> list[TranscriptEntry]:
    """The call's final transcript entries (partial speech results left out), oldest first."""
    return [entry for entry in call.transcript if entry.is_final]


def summary_fields(call: CallRecord) -> dict[str, Any]:
    """
    The fields of `call`'s `call.summary` event (the manager adds `type`, `callId` and `at`):
    outcome (the end reason), direction, from, to, startedAt, answeredAt, endedAt (epoch ms;
    null when it did not happen), durationSeconds, answeredBy, transferTarget (null when none),
    recordings (id, status, url, durationSeconds, as known at the end) and transcript
    ({speaker, text, timestamp}; the last ones, at most MAX_TRANSCRIPT_ENTRIES and
    MAX_TRANSCRIPT_CHARS of text; `transcriptOmitted` counts the others, when there are any).
    """
    entries = final_transcript(call)
    kept = _last_that_fit(entries)
    fields: dict[str, Any] = {
        "outcome": call.end_reason or call.state.value,
        "direction": call.direction.value,
        "from": call.from_number,
        "to": call.to_number,
        "startedAt": call.started_at,
        "answeredAt": call.answered_at,
        "endedAt": call.ended_at,
        "durationSeconds": duration_seconds(call),
        "answeredBy": call.answered_by,
        "transferTarget": call.metadata.get("transferTarget"),
        "recordings": [
            {key: recording[key] for key in SUMMARY_RECORDING_KEYS if recording.get(key) is not None}
            for recording in call.recordings
            if isinstance(recording, dict)
        ],
        "transcript": [{"speaker": e.speaker.value, "text": e.text, "timestamp": e.timestamp} for e in kept],
    }
    if len(entries) > len(kept):
        fields["transcriptOmitted"] = len(entries) - len(kept)
    return fields


def _last_that_fit(entries: list[TranscriptEntry]) -> list[TranscriptEntry]:
    """The newest entries within MAX_TRANSCRIPT_ENTRIES and MAX_TRANSCRIPT_CHARS, oldest first."""
    kept: list[TranscriptEntry] = []
    size = 0
    for entry in reversed(entries):
        size += len(entry.text)
        if len(kept) == MAX_TRANSCRIPT_ENTRIES or size > MAX_TRANSCRIPT_CHARS:
            break
        kept.append(entry)
    kept.reverse()
    return kept
