"""Statistics of a study: per-arm summaries, intervals that combine replicate and test-sampling variance, paired and
Welch differences, Holm's adjustment over a study's comparisons, and the verdict rule.

Replicates. Run r of an arm is keyed by its replicate (init seed, data order). When two arms have the same replicate
keys, run r of one and run r of the other share the initialisation seed and the training-document order, so their
difference is *paired*: d_r = x_r - y_r, v_rep = s_d^2 / n, df_rep = n - 1. Otherwise (different replicates, or
only some shared) the difference is *unpaired* (Welch): v_rep = s_x^2 / n_x + s_y^2 / n_y, df_rep
    nu = v_rep^2 / ((s_x^2 / n_x)^2 / (n_x - 1) + (s_y^2 / n_y)^2 / (n_y - 1)).

Test documents. Every arm is scored on the same test documents, so the replicate spread alone treats them as fixed;
a second test sample of documents would move every arm's loss. When per-document losses are given ({'tokens',
'loss_sum', 'doc_ids'} per run, the same documents in the same order for every run), the documents are resampled
with replacement (`resample_counts`: BOOTSTRAP_SAMPLES resamples, seeded, the same resamples for every arm and run,
so arm differences stay paired over documents) and each resample's token-weighted loss recomputed for every run;
v_doc = the variance over resamples of (mean over x's runs - mean over y's runs). The two sources are independent
(seeds vs the document sample), so

    se^2 = v_rep + v_doc,   df = se^4 / (v_rep^2 / df_rep + v_doc^2 / (D - 1))   (Satterthwaite; v_doc is a variance
    estimated from D documents, so D - 1 degrees of freedom however many resamples measure it),

and the interval is diff +- t_{1 - alpha/2, df} x se (two-sided, level 1 - alpha, default 95%), p the two-sided t
p-value. Without per-document losses v_doc = 0 and this is the plain t interval. docs/decisions.md ("Studies:
intervals") gives the reasons for this choice over a hierarchical bootstrap, and tests/test_studies_stats.py checks
its coverage on synthetic data of known variance.

Verdict rule (`verdict`, `adjust`): with fewer than MIN_RUNS (3) runs in either arm there is **no verdict**;
otherwise the p-values of all comparisons of a study (its family: every budget, every pair or planned comparison)
are Holm-adjusted (`holm`), and an arm is better when its adjusted p < ALPHA; else "no resolved difference". The
intervals shown are the unadjusted 95% ones. Lower is better (losses).

Quantiles come from scipy.stats.t (scipy is installed with jax); tests check t_{0.975, 2} = 4.303 and friends.
"""

from __future__ import annotations

import math
import statistics

import numpy as np
from scipy import stats as _scipy_stats

MIN_RUNS = 3
LEVEL = 0.95
ALPHA = 1 - LEVEL
BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with df (> 0, not necessarily integer, inf: normal) degrees of freedom."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    return float(_scipy_stats.t.ppf(p, df))


def two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom."""
    return float(2 * _scipy_stats.t.sf(abs(t), df))


def holm(pvalues) -> list:
    """Holm's step-down adjusted p-values, in the given order: sort the m p-values ascending, p_(i) -> max over
    j <= i of min(1, (m - j + 1) p_(j)). Rejecting where the adjusted p < alpha controls the family-wise error rate
    at alpha. Nones (comparisons not made) are not in the family and stay None."""
    idx = [i for i, p in enumerate(pvalues) if p is not None]
    m = len(idx)
    out = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - rank) * float(pvalues[i])))
        out[i] = running
    return out


def summary(values) -> dict:
    """n, mean, sample std (n - 1; 0 for one value), min, max and the t interval of the mean (half width; None
    below 2 values). Nones are dropped."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(vals)
    if not n:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None, "ci_half": None}
    mean = statistics.fmean(vals)
    std = statistics.stdev(vals) if n > 1 else 0.0
    half = t_quantile(0.5 + LEVEL / 2, n - 1) * std / math.sqrt(n) if n > 1 else None
    return {"n": n, "mean": mean, "std": std, "min": min(vals), "max": max(vals), "ci_half": half}


def welch_df(sx: float, nx: int, sy: float, ny: int) -> float:
    """Welch-Satterthwaite degrees of freedom; nx + ny - 2 when both spreads are 0 (the formula is 0/0)."""
    vx, vy = sx * sx / nx, sy * sy / ny
    den = (vx * vx / (nx - 1) if nx > 1 else 0.0) + (vy * vy / (ny - 1) if ny > 1 else 0.0)
    if den == 0:
        return float(nx + ny - 2)
    return (vx + vy) ** 2 / den


# ---------------------------------------------------------------------------------------------------------------
# The bootstrap over test documents


def resample_counts(n_docs: int, samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """[samples, n_docs] int: how often each document is drawn in each resample of n_docs documents with
    replacement. Seeded (numpy's PCG64): the same arguments give the same resamples on every machine."""
    if n_docs < 2:
        raise ValueError(f"a bootstrap over documents needs at least 2 documents, got {n_docs}")
    draws = np.random.default_rng(seed).integers(0, n_docs, size=(samples, n_docs))
    return np.stack([np.bincount(row, minlength=n_docs) for row in draws])


def documents(per_run: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """{run key: {'tokens', 'loss_sum', 'doc_ids'}} -> (doc_ids [D], tokens [runs, D], loss_sum [runs, D]) in
    sorted key order, or None when a run has none. ValueError when the runs were not scored on the same documents in
    the same order with the same token counts (their losses would not be comparable document by document)."""
    if not per_run or any(v is None for v in per_run.values()):
        return None
    keys = sorted(per_run, key=str)
    ids = [np.asarray(per_run[k]["doc_ids"]) for k in keys]
    toks = np.stack([np.asarray(per_run[k]["tokens"], dtype=np.float64) for k in keys])
    if any(i.shape != ids[0].shape or not np.array_equal(i, ids[0]) for i in ids) or \
            not np.all(toks == toks[0]):
        raise ValueError("runs were scored on different documents or token counts; a paired bootstrap over "
                         "documents needs the same documents, in the same order, for every run")
    return ids[0], toks, np.stack([np.asarray(per_run[k]["loss_sum"], dtype=np.float64) for k in keys])


def resampled_means(docs: tuple[np.ndarray, np.ndarray], counts: np.ndarray) -> np.ndarray:
    """[samples]: per resample, the mean over runs of each run's token-weighted loss on the resampled documents."""
    _, toks, loss = docs
    if toks.shape[1] != counts.shape[1]:
        raise ValueError(f"{toks.shape[1]} documents per run but resamples of {counts.shape[1]}")
    return ((counts @ loss.T) / (counts @ toks.T)).mean(axis=1)


def document_variance(x_docs, y_docs, counts: np.ndarray) -> float:
    """Variance over document resamples of mean(x runs) - mean(y runs) (y None: of mean(x runs))."""
    d = resampled_means(x_docs, counts)
    if y_docs is not None:
        if not (np.array_equal(x_docs[0], y_docs[0]) and np.array_equal(x_docs[1][0], y_docs[1][0])):
            raise ValueError("the two arms were scored on different documents")
        d = d - resampled_means(y_docs, counts)
    return float(np.var(d, ddof=1))


# ---------------------------------------------------------------------------------------------------------------
# Intervals, differences and verdicts


def _interval(out: dict, v_rep: float, df_rep: float, v_doc: float | None, level: float,
              df_doc: float = math.inf) -> dict:
    """Fill se (sqrt(v_rep + v_doc)), df (Satterthwaite over both terms), t_crit, lo, hi and p into `out` (its
    'diff' set)."""
    v_doc = v_doc or 0.0
    var = v_rep + v_doc
    den = v_rep * v_rep / df_rep + v_doc * v_doc / df_doc
    df = math.inf if den == 0 else var * var / den
    se = math.sqrt(var)
    t = t_quantile(0.5 + level / 2, df)
    p = (1.0 if out["diff"] == 0 else 0.0) if se == 0 else two_sided_p(out["diff"] / se, df)
    out.update(se=se, se_rep=math.sqrt(v_rep), se_doc=math.sqrt(v_doc), df=df, t_crit=t,
               lo=out["diff"] - t * se, hi=out["diff"] + t * se, p=p)
    return out


def difference(x: dict, y: dict, level: float = LEVEL, x_docs: dict | None = None, y_docs: dict | None = None,
               counts: np.ndarray | None = None) -> dict:
    """x - y for two arms given as {replicate key: value}. Paired when the keys are identical, Welch otherwise;
    with per-document losses of every run of both arms (x_docs, y_docs: {replicate key: {'tokens', 'loss_sum',
    'doc_ids'}}) and document resamples (`counts`), the test-sampling variance is added (module docstring).

    Returns {paired, n_x, n_y, diff, se, se_rep, se_doc, df, t_crit, lo, hi, p, documents, level}; se.. p are None
    when either arm has fewer than 2 values."""
    x = {k: float(v) for k, v in x.items() if v is not None}
    y = {k: float(v) for k, v in y.items() if v is not None}
    nx, ny = len(x), len(y)
    out = {"paired": False, "n_x": nx, "n_y": ny, "diff": None, "se": None, "se_rep": None, "se_doc": None,
           "df": None, "t_crit": None, "lo": None, "hi": None, "p": None, "documents": False, "level": level}
    if not nx or not ny:
        return out
    out["diff"] = statistics.fmean(x.values()) - statistics.fmean(y.values())
    if min(nx, ny) < 2:
        return out
    if set(x) == set(y):
        d = [x[k] - y[k] for k in sorted(x, key=str)]
        v_rep, df_rep = statistics.variance(d) / nx, float(nx - 1)
        out["paired"] = True
    else:
        sx, sy = statistics.stdev(x.values()), statistics.stdev(y.values())
        v_rep, df_rep = sx * sx / nx + sy * sy / ny, welch_df(sx, nx, sy, ny)
    v_doc = None
    if counts is not None and x_docs is not None and y_docs is not None:
        xd = documents({k: x_docs.get(k) for k in x})
        yd = documents({k: y_docs.get(k) for k in y})
        if xd is not None and yd is not None:
            v_doc = document_variance(xd, yd, counts)
            out["documents"] = True
    return _interval(out, v_rep, df_rep, v_doc, level, df_doc=_document_df(counts))


def mean_interval(x: dict, level: float = LEVEL, x_docs: dict | None = None,
                  counts: np.ndarray | None = None) -> dict:
    """The interval of one arm's mean (same fields as `difference`, diff = the mean): replicate variance s^2 / n
    plus, with per-document losses and resamples, the variance of the mean over document resamples."""
    x = {k: float(v) for k, v in x.items() if v is not None}
    n = len(x)
    out = {"paired": False, "n_x": n, "n_y": 0, "diff": statistics.fmean(x.values()) if n else None, "se": None,
           "se_rep": None, "se_doc": None, "df": None, "t_crit": None, "lo": None, "hi": None, "p": None,
           "documents": False, "level": level}
    if n < 2:
        return out
    v_doc = None
    if counts is not None and x_docs is not None:
        xd = documents({k: x_docs.get(k) for k in x})
        if xd is not None:
            v_doc = document_variance(xd, None, counts)
            out["documents"] = True
    return _interval(out, statistics.variance(x.values()) / n, float(n - 1), v_doc, level, df_doc=_document_df(counts))


def _document_df(counts: np.ndarray | None) -> float:
    """Degrees of freedom of the document variance: D - 1 for resamples of D documents."""
    return math.inf if counts is None else float(counts.shape[1] - 1)


def _decide(d: dict, p_adj: float, family: int, alpha: float = ALPHA) -> dict:
    """Set decision and text of a verdict from its (adjusted) p-value."""
    x, y, metric = d["x"], d["y"], d["metric"]
    head = f"{x} - {y} = {d['diff']:+.4f} {metric}"
    kind = f"paired t over {d['n_x']} replicates" if d["paired"] else f"Welch t over {d['n_x']} and {d['n_y']} runs"
    if d["documents"]:
        kind += " + document bootstrap"
    ci = (f"{100 * d['level']:.0f}% interval [{d['lo']:+.4f}, {d['hi']:+.4f}] ({kind}, df {d['df']:.1f}), "
          f"p = {d['p']:.2g}")
    adj = f", Holm-adjusted p = {p_adj:.2g} ({family} comparisons)" if family > 1 else ""
    d.update(p_holm=p_adj, family=family)
    if p_adj < alpha and d["diff"] != 0:
        better = x if d["diff"] < 0 else y
        d.update(decision=better, text=f"{head}, {ci}{adj}: **{better} is better** (lower {metric}).")
    else:
        d.update(decision="none", text=f"{head}, {ci}{adj}: **no resolved difference**.")
    return d


def verdict(name_x: str, x: dict, name_y: str, y: dict, metric: str = "loss", level: float = LEVEL,
            withheld: str | None = None, **docs) -> dict:
    """The difference (x - y; `docs`: x_docs, y_docs, counts as in `difference`) and one sentence: 'no verdict'
    under MIN_RUNS runs per arm, 'withheld' with a reason (e.g. a learning rate at its grid's edge), else which arm
    is better (p < 1 - level; `adjust` redoes this with Holm-adjusted p-values over a family) or no resolved
    difference."""
    d = difference(x, y, level, **docs)
    d.update(x=name_x, y=name_y, metric=metric, p_holm=None, family=None)
    nx, ny = d["n_x"], d["n_y"]
    if d["diff"] is None:
        d.update(decision="no verdict", text=f"{name_x} vs {name_y}: no runs to compare: no verdict.")
        return d
    head = f"{name_x} - {name_y} = {d['diff']:+.4f} {metric}"
    if min(nx, ny) < MIN_RUNS:
        d.update(decision="no verdict", text=f"{head} ({nx} and {ny} runs): fewer than {MIN_RUNS} runs in an arm, "
                                             "so the run-to-run spread is not known well enough: **no verdict**.")
        return d
    if withheld:
        d.update(decision="withheld", text=f"{head}: **verdict withheld** ({withheld}).")
        return d
    return _decide(d, d["p"], 1, 1 - level)


def adjust(verdicts: list[dict]) -> list[dict]:
    """Holm-adjust the p-values of `verdicts` (one study's family: every verdict that was drawn; 'no verdict' and
    'withheld' ones are not in it) and redo their decisions and texts at the same level. In place; returns it."""
    drawn = [v for v in verdicts if v.get("decision") not in ("no verdict", "withheld", None)]
    for v, p in zip(drawn, holm([v["p"] for v in drawn])):
        _decide(v, p, len(drawn), 1 - v["level"])
    return verdicts


def pearson(xs, ys) -> float | None:
    """Pearson correlation of two equal-length sequences; None when either is constant or has < 3 values."""
    pts = [(float(a), float(b)) for a, b in zip(xs, ys) if a is not None and b is not None]
    if len(pts) < 3:
        return None
    mx = statistics.fmean(p[0] for p in pts)
    my = statistics.fmean(p[1] for p in pts)
    sxy = sum((a - mx) * (b - my) for a, b in pts)
    sxx = sum((a - mx) ** 2 for a, _ in pts)
    syy = sum((b - my) ** 2 for _, b in pts)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)
