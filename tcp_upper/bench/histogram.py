"""Round trips in a fixed-size log-linear histogram: bounded memory, mergeable, within 1 %."""

from __future__ import annotations

import math

# _SUB_BITS + 1 bits plus _SUB per bit dropped, i.e. _SUB buckets per power of two.
_SUB_BITS = 7  # 128 sub-buckets per power of two: under 0.8 % relative error
_SUB = 1 << _SUB_BITS


def _bucket_value(index: int) -> float:
    """Middle of a bucket, in microseconds (the inverse of the mapping in ``add``)."""
    if index < 2 * _SUB:
        return float(index)
    shift = (index >> _SUB_BITS) - 1
    mantissa = index - (shift << _SUB_BITS)
    return (mantissa << shift) + ((1 << shift) - 1) / 2


class LatencyHistogram:
    """Round trips in log-linear microsecond buckets.

    Memory stays bounded however long the run (a few thousand buckets at most), percentiles are
    within 1 %, and histograms from several processes merge by adding counts.
    """

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.count = 0
        self.total_us = 0.0
        self.max_us = 0.0

    def add(self, seconds: float, times: int = 1) -> None:
        """Record *times* samples of one round trip of *seconds*."""
        micros = seconds * 1e6
        whole = int(micros)
        if whole < 2 * _SUB:
            index = whole
        else:
            shift = whole.bit_length() - _SUB_BITS - 1
            index = (shift << _SUB_BITS) + (whole >> shift)
        self.counts[index] = self.counts.get(index, 0) + times
        self.count += times
        self.total_us += micros * times
        if micros > self.max_us:
            self.max_us = micros

    def merge(self, other: LatencyHistogram) -> None:
        """Add *other*'s samples to this one."""
        for index, times in other.counts.items():
            self.counts[index] = self.counts.get(index, 0) + times
        self.count += other.count
        self.total_us += other.total_us
        self.max_us = max(self.max_us, other.max_us)

    def percentile(self, fraction: float) -> float:
        """The round trip (µs) that *fraction* (0..1) of the samples did not exceed; 0 if none."""
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(fraction * self.count))
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= rank:
                return min(_bucket_value(index), self.max_us)
        return self.max_us

    @property
    def mean_us(self) -> float:
        return self.total_us / self.count if self.count else 0.0

