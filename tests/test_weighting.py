"""Weighting schemes against their formulas."""
import math

import pytest

from obslib.io import UsageError
from obslib.weighting import FORMULA_SCHEMES, timestep_weights


def test_log_decrease_is_the_paper_formula():
    T, lo, hi = 25, 0.8, 1.2
    a = timestep_weights("log-decrease", T, lo, hi)
    for t in range(1, T + 1):
        assert a[t - 1] == pytest.approx(lo + (hi - lo) * math.log(T - t + 1) / math.log(T))
    assert a[0] == pytest.approx(hi) and a[-1] == pytest.approx(lo)
    # stays high for most steps, falls sharply at the end
    assert a[T // 2] > (lo + hi) / 2 and a[-2] - a[-1] > a[0] - a[1]


def test_log_increase_is_the_mirror():
    a, b = timestep_weights("log-decrease", 10), timestep_weights("log-increase", 10)
    assert a == pytest.approx(b[::-1])


def test_linear_and_uniform():
    assert timestep_weights("uniform", 4) == [1.0] * 4
    assert timestep_weights("linear-decrease", 5, 0.8, 1.2) == pytest.approx([1.2, 1.1, 1.0, 0.9, 0.8])
    assert timestep_weights("linear-increase", 5, 0.8, 1.2) == pytest.approx([0.8, 0.9, 1.0, 1.1, 1.2])


def test_ours_exp_and_cosine():
    e = timestep_weights("exp-decrease", 11, 0.8, 1.2)
    c = timestep_weights("cosine", 11, 0.8, 1.2)
    assert e[0] == pytest.approx(1.2) and e[-1] == pytest.approx(0.8)
    assert c[0] == pytest.approx(1.2) and c[-1] == pytest.approx(0.8) and c[5] == pytest.approx(1.0)
    s = 0.5  # midpoint of the exponential: alpha_min + range * (e^{-3/2} - e^{-3}) / (1 - e^{-3})
    assert e[5] == pytest.approx(0.8 + 0.4 * (math.exp(-3 * s) - math.exp(-3)) / (1 - math.exp(-3)))
    assert all(x > y for x, y in zip(e, e[1:])) and all(x > y for x, y in zip(c, c[1:]))


@pytest.mark.parametrize("scheme", FORMULA_SCHEMES)
def test_one_step_is_defined(scheme):
    (a,) = timestep_weights(scheme, 1)
    assert 0.8 <= a <= 1.2


def test_bad_scheme_and_steps():
    with pytest.raises(UsageError, match="weighting 'log' is unknown"):
        timestep_weights("log", 10)
    with pytest.raises(UsageError, match="steps 0"):
        timestep_weights("uniform", 0)
