"""Budget conventions: what one optimizer step of a config costs, and how many steps a budget buys.

Five conventions (`KINDS`); every study table shows a run's cost under the FLOP and token ones, and names the one its
steps were set by:

    model_flops     flops.flops_per_step: training FLOPs/token (3 x forward, k active experts, causal attention,
                    router) x tokens/step. Capacity padding, dispatch/combine and the optimizer are not counted.
    executed_flops  flops.executed_flops_per_step: what the step computes (flops_per_token's executed_training:
                    the model's products and their gradients, attention as its kernel computes it, capacity padding
                    and dispatch/combine with the gradients they have, remat's recomputation) x tokens/step + the
                    optimizer's Newton-Schulz FLOPs (flops.optimizer_flops_per_step: ns_steps iterations of
                    4 m^2 n + 2 m^3 per Muon matrix).
    tokens          train.batch_size x train.grad_accum x train.seq_len per step.
    wall_seconds    measured seconds per training step of the arm (a calibration run, `runner.calibrate`).
    micro_batches   train.grad_accum per step: the seeds counted their "steps" in micro-batches, so an arm with more
                    accumulation got fewer optimizer steps and tokens (a study's budget.arm_kinds reproduces that for
                    one arm: plan.arm_steps).

steps(arm) = max(1, round(budget / cost_per_step(arm))), so |steps x cost - budget| <= cost / 2: any two arms
differ by at most one step's cost. The budget is `budget.amount`, or when it is 0 `budget.reference_steps` steps of
`budget.reference_arm` under the same convention.
"""

from __future__ import annotations

from moe_jax.model import flops

KINDS = ("model_flops", "executed_flops", "tokens", "wall_seconds", "micro_batches")
UNITS = {"model_flops": "model FLOPs", "executed_flops": "executed FLOPs", "tokens": "tokens",
         "wall_seconds": "wall seconds", "micro_batches": "micro-batches"}
FORMULAS = {
    "model_flops": "model FLOPs/step = training FLOPs/token x batch_size x grad_accum x seq_len; training FLOPs/"
                   "token = 3 x forward; forward = 2 x (attention + dense FFN + k active experts + output head "
                   "parameters) + causal attention scores 2*S*d_model per layer + router 2*d_model*E per MoE layer "
                   "(embedding lookup, norms, softmaxes and the loss not counted; capacity padding, dispatch/combine "
                   "and the optimizer not counted)",
    "executed_flops": "executed FLOPs/step = executed training FLOPs/token x tokens/step + Newton-Schulz FLOPs/step; "
                      "executed FLOPs/token = every product the training step computes: the model's matmuls and "
                      "router 3x, attention scores as the kernel computes them (blocked: whole key blocks up to each "
                      "query block, all of S x S at S <= the block) 3x, capacity padding 3x, dispatch and combine "
                      "einsums 2x (the one-hot mask has no gradient), remat's recomputed forward "
                      "(moe_jax/model/flops.py); Newton-Schulz FLOPs/step: per Muon matrix [m, n], "
                      "m <= n, per iteration 2m^2n for X X^T + 2m^3 for A^2 + 2m^2n for B X; optim.ns_steps "
                      "iterations, once per optimizer step",
    "tokens": "tokens/step = batch_size x grad_accum x seq_len",
    "wall_seconds": "seconds/step measured by a calibration run per arm (median over its logging intervals after "
                    "the first, so compilation and warm-up are excluded)",
    "micro_batches": "micro-batches/step = grad_accum",
}


def tokens_per_step(config) -> int:
    t = config.train
    return int(t.batch_size * t.grad_accum * t.seq_len)


def cost_per_step(config, kind: str, seconds_per_step: float | None = None) -> float:
    """One optimizer step of `config` under convention `kind` (see the module docstring)."""
    if kind == "model_flops":
        return flops.flops_per_step(config)
    if kind == "executed_flops":
        return flops.executed_flops_per_step(config)
    if kind == "tokens":
        return float(tokens_per_step(config))
    if kind == "micro_batches":
        return float(config.train.grad_accum)
    if kind == "wall_seconds":
        if not seconds_per_step or seconds_per_step <= 0:
            raise ValueError("wall_seconds needs a measured seconds_per_step (runner.calibrate)")
        return float(seconds_per_step)
    raise ValueError(f"unknown budget kind {kind!r}; choose one of {KINDS}")


def steps_for(budget: float, per_step: float) -> int:
    return max(1, int(round(budget / per_step)))


def costs(config, steps: int) -> dict:
    """A run's cost under the three conventions known before it runs (wall seconds are measured)."""
    fpt = flops.run_flops_per_token(config)
    return {"model_flops": steps * flops.flops_per_step(config),
            "executed_flops": steps * flops.executed_flops_per_step(config),
            "optimizer_flops": steps * flops.optimizer_flops_per_step(config.model, config.optim),
            "padding_flops": steps * tokens_per_step(config) * fpt["dispatch_overhead_training"],
            "tokens": steps * tokens_per_step(config), "micro_batches": steps * config.train.grad_accum}
