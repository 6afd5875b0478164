"""Verdicts from seeds: the paired difference of a measure between two nets
trained from the same seeds, with its 95% Student-t interval.

A study that trains BN and the plain net from seeds 0..n-1 compares them
seed by seed: d_i = treated_i - control_i (the same initialization draw,
the same batch order), mean(d) with the interval mean(d) +- t * sd(d) /
sqrt(n), t the 97.5th percentile of Student's t with n - 1 degrees of
freedom. The verdict reads the interval, not one point: "higher" where it
lies above 0, "lower" where below, "no difference shown" where it holds 0.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import stats


@dataclasses.dataclass(frozen=True)
class PairedDifference:
    """mean(treated - control) over n paired seeds, and its interval."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float = 0.95

    @property
    def verdict(self) -> str:
        if self.low > 0:
            return "higher"
        if self.high < 0:
            return "lower"
        return "no difference shown"

    def __str__(self) -> str:
        return (f"{self.mean:+.4g} [{self.low:+.4g}, {self.high:+.4g}] "
                f"({self.confidence:.0%} interval, {self.n} seeds)")


def paired_difference(treated, control, confidence: float = 0.95) -> PairedDifference:
    """The paired difference treated - control (sequences of one measure,
    one value per seed, in the same seed order). ValueError, in one line, for
    unequal lengths, fewer than 2 seeds, a value that is not finite, or a
    confidence outside (0, 1)."""
    treated, control = np.asarray(treated, np.float64), np.asarray(control, np.float64)
    if treated.ndim != 1 or treated.shape != control.shape:
        raise ValueError(f"paired values need one value per seed on each side, got shapes {treated.shape} "
                         f"and {control.shape}")
    if len(treated) < 2:
        raise ValueError(f"an interval needs at least 2 seeds, got {len(treated)}")
    if not (np.all(np.isfinite(treated)) and np.all(np.isfinite(control))):
        raise ValueError(f"paired values must be finite, got {treated.tolist()} and {control.tolist()}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    differences = treated - control
    mean = float(differences.mean())
    half_width = float(stats.t.ppf(0.5 + confidence / 2, len(differences) - 1)
                       * differences.std(ddof=1) / math.sqrt(len(differences)))
    return PairedDifference(mean, mean - half_width, mean + half_width, len(differences), confidence)
