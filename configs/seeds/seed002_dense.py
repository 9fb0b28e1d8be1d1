"""Seed 002's dense model (vukrosic/llm-moe @ 0987b88, llm-same-flops-data.py, `MinimalLLM`), set so moe_jax computes
its function: d_model 384, 6 layers, 8 heads, FFN Linear-SiLU-Linear (d_ff 1536, not SwiGLU), RoPE on adjacent pairs
(torchtune), embedding x sqrt(d_model), torch RMSNorm eps (float32 machine epsilon), head tied, dropout 0.1.
Training as the seed trained it: seq 512, batch 24 x 4; the seed's 2,122 "steps" were micro-batches, i.e. 530
optimizer steps, with its LambdaLR laid out over 2,122 (seed defect 3: optim.schedule_steps; 5% warmup = 106 optimizer
steps from lr 0, cosine to 0.1x stopped at 0.905x); Muon 0.01 + AdamW 1e-3 (torch betas), wd 0.1 (norms included),
clip 1; the seed's Muon: fused qkv, Nesterov without bias correction, bfloat16 Newton-Schulz rounded at every op,
eps 1e-7. Remaining differences: docs/decisions.md ("Seed fidelity"); tests/test_seed_fidelity.py matches this config's
logits and tests/test_seed_training.py its training steps to the seed's own PyTorch code.

    python -m moe_jax.train --config configs/seeds/seed002_dense.py --workdir runs/seed002_dense
"""

from moe_jax.config import schema as config_lib


def get_config():
    c = config_lib.base_config()
    c.name = "seed002_dense"
    m = c.model
    m.d_model, m.n_layers, m.n_heads, m.d_ff = 384, 6, 8, 1536
    m.mlp = "silu"
    m.dropout = 0.1
    m.tie_embeddings = True
    m.embed_scale = True
    m.rope_layout = "adjacent"
    m.norm_eps = config_lib.FLOAT32_EPS
    c.moe.num_experts = 0
    o = c.optim
    o.name, o.muon_lr, o.adamw_lr, o.momentum, o.nesterov = "muon", 0.01, 1e-3, 0.95, True
    o.muon_scale = "keller"
    o.b1, o.b2, o.eps, o.weight_decay, o.clip_norm = 0.9, 0.999, 1e-8, 0.1, 1.0
    o.warmup_fraction, o.warmup_steps, o.min_lr_ratio = 0.05, -1, 0.1
    config_lib.torch_seed_training(o, "bfloat16", 2122)  # the seed's training semantics
    t = c.train
    t.steps, t.batch_size, t.grad_accum, t.seq_len = 530, 24, 4, 512
    return c
