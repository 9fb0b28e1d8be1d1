"""precision.py: 'auto' per backend, and the policy read off the traced program (jaxpr), not only the outputs:
bfloat16 matmul inputs, a float32 router at Precision.HIGHEST, float32 softmaxes/norms/loss, float32 parameters."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.config import resolve
from moe_jax.config import schema as config_lib
from moe_jax.config.typed import NewtonSchulz, parse
from moe_jax.model import layers
from moe_jax.model import precision
from moe_jax.model import transformer as model_lib
from moe_jax.train import step as step_lib


def tiny(kind="moe", dtype="bfloat16", attention="blocked"):
    """A tiny run's ModelConfig (parsed for this backend)."""
    c = config_lib.base_config()
    c.model.update(vocab_size=96, d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0, dtype=dtype,
                   attention=attention, attention_block=8)
    c.moe.update(num_experts=4 if kind == "moe" else 0, top_k=2, d_ff=32, group_size=16)
    c.train.update(batch_size=2, seq_len=16, grad_accum=1, steps=10)
    return parse(c).model


def eqns(jaxpr):
    """Every equation of a (closed) jaxpr, recursing into sub-jaxprs (jit, remat, custom_jvp/vjp, scan...)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for e in jaxpr.eqns:
        yield e
        for v in e.params.values():
            for sub in (v if isinstance(v, (tuple, list)) else (v,)):
                if hasattr(getattr(sub, "jaxpr", sub), "eqns"):  # Jaxpr or ClosedJaxpr (duck-typed across JAX)
                    yield from eqns(sub)


def dots(jaxpr):
    """[(input dtypes, output dtype, precision, output shape, input shapes)] of every dot_general."""
    return [(tuple(v.aval.dtype for v in e.invars), e.outvars[0].aval.dtype, e.params.get("precision"),
             e.outvars[0].aval.shape, tuple(v.aval.shape for v in e.invars))
            for e in eqns(jaxpr) if e.primitive.name == "dot_general"]


def is_highest(p):
    return p is not None and all(x == jax.lax.Precision.HIGHEST for x in (p if isinstance(p, tuple) else (p,)))


# ------------------------------------------------------------------------------------------------ 'auto' resolution


@pytest.mark.parametrize("backend,dtype,attention,ns,stack", [("cpu", "float32", "blocked", "bfloat16", "none"),
                                                              ("gpu", "bfloat16", "cudnn", "bfloat16", "layers"),
                                                              ("cuda", "bfloat16", "cudnn", "bfloat16", "layers"),
                                                              ("tpu", "bfloat16", "xla", "bfloat16", "layers")])
def test_auto_resolves_per_backend(backend, dtype, attention, ns, stack):
    c = config_lib.base_config()
    assert c.model.dtype == "auto" and c.model.attention == "auto"
    info = resolve.resolve(c, backend)
    run = parse(c, backend)
    assert (run.model.dtype, run.model.attention) == (dtype, attention)
    assert info["model.dtype"] == ("auto", dtype) and info["ns_dtype"] == ("auto", ns)
    assert info["ns_stack"] == ("auto", stack)
    c.optim.ns_dtype, c.optim.ns_stack = "float32", "layers"
    assert resolve.newton_schulz(c.optim, backend)["ns_dtype"] == "float32"
    assert resolve.newton_schulz(c.optim, backend)["ns_stack"] == "layers"
    c.optim.ns_dtype = c.optim.ns_stack = "auto"
    assert f"model.dtype auto -> {dtype}" in resolve.describe(info)
    assert f"ns_stack auto -> {stack}" in resolve.describe(info)
    assert info["ns_method"] == ("auto", "gram" if backend == "cpu" else "standard")
    assert run.optim.ns == NewtonSchulz(ns, stack, info["ns_method"][1])  # recorded
    assert (lambda o: (o["ns_dtype"], o["ns_stack"], o["ns_method"]))(run.to_dict()["optim"]) == (
        ns, stack, info["ns_method"][1])
    c = config_lib.base_config()
    c.optim.muon_impl = "optax"  # optax.contrib.muon runs float32 X space per parameter, whatever 'auto' says
    info = resolve.resolve(c, backend)
    assert (info["ns_dtype"], info["ns_stack"], info["ns_method"]) == (("auto", "float32"), ("auto", "none"),
                                                                       ("auto", "standard"))


def test_explicit_values_are_kept_and_cudnn_off_gpu_is_refused():
    c = config_lib.base_config()
    c.model.dtype, c.model.attention = "float32", "xla"
    run = parse(c, "gpu")
    assert (run.model.dtype, run.model.attention) == ("float32", "xla")
    c.model.attention = "cudnn"
    with pytest.raises(config_lib.ConfigError, match=r"config.model.attention: 'cudnn' runs only on GPU.*'auto'"):
        parse(c, "cpu")


def test_unresolved_auto_follows_the_default_backend():
    b = resolve.backend()  # 'cpu' in CI; the device check runs this module on the accelerator too
    cfg = tiny(dtype="auto", attention="auto")  # parse with no backend: jax.default_backend()
    assert layers.dtype_of(cfg.dtype) == precision.DTYPES[resolve.COMPUTE_DTYPE[b]]
    assert model_lib.create(cfg, 0).blocks[0].attn.impl == resolve.ATTENTION[b]


# ------------------------------------------------------------------------------------------- the policy in the jaxpr


@pytest.mark.parametrize("kind", ["moe", "dense"])
def test_forward_jaxpr_puts_each_tensor_in_its_promised_dtype(kind):
    c = tiny(kind)
    graphdef, params = model_lib.init_params(c, 0)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))  # parameters float32
    tokens = jnp.zeros((2, 16), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda p: model_lib.apply(graphdef, p, tokens))(params)
    ds = dots(jaxpr)
    f32 = [d for d in ds if d[0] == (jnp.float32, jnp.float32)]
    others = [d for d in ds if d[0] != (jnp.float32, jnp.float32)]
    n_moe = 2 if kind == "moe" else 0
    # float32 matmuls: the router logits x [G, T, M] @ w_router [M, E] (one per MoE layer) and route()'s gate and
    # slot einsums; all at Precision.HIGHEST with a float32 product
    assert all(is_highest(d[2]) and d[1] == jnp.float32 for d in f32), f32
    assert sum(d[4][1] == (32, 4) for d in f32) == n_moe
    assert len(f32) == 3 * n_moe
    # every other matmul (projections, MLP/experts, dispatch/combine, attention, head) takes bfloat16 inputs
    assert others and all(d[0] == (jnp.bfloat16, jnp.bfloat16) for d in others), others
    # attention scores and the output head accumulate into float32
    assert any(d[1] == jnp.float32 and d[3] == (2, 16, 96) or d[3] == (32, 96) for d in others)
    # exp / log / rsqrt (softmaxes, logsumexp, RMSNorm) all run in float32
    transcendental = [e for e in eqns(jaxpr) if e.primitive.name in ("exp", "log", "rsqrt")]
    assert transcendental and all(e.invars[0].aval.dtype == jnp.float32 for e in transcendental)
    # logits come out float32
    assert jaxpr.out_avals[0].dtype == jnp.float32


def test_loss_and_gradients_keep_the_policy():
    c = tiny("moe")
    graphdef, params = model_lib.init_params(c, 0)
    batch = {"inputs": jnp.zeros((2, 16), jnp.int32), "targets": jnp.ones((2, 16), jnp.int32),
             "weights": jnp.ones((2, 16), jnp.float32)}
    loss_fn = lambda p: step_lib._loss(graphdef, p, batch, None, False)[0]  # noqa: E731
    jaxpr = jax.make_jaxpr(jax.grad(loss_fn))(params)
    f32 = [d for d in dots(jaxpr) if jnp.float32 in d[0]]
    # in the backward pass too, the only matmuls with a float32 operand are the router's (forward, dx, dW), HIGHEST
    assert f32 and all(is_highest(d[2]) for d in f32), f32
    grads = jax.grad(loss_fn)(params)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    transcendental = [e for e in eqns(jaxpr) if e.primitive.name in ("exp", "log", "rsqrt")]
    assert all(e.invars[0].aval.dtype == jnp.float32 for e in transcendental)


def test_router_logits_equal_float64_product():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 8, 16)).astype(np.float32)
    w = rng.normal(size=(16, 4)).astype(np.float32)
    got = precision.router_logits(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w))
    want = np.einsum("gtm,me->gte", np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64), w.astype(np.float64))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------- cudnn fallback


def test_cudnn_fallback_reasons():
    q16 = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
    assert layers.cudnn_fallback_reason(q16) is None
    assert "bfloat16/float16" in layers.cudnn_fallback_reason(q16.astype(jnp.float32))
    assert "head_dim" in layers.cudnn_fallback_reason(jnp.zeros((1, 8, 2, 12), jnp.bfloat16))
    assert "head_dim" in layers.cudnn_fallback_reason(jnp.zeros((1, 8, 2, 256), jnp.bfloat16))


@pytest.mark.parametrize("segmented", [False, True])
def test_cudnn_with_float32_falls_back_to_xla_and_says_so(caplog, segmented):
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 16, 2, 8)), jnp.float32) for _ in range(3))
    seg = jnp.asarray(np.repeat([[0, 1]], 8, axis=1).repeat(2, axis=0)) if segmented else None
    with caplog.at_level(logging.WARNING):
        got = layers.cudnn_attention(q, k, v, seg)
    assert "falls back to 'xla'" in caplog.text and "bfloat16/float16" in caplog.text
    np.testing.assert_allclose(np.asarray(got), np.asarray(layers.xla_attention(q, k, v, seg)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got), np.asarray(layers.blocked_causal_attention(q, k, v, seg, 4)),
                               rtol=1e-5, atol=1e-6)


def test_model_attention_choices_agree_in_a_forward():
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 96, (2, 16)), jnp.int32)
    outs = {}
    for impl in ("blocked", "xla", "auto"):
        c = tiny("dense", dtype="float32", attention=impl)
        graphdef, params = nnx.split(model_lib.create(c, 0))
        outs[impl] = np.asarray(nnx.merge(graphdef, params)(tokens)[0])
    np.testing.assert_allclose(outs["xla"], outs["blocked"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(outs["auto"], outs["blocked"])


def test_einsum_f32_gradient_is_the_einsum_gradient_and_runs_in_the_input_dtype():
    rng = np.random.default_rng(3)
    a, b = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((4, 6), (6, 5)))
    f = lambda x, y: jnp.sum(jnp.sin(precision.einsum_f32("nk,ko->no", x, y)))  # noqa: E731
    g = lambda x, y: jnp.sum(jnp.sin(jnp.einsum("nk,ko->no", x, y)))  # noqa: E731
    for got, want in zip(jax.grad(f, (0, 1))(a, b), jax.grad(g, (0, 1))(a, b)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
    a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
    assert precision.einsum_f32("nk,ko->no", a16, b16).dtype == jnp.float32
    grads = jax.grad(f, (0, 1))(a16, b16)
    assert all(x.dtype == jnp.bfloat16 for x in grads)
    for got, want in zip(grads, jax.grad(g, (0, 1))(a16.astype(jnp.float32), b16.astype(jnp.float32))):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=0.05, atol=0.05)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="on a GPU cuDNN takes the call")
def test_cudnn_without_cudnn_falls_back_to_xla(caplog):
    """A run trained on a GPU (config.json: attention 'cudnn', bfloat16) still evaluates and generates elsewhere."""
    q = jnp.asarray(np.random.default_rng(4).normal(size=(1, 16, 2, 64)), jnp.bfloat16)
    with caplog.at_level(logging.WARNING):
        got = jax.jit(layers.cudnn_attention)(q, q, q)
    assert "cuDNN refused the call" in caplog.text
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(layers.xla_attention(q, q, q), np.float32))


@pytest.mark.parametrize("name", ["auto", "float32", "bfloat16"])
def test_optimizer_ns_dtype_follows_the_policy(name):
    from moe_jax.optim import chain as optimizer
    c = config_lib.base_config()
    c.optim.ns_dtype = name
    ns = parse(c).optim.ns  # auto: resolve.NS_DTYPE of this backend (bfloat16 on every backend)
    want = resolve.NS_DTYPE[resolve.backend()] if name == "auto" else name
    assert optimizer.ns_dtype(ns) == precision.DTYPES[want]
    if name == "auto":
        assert optimizer.ns_dtype(ns) == jnp.bfloat16
