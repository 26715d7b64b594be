import numpy as np
import pytest

from sme import stats


def test_t_halfwidth_matches_the_table():
    # t_{0.975, 4} = 2.7764451 and t_{0.95, 9} = 1.8331129 (standard tables)
    assert stats.t_halfwidth(1.0, 5) == pytest.approx(2.7764451 / np.sqrt(5), rel=1e-7)
    assert stats.t_halfwidth(2.0, 10, level=0.9) == pytest.approx(2 * 1.8331129 / np.sqrt(10), rel=1e-7)
    with pytest.raises(ValueError, match="n >= 2"):
        stats.t_halfwidth(1.0, 1)


def test_slope_interval_leaves_out_resamples_of_one_point():
    # -0.98994974874371850 is a float whose three-fold mean rounds away from it: x - mean(x) is then
    # not exactly 0 on a resample of that one point, and 0/0 rounding noise used to enter the interval.
    a = -0.9899497487437185
    assert np.array([a, a, a]).mean() != a
    x, y = np.array([0.5, 0.1, a]), np.array([1.0, 0.3, -0.4])
    fit = stats.fit_slope(x, y, num_boot=200, seed=3)
    # reference: the same resamples, least squares by np.polyfit, resamples of one distinct x left out
    idx = np.random.default_rng(3).integers(0, 3, size=(200, 3))
    boots = [np.polyfit(x[i], y[i], 1)[0] for i in idx if len(set(i.tolist())) > 1]
    low, high = np.quantile(boots, [0.025, 0.975])
    # polyfit and the centred formula differ by rounding only (three points of order one): 1e-9
    assert fit.ci_low == pytest.approx(low, rel=1e-9) and fit.ci_high == pytest.approx(high, rel=1e-9)
