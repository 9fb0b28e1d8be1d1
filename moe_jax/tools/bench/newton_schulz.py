"""`--mode newton-schulz`: accuracy and speed of Muon's Newton-Schulz chains on their own (docs/optimizer.md, "Gram
space"): the relative Frobenius error of each chain against float64 X-space Newton-Schulz on matrices of chosen
singular values, and the time of each chain on stacks of such matrices (jitted, median of --rounds).

    python -m moe_jax.bench --mode newton-schulz --rows 384 --cols 1536 --stack 8 --groups 2 --rounds 5

Chains: float32 X space (optax's), bfloat16 X space (moe_jax: bfloat16 operands, float32 products and sums), float32
Gram space (moe_jax `ns_method='gram'`), bfloat16 X space with every product rounded to bfloat16 (the seeds' PyTorch
arithmetic, `optim.ns_rounding='every_op'`, offered for seed fidelity only: twice the error) and bfloat16 Gram space
(not offered: diverges on ill-conditioned matrices). Last, the GFLOP/s of one [rows, cols] x [cols, rows] product per operand and result
dtype.
"""

from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import cli
from moe_jax.optim import muon
from moe_jax.tools.bench import common

FLAGS_READ = ("rows", "cols", "stack", "groups", "rounds")
ROUNDS = 5


def spectra(m: int) -> dict:
    """Singular values (m of them) of the test matrices, by name."""
    return {"uniform in 0.2 .. 1": np.linspace(0.2, 1.0, m),
            "logspace 1 .. 1e-4": np.logspace(0, -4, m),
            "rank 8 + 1e-3 floor": np.concatenate([np.ones(min(8, m)), np.full(max(0, m - 8), 1e-3)]),
            "1/i": 1.0 / np.arange(1, m + 1)}


def gram_bfloat16(x):
    """The rejected variant: Gram space with bfloat16 operands, float32 products."""
    f32, bf = jnp.float32, jnp.bfloat16

    def mm(p, q):
        return jnp.matmul(p.astype(bf), q.astype(bf), preferred_element_type=f32)

    c = [float(v) for v in muon.NS_COEFFS]
    x = x / (jnp.linalg.norm(x, axis=(-2, -1), keepdims=True) + 1e-8)
    a = mm(x, jnp.swapaxes(x, -1, -2))
    eye = jnp.eye(x.shape[-2], dtype=f32)
    r = None
    for k in range(5):
        q = c[0] * eye + c[1] * a + c[2] * mm(a, a)
        r = q if r is None else mm(q, r)
        if k < 4:
            a = mm(mm(q, a), q)
    return mm(r, x)


def chains() -> dict:
    """{name: chain [..., m, n] -> [..., m, n]}: the ones moe_jax offers and the one it does not."""
    coeffs = jnp.asarray(muon.NS_COEFFS)
    return {"float32 X space": lambda x: muon.newton_schulz(x, coeffs, 5, 1e-8),
            "bfloat16 X space, bfloat16 products (the seeds')":
                lambda x: muon.newton_schulz(x, coeffs, 5, 1e-8, jnp.bfloat16, rounding="every_op"),
            "bfloat16 X space": lambda x: muon.newton_schulz(x, coeffs, 5, 1e-8, jnp.bfloat16),
            "float32 Gram space": lambda x: muon.newton_schulz_gram(x, coeffs, 5, 1e-8),
            "bfloat16 Gram space (not offered)": gram_bfloat16}


def float64_reference(x: np.ndarray) -> np.ndarray:
    """Five X-space Newton-Schulz steps in float64 (the definition every chain implements)."""
    a_, b_, c_ = (float(np.float32(v)) for v in muon.NS_COEFFS)
    x = np.asarray(x, np.float64)
    x = x / (np.linalg.norm(x, axis=(-2, -1), keepdims=True) + 1e-8)
    for _ in range(5):
        a = x @ np.swapaxes(x, -1, -2)
        x = a_ * x + (b_ * a + c_ * a @ a) @ x
    return x


def errors(m: int, n: int, stack: int, rng: np.random.Generator, out=print) -> dict:
    """{spectrum: {chain: relative Frobenius error against float64_reference}} on `stack` [m, n] matrices drawn
    from `rng`."""
    fns = chains()
    result = {}
    for name, s in spectra(m).items():
        u = np.linalg.qr(rng.standard_normal((stack, m, m)))[0]
        v = np.linalg.qr(rng.standard_normal((stack, n, m)))[0]
        x = ((u * s[None, None, :]) @ np.swapaxes(v, -1, -2)).astype(np.float32)
        ref = float64_reference(x)
        result[name] = {}
        for chain, fn in fns.items():
            got = np.asarray(jax.jit(fn)(jnp.asarray(x)), np.float64)
            result[name][chain] = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
        out(f"{name:22s} " + "  ".join(f"{c}: {e:.1e}" for c, e in result[name].items()))
    return result


def chain_times(m: int, n: int, stack: int, groups: int, rounds: int, rng: np.random.Generator, out=print) -> dict:
    """{chain: median seconds of one jitted call on `groups` stacks of [stack, m, n] Gaussian matrices drawn from
    `rng`}."""
    xs = [jnp.asarray(rng.standard_normal((stack, m, n)), jnp.float32) for _ in range(groups)]
    times = {}
    for chain, fn in chains().items():
        f = jax.jit(lambda g, fn=fn: [fn(x) for x in g])
        jax.block_until_ready(f(xs))
        times[chain] = statistics.median(common.time_call(lambda: f(xs)) for _ in range(rounds))
        out(f"{chain:50s} {1e3 * times[chain]:8.1f} ms for {groups} x [{stack}, {m}, {n}]")
    return times


def dot_rates(m: int, n: int, rounds: int, out=print) -> dict:
    """GFLOP/s of one [m, n] x [n, m] product per operand -> result dtype (XLA's kernel choice depends on both)."""
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((m, n)), rng.standard_normal((n, m))
    rates = {}
    for name, dt, res in (("float32 -> float32", jnp.float32, jnp.float32),
                          ("bfloat16 -> float32", jnp.bfloat16, jnp.float32),
                          ("bfloat16 -> bfloat16", jnp.bfloat16, jnp.bfloat16)):
        f = jax.jit(lambda p, q, res=res: jnp.matmul(p, q, preferred_element_type=res))
        args = (jnp.asarray(a, dt), jnp.asarray(b, dt))
        jax.block_until_ready(f(*args))
        ts = [common.time_call(lambda: f(*args)) for _ in range(max(5, rounds))]
        rates[name] = 2.0 * m * n * m / min(ts) / 1e9
        out(f"dot [{m}, {n}] x [{n}, {m}] {name:22s} {rates[name]:7.1f} GFLOP/s (best of {len(ts)})")
    return rates


def run(m: int, n: int, stack: int, groups: int, rounds: int = ROUNDS, out=print) -> dict:
    """{'shape', 'errors': {spectrum: {chain: relative Frobenius error}}, 'times_s': {chain: median seconds},
    'dot_gflops': {operand -> result dtype: GFLOP/s}}."""
    if not 0 < m <= n:
        raise cli.UsageError(f"--rows {m} --cols {n}: need 0 < rows <= cols (the chains take the smaller "
                             "side first)")
    for name, value in (("stack", stack), ("groups", groups), ("rounds", rounds)):
        if value < 1:
            raise cli.UsageError(f"--{name} {value}: must be >= 1")
    rng = np.random.default_rng(0)  # one stream: the accuracy matrices, then the timed ones
    return {"shape": {"rows": m, "cols": n, "stack": stack, "groups": groups, "rounds": rounds},
            "errors": errors(m, n, stack, rng, out), "times_s": chain_times(m, n, stack, groups, rounds, rng, out),
            "dot_gflops": dot_rates(m, n, rounds, out)}


def from_flags() -> dict:
    """`--mode newton-schulz` from the command line."""
    from absl import flags

    FLAGS = flags.FLAGS
    return run(FLAGS.rows, FLAGS.cols, FLAGS.stack, FLAGS.groups, FLAGS.rounds or ROUNDS,
               out=lambda s: print(s, flush=True))
