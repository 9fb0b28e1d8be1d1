"""Tests for moe_jax/train/metrics.py's plots: their axes read as labelled (matplotlib objects, not pixels)."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from moe_jax.config import schema as config_lib  # noqa: E402
from moe_jax.config.typed import parse  # noqa: E402
from moe_jax.train import checkpoint as ckpt_lib  # noqa: E402
from moe_jax.train import metrics as metrics_lib  # noqa: E402


def _records(n=40, layers=2, experts=4):
    out = []
    for s in range(1, n + 1):
        out.append({"kind": "train", "step": s, "tokens": 30_000 * s, "wall_time": 0.5 * s, "loss": 6.0 - 0.05 * s,
                    "tokens_per_s": 60_000 + 100 * s, "mfu": 0.1 + 0.001 * s,
                    "moe/load_cv": [0.2] * layers, "moe/tokens_per_expert": [[10 + e for e in range(experts)]] * layers})
    out.append({"kind": "eval", "step": n, "tokens": 30_000 * n, "wall_time": 0.5 * n, "val_loss": 4.0})
    return out


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _labels(ticks):
    return [t.get_text() for t in ticks]


def _visible_x_labels(ax):
    lo, hi = ax.get_xlim()
    return [t.get_text() for t in ax.get_xticklabels() if lo <= t.get_position()[0] <= hi and t.get_text()]


def test_token_axis_is_engineering_notation_with_few_ticks():
    fig = metrics_lib.loss_figure(plt, _records())
    fig.canvas.draw()
    ax = fig.axes[1]
    assert ax.get_xlabel() == "tokens"
    labels = _visible_x_labels(ax)
    assert 2 <= len(labels) <= 6, labels
    assert all(x.endswith(("k", "M")) or x == "0" for x in labels), labels  # 300k, 600k, 1.2M: never 1200000
    assert max(len(x) for x in labels) <= 5, labels
    step_labels = _visible_x_labels(fig.axes[0])
    assert all(x.isdigit() for x in step_labels), step_labels  # integer steps


def test_throughput_is_two_labelled_panels_with_legends():
    fig = metrics_lib.throughput_figure(plt, _records())
    tokens, mfu = fig.axes
    assert tokens.get_ylabel() == "tokens / s" and mfu.get_ylabel() == "MFU (%)"
    for ax in (tokens, mfu):
        assert ax.get_xlabel() == "wall time (s)" and ax.get_legend() is not None and ax.get_title()
    assert mfu.lines[0].get_ydata()[-1] == pytest.approx(100 * 0.14)  # percent, on its own axis


def test_expert_load_ticks_are_integers_and_layers_their_transformer_index(tmp_path):
    c = config_lib.base_config()
    c.model.n_layers, c.moe.every = 4, 2  # MoE in transformer layers 1 and 3
    run = parse(c)
    ckpt_lib.write_run_files(str(tmp_path), run, None)
    ids = [1, 3]
    assert [i for i in range(4) if run.model.is_moe_layer(i)] == ids
    names = metrics_lib.moe_layer_names(str(tmp_path), len(ids))
    assert names == [f"layer {i}" for i in ids]
    fig = metrics_lib.expert_load_figure(plt, [r for r in _records(layers=len(ids)) if r["kind"] == "train"], names)
    fig.canvas.draw()
    heat = fig.axes[1]
    assert list(heat.get_xticks()) == [0, 1, 2, 3]  # experts: no -0.5 / 0.25 ticks
    assert list(heat.get_yticks()) == list(range(len(ids))) and _labels(heat.get_yticklabels()) == names
    assert [line.get_label() for line in fig.axes[0].lines] == names


def test_layer_names_fall_back_when_the_config_does_not_match(tmp_path):
    assert metrics_lib.moe_layer_names(str(tmp_path / "nothing"), 2) == ["MoE layer 0", "MoE layer 1"]
