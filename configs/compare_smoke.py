"""Two tiny arms (dense vs MoE) x 2 seeds, FLOP-matched: finishes in a few minutes on a 2-core CPU.

    python -m moe_jax.compare --config configs/compare_smoke.py --workdir runs/compare_smoke
"""

import os

import ml_collections

from moe_jax import cli


def get_config():
    c = ml_collections.ConfigDict()
    c.base = cli.load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "smoke.py"))
    c.base.train.checkpoint_every = 10
    c.base.train.log_every = 5
    c.base.train.plots = False
    c.base.train.progress_bar = False
    c.arms = ml_collections.ConfigDict()
    c.arms.dense = ml_collections.ConfigDict({"moe": {"num_experts": 0}})
    c.arms.moe = ml_collections.ConfigDict({"moe": {"num_experts": 4, "top_k": 2}})
    c.arm_names = "dense,moe"
    c.seeds = (0, 1)
    c.budget = ml_collections.ConfigDict()
    c.budget.flops = 0.0
    c.budget.reference_arm = "moe"
    c.budget.reference_steps = 20
    c.num_evals = 2  # each arm evaluates at ~1/2 and the end of its budget
    return c
