"""Seed 004's SmallBatch claim as the seed defined it, beside the fair version: the seed ran every variant for 300
"steps" that were micro-batches, so SmallBatch (batch 8, accumulation 4) got half the optimizer steps and half the
tokens of the baseline (batch 16, accumulation 2), at the baseline's learning rate, and won by 6.2% of validation
loss. Here, on the architecture study's baseline (architecture.seed004_study), three arms with 5 replicates:

    Baseline        the baseline at its own bracketed learning rate;
    SmallBatch      batch 8 x 4, the baseline's tokens per step and steps (the fair version: the same gradient up to
                    accumulation order), its own bracketed learning rate;
    SmallBatchSeed  batch 8 x 4 with as many micro-batches as the baseline (budget.arm_kinds 'micro_batches': half
                    the steps and tokens) at the baseline's chosen learning rate (lr_from): the seed's comparison.

Both are compared with the baseline (Holm over the 2 comparisons).

    python -m moe_jax.studies --config configs/studies/smallbatch.py --workdir runs/studies/smallbatch
    python -m moe_jax.studies --config configs/studies/smallbatch.py:tiny --workdir runs/studies/smallbatch_tiny

'cpu' scale: the budget is 530 baseline steps of 4,096 tokens (two epochs), so SmallBatchSeed still trains one epoch
(at the architecture study's one-epoch budget it would get half an epoch: validation 3.99 in a one-run calibration,
worse than the bigram's 3.86, which would leave nothing to rank). 2 arms x (3 grid values on replicate 0 + 4 at the
chosen value) + 5 SmallBatchSeed runs of half length = 19 runs: about 1.5 hours with one process per core
(docs/studies/README.md, "Scale").
"""

import os

import ml_collections

from moe_jax import cli


def _architecture():
    """configs/studies/architecture.py, loaded by path (configs/ is not a package)."""
    return cli.load_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "architecture.py"))


def get_config(arg=None):
    s, scale = _architecture().seed004_study("smallbatch", arg)
    t = s.base.train
    small = {"train": {"batch_size": t.batch_size // 2, "grad_accum": 4}}
    s.arms = ml_collections.ConfigDict({"Baseline": {}, "SmallBatch": small, "SmallBatchSeed": small})
    s.arm_names = "Baseline,SmallBatch,SmallBatchSeed"
    s.lr_from = ml_collections.ConfigDict({"SmallBatchSeed": "Baseline"})
    s.budget = ml_collections.ConfigDict({"kinds": ("model_flops",), "amount": 0.0, "reference_arm": "Baseline",
                                          "reference_steps": 530 if scale == "cpu" else 40,
                                          "arm_kinds": {"SmallBatchSeed": "micro_batches"}})
    s.conclusions = CONCLUSIONS
    return s


CONCLUSIONS = """
Seed 004 found SmallBatch best by 6.2% from one run per variant, SmallBatch having half the baseline's optimizer
steps and tokens. SmallBatchSeed repeats that comparison (same micro-batches, the baseline's learning rate) with five
replicates; SmallBatch is the fair version (same tokens and steps). If SmallBatchSeed is not better than the baseline
while SmallBatch equals it, the seed's win came neither from the batch shape nor from the smaller budget, but from
its single run. Small models, one corpus, two epochs; nothing here about the seed's 302 M-parameter model.
"""
