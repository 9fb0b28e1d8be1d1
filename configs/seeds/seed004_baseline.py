"""Seed 004's baseline (blueberry-llm @ f6354a9, experiments/architectural_study/architectural_experiments.py,
`get_baseline_config` -> models.AdaptiveMoEMinimalLLM), set so moe_jax computes its function: d_model 512, 8 layers,
16 heads, every layer MoE with 16 experts (Linear-SiLU-Linear, d_ff 2048) top-2, weights softmax over the top-2
logits, router noise std 0.1 in training, RoPE on adjacent pairs (torchtune), embedding x sqrt(d_model), RMSNorm
eps 1e-5 (its AdaptiveLayerNorm's default), head tied, dropout 0.1, Switch aux loss 0.01, no drops (capacity factor
E/k = 8). Training as the seed: seq 256, batch 16 x 2; the seed's 300 "steps" were micro-batches, i.e. 150 optimizer
steps, its LambdaLR laid out over 300 (optim.schedule_steps); Muon 0.01 (router included; MuonWithWarmup: momentum
0.85 -> 0.95 over max(300, 300 // 10) = 300 optimizer steps, so it ends at 0.90; fused qkv, Nesterov without bias
correction, bfloat16 Newton-Schulz rounded at every op, eps 1e-7) + AdamW 1e-3 (betas 0.9/0.999, norms decayed).
The seed ran this on an RTX 4090, where its AdaptiveLinear multiplies in bfloat16 (ops/matmul hopper kernel) and its
output projections start at zero; both, and the rest, are in docs/decisions.md ("Seed fidelity").

    python -m moe_jax.train --config configs/seeds/seed004_baseline.py --workdir runs/seed004_baseline
"""

from moe_jax.config import schema as config_lib


def get_config():
    c = config_lib.base_config()
    c.name = "seed004_baseline"
    m = c.model
    m.d_model, m.n_layers, m.n_heads, m.d_ff = 512, 8, 16, 2048
    m.mlp = "silu"
    m.dropout = 0.1
    m.tie_embeddings = True
    m.embed_scale = True
    m.rope_layout = "adjacent"
    m.norm_eps = 1e-5
    moe = c.moe
    moe.num_experts, moe.top_k, moe.every, moe.d_ff = 16, 2, 1, 2048
    moe.capacity_factor = moe.eval_capacity_factor = 8.0  # E / k: capacity = group size, nothing is ever dropped
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
    config_lib.torch_seed_training(o, "bfloat16", 300)  # the seed's training semantics
    o.momentum_warmup_steps, o.momentum_warmup_start = 300, 0.85  # optimizers/factory.py: MuonWithWarmup
    t = c.train
    t.steps, t.batch_size, t.grad_accum, t.seq_len = 150, 16, 2, 256
    return c
