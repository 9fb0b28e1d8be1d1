"""Shared pieces of the study configs (configs/studies/*.py): the data and evaluation setup every study uses, the
learning-rate and replicate protocol, and the two scales each study config offers.

    python -m moe_jax.studies --config configs/studies/<name>.py --workdir runs/studies/<name>        # 'cpu' scale
    python -m moe_jax.studies --config configs/studies/<name>.py:tiny --workdir runs/studies/<name>_tiny

'cpu' (the default): d_model 128, 4 layers, vocabulary 2,048, sequence 128, budgets of one to two epochs of the
shipped corpus (1.08 M training tokens at this vocabulary), chosen so that every arm has trained long enough to beat
an interpolated bigram on test by a clear margin (a dense arm at one epoch: validation 3.50 against the bigram's 3.86
nats/token) and each study fits in about three hours of the 2-core CPU with one process per core (the arithmetic is
in docs/studies/README.md, "Scale"). 'tiny': d_model 64, 2 layers, vocabulary 1,024, a few dozen steps: the engine's
behaviour and the run-to-run spread at that size; its numbers say nothing about the seeds' models.

Protocol (moe_jax/studies/__init__.py): 5 replicates (seed k = initialisation and data order, paired across arms);
every arm's Muon learning rate chosen on validation from its own grid (factor 2 apart), on the first replicate, the
grid extended by one factor-2 step beyond an edge it is chosen on (at most twice; still on the edge: 'edge', no
verdict); the AdamW rate tied to it at the base's ratio (0.15); the other four replicates run the chosen rate.
"""

import ml_collections

from moe_jax.config import schema as config_lib

SCALES = ("cpu", "tiny")
SEEDS = (0, 1, 2, 3, 4)
ADAMW_RATIO = 0.15  # AdamW lr / Muon lr (3e-3 / 0.02, the CPU comparison's pair), kept for every swept Muon rate


def scale_of(arg) -> str:
    scale = arg or "cpu"
    if scale not in SCALES:
        raise config_lib.ConfigError(f"study config argument {scale!r}: choose one of {SCALES} (e.g. "
                                     "--config configs/studies/dense_vs_moe.py:tiny)")
    return scale


def base(scale: str) -> ml_collections.ConfigDict:
    """The shared base: Muon + AdamW, warmup + cosine, the shipped corpus with a 5% validation and a 5% test split
    (whole documents). Final losses are scored on the whole splits; the curves during training on windows spread
    evenly over validation: 64 ('cpu') or 48 ('tiny')."""
    b = config_lib.base_config()
    m = b.model
    if scale == "cpu":
        m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.d_ff = 2048, 128, 4, 4, 512
        b.train.batch_size, b.train.seq_len = 16, 128
        b.data.max_val_windows = 64
        b.train.log_every, b.train.checkpoint_every = 25, 100
    else:
        m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.d_ff = 1024, 64, 2, 4, 256
        b.train.batch_size, b.train.seq_len = 8, 64
        b.data.max_val_windows = 48
        b.train.log_every, b.train.checkpoint_every = 10, 100
    b.data.val_window_sampling = "even"
    m.dropout = 0.0
    b.moe.group_size = 256
    b.optim.muon_lr = 0.04
    b.optim.adamw_lr = ADAMW_RATIO * b.optim.muon_lr
    b.optim.ns_dtype, b.optim.ns_method = "float32", "standard"  # float32 X-space Newton-Schulz, as counted
    b.train.grad_accum = 1
    b.train.eval_batches = 0
    b.train.progress_bar = False
    b.train.plots = False
    b.data.test_fraction = 0.05
    return b


def study(name: str, scale: str) -> ml_collections.ConfigDict:
    """A study with the shared base and protocol; the caller sets arms, arm_names, lr_grid, budget, conclusions."""
    s = ml_collections.ConfigDict()
    s.name = f"{name} ({scale} scale)"
    s.base = base(scale)
    s.seeds = SEEDS
    s.num_evals = 4
    s.correlation = False
    s.comparisons = "pairwise"
    s.lr_select_replicates = 1
    s.lr_extend = 2
    s.lr_step = 2.0
    s.lr_tied = (("optim.adamw_lr", ADAMW_RATIO),)
    s.lr_from = ml_collections.ConfigDict()
    s.bootstrap_seed = 0
    # a finished run drops its checkpoints once scored (runner.settle): a study's record stays small enough to copy
    # or commit and resume elsewhere; True keeps them (e.g. to generate from a run)
    s.keep_checkpoints = False
    return s
