"""GPU-sized MoE with the active FFN of configs/gpu_dense.py: d_model 768, 12 layers, 12 heads, 8 experts top-2 in
every layer with expert d_ff 1536 (= dense d_ff 3072 / 2, so a token's two experts hold the dense FFN's 2 x 768 x
3072 active weights), vocabulary 49152, sequence 1024, bfloat16 compute, batch 32 x 1024 tokens.

    python -m moe_jax.bench --config configs/gpu_moe.py --baseline configs/gpu_dense.py --batch 32 --seq 1024

Parameters: 122.8 M active (the dense model's 122.7 M + the router's 12 x 768 x 8), 292.7 M in total (8 experts per
layer). Training FLOPs/token equal the dense model's within 0.1% (the router), so step time / dense step time is
the MoE overhead at equal model FLOPs. Capacity: groups of 256 tokens, factor 1.25 -> 80 slots per expert.
Memory: as configs/gpu_dense.py per token, plus per MoE layer the [E, G, C, .] expert buffers (2.5 slots per token
at this capacity: inputs, 2 x hidden, outputs, about 23 KB) and the [G, T, E, C] dispatch mask (1.3 KB), about 20%
more than the dense model's; parameters, gradients and optimizer state about 5 GB.
"""

from configs import gpu_dense


def get_config():
    c = gpu_dense.get_config()
    c.name = "gpu_moe"
    c.moe.num_experts = 8
    c.moe.top_k = 2
    c.moe.every = 1
    c.moe.d_ff = 1536
    c.moe.group_size = 256
    c.moe.capacity_factor = 1.25
    return c
