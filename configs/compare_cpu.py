"""CPU-sized FLOP-matched comparison on the shipped corpus (King James Bible): dense vs MoE, 3 seeds each.

    python -m moe_jax.compare --config configs/compare_cpu.py --workdir runs/compare_cpu

Both arms are configs/cpu.py-sized (d_model 128, 4 layers, 4 heads, vocab 4096, seq 128, batch 16, Muon + AdamW,
warmup + cosine) and keep the seed architectures' ratios (configs/dense.py vs configs/moe.py):
  dense - a GELU FFN with d_ff 512 (4 x d_model) in every layer;
  moe   - 8 experts of d_ff 512, top-2, in every layer (capacity factor 1.25): 2x the dense arm's active FFN.
Also defined (add them to arm_names): moe_same_active (8 experts of d_ff 256 top-2: the dense arm's active
parameters) and dense_same_total (a dense FFN with the MoE arm's total parameters, d_ff 4096).

Budget: the training FLOPs of 250 MoE steps, 5.851e12 FLOPs per run: dense 346 steps (708,608 tokens), MoE 250 steps
(512,000 tokens), about half an epoch of the 1.0 M training tokens. 8 evaluations per run (16 x 16 validation
windows), the same training-token order and validation windows for every run.

Time estimate (2-core CPU; timed with this config's steps while other jobs shared the CPU, the fastest intervals
taken as the quiet speed): dense ~0.46 s/step, MoE ~0.9 s/step (the trainer and `python -m moe_jax.bench` agree;
contended intervals were 1.5-1.8x slower), setup + compilation ~20 s per run, 8 evaluations ~15 s (dense) and ~30 s
(MoE) per run. Per seed: 346 x 0.46 + 250 x 0.9 + ~100 s = ~8 min; 3 seeds: ~24 minutes on a quiet CPU (expect
35-40 minutes on a busy one). Re-running the command after an interruption resumes where it stopped.
"""

import ml_collections

from moe_jax import config_lib


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
