"""Seed exp5 MoE: d_model 384, 6 layers, 8 heads, 8 experts (d_ff 1536) top-2 in every layer, seq 512,
batch 24 x accumulation 4, 20,000 optimizer steps, Muon + AdamW, warmup + cosine.

    python -m moe_jax.train --config configs/moe.py --workdir runs/moe
"""

from moe_jax import config_lib


def get_config():
    c = config_lib.base_config()
    c.name = "moe"
    c.moe.num_experts = 8
    c.moe.top_k = 2
    c.moe.every = 1
    c.moe.d_ff = 1536
    return c
