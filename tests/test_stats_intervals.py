import numpy as np
import pytest

from sme import stats


def test_t_halfwidth_matches_the_table():
    # t_{0.975, 4} = 2.7764451 and t_{0.95, 9} = 1.8331129 (standard tables)
    assert stats.t_halfwidth(1.0, 5) == pytest.approx(2.7764451 / np.sqrt(5), rel=1e-7)
    assert stats.t_halfwidth(2.0, 10, level=0.9) == pytest.approx(2 * 1.8331129 / np.sqrt(10), rel=1e-7)
    with pytest.raises(ValueError, match="n >= 2"):
        stats.t_halfwidth(1.0, 1)
