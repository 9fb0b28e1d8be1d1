"""Seed 004's architecture study (nine variants of its MoE baseline) scaled to CPU and made fair: every variant
trains on the same model-FLOP budget (the seed gave SmallBatch half the tokens and updates of the others), with 3
replicates (seed k = initialisation, dropout, router noise and data order), scored on a test split; a ranking with
t intervals against the baseline and the correlation heatmap the seed drew.

    python -m moe_jax.studies --config configs/studies/architecture.py --workdir runs/studies/architecture
    python -m moe_jax.studies --config configs/studies/architecture.py:tiny --workdir runs/studies/architecture_tiny

Baseline (configs/seeds/seed004_baseline.py scaled): d_model 128 (512), 4 layers (8), 4 heads (16; head dim 32),
every layer MoE with 8 experts (16) of d_ff 512 top-2, SiLU experts, tied head, embedding x sqrt(d_model), router
noise 0.1, dropout 0.1, no drops (capacity factor E/k), Muon 0.01 + AdamW 1e-3, batch 16 x accumulation 2. The
variants change one thing each by the seed's ratio: Deeper 6 layers (x1.5), Wider d_model 160 with 5 heads (x1.25),
MoreExperts 12 (x1.5), Top3Experts top-3, LowDropout 0.05, HighLR Muon 0.015, SmallBatch batch 8 x accumulation 4
(the same tokens per step), LongSeq sequence x1.5. 'cpu': 9 x 3 = 27 runs of 26-40 steps of up to 4,096 tokens
(the budget: 40 baseline steps): about 75 minutes of one core of the 2-core CPU (2026-11-26); the report is committed
as docs/studies/architecture/. Longer: --config.budget.reference_steps=200.
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
    s = common.study("architecture", scale)
    b = s.base
    m, moe, o, t = b.model, b.moe, b.optim, b.train
    m.mlp, m.tie_embeddings, m.embed_scale, m.dropout = "silu", True, True, 0.1
    moe.num_experts, moe.top_k, moe.every, moe.d_ff = 8, 2, 1, m.d_ff
    moe.capacity_factor = moe.eval_capacity_factor = 4.0  # E / k: no token is dropped (the seed drops none)
    moe.router_noise_std, moe.load_balance_weight, moe.z_loss_weight = 0.1, 0.01, 0.0
    o.muon_lr, o.adamw_lr, o.b2 = 0.01, 1e-3, 0.999
    t.grad_accum = 2
    d, heads, layers, seq = m.d_model, m.n_heads, m.n_layers, t.seq_len
    s.arms = ml_collections.ConfigDict({
        "Baseline": {},
        "Deeper": {"model": {"n_layers": layers * 3 // 2}},
        "Wider": {"model": {"d_model": d * 5 // 4, "n_heads": heads * 5 // 4}},
        "MoreExperts": {"moe": {"num_experts": 12, "capacity_factor": 6.0, "eval_capacity_factor": 6.0}},
        "Top3Experts": {"moe": {"top_k": 3, "capacity_factor": 8 / 3, "eval_capacity_factor": 8 / 3}},
        "LowDropout": {"model": {"dropout": 0.05}},
        "HighLR": {"optim": {"muon_lr": 0.015}},
        "SmallBatch": {"train": {"batch_size": t.batch_size // 2, "grad_accum": 4}},
        "LongSeq": {"train": {"seq_len": seq * 3 // 2}},
    })
    s.arm_names = "Baseline,Deeper,Wider,MoreExperts,Top3Experts,LowDropout,HighLR,SmallBatch,LongSeq"
    s.budget = ml_collections.ConfigDict({"kinds": ("model_flops",), "amount": 0.0, "reference_arm": "Baseline",
                                          "reference_steps": 40})
    s.correlation = True
    s.conclusions = CONCLUSIONS
    return s


CONCLUSIONS = """
Seed 004 ranked nine variants from one run each at unequal budgets and concluded that SmallBatch (batch 8,
accumulation 4) is best by 6.2%, that more experts and top-3 routing do not help, that a higher learning rate and
longer sequences hurt, and that batch size matters most. Here every variant has the same model-FLOP budget (SmallBatch
the same tokens per step as the baseline) and three replicates: a seed claim survives only where the ranking's paired
interval against the baseline excludes 0 in the claimed direction. SmallBatch at equal tokens per step computes the
same gradient as the baseline up to accumulation order, so a difference there measures noise, not batch size. The
correlation heatmap is over nine arm means and inherits their noise; it describes this grid, not a law.
"""
