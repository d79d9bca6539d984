"""The monitor's alarm rule: K of the last N windows above the threshold, chosen so that the
false alarms per hour stay under a bound, from the per-window false-alarm rate the artifact's
threshold was calibrated for (binomial tail over independent windows)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from edgediag.errors import UserError


def binom_tail(n: int, k: int, p: float) -> float:
    """P(at least ``k`` of ``n`` independent events of probability ``p``)."""
    if k <= 0:
        return 1.0
    return float(sum(math.comb(n, i) * p ** i * (1.0 - p) ** (n - i) for i in range(k, n + 1)))


def false_alarms_per_hour(votes: int, of: int, p: float, window_s: float, hop_s: float) -> float:
    """Upper bound on the expected number of alarms per hour of normal running under the
    rule "``votes`` of the last ``of`` windows above the threshold", where each normal
    window is above it with probability ``p`` (the calibrated per-window false-alarm rate)
    and windows that do not overlap are independent.

    Windows ``hop_s`` apart overlap when ``hop_s < window_s``: windows i and i + s, with
    s = ceil(window/hop), do not, so the last ``of`` windows form s chains of disjoint
    windows. ``votes`` of ``of`` above means at least ceil(votes/s) above in one chain
    (all of one chain when votes = of); an alarm can start at most once per hop, so the
    rate is at most (3600 / hop) times that probability."""
    s = max(1, math.ceil(window_s / hop_s - 1e-9))
    chains = [len(range(c, of, s)) for c in range(min(s, of))]
    need = math.ceil(votes / s)
    per_window = sum(binom_tail(m, need, p) for m in chains)
    if votes == of:  # every window above: each chain entirely above, the longest one included
        per_window = min(per_window, p ** max(chains))
    return min(1.0, per_window) * 3600.0 / hop_s


def choose_rule(p: float, window_s: float, hop_s: float, per_hour: float, max_windows: int = 512) -> tuple[int, int]:
    """The shortest vote (fewest windows, then fewest votes) whose false-alarm bound
    (:func:`false_alarms_per_hour`) is at most ``per_hour``."""
    for of in range(1, max_windows + 1):
        if false_alarms_per_hour(of, of, p, window_s, hop_s) > per_hour:
            continue
        votes = of
        while votes > 1 and false_alarms_per_hour(votes - 1, of, p, window_s, hop_s) <= per_hour:
            votes -= 1
        return votes, of
    raise UserError(f"no vote of up to {max_windows} windows keeps false alarms under {per_hour:g}/hour at a "
                    f"per-window false-alarm rate of {p:g}: raise --false-alarms-per-hour, or calibrate the "
                    "threshold for a lower rate (train --target-far)")


@dataclass
class AlarmRule:
    """``votes`` of the last ``of`` windows above the threshold, and what it promises."""

    votes: int
    of: int
    window_s: float
    hop_s: float
    window_far: float | None = None  # per-window false-alarm rate the rule was derived from
    window_far_hi: float | None = None  # the calibration's 95 % upper bound on it
    note: str = ""  # why no rate is promised, where none is
    min_duration: float = 0.0  # seconds the vote must hold (--min-duration)

    def rate(self, p: float | None) -> float | None:
        return None if p is None else false_alarms_per_hour(self.votes, self.of, p, self.window_s, self.hop_s)

    per_hour = property(lambda self: self.rate(self.window_far))
    per_hour_hi = property(lambda self: self.rate(self.window_far_hi))

    @property
    def delay_s(self) -> float:
        """Alarm delay for a fault whose every window scores above the threshold: the first
        window wholly inside it ends one window after the onset (up to a hop later), and
        ``votes`` windows must be in, for ``min_duration``."""
        return self.window_s + (self.votes - 1) * self.hop_s + self.min_duration

    def as_dict(self) -> dict:
        d = {"votes": self.votes, "of": self.of, "window_s": round(self.window_s, 4), "hop_s": round(self.hop_s, 4),
             "delay_s": round(self.delay_s, 3)}
        for key, value in (("window_far", self.window_far), ("window_far_hi", self.window_far_hi),
                           ("false_alarms_per_hour", self.per_hour), ("false_alarms_per_hour_hi", self.per_hour_hi)):
            if value is not None:
                d[key] = float(f"{value:.4g}")
        if self.note:
            d["note"] = self.note
        return d

    def describe(self) -> str:
        text = (f"alarm rule: {self.votes} of the last {self.of} windows above the threshold "
                f"({self.window_s:g} s windows every {self.hop_s:g} s; about {self.delay_s:.3g} s after a fault "
                f"that scores above it)")
        if self.window_far is None:
            return text + f"; no false-alarm rate promised: {self.note}"
        text += (f"; at most {self.per_hour:.2g} false alarms/hour at a per-window false-alarm rate of "
                 f"{self.window_far:.3g}")
        if self.window_far_hi is not None and self.window_far_hi > self.window_far:
            text += f" ({self.per_hour_hi:.2g}/hour at its 95 % upper bound {self.window_far_hi:.3g})"
        return text


def parse_rule(text: str) -> tuple[int, int] | None:
    """``auto`` -> None, ``K/N`` -> (K, N)."""
    if text == "auto":
        return None
    try:
        votes, of = (int(v) for v in text.split("/"))
    except ValueError:
        raise UserError(f"--alarm-rule must be auto or K/N (K of the last N windows), not {text!r}") from None
    return votes, of  # 1 <= K <= N: checked by Hysteresis
