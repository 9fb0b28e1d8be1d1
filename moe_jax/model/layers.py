"""Transformer layers (Flax NNX): RMSNorm, token embedding, rotary embeddings, causal attention with an optional KV
cache, the dense feed-forward, and dropout.

Conventions: parameters are float32 and carry `logical_axes` metadata (see sharding.py); computation runs in the
config's compute dtype (`x.astype(dtype)` at each matmul); softmaxes and norms are computed in float32. Which tensor
has which dtype, and what 'auto' means per backend, is precision.py's policy.
Shapes: B batch, S length, M d_model, H heads, D head_dim, F d_ff, V vocab, L cache length.
"""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.model import precision
from moe_jax.config.typed import ModelConfig
from moe_jax.sharding import constrain


def dtype_of(name: str):
    """model.dtype (resolved by config.typed.parse) -> jnp dtype."""
    return precision.DTYPES[name]


def param(rngs: nnx.Rngs, shape, axes, std: float | None) -> nnx.Param:
    """A float32 parameter: N(0, std) or ones when std is None, tagged with its logical axes."""
    value = jnp.ones(shape, jnp.float32) if std is None else std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value, logical_axes=tuple(axes))


def project(x: jax.Array, w: jax.Array, n_in: int = 1, out_dtype=None) -> jax.Array:
    """Contract the last `n_in` dims of x with the first `n_in` dims of w: x [..., *K], w [*K, *O] -> [..., *O].
    `out_dtype` (e.g. float32 for the output logits) sets the accumulation/result dtype; default: the inputs'.

    Computed as one 2-D matmul [rows, prod K] @ [prod K, prod O]. XLA:CPU differentiates the 2-D form faster than
    the same contraction written as an einsum over [B, S, ...] (whose weight gradient needs transposing copies of the
    activations; measured in docs/benchmarks.md). On accelerators the two are the same.
    """
    k_shape, o_shape = w.shape[:n_in], w.shape[n_in:]
    lead = x.shape[:x.ndim - n_in]
    k = math.prod(k_shape)
    x2, w2 = x.reshape(-1, k), w.reshape(k, -1)
    if out_dtype == jnp.float32 and jnp.result_type(x2, w2) != jnp.float32:
        y = precision.einsum_f32("nk,ko->no", x2, w2)  # float32 out, backward in the inputs' dtype
    else:
        y = jnp.matmul(x2, w2, preferred_element_type=out_dtype)
    return y.reshape(lead + o_shape)


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout; identity when rate == 0 or rng is None (evaluation)."""
    if rate == 0.0 or rng is None:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x^2) + eps) * scale, computed in float32. x: [..., M]."""

    def __init__(self, dim: int, eps: float, dtype, rngs: nnx.Rngs):
        self.scale = param(rngs, (dim,), ("norm",), None)
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(self.dtype)


class Embed(nnx.Module):
    """Token embedding [V, M]; `attend` gives logits against it (tied output head)."""

    def __init__(self, vocab: int, dim: int, std: float, dtype, rngs: nnx.Rngs):
        self.embedding = param(rngs, (vocab, dim), ("vocab", "embed"), std)
        self.dtype = dtype

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens [B, S] int -> [B, S, M]."""
        return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """x [B, S, M] -> logits [B, S, V] float32 (compute-dtype inputs, float32 accumulation and result)."""
        return project(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T, out_dtype=jnp.float32)


def rope(x: jax.Array, positions: jax.Array, base: float, layout: str = "halves") -> jax.Array:
    """Rotary embedding: each pair of channels is rotated by angle pos * base^(-2i/D), i = 0 .. D/2 - 1.

    layout 'halves': pair i is (x[i], x[i + D/2]) (seed exp5, LLaMA-style code); 'adjacent': pair i is
    (x[2i], x[2i + 1]) (seed 002 and 004 through torchtune's RotaryPositionalEmbeddings). Either is the complex
    product (x_a + 1j * x_b) * exp(1j * pos * theta_i) for its pair (a, b). The two layouts are the same function up to
    a fixed permutation of the q/k channels, so they differ for given weights but not as a model family.
    x: [B, S, H, D]; positions: [B, S] int. Computed in float32, returned in x's dtype.
    """
    d = x.shape[-1]
    half = d // 2
    inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / d)  # [D/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, S, D/2]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    if layout == "adjacent":
        pairs = x32.reshape(x.shape[:-1] + (half, 2))
        x1, x2 = pairs[..., 0], pairs[..., 1]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x.shape)
    elif layout == "halves":
        x1, x2 = x32[..., :half], x32[..., half:]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    else:
        raise ValueError(f"model.rope_layout: unknown {layout!r}; choose 'halves' or 'adjacent'")
    return out.astype(x.dtype)


def blocked_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None = None,
                             block: int = 128) -> jax.Array:
    """softmax(q k^T / sqrt(D) + causal mask) v, computed one block of `block` queries at a time.

    q, k, v: [B, S, H, D]; segment_ids: [B, S] or None (a query then also sees only keys of its own segment).
    Returns [B, S, H, D] in q's dtype. Query block i (rows i*block .. (i+1)*block - 1) attends to keys 0 ..
    (i+1)*block - 1 only: the key blocks above the diagonal are never computed, so with n = S / block blocks the
    score and probability arrays hold (n + 1) / (2n) of the S x S entries (5/8 at S = 512, block 128), and the
    backward pass, which is bound by passes over those arrays, shrinks in proportion. Scores and the softmax are
    float32; probabilities are cast to q's dtype for the value product. block <= 0 or >= S: one block (plain
    masked attention). Scores are laid out [B, H, q, k] so the softmax reduces over the minor dimension.
    """
    b, s, h, d = q.shape
    block = s if block <= 0 else min(block, s)
    q = q * jnp.asarray(d ** -0.5, q.dtype)
    outs = []
    for start in range(0, s, block):
        stop = min(start + block, s)
        scores = precision.einsum_f32("bqhd,bkhd->bhqk", q[:, start:stop], k[:, :stop])  # [B, H, q, stop] f32
        visible = jnp.arange(stop)[None, :] <= jnp.arange(start, stop)[:, None]  # [q, k]
        visible = visible[None, None]
        if segment_ids is not None:
            same = segment_ids[:, start:stop, None] == segment_ids[:, None, :stop]  # [B, q, k]
            visible = visible & same[:, None]
        probs = jax.nn.softmax(jnp.where(visible, scores, -1e30), axis=-1).astype(v.dtype)
        outs.append(jnp.einsum("bhqk,bkhd->bqhd", probs, v[:, :stop]))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def segment_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, S] segment ids -> [B, 1, S, S] bool: query i may see key j (same segment, j <= i)."""
    s = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same & jnp.tril(jnp.ones((s, s), bool)))[:, None]


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """Causal attention by `jax.nn.dot_product_attention` (XLA: the full S x S scores, float32 softmax).
    q, k, v [B, S, H, D]; segment_ids [B, S] or None -> [B, S, H, D]."""
    if segment_ids is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    return jax.nn.dot_product_attention(q, k, v, mask=segment_mask(segment_ids), implementation="xla")


CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def cudnn_fallback_reason(q: jax.Array) -> str | None:
    """Why cuDNN's fused attention cannot take q [B, S, H, D] (None when it can): it needs bfloat16/float16 inputs
    and a head_dim that is a multiple of 8 and at most 128 (jax.nn.dot_product_attention, implementation='cudnn')."""
    d = q.shape[-1]
    if q.dtype not in CUDNN_DTYPES:
        return f"cuDNN fused attention needs bfloat16/float16 inputs, got {q.dtype} (set model.dtype=bfloat16)"
    if d % 8 or d > 128:
        return f"cuDNN fused attention needs head_dim % 8 == 0 and head_dim <= 128, got {d}"
    return None


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """Causal attention by cuDNN's fused (flash) kernel: `jax.nn.dot_product_attention(implementation='cudnn')`.

    q, k, v [B, S, H, D]; segment_ids [B, S] or None -> [B, S, H, D]. Packed segments go in as cuDNN's mask (an
    additive bias of [B, 1, S, S] beside the causal mask). Where cuDNN cannot take the inputs (float32, an odd head
    size, or a mask its version refuses while tracing) this logs the reason and computes `xla_attention` instead.
    """
    reason = cudnn_fallback_reason(q)
    if reason is None:
        try:
            if segment_ids is None:
                return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
            return jax.nn.dot_product_attention(q, k, v, mask=segment_mask(segment_ids), is_causal=True,
                                                implementation="cudnn")
        except (ValueError, NotImplementedError, RuntimeError) as e:  # raised while tracing, before anything runs
            reason = f"cuDNN refused the call: {e}"
    logging.getLogger(__name__).warning("model.attention='cudnn' falls back to 'xla' attention: %s", reason)
    return xla_attention(q, k, v, segment_ids)


class Attention(nnx.Module):
    """Causal multi-head self-attention with RoPE.

    Weights: wq, wk, wv [M, H, D]; wo [H, D, M]. Without a cache, attends causally within the sequence (and within
    the same segment when segment_ids are given) with `model.attention`: 'blocked' (`blocked_causal_attention`,
    skipping the key blocks above the diagonal), 'xla' (`jax.nn.dot_product_attention`, the full S x S mask),
    'cudnn' (cuDNN's fused flash attention, GPU only; see `cudnn_attention`); config.typed.parse resolves 'auto'
    (config/resolve.py ATTENTION: blocked on CPU, cudnn on GPU, xla on TPU).
    With a cache {'k','v': [B, L, H, D]} and `cache_index` (a scalar: where the new tokens start), writes the new
    keys/values there and attends to cache positions <= each query's (decoding; `jax.nn.dot_product_attention`).
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.rope_base = cfg.rope_base
        self.rope_layout = cfg.rope_layout
        self.dtype = dtype_of(cfg.dtype)
        self.impl = cfg.attention
        self.block = cfg.attention_block
        shape_in = (cfg.d_model, cfg.n_heads, self.head_dim)
        axes_in = ("embed", "heads", "head_dim")
        self.wq = param(rngs, shape_in, axes_in, cfg.init_std)
        self.wk = param(rngs, shape_in, axes_in, cfg.init_std)
        self.wv = param(rngs, shape_in, axes_in, cfg.init_std)
        # GPT-2 style: scale the residual output projection by 1/sqrt(2 * n_layers).
        self.wo = param(rngs, (cfg.n_heads, self.head_dim, cfg.d_model), ("heads", "head_dim", "embed"),
                        cfg.init_std / (2 * cfg.n_layers) ** 0.5)

    def __call__(self, x, positions, segment_ids=None, cache=None, cache_index=None):
        """x [B, S, M], positions [B, S] -> ([B, S, M], new cache or None)."""
        dt = self.dtype
        x = x.astype(dt)
        q = project(x, self.wq[...].astype(dt))  # [B, S, H, D]
        k = project(x, self.wk[...].astype(dt))
        v = project(x, self.wv[...].astype(dt))
        q = constrain(rope(q, positions, self.rope_base, self.rope_layout), ("batch", "length", "heads", "head_dim"))
        k = constrain(rope(k, positions, self.rope_base, self.rope_layout), ("batch", "length", "heads", "head_dim"))
        v = constrain(v, ("batch", "length", "heads", "head_dim"))

        new_cache = None
        if cache is not None:
            ck = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, cache_index, 0, 0))
            cv = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, cache_index, 0, 0))
            new_cache = {"k": ck, "v": cv}
            key_pos = jnp.arange(ck.shape[1])
            mask = key_pos[None, None, None, :] <= positions[:, None, :, None]  # [B, 1, S, L]
            out = jax.nn.dot_product_attention(q, ck.astype(dt), cv.astype(dt), mask=mask)
        elif self.impl == "cudnn":
            out = cudnn_attention(q, k, v, segment_ids)
        elif self.impl == "xla":
            out = xla_attention(q, k, v, segment_ids)
        else:
            out = blocked_causal_attention(q, k, v, segment_ids, self.block)
        out = constrain(out, ("batch", "length", "heads", "head_dim"))
        y = project(out, self.wo[...].astype(dt), n_in=2)
        return constrain(y, ("batch", "length", "embed")), new_cache


def gelu_exact(x: jax.Array) -> jax.Array:
    """GELU with the error function, x * Phi(x) (PyTorch's F.gelu default; seed exp5's experts)."""
    return jax.nn.gelu(x, approximate=False)


def activation(name: str):
    """'gelu': tanh-approximate GELU (jax.nn.gelu's default); 'gelu_exact': erf GELU; 'silu'/'swiglu': SiLU."""
    return {"gelu": jax.nn.gelu, "gelu_exact": gelu_exact, "silu": jax.nn.silu, "swiglu": jax.nn.silu}[name]


class MLP(nnx.Module):
    """Dense feed-forward. 'gelu'/'gelu_exact'/'silu': w_out(act(w_in x)); 'swiglu': w_out(silu(w_gate x) * w_in x).
    w_in, w_gate [M, F]; w_out [F, M]."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.kind = cfg.mlp
        self.dtype = dtype_of(cfg.dtype)
        self.w_in = param(rngs, (cfg.d_model, cfg.d_ff), ("embed", "mlp"), cfg.init_std)
        if self.kind == "swiglu":
            self.w_gate = param(rngs, (cfg.d_model, cfg.d_ff), ("embed", "mlp"), cfg.init_std)
        self.w_out = param(rngs, (cfg.d_ff, cfg.d_model), ("mlp", "embed"), cfg.init_std / (2 * cfg.n_layers) ** 0.5)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, S, M] -> [B, S, M]."""
        dt = self.dtype
        x = x.astype(dt)
        h = project(x, self.w_in[...].astype(dt))
        if self.kind == "swiglu":
            h = jax.nn.silu(project(x, self.w_gate[...].astype(dt))) * h
        else:
            h = activation(self.kind)(h)
        h = constrain(h, ("batch", "length", "mlp"))
        return constrain(project(h, self.w_out[...].astype(dt)), ("batch", "length", "embed"))
