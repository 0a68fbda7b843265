"""
The carriers' worst documented day, for the fake carriers (DESIGN.md "Delivery semantics").

A `Chaos` object, handed to FakeTwilio / FakeTelnyx / FakePlivo (`chaos=`), makes their webhook
deliveries misbehave the way the carriers say they may, every decision drawn from one seeded
`random.Random` so a failing run replays from its seed:

- duplicates: a webhook is delivered again `retry_after` seconds (at most) later, re-signed with
  a fresh timestamp (Telnyx: `meta.attempt` incremented, same `data.id`; Twilio: the
  `I-Twilio-Idempotency-Token` header kept identical; Plivo: a fresh nonce);
- reordering and concurrency: each delivery waits a random delay up to `reorder_window`
  seconds, so a call's webhooks overtake each other and are in flight together;
- delays: every delivery also waits up to `max_delay` seconds;
- playback that takes the real time of the words: `seconds_per_char` (60 ms a character) divided
  by `speed` (10: ten times faster, for tests);
- late and repeated TwiML/XML fetches: a fetch waits up to `late_fetch` seconds, and is repeated
  (same request, its answer ignored) with probability `refetch`;
- a callee who talks over prompts: with probability `barge_in` the person answers while the
  prompt still plays.

`Chaos()` is off (every knob zero): the fakes behave as before. `Chaos.worst_day(seed)` turns
everything on at once. `add_arguments` / `from_arguments` give the standalone fakes their
`--chaos*` flags.
"""
from __future__ import annotations

import argparse
import random
from typing import Any

from attrs import define, field

#: Real speech: about 60 ms a character (~2.5 words a second).
REAL_SECONDS_PER_CHAR = 0.06


@define
class Chaos:
    """How badly the fake carrier behaves; all zero (the default) is a well-behaved carrier."""

    rng: random.Random = field(factory=lambda: random.Random(0), repr=False)
    duplicate: float = 0.0
    retry_after: float = 2.0
    reorder_window: float = 0.0
    max_delay: float = 0.0
    realistic_playback: bool = False
    seconds_per_char: float = REAL_SECONDS_PER_CHAR
    speed: float = 1.0
    late_fetch: float = 0.0
    refetch: float = 0.0
    barge_in: float = 0.0
    #: Extra deliveries made so far (duplicates, repeated fetches), for tests and logs.
    duplicates_sent: int = 0

    def __attrs_post_init__(self) -> None:
        for name in ("duplicate", "refetch", "barge_in"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"chaos {name} is a probability (0..1)")
        for name in ("retry_after", "reorder_window", "max_delay", "late_fetch", "seconds_per_char"):
            if getattr(self, name) < 0:
                raise ValueError(f"chaos {name} is a number of seconds (>= 0)")
        if self.speed <= 0:
            raise ValueError("chaos speed must be positive")

    @classmethod
    def worst_day(cls, seed: int = 0, *, speed: float = 10.0, **overrides: Any) -> Chaos:
        """Everything on: duplicates, reordering, delays, real-time playback, late and repeated fetches, barge-in."""
        settings: dict[str, Any] = dict(
            duplicate=0.3,
            retry_after=1.0,
            reorder_window=0.3,
            max_delay=0.2,
            realistic_playback=True,
            speed=speed,
            late_fetch=0.3,
            refetch=0.2,
            barge_in=0.2,
        )
        settings.update(overrides)
        return cls(random.Random(seed), **settings)

    # -- the fakes ask -----------------------------------------------------------------------

    @property
    def reorders(self) -> bool:
        """Whether a call's webhooks may overtake each other (no per-call ordering)."""
        return self.reorder_window > 0

    def delivery_delay(self) -> float:
        """Seconds to hold a webhook before sending it."""
        delay = 0.0
        if self.reorder_window > 0:
            delay += self.rng.uniform(0, self.reorder_window)
        if self.max_delay > 0:
            delay += self.rng.uniform(0, self.max_delay)
        return delay

    def duplicate_after(self) -> float | None:
        """Seconds after the first delivery to deliver the webhook again, or None (no duplicate)."""
        if self.duplicate <= 0 or self.rng.random() >= self.duplicate:
            return None
        self.duplicates_sent += 1
        return self.rng.uniform(0, self.retry_after)

    def fetch_delay(self) -> float:
        """Seconds a TwiML/XML fetch waits before it is made."""
        return self.rng.uniform(0, self.late_fetch) if self.late_fetch > 0 else 0.0

    def repeat_fetch(self) -> bool:
        """Whether a TwiML/XML fetch is made twice."""
        hit = self.refetch > 0 and self.rng.random() < self.refetch
        if hit:
            self.duplicates_sent += 1
        return hit

    def talks_over(self) -> bool:
        """Whether the person answers while the prompt is still playing."""
        return self.barge_in > 0 and self.rng.random() < self.barge_in

    def barge_point(self) -> float:
        """How far into a prompt (0..1) the person starts talking over it."""
        return self.rng.uniform(0.1, 0.9)

    def playback_seconds(self, text: str, scenario_rate: float) -> float:
        """How long saying `text` takes: the real time (scaled by `speed`) or the scenario's rate."""
        if self.realistic_playback:
            return len(text) * self.seconds_per_char / self.speed
        return len(text) * scenario_rate


# -- command-line flags of the standalone fakes ------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `--chaos*` flags (all off by default)."""
    group = parser.add_argument_group("chaos (the carrier's worst day; all off by default)")
    group.add_argument("--chaos", action="store_true", help="turn every chaos knob on (worst-day defaults)")
    group.add_argument("--chaos-seed", type=int, default=0, help="seed of the chaos random generator")
    group.add_argument("--chaos-duplicate", type=_probability, default=None, help="probability a webhook is delivered twice")
    group.add_argument("--chaos-retry-after", type=_seconds, default=None, help="max seconds before a duplicate")
    group.add_argument("--chaos-reorder", type=_seconds, default=None, help="reorder window in seconds (deliveries overtake)")
    group.add_argument("--chaos-delay", type=_seconds, default=None, help="max extra delay of each delivery, seconds")
    group.add_argument("--chaos-late-fetch", type=_seconds, default=None, help="max delay of a TwiML/XML fetch, seconds")
    group.add_argument("--chaos-refetch", type=_probability, default=None, help="probability a TwiML/XML fetch is repeated")
    group.add_argument("--chaos-barge-in", type=_probability, default=None, help="probability the callee talks over a prompt")
    group.add_argument(
        "--chaos-playback-speed", type=float, default=None,
        help="playback takes the real time of the words (60 ms/char) divided by this factor",
    )


def from_arguments(args: argparse.Namespace) -> Chaos:
    """The Chaos the parsed `--chaos*` flags describe (off unless a flag is given)."""
    named = {
        "duplicate": args.chaos_duplicate,
        "retry_after": args.chaos_retry_after,
        "reorder_window": args.chaos_reorder,
        "max_delay": args.chaos_delay,
        "late_fetch": args.chaos_late_fetch,
        "refetch": args.chaos_refetch,
        "barge_in": args.chaos_barge_in,
    }
    given = {k: v for k, v in named.items() if v is not None}
    if args.chaos_playback_speed is not None:
        given.update(realistic_playback=True, speed=args.chaos_playback_speed)
    if args.chaos:
        return Chaos.worst_day(args.chaos_seed, **given)
    return Chaos(random.Random(args.chaos_seed), **given)


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("a probability between 0 and 1")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("a number of seconds >= 0")
    return value
