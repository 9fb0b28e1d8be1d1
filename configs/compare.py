"""Seed-sized FLOP-matched comparison: dense (seed exp5 architecture) vs MoE (8 experts top-2, every layer), plus an
MoE with the dense model's active parameters, 3 seeds each, all at the FLOPs of 2,000 dense steps.

    python -m moe_jax.compare --config configs/compare.py --workdir runs/compare

This is GPU/TPU-sized (batch 24 x 4 x 512 tokens per step). configs/compare_cpu.py is the CPU-sized version.
"""

import ml_collections

from moe_jax.config import schema as config_lib


def get_config():
    c = ml_collections.ConfigDict()
    c.base = config_lib.base_config()
    c.base.train.checkpoint_every = 500
    c.arms = ml_collections.ConfigDict()
    c.arms.dense = ml_collections.ConfigDict({"moe": {"num_experts": 0}})
    c.arms.moe = ml_collections.ConfigDict({"moe": {"num_experts": 8, "top_k": 2, "every": 1, "d_ff": 1536}})
    c.arms.moe_same_active = ml_collections.ConfigDict(
        {"derive": "same_active", "from_arm": "dense", "num_experts": 8, "top_k": 2})
    c.arms.dense_same_total = ml_collections.ConfigDict({"derive": "same_total", "from_arm": "moe"})
    c.arm_names = "dense,moe,moe_same_active"
    c.seeds = (0, 1, 2)
    c.budget = ml_collections.ConfigDict()
    c.budget.flops = 0.0  # total training FLOPs per run; 0: reference_arm x reference_steps
    c.budget.reference_arm = "dense"
    c.budget.reference_steps = 2000
    c.num_evals = 8  # each arm evaluates at 1/8, 2/8, ... of its budget (eval_every = ceil(steps / 8))
    return c
