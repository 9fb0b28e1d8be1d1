"""moe_jax/optim/muon.py's Newton-Schulz chains on their own (tests/test_optimizer.py tests the whole transformation against
optax.contrib.muon): the bfloat16 chain's arithmetic, the seeds' every-op rounding, and the Gram-space chain against a float64 X-space reference
on well- and ill-conditioned matrices, wide and tall, one at a time and stacked."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from optax.contrib import MuonDimensionNumbers

from moe_jax.optim import muon

COEFFS = jnp.asarray(muon.NS_COEFFS)


def rel_frobenius(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def ns_float64(x: np.ndarray, steps: int = 5) -> np.ndarray:
    """X-space Newton-Schulz in float64 for [..., m, n] with m <= n (the definition both chains implement)."""
    a_, b_, c_ = (float(np.float32(c)) for c in muon.NS_COEFFS)
    x = np.asarray(x, np.float64)
    x = x / (np.linalg.norm(x, axis=(-2, -1), keepdims=True) + 1e-8)
    for _ in range(steps):
        a = x @ np.swapaxes(x, -1, -2)
        x = a_ * x + (b_ * a + c_ * a @ a) @ x
    return x


def with_spectrum(rng, m: int, n: int, svals: np.ndarray) -> np.ndarray:
    u = np.linalg.qr(rng.standard_normal((m, m)))[0]
    v = np.linalg.qr(rng.standard_normal((n, m)))[0]
    return ((u * svals) @ v.T).astype(np.float32)


SPECTRA = {  # name -> singular values of a 32 x 128 matrix
    "well-conditioned": lambda: np.linspace(0.2, 1.0, 32),
    "logspace 1 .. 1e-4": lambda: np.logspace(0, -4, 32),
    "rank 4 + 1e-3": lambda: np.concatenate([np.ones(4), np.full(28, 1e-3)]),
}


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_every_op_chain_rounds_every_result_to_ns_dtype(dtype):
    """rounding='every_op' (the seeds' torch arithmetic; tests/test_seed_training.py matches their bfloat16 output bit
    for bit): the result lies on ns_dtype's grid and is further from the float64 chain than rounding only the operands;
    float16's subnormals are kept (a matrix of entries ~5e-6, all subnormal in float16, still gives the chain to a few
    percent, where flushing them to zero gives 0 / 0); in float32 it is the plain chain."""
    rng = np.random.default_rng(0)
    x = with_spectrum(rng, 32, 128, np.linspace(0.2, 1.0, 32))
    ref = ns_float64(x)
    every = np.asarray(muon.newton_schulz(jnp.asarray(x), COEFFS, 5, 1e-7, dtype, "every_op"))
    operands = np.asarray(muon.newton_schulz(jnp.asarray(x), COEFFS, 5, 1e-7, dtype))
    np.testing.assert_array_equal(np.asarray(jnp.asarray(every).astype(dtype).astype(jnp.float32)), every)
    assert rel_frobenius(operands, ref) < rel_frobenius(every, ref) < 0.1
    tiny = np.asarray(muon.newton_schulz(jnp.asarray(1e-4 * x), COEFFS, 5, 1e-7, dtype, "every_op"))
    assert np.all(np.isfinite(tiny)) and rel_frobenius(tiny, ref) < 0.1
    np.testing.assert_array_equal(muon.newton_schulz(jnp.asarray(x), COEFFS, 5, 1e-7, jnp.float32, "every_op"),
                                  muon.newton_schulz(jnp.asarray(x), COEFFS, 5, 1e-7))


def test_bfloat16_chain_multiplies_bfloat16_into_float32():
    """Every product of a bfloat16 chain takes bfloat16 operands and returns float32 (XLA:CPU's fast bfloat16 dot
    needs the float32 result; GPUs/TPUs accumulate in float32 anyway), and the result equals a float64 emulation of
    that arithmetic: operands rounded to bfloat16, products and sums exact."""
    x = jax.random.normal(jax.random.key(0), (3, 16, 40), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda v: muon.newton_schulz(v, COEFFS, 5, 1e-8, jnp.bfloat16))(x)
    dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 15
    for e in dots:
        assert [v.aval.dtype for v in e.invars] == [jnp.bfloat16] * 2 and e.outvars[0].aval.dtype == jnp.float32

    def bf(v):
        return np.asarray(jnp.asarray(v, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32), np.float64)

    a_, b_, c_ = (float(np.float32(c)) for c in muon.NS_COEFFS)
    ref = []
    for m in np.asarray(x):
        y = bf(m / (np.linalg.norm(m) + np.float32(1e-8)))
        for _ in range(5):
            a = y @ y.T
            b = bf(b_ * a + c_ * (bf(a) @ bf(a)))
            xf = a_ * y + b @ y
            y = bf(xf)
        ref.append(xf)
    got = muon.newton_schulz(x, COEFFS, 5, 1e-8, jnp.bfloat16)
    assert got.dtype == jnp.float32
    assert rel_frobenius(got, np.stack(ref)) < 2e-3  # float32 vs float64 sums; bfloat16 operand ties may differ


@pytest.mark.parametrize("spectrum", list(SPECTRA))
def test_gram_chain_equals_the_float64_x_space_chain(spectrum):
    """Same polynomial, iterated on the Gram matrix: within 1e-3 (well-conditioned: 2e-5) of float64 X-space NS,
    where the bfloat16 X-space chain that the reference Muon runs is off by 1e-2 or more."""
    rng = np.random.default_rng(1)
    x = np.stack([with_spectrum(rng, 32, 128, SPECTRA[spectrum]()) for _ in range(3)])  # [3, 32, 128]
    ref = ns_float64(x)
    gram = muon.newton_schulz_gram(jnp.asarray(x), COEFFS, 5, 1e-8)
    std32 = muon.newton_schulz(jnp.asarray(x), COEFFS, 5, 1e-8)
    std16 = muon.newton_schulz(jnp.asarray(x), COEFFS, 5, 1e-8, jnp.bfloat16)
    assert gram.dtype == jnp.float32 and gram.shape == x.shape
    err = rel_frobenius(gram, ref)
    assert err < (2e-5 if spectrum == "well-conditioned" else 1e-3), err
    assert rel_frobenius(std32, ref) < 1e-4
    assert rel_frobenius(std16, ref) > 5 * err
    for i in range(3):  # each matrix on its own: stacking never mixes them
        np.testing.assert_allclose(muon.newton_schulz_gram(jnp.asarray(x[i]), COEFFS, 5, 1e-8), gram[i],
                                   rtol=1e-5, atol=1e-6)


def test_gram_chain_is_cheaper_by_its_matmul_shapes():
    """One product contracts over n (A_0 = X X^T) and one has n columns (R X_0); the other 4 steps - 3 are m x m:
    4 m^2 n + (8 steps - 6) m^3 FLOPs against steps (4 m^2 n + 2 m^3) in X space."""
    m, n, steps = 32, 128, 5
    x = jnp.zeros((m, n), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda v: muon.newton_schulz_gram(v, COEFFS, steps, 1e-8))(x)
    flops = 0
    for e in jaxpr.eqns:
        if e.primitive.name == "dot_general":
            (lc, _), _ = e.params["dimension_numbers"]
            k = int(np.prod([e.invars[0].aval.shape[d] for d in lc]))
            flops += 2 * k * int(np.prod(e.outvars[0].aval.shape))
            assert e.params["precision"] is not None and "HIGHEST" in str(e.params["precision"])
    assert flops == 4 * m * m * n + (8 * steps - 6) * m ** 3
    assert flops < steps * (4 * m * m * n + 2 * m ** 3)


def test_orthogonalize_uses_gram_space_only_for_wide_matrices():
    """method='gram': a 32 x 128 (or tall 128 x 32) weight goes through the Gram chain, a square 32 x 32 one through
    the X-space chain in ns_dtype, so square results equal method='standard' exactly."""
    rng = np.random.default_rng(2)
    tree = {"wide": jnp.asarray(rng.standard_normal((32, 128)), jnp.float32),
            "tall": jnp.asarray(rng.standard_normal((128, 32)), jnp.float32),
            "square": jnp.asarray(rng.standard_normal((32, 32)), jnp.float32),
            "experts": jnp.asarray(rng.standard_normal((4, 32, 96)), jnp.float32)}
    dims = {"wide": MuonDimensionNumbers(), "tall": MuonDimensionNumbers(), "square": MuonDimensionNumbers(),
            "experts": MuonDimensionNumbers(reduction_axis=1, output_axis=2)}
    std = muon.orthogonalize(tree, dims, COEFFS, 5, 1e-8, None, lambda p: str(p), "standard")
    gram = muon.orthogonalize(tree, dims, COEFFS, 5, 1e-8, None, lambda p: str(p), "gram")
    np.testing.assert_array_equal(gram["square"], std["square"])
    np.testing.assert_allclose(gram["wide"], muon.newton_schulz_gram(tree["wide"], COEFFS, 5, 1e-8), rtol=1e-6,
                               atol=1e-7)
    np.testing.assert_allclose(gram["tall"], muon.newton_schulz_gram(tree["tall"].T, COEFFS, 5, 1e-8).T, rtol=1e-6,
                               atol=1e-7)
    for k in ("wide", "tall", "experts"):
        assert gram[k].shape == tree[k].shape
        assert rel_frobenius(gram[k], std[k]) < 1e-4, k
    with pytest.raises(ValueError, match="unknown Newton-Schulz method 'polar'"):
        muon.orthogonalize(tree, dims, COEFFS, 5, 1e-8, method="polar")


def test_distributed_orthogonalize_is_the_per_matrix_result():
    """Distributed Muon's grouping (every matrix of one oriented shape in one stack, padded with zero matrices to a
    multiple of the devices, [n, m] ones transposed in) changes nothing per matrix: without a mesh (one 'device')
    and under an 8-device mesh it equals orthogonalize's per-parameter chains to float32 rounding."""
    from moe_jax import sharding
    rng = np.random.default_rng(0)
    tree = {"wq": rng.normal(size=(16, 32)), "wo": rng.normal(size=(32, 16)), "experts": rng.normal(size=(3, 16, 32)),
            "odd": rng.normal(size=(8, 24))}
    tree = {k: jnp.asarray(v, jnp.float32) for k, v in tree.items()}
    dims = {"wq": None, "wo": None, "experts": MuonDimensionNumbers(1, 2), "odd": None}
    coeffs = jnp.asarray(muon.NS_COEFFS)
    ref = muon.orthogonalize(tree, dims, coeffs, 5, 1e-8, group_key=lambda path: jax.tree_util.keystr(path))
    alone = muon.orthogonalize(tree, dims, coeffs, 5, 1e-8, distributed=True)
    mesh = sharding.build_mesh((-1, 1, 1))
    with jax.set_mesh(mesh):  # the stack of 5 [16, 32] matrices is padded to 8, one per device
        spread = jax.jit(lambda t: muon.orthogonalize(t, dims, coeffs, 5, 1e-8, distributed=True))(tree)
    for k in tree:
        np.testing.assert_allclose(alone[k], ref[k], rtol=0, atol=2e-6, err_msg=k)
        np.testing.assert_allclose(spread[k], ref[k], rtol=0, atol=2e-6, err_msg=k)


def _compiled_update_flops(fsdp: bool):
    """(XLA's per-device FLOPs, RunConfig) of the smoke model's optimizer update on the 8-device (8, 1, 1) mesh:
    replicated parameters and Newton-Schulz, or FSDP with distributed Muon."""
    from smoke_helpers import run_config
    from moe_jax import sharding
    from moe_jax.model import transformer as model
    from moe_jax.optim import chain
    from moe_jax.train import step as train_step
    run = run_config("smoke", **{"mesh.shape": (8, 1, 1), "mesh.fsdp": fsdp, "optim.ns_dtype": "float32"})
    mesh = sharding.build_mesh(run.mesh)
    tx = chain.build(run.optim, run.train.steps, distributed_muon=fsdp)
    state = train_step.abstract_train_state(model.abstract(run.model)[1], tx, mesh, fsdp)
    sh = jax.tree.map(lambda s: s.sharding, state)
    with jax.set_mesh(mesh):
        update = jax.jit(tx.update, in_shardings=(sh["params"], sh["opt_state"], sh["params"]),
                         out_shardings=(sh["params"], sh["opt_state"]))
        compiled = update.lower(state["params"], state["opt_state"], state["params"]).compile()
    return float(compiled.cost_analysis()["flops"]), run


def test_distributed_muon_runs_one_eighth_of_the_newton_schulz_flops_per_device():
    """On 8 devices each runs 1/8 of the matrices: XLA's count of the compiled update per device is 1/8 of the
    replicated one plus the elementwise work (momentum, AdamW, clipping: O(parameters)), and equals
    flops.optimizer_flops_per_step(..., devices=8) to that elementwise remainder (measured 0.129 of replicated)."""
    from moe_jax.model import flops
    replicated, run = _compiled_update_flops(False)
    spread, _ = _compiled_update_flops(True)
    counted_1 = flops.optimizer_flops_per_step(run.model, run.optim)
    counted_8 = flops.optimizer_flops_per_step(run.model, run.optim, devices=8)
    assert counted_8 == counted_1 / 8  # the smoke model's stacks (8 attention, 16 expert matrices) divide by 8
    elementwise = 40 * 200_000  # < 40 FLOPs per element of the ~200k parameters (momentum, AdamW, clip)
    assert abs(replicated - counted_1) < elementwise
    assert abs(spread - counted_8) < elementwise / 8 + 1e6
    assert spread / replicated < 1 / 8 + 0.01
