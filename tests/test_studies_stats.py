"""moe_jax.studies.stats: t quantiles against tables, t intervals, Welch and paired differences against scipy's tests,
the verdict rule (no verdict under 3 runs), and Pearson correlation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from moe_jax.studies import stats


@pytest.mark.parametrize("p, df, want", [
    (0.975, 1, 12.706), (0.975, 2, 4.303), (0.975, 3, 3.182), (0.975, 4, 2.776), (0.975, 10, 2.228),
    (0.975, 30, 2.042), (0.95, 5, 2.015), (0.995, 2, 9.925), (0.025, 2, -4.303),
])
def test_t_quantile_matches_the_printed_table(p, df, want):
    assert stats.t_quantile(p, df) == pytest.approx(want, abs=5e-4)


def test_t_quantile_refuses_bad_arguments():
    with pytest.raises(ValueError, match="p must be in"):
        stats.t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="degrees of freedom"):
        stats.t_quantile(0.9, 0)


def test_summary_interval_is_t_times_standard_error():
    s = stats.summary([1.0, 2.0, 3.0, None])
    assert (s["n"], s["mean"], s["std"], s["min"], s["max"]) == (3, 2.0, 1.0, 1.0, 3.0)
    assert s["ci_half"] == pytest.approx(4.3027 / math.sqrt(3), rel=1e-4)
    assert stats.summary([5.0])["ci_half"] is None and stats.summary([])["n"] == 0


def test_welch_difference_equals_scipy_unequal_variance_t_test():
    rng = np.random.default_rng(0)
    x, y = rng.normal(3.0, 0.1, 4), rng.normal(3.1, 0.3, 6)
    d = stats.difference({f"a{i}": v for i, v in enumerate(x)}, {f"b{i}": v for i, v in enumerate(y)})
    ref = sps.ttest_ind(x, y, equal_var=False)
    assert not d["paired"]
    assert d["diff"] / d["se"] == pytest.approx(ref.statistic, rel=1e-10)
    assert d["df"] == pytest.approx(ref.df, rel=1e-10)
    lo, hi = ref.confidence_interval(0.95)
    assert (d["lo"], d["hi"]) == (pytest.approx(lo, rel=1e-9), pytest.approx(hi, rel=1e-9))
    # hand value of the Welch-Satterthwaite formula: sx=1, nx=3, sy=2, ny=5
    assert stats.welch_df(1.0, 3, 2.0, 5) == pytest.approx((1 / 3 + 4 / 5) ** 2 / ((1 / 9) / 2 + (16 / 25) / 4))


def test_paired_difference_equals_scipy_paired_t_test_and_is_used_for_shared_replicates():
    rng = np.random.default_rng(1)
    shared = rng.normal(0, 0.2, 5)  # replicate effect (init + data order) common to both arms
    x = 3.0 + shared + rng.normal(0, 0.005, 5)
    y = 3.05 + shared + rng.normal(0, 0.005, 5)
    keys = [f"seed{i}" for i in range(5)]
    d = stats.difference(dict(zip(keys, x)), dict(zip(keys, y)))
    ref = sps.ttest_rel(x, y)
    assert d["paired"] and d["df"] == 4
    assert d["diff"] / d["se"] == pytest.approx(ref.statistic, rel=1e-10)
    assert d["hi"] < 0  # paired: the 0.05 gap is resolved ...
    unpaired = stats.difference(dict(zip(keys, x)), {k + "_other": v for k, v in zip(keys, y)})
    assert not unpaired["paired"] and unpaired["lo"] < 0 < unpaired["hi"]  # ... unpaired it is lost in the spread


def test_verdict_rule():
    x = {f"seed{i}": v for i, v in enumerate([3.00, 3.01, 3.02])}
    y = {f"seed{i}": v for i, v in enumerate([2.90, 2.92, 2.91])}
    v = stats.verdict("dense", x, "moe", y)
    assert v["decision"] == "moe" and "**moe is better**" in v["text"] and "paired t over 3 replicates" in v["text"]
    assert stats.verdict("moe", y, "dense", x)["decision"] == "moe"
    noisy = {f"seed{i}": v for i, v in enumerate([2.8, 3.1, 3.05])}
    assert stats.verdict("dense", x, "moe", noisy)["decision"] == "none"
    two = stats.verdict("dense", {"s0": 3.0, "s1": 3.0}, "moe", {"s0": 1.0, "s1": 1.1})
    assert two["decision"] == "no verdict" and "fewer than 3 runs" in two["text"] and two["lo"] is not None
    assert stats.verdict("dense", {}, "moe", y)["decision"] == "no verdict"


def test_pearson():
    assert stats.pearson([1, 2, 3, 4], [2, 4, 6, 8.5]) == pytest.approx(np.corrcoef([1, 2, 3, 4],
                                                                                   [2, 4, 6, 8.5])[0, 1])
    assert stats.pearson([1, 1, 1], [1, 2, 3]) is None and stats.pearson([1, 2], [1, 2]) is None
