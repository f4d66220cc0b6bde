"""Summaries of per-seed results: the 95% t-interval and selection modes."""

import math

import pytest

from cggm.runner import summarize, t_crit


@pytest.mark.parametrize("n,ref", [(2, 12.706), (5, 2.776), (11, 2.228), (16, 2.131), (21, 2.086), (31, 2.042),
                                   (61, 2.000), (121, 1.980)])
def test_t_critical_values(n, ref):
    assert t_crit(n) == pytest.approx(ref, abs=1.5e-3)


def test_summarize():
    s = summarize([0.5, 0.7, 0.6, float("nan")])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.6)
    assert s["std"] == pytest.approx(0.1)
    assert s["ci95"] == pytest.approx(4.303 * 0.1 / math.sqrt(3), rel=1e-3)  # t table: 4.303 (3 digits)
    assert math.isnan(summarize([])["mean"])
