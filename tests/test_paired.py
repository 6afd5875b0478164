"""Paired differences over seeds (experiments/paired.py): the interval held
to a hand computation and to scipy's paired t-test, its verdicts, refusals."""

import math

import numpy as np
import pytest
from scipy import stats

from experiments.paired import paired_difference


def test_the_interval_is_students_by_hand():
    # differences 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.302653
    difference = paired_difference([11.0, 12.0, 13.0], [10.0, 10.0, 10.0])
    half_width = 4.302652729749464 / math.sqrt(3)
    assert difference.mean == 2.0 and difference.n == 3
    assert difference.low == pytest.approx(2.0 - half_width, rel=1e-12)
    assert difference.high == pytest.approx(2.0 + half_width, rel=1e-12)
    assert difference.verdict == "no difference shown"  # 2 +- 2.48 holds 0
    assert str(difference) == "+2 [-0.4841, +4.484] (95% interval, 3 seeds)"


def test_the_interval_is_scipys_paired_t_test():
    rng = np.random.default_rng(0)
    control = rng.normal(size=7)
    treated = control + 0.5 + 0.3 * rng.normal(size=7)
    expected = stats.ttest_rel(treated, control).confidence_interval(0.9)
    difference = paired_difference(treated, control, confidence=0.9)
    assert (difference.low, difference.high) == pytest.approx((expected.low, expected.high), rel=1e-12)
    assert difference.verdict == "higher"
    assert paired_difference(control, treated).verdict == "lower"


@pytest.mark.parametrize("treated, control, confidence, message", [
    ([1.0, 2.0], [1.0], 0.95, r"^paired values need one value per seed on each side"),
    ([1.0], [2.0], 0.95, r"^an interval needs at least 2 seeds, got 1$"),
    ([1.0, float("nan")], [1.0, 2.0], 0.95, r"^paired values must be finite"),
    ([1.0, 2.0], [1.0, 2.0], 1.0, r"^confidence must be in \(0, 1\), got 1.0$"),
])
def test_bad_input_is_refused_in_one_line(treated, control, confidence, message):
    with pytest.raises(ValueError, match=message):
        paired_difference(treated, control, confidence)
