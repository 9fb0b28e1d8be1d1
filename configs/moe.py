"""moe_jax's MoE at seed exp5's shape: d_model 384, 6 layers, 8 heads, 8 experts (d_ff 1536) top-2 in every
layer, seq 512, batch 24 x accumulation 4, 20,000 optimizer steps, Muon + AdamW, warmup + cosine.

With moe_jax's own numerics (tanh GELU, RoPE on halves, no embedding scale, RMSNorm eps 1e-6, capacity factor 1.25,
Switch + z-loss): the seed's shape, not the seed's function, and 4x its tokens (exp5's 20,000 "steps" were
micro-batches). configs/seeds/exp5_moe.py computes exp5's function
(tests/test_seed_fidelity.py); docs/decisions.md ("Seed fidelity") lists what differs.

    python -m moe_jax.train --config configs/moe.py --workdir runs/moe
"""

from moe_jax.config import schema as config_lib


def get_config():
    c = config_lib.base_config()
    c.name = "moe"
    c.moe.num_experts = 8
    c.moe.top_k = 2
    c.moe.every = 1
    c.moe.d_ff = 1536
    return c
