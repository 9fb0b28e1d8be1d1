"""Seed 004's architecture study (its MoE baseline and variants) scaled to CPU and made fair: every variant trains
on the same model-FLOP budget at its own bracketed learning rate, with 5 replicates (seed k = initialisation,
dropout, router noise and data order), scored on the same test tokens; each variant is compared with the baseline
(7 planned comparisons, Holm-adjusted), and the correlation heatmap the seed drew.

    python -m moe_jax.studies --config configs/studies/architecture.py --workdir runs/studies/architecture
    python -m moe_jax.studies --config configs/studies/architecture.py:tiny --workdir runs/studies/architecture_tiny

Baseline (configs/seeds/seed004_baseline.py scaled; `seed004_study`, shared with smallbatch.py): d_model 128 (512),
4 layers (8), 4 heads (16; head dim 32), every layer MoE with 8 experts (16) top-2 of d_ff 256 (2048: half the
seed's width ratio, for time), SiLU experts, tied head, embedding x sqrt(d_model), router noise 0.1, dropout 0.1,
capacity factor 1.25 (the seed drops nothing, capacity E/k; at E/k the experts would compute 4x the needed slots,
too slow here), AdamW tied to Muon at the seed's ratio 0.1, batch 16 x accumulation 2. The variants change one thing
each by the seed's ratio: Deeper 6 layers (x1.5), Wider d_model 160 with 5 heads (x1.25), MoreExperts 12 (x1.5),
Top3Experts top-3, LowDropout 0.05, SmallBatch batch 8 x accumulation 4 (the same tokens per step), LongSeq sequence
x1.5. The seed's HighLR (Muon 0.015 against 0.01) is a learning-rate choice, which every arm now makes on its own
grid: the baseline's grid table answers it. The seed's SmallBatch as the seed ran it (half the optimizer steps and
tokens) is configs/studies/smallbatch.py, at a budget where that arm still trains an epoch.

'cpu' scale: the budget is 265 baseline steps of 4,096 tokens (one epoch of the 1.08 M training tokens); variants
with more FLOPs per token get fewer steps (Deeper 0.73 epochs: validation 3.74 in a one-run calibration at Muon
0.04, against the bigram's 3.86). 8 arms x (3 grid values on replicate 0 + 4 replicates at the chosen value) = 56
runs (plus any grid extension): about 2.7 hours with one process per core (docs/studies/README.md, "Scale").
"""

import os

import ml_collections

from moe_jax import cli

ADAMW_RATIO = 0.1  # the seed's AdamW 1e-3 with Muon 0.01


def _common():
    """configs/studies/common.py, loaded by path (configs/ is not a package)."""
    return cli.load_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "common.py"))


def seed004_study(name: str, arg=None):
    """A study of seed 004's baseline at the given scale (module docstring): shared base, no arms yet."""
    common = _common()
    scale = common.scale_of(arg)
    s = common.study(name, scale)
    b = s.base
    m, moe, o, t = b.model, b.moe, b.optim, b.train
    m.mlp, m.tie_embeddings, m.embed_scale, m.dropout = "silu", True, True, 0.1
    moe.num_experts, moe.top_k, moe.every, moe.d_ff = 8, 2, 1, m.d_ff // 2
    moe.capacity_factor = 1.25
    moe.router_noise_std, moe.load_balance_weight, moe.z_loss_weight = 0.1, 0.01, 0.0
    o.muon_lr, o.b2 = 0.04, 0.999
    o.adamw_lr = ADAMW_RATIO * o.muon_lr
    s.lr_tied = (("optim.adamw_lr", ADAMW_RATIO),)
    t.grad_accum = 2
    s.comparisons = "reference"
    s.lr_grid = ml_collections.ConfigDict({"all": (0.02, 0.04, 0.08)})
    return s, scale


def get_config(arg=None):
    s, scale = seed004_study("architecture", arg)
    m, t = s.base.model, s.base.train
    d, heads, layers, seq = m.d_model, m.n_heads, m.n_layers, t.seq_len
    s.arms = ml_collections.ConfigDict({
        "Baseline": {},
        "Deeper": {"model": {"n_layers": layers * 3 // 2}},
        "Wider": {"model": {"d_model": d * 5 // 4, "n_heads": heads * 5 // 4}},
        "MoreExperts": {"moe": {"num_experts": 12}},
        "Top3Experts": {"moe": {"top_k": 3}},
        "LowDropout": {"model": {"dropout": 0.05}},
        "SmallBatch": {"train": {"batch_size": t.batch_size // 2, "grad_accum": 4}},
        "LongSeq": {"train": {"seq_len": seq * 3 // 2}},
    })
    s.arm_names = "Baseline,Deeper,Wider,MoreExperts,Top3Experts,LowDropout,SmallBatch,LongSeq"
    s.budget = ml_collections.ConfigDict({"kinds": ("model_flops",), "amount": 0.0, "reference_arm": "Baseline",
                                          "reference_steps": 265 if scale == "cpu" else 40})
    s.correlation = True
    s.conclusions = CONCLUSIONS
    return s


CONCLUSIONS = """
Seed 004 ranked nine variants from one run each and concluded that SmallBatch (batch 8, accumulation 4) is best by
6.2%, that more experts and top-3 routing do not help, that a higher learning rate and longer sequences hurt, and
that batch size matters most. Here every variant has the same model-FLOP budget, its own bracketed learning rate and
five replicates, and is compared with the baseline on the same test tokens; a seed claim survives only where its
Holm-adjusted verdict says so in the claimed direction. SmallBatch at equal tokens per step computes the same
gradient as the baseline up to accumulation order, so it cannot test the seed's claim, which gave SmallBatch half
the optimizer steps and tokens: the smallbatch study runs that comparison. Variants that cost more FLOPs per token
get fewer steps, so a loss here is a loss at equal model FLOPs, not at equal tokens. The correlation heatmap is over
the arm means and inherits their noise; it describes this grid, not a law.
"""
