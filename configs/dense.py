"""configs/moe.py with a dense GELU FFN (d_ff 1536) in every layer: the dense arm of the comparison, at seed exp5's
shape with moe_jax's numerics. Not seed 002's dense model (SiLU FFN, adjacent-pair RoPE, embedding x sqrt(d_model),
float32-eps RMSNorm): that is configs/seeds/seed002_dense.py.

    python -m moe_jax.train --config configs/dense.py --workdir runs/dense
"""

from moe_jax.config import schema as config_lib


def get_config():
    c = config_lib.base_config()
    c.name = "dense"
    c.moe.num_experts = 0
    return c
