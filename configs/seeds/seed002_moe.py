"""Seed 002's MoE model (vukrosic/llm-moe @ 0987b88, llm-same-flops-data.py, `MoEMinimalLLM`, moe_layers='alternate'),
set so moe_jax computes its function: seed002_dense.py's model (SiLU FFN, adjacent-pair RoPE, embedding x sqrt(d),
float32-eps RMSNorm, tied head) with MoE on layers 1, 3, 5: 8 experts of the full d_ff 1536 (Linear-SiLU-Linear),
top-2, weights softmax over the top-2 logits (= renormalised top-2 probabilities), Gaussian router noise std 0.1 in
training, Switch aux loss 0.01 * E * sum f_i P_i summed over MoE layers, no z-loss, no drops (capacity factor
E/k = 4). Training as the seed trained it: 1,724 seed micro-batches = 431 optimizer steps of 24 x 4 x 512 tokens,
the schedule laid out over 1,724 (optim.schedule_steps, warmup from lr 0); Muon 0.01 (router included) + AdamW 1e-3
with the seed's Muon and AdamW semantics (seed002_dense.py). Remaining differences: docs/decisions.md ("Seed
fidelity"); tests/test_seed_training.py matches its training steps to the seed's.

    python -m moe_jax.train --config configs/seeds/seed002_moe.py --workdir runs/seed002_moe
"""

from moe_jax.config import schema as config_lib


def get_config():
    c = config_lib.base_config()
    c.name = "seed002_moe"
    m = c.model
    m.d_model, m.n_layers, m.n_heads, m.d_ff = 384, 6, 8, 1536
    m.mlp = "silu"
    m.dropout = 0.1
    m.tie_embeddings = True
    m.embed_scale = True
    m.rope_layout = "adjacent"
    m.norm_eps = config_lib.FLOAT32_EPS
    moe = c.moe
    moe.num_experts, moe.top_k, moe.every, moe.d_ff = 8, 2, 2, 1536
    moe.capacity_factor = moe.eval_capacity_factor = 4.0  # E / k: capacity = group size, nothing is ever dropped
    moe.renormalize = True
    moe.router_noise_std = 0.1
    moe.load_balance_weight = 0.01
    moe.z_loss_weight = 0.0
    o = c.optim
    o.name, o.muon_lr, o.adamw_lr, o.momentum, o.nesterov = "muon", 0.01, 1e-3, 0.95, True
    o.muon_scale = "keller"
    o.router_muon = True
    o.b1, o.b2, o.eps, o.weight_decay, o.clip_norm = 0.9, 0.999, 1e-8, 0.1, 1.0
    o.warmup_fraction, o.warmup_steps, o.min_lr_ratio = 0.05, -1, 0.1
    config_lib.torch_seed_training(o, "bfloat16", 1724)  # the seed's training semantics
    t = c.train
    t.steps, t.batch_size, t.grad_accum, t.seq_len = 431, 24, 4, 512
    return c
