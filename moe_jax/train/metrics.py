"""Run metrics: one JSON record per line in `metrics.jsonl`, TensorBoard event files, and PNG plots at the end.

Records are flat dicts. Train records have "kind": "train" (loss, accuracy, perplexity, learning rates, grad norm,
MoE losses, dropped fraction, expert load per layer, tokens/s, TFLOP/s, MFU, step time); evaluation records have
"kind": "eval" (val_loss, val_accuracy, val_perplexity). Every record has step, tokens (seen so far) and
wall_time (seconds since the run began, resumed runs continue the clock).
"""

from __future__ import annotations

import json
import math
import os
from typing import Iterable

import numpy as np

METRICS_FILE = "metrics.jsonl"
PLOTS_DIR = "plots"


def _scalar(v):
    if isinstance(v, (np.ndarray, np.generic)):
        return v.item() if v.ndim == 0 else v.tolist()
    return v


class MetricsWriter:
    """Appends records to metrics.jsonl and TensorBoard (scalars; lists as one scalar per index). Process 0 only."""

    def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, METRICS_FILE)
        self._tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            if tensorboard:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {k: _scalar(v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self._tb is not None:
            step = int(record["step"])
            prefix = record.get("kind", "train")
            for k, v in record.items():
                if k in ("step", "kind"):
                    continue
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)
                elif isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
                    for i, x in enumerate(v):
                        self._tb.add_scalar(f"{prefix}/{k}/{i}", x, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def read(workdir_or_file: str) -> list[dict]:
    path = workdir_or_file
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out


def truncate_after(workdir: str, step: int) -> None:
    """On resume from `step`, drop records written after it (they belong to the interrupted run's lost steps)."""
    path = os.path.join(workdir, METRICS_FILE)
    records = read(path)
    if not records:
        return
    kept = [r for r in records if r["step"] <= step]
    with open(path + ".tmp", "w") as f:
        for r in kept:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    os.replace(path + ".tmp", path)


def write_json(workdir: str, name: str, obj) -> str:
    """Write `obj` as JSON to workdir/name atomically (temp file + rename)."""
    path = os.path.join(workdir, name)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=float)
    os.replace(path + ".tmp", path)
    return path


def _series(records: Iterable[dict], kind: str, key: str, x: str):
    pts = [(r[x], r[key]) for r in records if r.get("kind") == kind and key in r and x in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def moe_layer_names(workdir: str, n: int) -> list[str]:
    """Names of the run's `n` MoE layers by their transformer layer index ('layer 1', 'layer 3', ...), as the routing
    tool names them; 'MoE layer j' when the run's config cannot be read or does not match."""
    from moe_jax.train import checkpoint as ckpt_lib

    try:
        model = ckpt_lib.load_run(workdir, warn=lambda _: None).model
        ids = [i for i in range(model.n_layers) if model.is_moe_layer(i)]
    except Exception:  # plotting never fails a run: fall back to MoE-relative names
        ids = []
    return [f"layer {i}" for i in ids] if len(ids) == n else [f"MoE layer {j}" for j in range(n)]


def _token_axis(ax) -> None:
    """Engineering notation (1.2M) and at most 5 ticks on the x axis, so token counts never run together."""
    from matplotlib import ticker

    ax.xaxis.set_major_formatter(ticker.EngFormatter(sep=""))
    ax.xaxis.set_major_locator(ticker.MaxNLocator(nbins=5))


def _step_axis(ax) -> None:
    from matplotlib import ticker

    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))


def loss_figure(plt, records):
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, x, label in zip(axes, ("step", "tokens", "wall_time"), ("optimizer step", "tokens", "wall time (s)")):
        ax.plot(*_series(records, "train", "loss", x), label="train", alpha=0.8)
        xs, ys = _series(records, "eval", "val_loss", x)
        if xs:
            ax.plot(xs, ys, "o-", label="validation")
        ax.set_xlabel(label)
        ax.set_ylabel("cross-entropy (nats)")
        ax.grid(alpha=0.3)
        ax.legend()
        if x == "tokens":
            _token_axis(ax)
        elif x == "step":
            _step_axis(ax)
    fig.suptitle("loss")
    return fig


def throughput_figure(plt, records):
    """Two panels, each labelled with its legend: tokens/s and MFU against wall time."""
    from matplotlib import ticker

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    xs, ys = _series(records, "train", "tokens_per_s", "wall_time")
    axes[0].plot(xs, ys, color="tab:blue", label="tokens / s (train)")
    axes[0].set_ylabel("tokens / s")
    axes[0].yaxis.set_major_formatter(ticker.EngFormatter(sep=""))
    xs, ys = _series(records, "train", "mfu", "wall_time")
    axes[1].plot(xs, [100 * y for y in ys], color="tab:orange", label="MFU (model FLOPs / peak)")
    axes[1].set_ylabel("MFU (%)")
    for ax, title in zip(axes, ("tokens per second", "model FLOPs utilisation")):
        ax.set_xlabel("wall time (s)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("throughput")
    return fig


def expert_load_figure(plt, load, names):
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5))
    steps = [r["step"] for r in load]
    cv = np.asarray([r["moe/load_cv"] for r in load])  # [records, layers]
    for j in range(cv.shape[1]):
        axes[0].plot(steps, cv[:, j], label=names[j])
    axes[0].set_xlabel("optimizer step")
    _step_axis(axes[0])
    axes[0].set_ylabel("expert load CV (carried)")
    axes[0].legend(fontsize=7)
    axes[0].grid(alpha=0.3)
    last = np.asarray(load[-1]["moe/tokens_per_expert"], dtype=float)  # [layers, experts]
    frac = last / last.sum(axis=1, keepdims=True)
    im = axes[1].imshow(frac, aspect="auto", cmap="viridis")
    axes[1].set_xticks(range(frac.shape[1]))
    axes[1].set_yticks(range(frac.shape[0]), names)
    axes[1].set_xlabel("expert")
    axes[1].set_ylabel("transformer layer (MoE)")
    axes[1].set_title(f"fraction of carried assignments per expert (step {steps[-1]})")
    fig.colorbar(im, ax=axes[1])
    return fig


def plot(workdir: str) -> list[str]:
    """Write loss (vs steps, tokens, wall time), throughput and expert-load plots; returns the files written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read(workdir)
    if not records:
        return []
    out_dir = os.path.join(workdir, PLOTS_DIR)
    os.makedirs(out_dir, exist_ok=True)
    figures = [("loss.png", loss_figure(plt, records)), ("throughput.png", throughput_figure(plt, records))]
    load = [r for r in records if r.get("kind") == "train" and "moe/tokens_per_expert" in r]
    if load:
        names = moe_layer_names(workdir, len(load[-1]["moe/tokens_per_expert"]))
        figures.append(("expert_load.png", expert_load_figure(plt, load, names)))
    written = []
    for name, fig in figures:
        fig.tight_layout()
        written.append(os.path.join(out_dir, name))
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written
