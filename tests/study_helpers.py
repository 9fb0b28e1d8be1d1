"""Helpers shared by the comparison and study tests (test_compare.py, test_studies.py, test_studies_reports.py)."""

from __future__ import annotations

import ml_collections

from moe_jax.config import schema as config_lib


def tiny_base(cache_dir: str) -> ml_collections.ConfigDict:
    """The base config of the tiny comparisons and studies: an MoE of d_model 32, 2 layers, vocab 512, 4 experts
    (d_ff 64) top-2, batch 4 x seq 32, one micro-batch per step, no plots or progress bar, a fixed peak (no CPU peak
    measurement per run), 16 validation windows, data cached in `cache_dir`. Callers set the rest."""
    b = config_lib.base_config()
    m = b.model
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.d_ff, m.dropout = 512, 32, 2, 2, 64, 0.0
    b.moe.num_experts, b.moe.top_k, b.moe.d_ff, b.moe.group_size = 4, 2, 64, 64
    t = b.train
    t.batch_size, t.grad_accum, t.seq_len, t.log_every = 4, 1, 32, 2
    t.peak_tflops = 0.05  # skip measuring the CPU peak in every run
    t.plots = t.progress_bar = False
    b.data.cache_dir = cache_dir
    b.data.max_val_windows = 16
    return b


def markdown_table(report: str, first_header: str) -> list[dict]:
    """The rows of the first markdown table in `report` whose header row starts with `| {first_header} |`, as
    {column header: cell text}."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    header = [h.strip() for h in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, [v.strip() for v in line.strip("|").split("|")])))
    return rows
