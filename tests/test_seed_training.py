"""configs/seeds/* train as the seeds trained: moe_jax's compiled train step with a seed config (shrunk to the
fixture's shape; dropout and router noise 0; Newton-Schulz in float32) reproduces each seed's own PyTorch training
run, step for step: the loss of every optimizer step, the learning rates and momenta, the (zero) update of step 1 and
the update of step 2 of every parameter. Turning any one of the seed options off breaks the match.

No PyTorch needed: tests/fixtures/seed_training/ holds the weights, the batches and what the seeds' code computed,
written by scripts/seed_training_fixture.py from the seeds' repositories (commits and file hashes in fixtures.json).
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import sharding
from moe_jax.model import transformer as model
from moe_jax.optim import chain, muon
from moe_jax.train import step as step_lib
from seed_helpers import ROOT, seed_config, seed_layout, to_params

FIXTURES = ROOT / "tests" / "fixtures" / "seed_training"
META = json.loads((FIXTURES / "fixtures.json").read_text())
STEPS = META["steps"]
BY_NAME = {fx["seed_model"]: fx for fx in META["fixtures"]}


def train_config(fx: dict, **overrides):
    """The seed config at the fixture's shape and length: sizes, the seed's micro-batch count as the schedule's length
    (train.steps x grad_accum, as the seeds' max_steps), dropout and router noise 0, Newton-Schulz float32."""
    s = META["shape"]
    sizes = {"train.steps": STEPS, "train.batch_size": s["batch"], "train.grad_accum": fx["grad_accum"],
             "optim.schedule_steps": STEPS * fx["grad_accum"], "model.dropout": 0.0, "moe.router_noise_std": 0.0,
             "optim.ns_dtype": "float32"}
    return seed_config(fx["seed_model"], s, s["seq_len"], **{**sizes, **overrides})


def load(fx: dict) -> dict:
    z = np.load(FIXTURES / fx["file"])
    return {k: z[k] for k in z.files}


def seed_weights(fx: dict, data: dict) -> dict:
    """{'w/<seed name>': float32}: the int8 grid values times their power of two (exact in float32)."""
    return {f"w/{p['name']}": data[f"q/{p['name']}"].astype(np.float32) * np.float32(2.0 ** p["exp"])
            for p in fx["params"]}


def step_batch(tokens: np.ndarray, step: int, accum: int) -> dict:
    """Optimizer step `step`'s batch [A*B, S]: the seed's micro-batch step*A + a is moe_jax's micro-batch a, rows
    a, a+A, ... (train/step.py splits rows a::A)."""
    t = np.swapaxes(tokens[step * accum:(step + 1) * accum].astype(np.int32), 0, 1)  # [B, A, S+1]
    t = t.reshape(-1, t.shape[-1])
    return {"inputs": t[:, :-1], "targets": t[:, 1:], "weights": np.ones(t[:, 1:].shape, np.float32)}


def train(config, fx: dict, data: dict, steps: int = STEPS):
    """moe_jax's compiled train step (train/step.py, one device) from the fixture's weights over its batches: (losses
    [steps], parameters after each step as pure dicts)."""
    params = to_params(seed_weights(fx, data), fx["seed_model"], config)
    graphdef, abstract = model.abstract(config.model)
    tx = chain.build(config.optim, config.train.steps)
    mesh = sharding.build_mesh((1, 1, 1), devices=jax.devices()[:1])
    abstract_state = step_lib.abstract_train_state(abstract, tx, mesh)
    shardings = jax.tree.map(lambda s: s.sharding, abstract_state)
    state = jax.device_put(step_lib.init_state(config.seed, params, tx), shardings)
    first = step_batch(data["tokens"], 0, fx["grad_accum"])
    exe, b_shard = step_lib.compile_train_step(config.train, graphdef, tx, abstract_state, mesh,
                                               step_lib.batch_like(first, first["inputs"].shape[0]))
    losses, after = [], []
    for s in range(steps):
        state, metrics = exe(state, step_lib.to_global(step_batch(data["tokens"], s, fx["grad_accum"]), b_shard))
        losses.append(float(metrics["loss"]))
        after.append(jax.tree.map(np.asarray, state["params"]))
    return np.asarray(losses), [params] + after


# Tolerances, from float32's error in this computation. The noise floor was measured by perturbing every initial
# weight by one float32 ulp (x (1 +- 2^-24)) and training moe_jax again: it moves the losses by 4.8e-7 (one ulp at
# 4.8), the step-2 updates of the attention and FFN matrices by <= 6e-6 (relative Frobenius) and of the routers by
# <= 3.6e-5 (small, cancelling gradients, which Newton-Schulz normalises). moe_jax against the seeds measured
# <= 3.4e-6 (losses), <= 7e-6 (matrices), <= 3.8e-5 (routers) (2026-12-05, torch 2.13 CPU vs jax 0.10.2 CPU).
# An update is read as the difference of two float32 parameters, so it also carries their rounding: one ulp of the
# parameter per side (a norm scale near 1 has ulp 1.2e-7 against an update of 2.5e-4: 5e-4 relative).
LOSS_ATOL = 1e-5  # ~20 ulps of the loss; every seed option but ns_eps moves some loss by >= 1.2e-4
UPDATE_RTOL = 2e-5  # ~3x the matrices' floor
ROUTER_RTOL = 1e-4  # ~3x the routers' floor
PARAM_ULPS = 2.0


def update_ratios(fx: dict, data: dict, config, after: list) -> dict:
    """{seed parameter: error / tolerance} of the step-2 update at the fixture's positions, with error
    ||u_moe_jax - u_seed|| and tolerance rtol ||u_seed|| + PARAM_ULPS ||ulp(parameter)||."""
    shapes = {p["name"]: tuple(p["shape"]) for p in fx["params"]}
    u2 = seed_layout(jax.tree.map(np.subtract, after[2], after[1]), shapes, fx["seed_model"], config)
    w1 = seed_layout(after[1], shapes, fx["seed_model"], config)
    out = {}
    for n in shapes:
        pos = data[f"u2i/{n}"].astype(np.int64)
        want, got = data[f"u2/{n}"], u2[n].reshape(-1)[pos]
        ulp = np.spacing(np.abs(w1[n].reshape(-1)[pos]).astype(np.float32))
        tol = (ROUTER_RTOL if "router" in n else UPDATE_RTOL) * np.linalg.norm(want) + PARAM_ULPS * np.linalg.norm(ulp)
        out[n] = float(np.linalg.norm(got - want) / tol)
    return out


def mismatch(fx: dict, data: dict, config) -> dict:
    """Train `config` on the fixture; each comparison as a ratio to its tolerance (<= 1: reproduced): 'loss' (worst
    step), 'update1' (step 1 must leave every parameter unchanged: the seeds' first step is at lr 0), 'update2' (worst
    parameter); with the raw differences for reports."""
    losses, after = train(config, fx, data)
    u1 = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(after[1]), jax.tree.leaves(after[0])))
    ratios = update_ratios(fx, data, config, after)
    worst = max(ratios, key=ratios.get)
    dloss = float(np.max(np.abs(losses - data["losses"])))
    return {"loss": dloss / LOSS_ATOL, "update1": math.inf if u1 else 0.0, "update2": ratios[worst],
            "worst_param": worst, "loss_diff": dloss, "update1_absmax": u1}


QUICK = "exp5_moe"  # the quick tier trains one seed (the one with the most options); the full suite all four
REPRODUCED = [pytest.param(n, marks=() if n == QUICK else pytest.mark.slow) for n in sorted(BY_NAME)]


@pytest.mark.parametrize("name", REPRODUCED)
def test_seed_config_reproduces_the_seeds_training_steps(name):
    fx = BY_NAME[name]
    m = mismatch(fx, load(fx), train_config(fx))
    assert fx["update1_absmax"] == 0.0 and m["update1_absmax"] == 0.0, m
    assert m["loss"] <= 1.0, f"losses differ by {m['loss_diff']:.2e} > {LOSS_ATOL:.0e}"
    assert m["update2"] <= 1.0, f"step-2 update of {m['worst_param']}: {m['update2']:.2f} x the tolerance"


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_schedules_are_the_seeds(name):
    """Every step's learning rates (Muon and AdamW) and Muon momentum, as the seeds' optimizers held them."""
    fx = BY_NAME[name]
    o = train_config(fx).optim
    for s in range(STEPS):
        lrs = chain.learning_rates(o, STEPS, s)
        assert lrs["muon_lr"] == pytest.approx(fx["lrs"]["muon"][s], rel=1e-6, abs=1e-12), s
        assert lrs["adamw_lr"] == pytest.approx(fx["lrs"]["adamw"][s], rel=1e-6, abs=1e-12), s
        beta = chain.momentum(o)
        want = fx["muon_momentum"][s] if fx["muon_momentum"] else 0.95
        assert float(beta(s) if callable(beta) else beta) == pytest.approx(want, rel=1e-6), s


# Each seed option turned off (back to moe_jax's default, or the other form), on a seed that has it: the match must
# break. (fixture, field, value)
FLIPS = [
    ("seed002_dense", "optim.muon_fused_qkv", False),
    ("seed002_dense", "optim.muon_bias_correction", True),
    ("seed002_dense", "optim.decay_norms", False),
    ("seed002_dense", "optim.schedule_steps", 0),
    ("seed002_dense", "optim.warmup_from_zero", False),
    ("exp5_moe", "optim.ns_eps", 1e-8),
    ("exp5_moe", "moe.load_balance_form", "switch"),
    ("seed002_moe", "moe.load_balance_form", "prob_squares"),
    ("seed004_baseline", "optim.momentum_warmup_steps", 0),
    ("seed004_baseline", "optim.muon_fused_qkv", False),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, field, value", FLIPS, ids=[f"{n}:{f}={v}" for n, f, v in FLIPS])
def test_each_seed_option_matters(name, field, value):
    fx = BY_NAME[name]
    m = mismatch(fx, load(fx), train_config(fx, **{field: value}))
    assert max(m["loss"], m["update1"], m["update2"]) > 2.0, f"{field}={value!r} still matches: {m}"


# ------------------------------------------------------------------------------------------------ Newton-Schulz

NS = np.load(FIXTURES / META["newton_schulz"]["file"])
NS_SEEDS = META["newton_schulz"]["dtypes"]  # {seed: 'bfloat16' | 'float16'}


def seed_newton_schulz(x: np.ndarray, eps: float, ns_dtype=None, rounding: str = "operands") -> np.ndarray:
    """moe_jax's Newton-Schulz of one matrix, oriented as muon.orthogonalize does (smaller side first)."""
    tall = x.shape[0] > x.shape[1]
    y = muon.newton_schulz(jnp.asarray(x.T if tall else x), jnp.asarray(muon.NS_COEFFS), META["newton_schulz"]
                           ["steps"], eps, ns_dtype, rounding)
    return np.asarray(y).T if tall else np.asarray(y)


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("seed", sorted(NS_SEEDS))
@pytest.mark.parametrize("matrix", ["wide", "tall", "tiny"])
def test_every_op_newton_schulz_is_the_seeds_arithmetic(seed, matrix):
    """optim.ns_rounding='every_op' with the seed's dtype against the seed's own zeropower_via_newtonschulz5 (eager):
    bfloat16 bit for bit; float16 on the float16 grid and within 2e-3 (measured 0 / 0 / 1.2e-3: torch's float16
    matmul rounds the exact sum, ours a float32 sum, and one flipped ulp in the first iteration spreads), where
    rounding only the operands is 4.2e-3..4.5e-2 away."""
    x, want, dt = NS[f"in/{matrix}"], NS[f"{seed}/{matrix}"], NS_SEEDS[seed]
    got = seed_newton_schulz(x, 1e-7, dt, "every_op")
    assert rel(seed_newton_schulz(x, 1e-7, dt), want) > 4e-3
    if dt == "bfloat16":
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_array_equal(got.astype(np.float16).astype(np.float32), got)
        assert rel(got, want) <= 2e-3


@pytest.mark.parametrize("seed", sorted(NS_SEEDS))
def test_newton_schulz_eps_is_the_seeds(seed):
    """optim.ns_eps=1e-7 (the seeds') in float32 against the seed's own iteration in float32: 1e-6 on a matrix of
    Frobenius norm 3e-4, where optax's 1e-8 is 1e-3 away."""
    x, want = NS["in/tiny"], NS[f"{seed}/f32/tiny"]
    assert rel(seed_newton_schulz(x, 1e-7), want) < 2e-6
    assert rel(seed_newton_schulz(x, 1e-8), want) > 1e-4
