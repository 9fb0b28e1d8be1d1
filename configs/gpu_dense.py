"""GPU-sized dense model near 125 M parameters: d_model 768, 12 layers, 12 heads (head_dim 64), GELU FFN d_ff 3072,
vocabulary 49152 (the seeds' SmolLM tokenizer size), sequence 1024, bfloat16 compute, batch 32 x 1024 tokens.

    python -m moe_jax.bench --config configs/gpu_moe.py --baseline configs/gpu_dense.py --batch 32 --seq 1024
    bash scripts/device_check.sh                     (benchmarks this against configs/gpu_moe.py)

Parameters (flops.param_counts): 122.7 M = embedding 37.7 M (tied head) + attention 28.3 M + FFN 56.6 M + norms.
Training FLOPs/token (flops.flops_per_token): 3 x forward (matmuls incl. the [M, V] head; causal attention): 0.79 G.

Batch (sized for one 80 GB H100 in bfloat16, no rematerialisation), an estimate per token of what the backward pass
keeps: per layer about 38 x d_model bytes (bfloat16 residual, norm outputs, q/k/v, attention output, FFN in/out,
and 2 x d_ff pre-/post-activation; flash attention keeps no S x S scores) = 29 KB, x 12 layers = 350 KB; the float32
logits [V] and their softmax/gradient temporaries 2-3 x 4 x 49152 bytes = 0.4-0.6 MB. About 1 MB per token, so
32 x 1024 tokens = 33 GB of activations, plus parameters, gradients and optimizer state (4 x 4 bytes x 123 M = 2 GB).
That leaves half the card for XLA's temporaries; the device check records XLA's own compiled figure
(memory_bytes in its JSON). The MoE (configs/gpu_moe.py) keeps about 20% more per token.
To train it on text, set data (e.g. data.source='tfds') and, for the Bible's small corpus, model.vocab_size=8192.
"""

from moe_jax.config import schema as config_lib


def get_config():
    c = config_lib.base_config()
    c.name = "gpu_dense"
    c.model.vocab_size = 49152
    c.model.d_model = 768
    c.model.n_layers = 12
    c.model.n_heads = 12
    c.model.d_ff = 3072
    c.model.mlp = "gelu"
    c.model.dropout = 0.0
    c.model.dtype = "bfloat16"
    c.model.attention = "auto"  # cuDNN flash attention on GPU, XLA on TPU, blocked on CPU
    c.moe.num_experts = 0
    c.train.seq_len = 1024
    c.train.batch_size = 32
    c.train.grad_accum = 1
    c.train.steps = 10000
    c.train.eval_every = 1000
    c.train.checkpoint_every = 1000
    return c
