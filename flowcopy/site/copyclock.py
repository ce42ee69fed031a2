"""The array's shared copy clock, in fixed point.

Processor sharing (ess.py, "shared copy bandwidth"): the k background copies running at
a moment each get bandwidth/k. One clock V counts what each running copy has been given
since the array began; a copy started at V = v0 has walked (V - v0) // TICKS_PER_TRACK
tracks. V is an integer number of ticks, 2**-TICK_BITS of a track each, because an exact
rational V (its first form) gained a denominator factor with every change of k: after
thousands of changes one query of 10,000 copies spent seconds in big-number arithmetic.

The rounding rules, each applied in exactly one place (`value`, `reaches`), and written
again independently by the reference model of tests/test_ess_stateful.py:

* V is fixed at each site time `at` the set of running copies (or the bandwidth)
  changes; in between, V(t) = V(at) + floor((t - at) * bandwidth * 2**TICK_BITS /
  (k * TRACK_SIZE)), computed exactly from the float site times. So V rounds down by
  less than one tick per change (a copy never gets ahead of the bandwidth), and asking
  V at any moments in between changes nothing.
* A copy whose finish mark is m completes at the first float site time t with V(t) >= m
  (the site clock is a float: no float between two change times is skipped or repeated).
  That moment is the next change time, so change times are always floats and the
  arithmetic stays a few machine words wide, however long the array runs.
"""

from __future__ import annotations

import math

from flowcopy.site.api import TRACK_SIZE

TICK_BITS = 32
TICKS_PER_TRACK = 1 << TICK_BITS


class CopyClock:
    """V at the last change time `at` (`ticks`), the running-copy count `k` since, and the
    bandwidth. Mutable on purpose: the array changes it in place at every change."""

    __slots__ = ("ticks", "at", "k", "bandwidth", "_at_ratio", "_bw_ratio")

    def __init__(self, bandwidth: float, *, ticks: int = 0, at: float = 0.0, k: int = 0) -> None:
        self.ticks = int(ticks)
        self.at = float(at)
        self.k = int(k)
        self.bandwidth = float(bandwidth)
        self._at_ratio = self.at.as_integer_ratio()
        self._bw_ratio = self.bandwidth.as_integer_ratio()

    def copy(self) -> CopyClock:
        return CopyClock(self.bandwidth, ticks=self.ticks, at=self.at, k=self.k)

    def value(self, t: float) -> int:
        """V at site time t (not before `at`: an earlier t reads V(at))."""
        if self.k == 0 or t <= self.at:
            return self.ticks
        p, q = float(t).as_integer_ratio()
        pa, qa = self._at_ratio
        bn, bd = self._bw_ratio
        # (t - at) * bandwidth * 2**TICK_BITS / (k * TRACK_SIZE), rounded down, in integers
        return self.ticks + ((p * qa - pa * q) * bn << TICK_BITS) // (q * qa * bd * self.k * TRACK_SIZE)

    def change(self, t: float, k: int) -> None:
        """Fix V at t, then run k copies from there (rule 1: this is where V rounds)."""
        if t > self.at:
            self.ticks = self.value(t)
            self.at = float(t)
            self._at_ratio = self.at.as_integer_ratio()
        self.k = k

    def set_bandwidth(self, t: float, bandwidth: float) -> None:
        self.change(t, self.k)
        self.bandwidth = float(bandwidth)
        self._bw_ratio = self.bandwidth.as_integer_ratio()

    def reaches(self, mark: int) -> float:
        """The first float site time at which V reaches `mark` if k stays as it is (rule 2);
        `at` if it already has, infinity if nothing runs."""
        if mark <= self.ticks:
            return self.at
        if self.k == 0:
            return math.inf
        pa, qa = self._at_ratio
        bn, bd = self._bw_ratio
        # at + (mark - ticks) * k * TRACK_SIZE / (bandwidth * 2**TICK_BITS) = num / den exactly
        scale = bn << TICK_BITS
        num = pa * scale + (mark - self.ticks) * bd * self.k * TRACK_SIZE * qa
        den = qa * scale
        f = num / den  # correctly rounded: at most one float below the exact time
        fp, fq = f.as_integer_ratio()
        if fp * den < num * fq:
            f = math.nextafter(f, math.inf)
        return f
