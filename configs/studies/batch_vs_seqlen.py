"""Seed 000's ablation (exp5 README: "Batch Size vs Sequence Length"): large batch of short sequences vs a few long
sequences vs balanced, scaled to CPU and made fair: every arm takes the same tokens per step and the same total tokens
(a token budget), so only the shape of a step differs. The seed's shapes 64x256, 24x512 and 8x1024 had 16k, 12k and
8k tokens per step; here the sequence lengths keep the seed's 1:2:4 ratio and the batch makes up 2,048 tokens
('cpu') or 512 ('tiny') per step. The seed swept three Muon rates (0.005, 0.01, 0.02) for every shape; here every
shape's rate is chosen on validation from its own bracketed grid (common.py).

    python -m moe_jax.studies --config configs/studies/batch_vs_seqlen.py --workdir runs/studies/batch_vs_seqlen
    python -m moe_jax.studies --config configs/studies/batch_vs_seqlen.py:tiny \\
        --workdir runs/studies/batch_vs_seqlen_tiny

Every arm is scored on the same tokens: the whole validation and test splits, every token once, each arm at its own
sequence length (a model trained on longer windows is evaluated with longer contexts, which is part of what the
ablation measures). The report's val_loss_per_lr.png is the seed's comparison figure. 'cpu' scale: 1,060 steps of
2,048 tokens (two epochs of the 1.08 M training tokens); 3 arms x (3 grid values on replicate 0 + 4 replicates at the
chosen value) = 21 runs (plus any grid extension): about 2 hours with one process per core (docs/studies/README.md,
"Scale").
"""

import os

import ml_collections

from moe_jax import cli


def _common():
    """configs/studies/common.py, loaded by path (configs/ is not a package)."""
    return cli.load_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "common.py"))


def get_config(arg=None):
    common = _common()
    scale = common.scale_of(arg)
    s = common.study("batch_vs_seqlen", scale)
    b = s.base
    b.moe.num_experts, b.moe.top_k, b.moe.every = 8, 2, 1  # seed exp5: every layer MoE, 8 experts top-2
    b.moe.d_ff = b.model.d_ff // 2
    tokens = 2048 if scale == "cpu" else 512
    seqs = (64, 128, 256) if scale == "cpu" else (32, 64, 128)
    s.arms = ml_collections.ConfigDict()
    for name, seq in zip(("large_batch", "balanced", "long_seq"), seqs):
        s.arms[name] = ml_collections.ConfigDict({"train": {"batch_size": tokens // seq, "seq_len": seq}})
    b.train.batch_size, b.train.seq_len = tokens // seqs[1], seqs[1]
    b.moe.group_size = min(256, tokens)
    s.arm_names = "balanced,large_batch,long_seq"
    s.lr_grid = ml_collections.ConfigDict({"all": (0.02, 0.04, 0.08)})
    s.budget = ml_collections.ConfigDict({"kinds": ("tokens",), "amount": 0.0, "reference_arm": "balanced",
                                          "reference_steps": 1060 if scale == "cpu" else 80})
    s.conclusions = CONCLUSIONS
    return s


CONCLUSIONS = """
Seed 000 asked what to fill memory with: a large batch of short sequences, a few long ones, or a balance, at three
Muon learning rates, and published no result. Here the three shapes get equal tokens per step and equal total tokens,
the learning rate is chosen per arm on validation from a bracketed grid, and the arms are compared on the same test
tokens. A shape is better only where its Holm-adjusted verdict says so; at a token budget the long-sequence arm
spends more FLOPs per token on attention (model FLOPs column), so a win for it is not a win at equal compute. No
wall-time budget was run: the wall seconds in the tables describe these runs, not a comparison at equal time. The
answer depends on the corpus (the King James Bible, chapters of a few hundred to a few thousand tokens) and on model
size; it does not transfer to the seed's GPU scale.
"""
