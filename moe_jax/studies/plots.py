"""A study's figures (report.py writes the tables and links these): per budget, validation loss against model
FLOPs, executed FLOPs and wall seconds (one line per replicate), throughput per arm, validation curves per learning
rate when there is a grid; and with study.correlation a Pearson correlation matrix over the arms. PNGs in
<workdir>/plots/ (prefixed by the budget when a study has several)."""

from __future__ import annotations

import os
import statistics

import numpy as np

from moe_jax.studies import stats

CORRELATION_FEATURES = (("model.d_model", "d_model"), ("model.n_layers", "layers"), ("moe.num_experts", "experts"),
                        ("moe.top_k", "top_k"), ("model.dropout", "dropout"), ("optim.muon_lr", "muon lr"),
                        ("train.batch_size", "batch"), ("train.seq_len", "seq_len"))


def correlation(tables: dict, planned: dict, key: str) -> tuple[list[str], np.ndarray]:
    """Pearson correlations over the arms of the first budget between their settings (those that vary), size,
    steps and outcomes (mean loss, mean wall seconds, tokens/s). NaN where a column is constant."""
    arms = tables[planned["kinds"][0]]
    cols: dict[str, list] = {}
    for path, label in CORRELATION_FEATURES:
        section, k = path.split(".")
        vals = [float(a["runs"][0]["lr"]) if path == planned["lr_field"] and a["runs"][0]["lr"] is not None
                else float(planned["arms"][n][section][k]) for n, a in arms.items()]
        if len(set(vals)) > 1:
            cols[label] = vals
    cols["parameters"] = [a["params_total"]["mean"] for a in arms.values()]
    cols["steps"] = [a["steps"]["mean"] for a in arms.values()]
    cols[key.replace("_", " ")] = [a[key]["mean"] for a in arms.values()]
    cols["wall seconds"] = [a["wall_time"]["mean"] for a in arms.values()]
    names = list(cols)
    m = np.full((len(names), len(names)), np.nan)
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            r = stats.pearson(cols[a], cols[b])
            m[i, j] = np.nan if r is None else r
    return names, m


def _save(plt, fig, path: str, written: list[str]) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    written.append(path)


def _curve_plots(plt, out: str, prefix: str, kind: str, recs: list[dict], arms: list[str], colors: dict,
                 written: list[str]) -> None:
    """Validation loss against model FLOPs, executed FLOPs and wall seconds, one line per replicate."""
    for x, label, fname in (("model_flops", "model FLOPs", "val_loss_vs_flops.png"),
                            ("executed_flops", "executed FLOPs", "val_loss_vs_executed_flops.png"),
                            ("wall_time", "wall seconds", "val_loss_vs_wall_time.png")):
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        for a in arms:
            for i, r in enumerate(q for q in recs if q["arm"] == a):
                ax.plot([p[x] for p in r["curve"]], [p["val_loss"] for p in r["curve"]], marker="o",
                        ms=3, color=colors[a], alpha=0.7, label=a if i == 0 else None)
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss")
        ax.set_title(f"validation loss vs {label} ({kind} budget; one line per replicate)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        _save(plt, fig, os.path.join(out, prefix + fname), written)


def _throughput_plot(plt, out: str, prefix: str, recs: list[dict], arms: list[str], colors: dict,
                     written: list[str]) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, a in enumerate(arms):
        vals = [r["tokens_per_s"] for r in recs if r["arm"] == a and r["tokens_per_s"]]
        if vals:
            ax.bar(i, statistics.fmean(vals), color=colors[a], alpha=0.6,
                   yerr=statistics.stdev(vals) if len(vals) > 1 else 0, capsize=4)
            ax.scatter([i] * len(vals), vals, color="k", s=12, zorder=3)
    ax.set_xticks(range(len(arms)), arms, rotation=30, fontsize=8)
    ax.set_ylabel("training tokens / s")
    ax.set_title("throughput per arm (bar: mean ± std; dots: runs)")
    _save(plt, fig, os.path.join(out, prefix + "throughput.png"), written)


def _per_lr_plot(plt, out: str, prefix: str, kind: str, records: list[dict], lrs: list[float], lr_field: str,
                 arms: list[str], colors: dict, written: list[str]) -> None:
    """Seed 000's comparison figure: at each learning rate, every arm's validation curve (all runs of the grid)."""
    fig, axes = plt.subplots(1, len(lrs), figsize=(4.5 * len(lrs), 4), sharey=True, squeeze=False)
    handles = {}  # one legend entry per arm, from whichever panel first shows it (an arm may run one rate only)
    for ax, lr in zip(axes[0], lrs):
        for a in arms:
            for r in (q for q in records if q["kind"] == kind and q["arm"] == a and q["lr"] == lr):
                (line,) = ax.plot([p["tokens"] for p in r["curve"]], [p["val_loss"] for p in r["curve"]],
                                  color=colors[a], alpha=0.7)
                handles.setdefault(a, line)
        ax.set_title(f"{lr_field} = {lr:g}")
        ax.set_xlabel("training tokens")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation loss")
    axes[0][0].legend([handles[a] for a in arms if a in handles], [a for a in arms if a in handles], fontsize=7)
    _save(plt, fig, os.path.join(out, prefix + "val_loss_per_lr.png"), written)


def _correlation_plot(plt, out: str, tables: dict, planned: dict, key: str, written: list[str]) -> None:
    names, m = correlation(tables, planned, key)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(names), 0.8 + 0.55 * len(names)))
    im = ax.imshow(np.nan_to_num(m), cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, "" if np.isnan(m[i, j]) else f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6)
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_title(f"Pearson correlation over arms ({planned['kinds'][0]} budget)")
    _save(plt, fig, os.path.join(out, "correlation.png"), written)


def plot(workdir: str, planned: dict, records: list[dict], tables: dict, key: str, study) -> list[str]:
    """Every figure of the study into <workdir>/plots/. Returns the paths written, in report order."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = os.path.join(workdir, "plots")
    os.makedirs(out, exist_ok=True)
    written: list[str] = []
    multi = len(planned["kinds"]) > 1
    for kind in planned["kinds"]:
        prefix = f"{kind}_" if multi else ""
        recs = [r for r in records if r["kind"] == kind and r["selected"]]
        arms = list(dict.fromkeys(r["arm"] for r in recs))
        colors = {a: plt.cm.tab10(i % 10) for i, a in enumerate(arms)}
        _curve_plots(plt, out, prefix, kind, recs, arms, colors, written)
        _throughput_plot(plt, out, prefix, recs, arms, colors, written)
        lrs = sorted({r["lr"] for r in records if r["kind"] == kind and r["lr"] is not None})
        if lrs:
            _per_lr_plot(plt, out, prefix, kind, records, lrs, planned["lr_field"], arms, colors, written)
    if study.get("correlation", False):
        _correlation_plot(plt, out, tables, planned, key, written)
    return written
