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


# ---------------------------------------------------------------------------------------------------------------
# Holm's adjustment, the bootstrap over documents, and intervals that combine both sources of variance


def test_holm_matches_a_hand_computed_example():
    # m = 4; sorted 0.005, 0.01, 0.03, 0.04 -> 4 x 0.005 = 0.02, 3 x 0.01 = 0.03, 2 x 0.03 = 0.06,
    # max(0.06, 1 x 0.04) = 0.06; back in the given order:
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # at alpha 0.05 Holm rejects the first two in sorted order and stops at 0.03 (2 x 0.03 > 0.05); Bonferroni
    # (4 x p) would reject only 0.005 and 0.01 as well, but unadjusted all four are < 0.05
    assert stats.holm([0.2, None, 0.6]) == [0.4, None, 0.6]  # None is outside the family (m = 2)
    assert stats.holm([0.03]) == [0.03] and stats.holm([0.5, 0.9, 0.8]) == [1.0, 1.0, 1.0]


def test_adjust_redoes_the_decisions_of_a_family_with_holm():
    keys = [f"seed{i}" for i in range(5)]
    base = dict(zip(keys, [3.00, 3.01, 3.02, 3.00, 3.01]))
    gaps = {"a": 0.05, "b": 0.004, "c": 0.0}  # a clear gap, a marginal one, none
    rng = np.random.default_rng(3)
    vs = [stats.verdict(n, {k: v - g + rng.normal(0, 0.003) for k, v in base.items()}, "ref", base)
          for n, g in gaps.items()]
    raw = [v["p"] for v in vs]
    stats.adjust(vs)
    assert [v["p_holm"] for v in vs] == pytest.approx(stats.holm(raw)) and all(v["family"] == 3 for v in vs)
    assert vs[0]["decision"] == "a" and "Holm-adjusted p" in vs[0]["text"] and "(3 comparisons)" in vs[0]["text"]
    for v in vs:
        assert (v["decision"] != "none") == (v["p_holm"] < 0.05)
    withheld = stats.verdict("a", base, "ref", base, withheld="learning rate at its grid's edge")
    few = stats.verdict("a", {"s0": 1.0}, "ref", {"s0": 2.0})
    stats.adjust([withheld, few])
    assert withheld["decision"] == "withheld" and "verdict withheld" in withheld["text"] and withheld["p_holm"] is None
    assert few["decision"] == "no verdict"


def test_resamples_are_seeded_and_draw_every_document_count_once_per_resample():
    a = stats.resample_counts(7, samples=50, seed=1)
    assert a.shape == (50, 7) and np.all(a.sum(axis=1) == 7) and a.dtype.kind == "i"
    np.testing.assert_array_equal(a, stats.resample_counts(7, samples=50, seed=1))
    assert not np.array_equal(a, stats.resample_counts(7, samples=50, seed=2))
    with pytest.raises(ValueError, match="at least 2 documents"):
        stats.resample_counts(1)


def test_document_bootstrap_variance_of_a_mean_is_the_sample_variance_over_d():
    """Equal token counts: the token-weighted loss is the mean of the document losses, whose bootstrap variance is
    the population variance (ddof 0) of the document losses / D (sampling error of 2000 resamples: ~3%)."""
    rng = np.random.default_rng(0)
    per_doc = rng.normal(4.0, 0.5, 40)
    docs = {"s0": {"tokens": np.full(40, 100), "loss_sum": 100 * per_doc, "doc_ids": np.arange(40)}}
    v = stats.document_variance(stats.documents(docs), None, stats.resample_counts(40))
    assert v == pytest.approx(np.var(per_doc) / 40, rel=0.08)


def test_documents_must_be_the_same_for_every_run():
    one = {"tokens": [3, 4], "loss_sum": [1.0, 2.0], "doc_ids": [0, 1]}
    assert stats.documents({"a": one, "b": None}) is None
    with pytest.raises(ValueError, match="different documents"):
        stats.documents({"a": one, "b": dict(one, doc_ids=[0, 2])})
    with pytest.raises(ValueError, match="different documents"):
        stats.documents({"a": one, "b": dict(one, tokens=[3, 5])})


def synthetic_study(rng, n_docs, n_reps, delta, doc_sd, seed_sd):
    """Two arms scored on the same n_docs documents drawn from a population, n_reps paired replicates. Per-token
    loss of arm x on document j in replicate r: a_j + c_r + u_xr + e; arm y: a_j + delta_j + c_r + u_yr + e, with
    document difficulty a_j ~ N(4, 0.5) and shared replicate effect c_r ~ N(0, 0.2) (both cancel in the paired
    difference), document effect delta_j ~ N(delta, doc_sd), arm-specific replicate effects u ~ N(0, seed_sd),
    per-document noise e of sd 1/sqrt(tokens). The population difference x - y is -delta."""
    tokens = rng.integers(200, 1500, n_docs)
    a = rng.normal(4.0, 0.5, n_docs)
    dj = rng.normal(delta, doc_sd, n_docs)
    c = rng.normal(0, 0.2, n_reps)
    out = {}
    for arm, shift in (("x", 0.0), ("y", 1.0)):
        u = rng.normal(0, seed_sd, n_reps)
        runs = {}
        for r in range(n_reps):
            per_token = a + shift * dj + c[r] + u[r] + rng.normal(0, 1, n_docs) / np.sqrt(tokens)
            runs[f"seed{r}"] = {"tokens": tokens, "loss_sum": per_token * tokens, "doc_ids": np.arange(n_docs)}
        out[arm] = runs
    return out


def loss_of(run):
    return float(np.sum(run["loss_sum"]) / np.sum(run["tokens"]))


@pytest.mark.parametrize("doc_sd, seed_sd", [(0.05, 0.002), (0.003, 0.01), (0.02, 0.01)],
                         ids=["documents dominate", "replicates dominate", "both"])
def test_combined_interval_covers_the_population_difference_at_its_level(doc_sd, seed_sd):
    """400 synthetic studies of 5 replicates x 50 test documents: the 95% interval (replicate + document bootstrap
    variance) contains the population difference in 95% of them (binomial sd 1.1%: accept 92-98%); the replicate-
    only interval does not where the document sample dominates."""
    rng = np.random.default_rng(2024)
    counts = stats.resample_counts(50, samples=500, seed=7)
    hit = hit_rep = 0
    trials = 400
    for _ in range(trials):
        s = synthetic_study(rng, 50, 5, 0.03, doc_sd, seed_sd)
        x = {k: loss_of(v) for k, v in s["x"].items()}
        y = {k: loss_of(v) for k, v in s["y"].items()}
        d = stats.difference(x, y, x_docs=s["x"], y_docs=s["y"], counts=counts)
        rep = stats.difference(x, y)
        assert d["documents"] and d["paired"] and d["se"] >= rep["se"]
        hit += d["lo"] <= -0.03 <= d["hi"]
        hit_rep += rep["lo"] <= -0.03 <= rep["hi"]
    assert 0.92 <= hit / trials <= 0.98, hit / trials
    if doc_sd > 10 * seed_sd:
        assert hit_rep / trials < 0.8, hit_rep / trials


def test_paired_document_bootstrap_cancels_what_the_arms_share():
    """Document difficulty (sd 0.5) moves both arms alike: the document part of the difference's se is far below
    that of either arm's mean, and the arm's own interval includes it."""
    s = synthetic_study(np.random.default_rng(5), 50, 5, 0.03, 0.003, 0.01)
    counts = stats.resample_counts(50)
    x = {k: loss_of(v) for k, v in s["x"].items()}
    y = {k: loss_of(v) for k, v in s["y"].items()}
    d = stats.difference(x, y, x_docs=s["x"], y_docs=s["y"], counts=counts)
    m = stats.mean_interval(x, x_docs=s["x"], counts=counts)
    assert m["documents"] and m["diff"] == pytest.approx(np.mean(list(x.values())))
    assert d["se_doc"] < m["se_doc"] / 10
    assert m["se"] ** 2 == pytest.approx(m["se_doc"] ** 2 + np.var(list(x.values()), ddof=1) / 5)
    assert m["lo"] < m["diff"] < m["hi"] and m["df"] > 4


def test_document_variance_counts_d_minus_1_degrees_of_freedom():
    """The document term is a variance estimated from D documents: Satterthwaite over both terms gives it D - 1
    degrees of freedom, so the interval's df stays at most (n - 1) + (D - 1) however many resamples there are."""
    s = synthetic_study(np.random.default_rng(11), 12, 5, 0.03, 0.05, 0.002)
    x = {k: loss_of(v) for k, v in s["x"].items()}
    y = {k: loss_of(v) for k, v in s["y"].items()}
    for samples in (200, 2000):
        d = stats.difference(x, y, x_docs=s["x"], y_docs=s["y"], counts=stats.resample_counts(12, samples=samples))
        v_rep, v_doc = d["se_rep"] ** 2, d["se_doc"] ** 2
        assert d["df"] == pytest.approx((v_rep + v_doc) ** 2 / (v_rep ** 2 / 4 + v_doc ** 2 / 11), rel=1e-12)
        assert d["df"] <= 4 + 11
        assert d["t_crit"] == pytest.approx(stats.t_quantile(0.975, d["df"]), rel=1e-12)
