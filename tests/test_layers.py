"""Tests for moe_jax/model/layers.py: RoPE, attention (masking, blocked vs reference), dropout, RMSNorm, the dense MLP."""

import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from numpy.testing import assert_allclose

from moe_jax.config.typed import parse
from moe_jax.model import layers
from moe_jax.cli import load_config_file

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def tiny_config(**model):
    c = load_config_file(CONFIGS / "smoke.py")
    c.model.dtype = "float32"
    for k, v in model.items():
        c.model[k] = v
    return c


# ----------------------------------------------------------------------------------------------------------- RoPE


def rope_reference(x: np.ndarray, positions: np.ndarray, base: float) -> np.ndarray:
    """'halves' RoPE as a complex rotation: (x[i] + 1j*x[i+D/2]) * exp(1j * pos * base^(-2i/D)), in float64."""
    d = x.shape[-1]
    half = d // 2
    z = x[..., :half].astype(np.float64) + 1j * x[..., half:].astype(np.float64)
    theta = base ** (-2.0 * np.arange(half) / d)  # [D/2]
    rot = np.exp(1j * positions[..., None, None].astype(np.float64) * theta)  # [B, S, 1, D/2]
    z = z * rot
    return np.concatenate([z.real, z.imag], axis=-1)


def test_rope_equals_complex_rotation():
    rng = np.random.default_rng(0)
    b, s, h, d = 2, 9, 3, 16
    x = rng.standard_normal((b, s, h, d)).astype(np.float32)
    positions = rng.integers(0, 64, size=(b, s)).astype(np.int32)
    for base in (10000.0, 100.0):
        got = np.asarray(layers.rope(jnp.asarray(x), jnp.asarray(positions), base))
        assert got.dtype == np.float32
        assert_allclose(got, rope_reference(x, positions, base), rtol=1e-5, atol=2e-5)


def test_rope_position_zero_is_identity_and_norm_preserved():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 5, 2, 8)).astype(np.float32)
    zero = np.asarray(layers.rope(jnp.asarray(x), jnp.zeros((1, 5), jnp.int32), 10000.0))
    assert_allclose(zero, x, rtol=0, atol=0)
    pos = jnp.asarray([[3, 17, 100, 2, 40]], jnp.int32)
    rotated = np.asarray(layers.rope(jnp.asarray(x), pos, 10000.0))
    # each (x[i], x[i+D/2]) pair is rotated, so every pair's norm (hence the vector's) is unchanged
    def pair_norm(a):
        return np.hypot(a[..., :4], a[..., 4:])
    assert_allclose(pair_norm(rotated), pair_norm(x), rtol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(2)
    s, h, d = 12, 2, 32
    q = jnp.asarray(rng.standard_normal((1, s, h, d)).astype(np.float32))
    k = jnp.asarray(rng.standard_normal((1, s, h, d)).astype(np.float32))
    pos = jnp.arange(s, dtype=jnp.int32)[None]

    def scores(q_pos, k_pos):
        qr = layers.rope(q, q_pos, 10000.0)
        kr = layers.rope(k, k_pos, 10000.0)
        return np.asarray(jnp.einsum("bqhd,bkhd->bhqk", qr, kr))

    base = scores(pos, pos)
    for shift in (1, 37, 250):
        assert_allclose(scores(pos + shift, pos + shift), base, rtol=1e-4, atol=1e-4)
    # not vacuous: shifting only the queries changes i - j, and the scores
    assert np.max(np.abs(scores(pos + 5, pos) - base)) > 1e-2


def test_rope_adjacent_equals_complex_rotation_of_pairs():
    """'adjacent' rotates (x[2i], x[2i+1]) (torchtune / seed 002): the 'halves' rotation of the de-interleaved
    channels, re-interleaved."""
    rng = np.random.default_rng(3)
    b, s, h, d = 2, 9, 3, 16
    x = rng.standard_normal((b, s, h, d)).astype(np.float32)
    positions = rng.integers(0, 64, size=(b, s)).astype(np.int32)
    perm = np.concatenate([np.arange(0, d, 2), np.arange(1, d, 2)])  # halves order <- adjacent order
    want = np.empty_like(x, dtype=np.float64)
    want[..., perm] = rope_reference(x[..., perm], positions, 10000.0)
    got = np.asarray(layers.rope(jnp.asarray(x), jnp.asarray(positions), 10000.0, "adjacent"))
    assert_allclose(got, want, rtol=1e-5, atol=2e-5)
    # not vacuous: the two layouts differ on the same input
    halves = np.asarray(layers.rope(jnp.asarray(x), jnp.asarray(positions), 10000.0, "halves"))
    assert np.max(np.abs(halves - got)) > 0.1
    with pytest.raises(ValueError, match="rope_layout"):
        layers.rope(jnp.asarray(x), jnp.asarray(positions), 10000.0, "interleaved")


def test_rope_keeps_dtype():
    x = jnp.ones((1, 3, 2, 8), jnp.bfloat16)
    assert layers.rope(x, jnp.arange(3)[None], 10000.0).dtype == jnp.bfloat16


# ------------------------------------------------------------------------------------------------------ Attention


def attention_reference(q, k, v, segment_ids=None):
    """softmax(q k^T / sqrt(D) masked causally (and by segment)) v, in float64 numpy. q, k, v [B, S, H, D]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    s = q.shape[1]
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    visible = np.tril(np.ones((s, s), bool))[None, None]
    if segment_ids is not None:
        seg = np.asarray(segment_ids)
        visible = visible & (seg[:, None, :, None] == seg[:, None, None, :])
    scores = np.where(visible, scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("block", [0, 1, 3, 4, 10, 64])
@pytest.mark.parametrize("segmented", [False, True])
def test_blocked_attention_equals_reference(block, segmented):
    """Every block size, dividing S = 10 or not, gives exact masked softmax attention."""
    rng = np.random.default_rng(11)
    b, s, h, d = 2, 10, 3, 8
    q, k, v = (rng.standard_normal((b, s, h, d)).astype(np.float32) for _ in range(3))
    seg = np.asarray([[1] * 4 + [2] * 6, [1] * 10]) if segmented else None
    out = jax.jit(layers.blocked_causal_attention, static_argnums=4)(q, k, v, seg, block)
    assert out.shape == (b, s, h, d) and out.dtype == jnp.float32
    assert_allclose(np.asarray(out), attention_reference(q, k, v, seg), rtol=1e-5, atol=1e-5)


def test_blocked_attention_gradients_equal_dot_product_attention():
    rng = np.random.default_rng(12)
    q, k, v, g = (jnp.asarray(rng.standard_normal((2, 12, 2, 8)), jnp.float32) for _ in range(4))

    def grads(fn):
        return jax.jit(lambda q, k, v: jax.vjp(fn, q, k, v)[1](g))(q, k, v)

    ours = grads(lambda q, k, v: layers.blocked_causal_attention(q, k, v, None, 5))
    xla = grads(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True))
    for a, b in zip(ours, xla):
        assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("segmented", [False, True])
def test_attention_implementations_agree(segmented):
    """model.attention='blocked' (block 4 of S = 10) and 'xla' (jax.nn.dot_product_attention) are the same layer."""
    rng = np.random.default_rng(5)
    b, s = 2, 10
    blocked = make_attention(tiny_config(attention="blocked", attention_block=4))
    xla = make_attention(tiny_config(attention="xla"))
    x = jnp.asarray(rng.standard_normal((b, s, 64)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(s), (b, s))
    seg = jnp.asarray([[1] * 3 + [2] * 7, [1] * 6 + [2] * 4]) if segmented else None
    assert_allclose(np.asarray(blocked(x, pos, seg)[0]), np.asarray(xla(x, pos, seg)[0]), rtol=1e-5, atol=1e-6)


def test_project_equals_einsum():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 5, 3, 4)).astype(np.float32)
    w1 = rng.standard_normal((4, 6, 2)).astype(np.float32)
    w2 = rng.standard_normal((3, 4, 7)).astype(np.float32)
    y1 = layers.project(jnp.asarray(x), jnp.asarray(w1))
    assert y1.shape == (2, 5, 3, 6, 2)
    assert_allclose(np.asarray(y1), np.einsum("bsak,kfo->bsafo", x, w1), rtol=1e-5, atol=1e-5)
    y2 = layers.project(jnp.asarray(x), jnp.asarray(w2), n_in=2)
    assert y2.shape == (2, 5, 7)
    assert_allclose(np.asarray(y2), np.einsum("bshd,hdm->bsm", x, w2), rtol=1e-5, atol=1e-5)


def make_attention(config):
    """The layer, called under jit (much faster than op-by-op): f(x, positions, segment_ids=None) -> y."""
    attn = layers.Attention(parse(config).model, nnx.Rngs(params=0))
    graphdef, state = nnx.split(attn)

    @jax.jit
    def call(x, positions, segment_ids=None):
        return nnx.merge(graphdef, state)(x, positions, segment_ids)

    return call


def test_attention_is_causal():
    config = tiny_config()
    attn = make_attention(config)
    rng = np.random.default_rng(3)
    b, s, m = 2, 10, config.model.d_model
    x = rng.standard_normal((b, s, m)).astype(np.float32)
    pos = jnp.broadcast_to(jnp.arange(s), (b, s))
    y0, _ = attn(jnp.asarray(x), pos)
    t = 6
    x2 = x.copy()
    x2[:, t] += 1.0
    y1, _ = attn(jnp.asarray(x2), pos)
    assert_allclose(np.asarray(y1[:, :t]), np.asarray(y0[:, :t]), rtol=1e-6, atol=1e-6)
    assert np.max(np.abs(np.asarray(y1[:, t:] - y0[:, t:]))) > 1e-4


def test_attention_segment_ids_restrict_to_segment():
    config = tiny_config()
    attn = make_attention(config)
    rng = np.random.default_rng(4)
    s, m = 12, config.model.d_model
    x = rng.standard_normal((1, s, m)).astype(np.float32)
    seg = jnp.asarray([[1] * 5 + [2] * 7])
    pos = jnp.asarray([list(range(5)) + list(range(7))])
    packed, _ = attn(jnp.asarray(x), pos, seg)
    # each segment alone gives the same outputs as in the packed row
    first, _ = attn(jnp.asarray(x[:, :5]), pos[:, :5])
    second, _ = attn(jnp.asarray(x[:, 5:]), pos[:, 5:])
    assert_allclose(np.asarray(packed[:, :5]), np.asarray(first), rtol=1e-5, atol=1e-6)
    assert_allclose(np.asarray(packed[:, 5:]), np.asarray(second), rtol=1e-5, atol=1e-6)
    # changing segment 1 leaves segment 2 untouched (without segment_ids it would not)
    x2 = x.copy()
    x2[:, 1] += 3.0
    changed, _ = attn(jnp.asarray(x2), pos, seg)
    assert_allclose(np.asarray(changed[:, 5:]), np.asarray(packed[:, 5:]), rtol=1e-6, atol=1e-6)
    unsegmented0, _ = attn(jnp.asarray(x), pos)
    unsegmented1, _ = attn(jnp.asarray(x2), pos)
    assert np.max(np.abs(np.asarray(unsegmented1[:, 5:] - unsegmented0[:, 5:]))) > 1e-4


# -------------------------------------------------------------------------------------------------------- Dropout


def test_dropout_identity_without_rng_or_rate():
    x = jnp.arange(12.0).reshape(3, 4)
    assert layers.dropout(x, 0.5, None) is x
    assert layers.dropout(x, 0.0, jax.random.key(0)) is x


def test_dropout_zeroes_and_rescales():
    x = jnp.ones((200, 100), jnp.float32)
    y = np.asarray(layers.dropout(x, 0.25, jax.random.key(0)))
    kept = y != 0
    assert_allclose(y[kept], 1.0 / 0.75, rtol=1e-6)
    assert abs(1.0 - kept.mean() - 0.25) < 0.02  # about `rate` of the entries are dropped
    assert abs(y.mean() - 1.0) < 0.03  # inverted dropout keeps the expectation
    other = np.asarray(layers.dropout(x, 0.25, jax.random.key(1)))
    assert not np.array_equal(y, other)
    assert layers.dropout(x.astype(jnp.bfloat16), 0.25, jax.random.key(0)).dtype == jnp.bfloat16


# ----------------------------------------------------------------------------------------------- RMSNorm and MLP


def test_rmsnorm_formula():
    norm = layers.RMSNorm(8, 1e-6, jnp.float32, nnx.Rngs(params=0))
    scale = np.linspace(0.5, 2.0, 8).astype(np.float32)
    norm.scale[...] = jnp.asarray(scale)
    x = np.random.default_rng(5).standard_normal((2, 3, 8)).astype(np.float32)
    want = x / np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True) + 1e-6) * scale
    assert_allclose(np.asarray(norm(jnp.asarray(x))), want, rtol=1e-5, atol=1e-6)
    bf = layers.RMSNorm(8, 1e-6, jnp.bfloat16, nnx.Rngs(params=0))
    assert bf(jnp.asarray(x)).dtype == jnp.bfloat16


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def silu(x):
    return x / (1.0 + np.exp(-x))


def gelu_erf(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


@pytest.mark.parametrize("kind", ["gelu", "gelu_exact", "silu", "swiglu"])
def test_mlp_formula(kind):
    config = tiny_config(mlp=kind, init_std=0.3)
    mlp = layers.MLP(parse(config).model, nnx.Rngs(params=0))
    assert hasattr(mlp, "w_gate") == (kind == "swiglu")
    x = np.random.default_rng(6).standard_normal((2, 3, config.model.d_model)).astype(np.float32)
    w_in = np.asarray(mlp.w_in[...], np.float64)
    w_out = np.asarray(mlp.w_out[...], np.float64)
    h = x @ w_in
    if kind == "swiglu":
        h = silu(x @ np.asarray(mlp.w_gate[...], np.float64)) * h
    else:
        h = {"gelu": gelu_tanh, "gelu_exact": gelu_erf, "silu": silu}[kind](h)
    assert_allclose(np.asarray(mlp(jnp.asarray(x))), h @ w_out, rtol=1e-4, atol=1e-5)


def test_gelu_exact_is_erf_not_tanh():
    x = np.linspace(-6, 6, 241)
    assert_allclose(np.asarray(layers.gelu_exact(jnp.asarray(x, jnp.float32))), gelu_erf(x), rtol=1e-6, atol=1e-6)
    # the tanh approximation differs by up to ~5e-4 near |x| = 2: an option, not a rounding detail
    assert np.max(np.abs(np.asarray(layers.activation("gelu")(jnp.asarray(x, jnp.float32))) - gelu_erf(x))) > 1e-4
