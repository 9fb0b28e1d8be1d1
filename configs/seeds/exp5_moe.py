"""Seed 000 exp5 (blueberry-llm @ c1b4a78, experiments/exp5_simple_transformer_moe, `SimpleTransformerMoE`), set so
moe_jax computes its function: d_model 384, 6 layers, 8 heads, every layer MoE with 8 experts (Linear-GELU-Linear,
d_ff 1536, exact erf GELU as torch's F.gelu) top-2 over softmax probabilities renormalised, RoPE on halves, embedding
x sqrt(d_model), torch RMSNorm eps (float32 machine epsilon), head tied; no router noise, no z-loss, no drops
(capacity factor E/k = 4 gives every expert a slot per token); the aux loss 0.01 * E * sum_e P_e^2 summed over
layers (moe.load_balance_form). Training as the seed: seq 512, batch 24 x 4; the seed's 20,000 "steps" were
micro-batches (run_experiment.py counts each batch), i.e. 5,000 optimizer steps, its LambdaLR laid out over 20,000
(optim.schedule_steps: 5% warmup = 1,000 optimizer steps from lr 0, cosine to 0.1x stopped at 0.905x); Muon 0.01
(router included; fused qkv, Nesterov without bias correction, float16 Newton-Schulz rounded at every op, eps 1e-7)
+ AdamW 1e-3 (torch betas 0.9/0.999), wd 0.1 (norms included), clip 1.
Remaining differences (init, dropout sites, vocabulary) are listed in docs/decisions.md ("Seed fidelity");
tests/test_seed_fidelity.py matches this config's logits and tests/test_seed_training.py its training steps to the
seed's own PyTorch code.

    python -m moe_jax.train --config configs/seeds/exp5_moe.py --workdir runs/exp5
"""

from moe_jax.config import schema as config_lib


def get_config():
    c = config_lib.base_config()
    c.name = "seed_exp5_moe"
    m = c.model
    m.d_model, m.n_layers, m.n_heads, m.d_ff = 384, 6, 8, 1536
    m.mlp = "gelu_exact"
    m.dropout = 0.1
    m.tie_embeddings = True
    m.embed_scale = True
    m.rope_layout = "halves"
    m.norm_eps = config_lib.FLOAT32_EPS
    moe = c.moe
    moe.num_experts, moe.top_k, moe.every, moe.d_ff = 8, 2, 1, 1536
    moe.capacity_factor = moe.eval_capacity_factor = 4.0  # E / k: capacity = group size, nothing is ever dropped
    moe.renormalize = True
    moe.router_noise_std = 0.0
    moe.load_balance_weight = 0.01
    moe.load_balance_form = "prob_squares"  # the seed's 0.01 * E * sum(P^2), not Switch's E * sum(f P)
    moe.z_loss_weight = 0.0
    o = c.optim
    o.name, o.muon_lr, o.adamw_lr, o.momentum, o.nesterov = "muon", 0.01, 1e-3, 0.95, True
    o.muon_scale = "keller"
    o.router_muon = True  # the seed sends every 2-D weight but embedding and norms to Muon
    o.b1, o.b2, o.eps, o.weight_decay, o.clip_norm = 0.9, 0.999, 1e-8, 0.1, 1.0
    o.warmup_fraction, o.warmup_steps, o.min_lr_ratio = 0.05, -1, 0.1
    config_lib.torch_seed_training(o, "float16", 20000)  # the seed's training semantics
    t = c.train
    t.steps, t.batch_size, t.grad_accum, t.seq_len = 5000, 24, 4, 512
    return c
