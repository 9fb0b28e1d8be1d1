"""CPU-sized FLOP-matched comparison on the shipped corpus (King James Bible): dense vs MoE vs MoE with the dense
model's active parameters, 3 seeds each.

    python -m moe_jax.compare --config configs/compare_cpu.py --workdir runs/compare_cpu

All arms are configs/cpu.py-sized (d_model 128, 4 layers, 4 heads, vocab 4096, seq 128, batch 16, Muon + AdamW,
warmup + cosine) and keep the seed architectures' ratios (configs/dense.py vs configs/moe.py):
  dense           - a GELU FFN with d_ff 512 (4 x d_model) in every layer;
  moe             - 8 experts of d_ff 512, top-2, in every layer (capacity factor 1.25): 2x the dense arm's active FFN;
  moe_same_active - 8 experts of d_ff 256, top-2, in every layer: the dense arm's active parameters.
Also defined (add it to arm_names): dense_same_total (a dense FFN with the MoE arm's total parameters, d_ff 4096).

Budget: the training FLOPs of 400 MoE steps, 9.362e12 FLOPs per run: dense 554 steps (1.13 M tokens), moe 400 steps
(0.82 M tokens), moe_same_active 552 steps (1.13 M tokens), about one epoch of the 1.01 M training tokens (the
training split at vocab 4096; data.build's stats). 8
evaluations per run (16 x 16 validation windows), the same training-token order and validation windows for every run.

Time (2026-11-24, 2-core CPU): 20.9 minutes for the 9 runs (dense ~1.7, moe ~2.3, moe_same_active ~2.6 minutes of
training loop per run, plus setup, compilation and evaluation). The report is committed as docs/compare_cpu/.
Re-running the command after an interruption resumes where it stopped.
"""

import ml_collections

from moe_jax.config import schema as config_lib


def get_config():
    b = config_lib.base_config()
    b.name = "compare_cpu"
    b.model.vocab_size = 4096
    b.model.d_model = 128
    b.model.n_layers = 4
    b.model.n_heads = 4
    b.model.d_ff = 512
    b.model.dropout = 0.0
    b.moe.group_size = 256
    b.optim.muon_lr = 0.02
    b.optim.adamw_lr = 3e-3
    # the committed results ran float32 X-space Newton-Schulz (what 'auto' meant on CPU before issue 19's changes)
    b.optim.ns_dtype, b.optim.ns_method = "float32", "standard"
    b.train.batch_size = 16
    b.train.grad_accum = 1
    b.train.seq_len = 128
    b.train.log_every = 25
    b.train.eval_batches = 16
    b.train.checkpoint_every = 250
    b.train.progress_bar = False
    b.data.max_val_windows = 256

    c = ml_collections.ConfigDict()
    c.base = b
    c.arms = ml_collections.ConfigDict()
    c.arms.dense = ml_collections.ConfigDict({"moe": {"num_experts": 0}})
    c.arms.moe = ml_collections.ConfigDict({"moe": {"num_experts": 8, "top_k": 2, "every": 1, "d_ff": 512}})
    c.arms.moe_same_active = ml_collections.ConfigDict(
        {"derive": "same_active", "from_arm": "dense", "num_experts": 8, "top_k": 2, "every": 1})
    c.arms.dense_same_total = ml_collections.ConfigDict({"derive": "same_total", "from_arm": "moe"})
    c.arm_names = "dense,moe,moe_same_active"
    c.seeds = (0, 1, 2)
    c.budget = ml_collections.ConfigDict()
    c.budget.flops = 0.0  # 0: reference_arm x reference_steps
    c.budget.reference_arm = "moe"
    c.budget.reference_steps = 400
    c.num_evals = 8
    return c
