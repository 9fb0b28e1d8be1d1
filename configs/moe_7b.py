"""A ~1 B-active / ~7 B-total MoE that needs FSDP (config.mesh.fsdp): d_model 2048, 16 layers, 16 heads, 16 SwiGLU
experts of d_ff 4096 in every layer, top-2, vocabulary 49152 (tied), sequence 2048, bfloat16 compute.

    python -m moe_jax.aot --config configs/moe_7b.py --target h100-8 --mesh 4,2,1
    python -m moe_jax.aot --config configs/moe_7b.py --target v5p-64 --mesh 32,1,1
    (add --config.mesh.fsdp=False to see it not fit)

Parameters (moe_jax/model/flops.py param_counts): ~6.8 B in total, ~1.2 B active per token (2 of 16 experts).
Float32 state without FSDP: parameters, Muon momentum and gradients are ~27 GB each, more than one H100 (80 GB; mesh
4,2,1: 95% of it) or v5p chip (95 GB; mesh 32,1,1: the compiler's 98 GB of temporaries) holds with the activations;
with FSDP each device holds 1/N of them: peak 22.5 GiB on h100-8, 8.7 GiB on v5p-64 (docs/benchmarks.md).
"""

from moe_jax.config import schema as config_lib


def get_config():
    c = config_lib.base_config()
    c.name = "moe_7b"
    c.model.vocab_size = 49152
    c.model.d_model = 2048
    c.model.n_layers = 16
    c.model.n_heads = 16
    c.model.d_ff = 8192  # unused: every layer is MoE
    c.model.mlp = "swiglu"
    c.model.dropout = 0.0
    c.model.remat = True
    c.moe.num_experts = 16
    c.moe.top_k = 2
    c.moe.every = 1
    c.moe.d_ff = 4096
    c.moe.group_size = 256
    c.moe.capacity_factor = 1.25
    c.train.seq_len = 2048
    c.train.batch_size = 32
    c.train.grad_accum = 1
    c.train.steps = 10000
    c.mesh.shape = (-1, 2, 1)
    c.mesh.fsdp = True
    return c
