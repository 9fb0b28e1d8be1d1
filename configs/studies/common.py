"""Shared pieces of the study configs (configs/studies/*.py): the data and evaluation setup every study uses, and the
two scales each study config offers.

    python -m moe_jax.studies --config configs/studies/<name>.py --workdir runs/studies/<name>        # 'cpu' scale
    python -m moe_jax.studies --config configs/studies/<name>.py:tiny --workdir runs/studies/<name>_tiny

'cpu': the CPU comparison's model (d_model 128, 4 layers, vocab 4096) on short budgets (16-50% of an epoch of the
shipped corpus) so that all three studies run in about 1.5 hours on the 2-core CPU, one study per core; each
config's reference_steps raises it (--config.budget.reference_steps=N);
'tiny': d_model 64, 2 layers, vocab 1024, a few dozen steps: small enough to run every study on a loaded 2-core CPU
in tens of minutes. Its numbers say how the engine behaves and how large the run-to-run spread is at that size;
they say little about the seeds' models.
"""

import ml_collections

from moe_jax.config import schema as config_lib

SCALES = ("cpu", "tiny")


def scale_of(arg) -> str:
    scale = arg or "cpu"
    if scale not in SCALES:
        raise config_lib.ConfigError(f"study config argument {scale!r}: choose one of {SCALES} (e.g. "
                                     "--config configs/studies/dense_vs_moe.py:tiny)")
    return scale


def base(scale: str) -> ml_collections.ConfigDict:
    """The shared base: Muon + AdamW, warmup + cosine, the shipped corpus with a 5% validation and a 5% test split
    (whole documents), scored on windows spread evenly over the split: 128 ('cpu') or 48 ('tiny')."""
    b = config_lib.base_config()
    m = b.model
    if scale == "cpu":
        m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.d_ff = 4096, 128, 4, 4, 512
        b.train.batch_size, b.train.seq_len = 16, 128
        b.data.max_val_windows = 128
        b.data.val_window_sampling = "even"
        b.train.log_every, b.train.checkpoint_every = 20, 100
    else:
        m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.d_ff = 1024, 64, 2, 4, 256
        b.train.batch_size, b.train.seq_len = 8, 64
        b.data.max_val_windows = 48
        b.data.val_window_sampling = "even"
        b.train.log_every, b.train.checkpoint_every = 10, 100
    m.dropout = 0.0
    b.moe.group_size = 256
    b.optim.muon_lr = 0.02
    b.optim.adamw_lr = 3e-3
    # the committed results ran float32 X-space Newton-Schulz (what 'auto' meant on CPU before issue 19's changes)
    b.optim.ns_dtype, b.optim.ns_method = "float32", "standard"
    b.train.grad_accum = 1
    b.train.eval_batches = 0
    b.train.progress_bar = False
    b.train.plots = False
    b.data.test_fraction = 0.05
    return b


def study(name: str, scale: str) -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.name = f"{name} ({scale} scale)"
    s.base = base(scale)
    s.seeds = (0, 1, 2)
    s.num_evals = 4
    s.correlation = False
    return s
