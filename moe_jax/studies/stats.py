"""Statistics of a study: per-arm summaries, Student-t intervals, paired and Welch differences, and the verdict rule.

Replicates. Run r of an arm is keyed by its replicate (init seed, data order). When two arms have the same replicate
keys, run r of one and run r of the other share the initialisation seed and the training-document order, so their
difference is *paired*: d_r = x_r - y_r, mean d, s_d = sample std of d, se = s_d / sqrt(n), t on n - 1 degrees of
freedom. Otherwise (different replicates, or only some shared) the difference is *unpaired* (Welch):
se = sqrt(s_x^2 / n_x + s_y^2 / n_y), degrees of freedom
    nu = se^4 / ((s_x^2 / n_x)^2 / (n_x - 1) + (s_y^2 / n_y)^2 / (n_y - 1)).
The interval is diff +- t_{1 - alpha/2, nu} x se (two-sided, level 1 - alpha, default 95%).

Verdict rule (`verdict`): with fewer than MIN_RUNS (3) runs in either arm there is **no verdict** (the spread of
two values is too poorly known for any interval to mean much); otherwise an arm is better when the interval of the
difference excludes 0, and "no resolved difference" when it contains 0. Lower is better (losses).

Quantiles come from scipy.stats.t (scipy is installed with jax); tests check t_{0.975, 2} = 4.303 and friends.
"""

from __future__ import annotations

import math
import statistics

from scipy import stats as _scipy_stats

MIN_RUNS = 3
LEVEL = 0.95


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with df (> 0, not necessarily integer) degrees of freedom."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    return float(_scipy_stats.t.ppf(p, df))


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


def difference(x: dict, y: dict, level: float = LEVEL) -> dict:
    """x - y for two arms given as {replicate key: value}. Paired when the keys are identical, Welch otherwise.

    Returns {paired, n_x, n_y, diff, se, df, t_crit, lo, hi}; se/df/lo/hi are None when either arm has fewer
    than 2 values."""
    x = {k: float(v) for k, v in x.items() if v is not None}
    y = {k: float(v) for k, v in y.items() if v is not None}
    nx, ny = len(x), len(y)
    out = {"paired": False, "n_x": nx, "n_y": ny, "diff": None, "se": None, "df": None, "t_crit": None,
           "lo": None, "hi": None, "level": level}
    if not nx or not ny:
        return out
    out["diff"] = statistics.fmean(x.values()) - statistics.fmean(y.values())
    if min(nx, ny) < 2:
        return out
    if set(x) == set(y):
        d = [x[k] - y[k] for k in sorted(x, key=str)]
        se, df = statistics.stdev(d) / math.sqrt(nx), float(nx - 1)
        out["paired"] = True
    else:
        sx, sy = statistics.stdev(x.values()), statistics.stdev(y.values())
        se, df = math.sqrt(sx * sx / nx + sy * sy / ny), welch_df(sx, nx, sy, ny)
    t = t_quantile(0.5 + level / 2, df)
    out.update(se=se, df=df, t_crit=t, lo=out["diff"] - t * se, hi=out["diff"] + t * se)
    return out


def verdict(name_x: str, x: dict, name_y: str, y: dict, metric: str = "loss", level: float = LEVEL) -> dict:
    """The difference (x - y) and one sentence: 'no verdict' under MIN_RUNS runs per arm, else which arm is better
    (lower) when the interval excludes 0, else no resolved difference."""
    d = difference(x, y, level)
    d.update(x=name_x, y=name_y, metric=metric)
    nx, ny = d["n_x"], d["n_y"]
    if d["diff"] is None:
        d.update(decision="no verdict", text=f"{name_x} vs {name_y}: no runs to compare: no verdict.")
        return d
    head = f"{name_x} - {name_y} = {d['diff']:+.4f} {metric}"
    if min(nx, ny) < MIN_RUNS:
        d.update(decision="no verdict", text=f"{head} ({nx} and {ny} runs): fewer than {MIN_RUNS} runs in an arm, "
                                             "so the run-to-run spread is not known well enough: **no verdict**.")
        return d
    kind = f"paired t over {nx} replicates" if d["paired"] else f"Welch t over {nx} and {ny} runs"
    ci = f"{100 * level:.0f}% interval [{d['lo']:+.4f}, {d['hi']:+.4f}] ({kind}, df {d['df']:.1f})"
    if d["hi"] < 0:
        d.update(decision=name_x, text=f"{head}, {ci} excludes 0: **{name_x} is better** (lower {metric}).")
    elif d["lo"] > 0:
        d.update(decision=name_y, text=f"{head}, {ci} excludes 0: **{name_y} is better** (lower {metric}).")
    else:
        d.update(decision="none", text=f"{head}, {ci} contains 0: **no resolved difference**.")
    return d


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
