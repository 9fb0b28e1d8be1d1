"""A small MoE that trains on the shipped corpus in a few minutes on a laptop CPU (the quick-start job):
d_model 128, 4 layers, 4 heads, 8 experts (d_ff 256) top-2 on alternate layers, vocab 4096, seq 128.

    python -m moe_jax.train --config configs/cpu.py --workdir runs/cpu
"""

from moe_jax.config import schema as config_lib


def get_config():
    c = config_lib.base_config()
    c.name = "cpu"
    c.model.vocab_size = 4096
    c.model.d_model = 128
    c.model.n_layers = 4
    c.model.n_heads = 4
    c.model.d_ff = 512
    c.model.dropout = 0.0
    c.moe.num_experts = 8
    c.moe.top_k = 2
    c.moe.every = 2
    c.moe.d_ff = 256
    c.moe.group_size = 256
    c.optim.muon_lr = 0.02
    c.optim.adamw_lr = 3e-3
    c.train.steps = 400
    c.train.batch_size = 16
    c.train.grad_accum = 1
    c.train.seq_len = 128
    c.train.log_every = 20
    c.train.eval_every = 100
    c.train.eval_batches = 16
    c.train.checkpoint_every = 100
    c.data.max_val_windows = 256
    return c
