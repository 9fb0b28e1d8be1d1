"""Transformer layers (Flax NNX): RMSNorm, token embedding, rotary embeddings, causal attention with an optional KV
cache, the dense feed-forward, and dropout.

Conventions: parameters are float32 and carry `logical_axes` metadata (see sharding.py); computation runs in the
config's compute dtype (`x.astype(dtype)` at each matmul); softmaxes and norms are computed in float32.
Shapes: B batch, S length, M d_model, H heads, D head_dim, F d_ff, V vocab, L cache length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.sharding import constrain


def dtype_of(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


def param(rngs: nnx.Rngs, shape, axes, std: float | None) -> nnx.Param:
    """A float32 parameter: N(0, std) or ones when std is None, tagged with its logical axes."""
    value = jnp.ones(shape, jnp.float32) if std is None else std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value, logical_axes=tuple(axes))


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
        """x [B, S, M] -> logits [B, S, V]."""
        return jnp.einsum("bsm,vm->bsv", x.astype(self.dtype), self.embedding[...].astype(self.dtype))


def rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """Rotary embedding, 'halves' convention: pair (x[i], x[i + D/2]) is rotated by angle pos * base^(-2i/D).

    x: [B, S, H, D]; positions: [B, S] int. Equivalent to multiplying the complex number x[i] + 1j*x[i + D/2] by
    exp(1j * pos * theta_i). Computed in float32, returned in x's dtype.
    """
    d = x.shape[-1]
    half = d // 2
    inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / d)  # [D/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, S, D/2]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class Attention(nnx.Module):
    """Causal multi-head self-attention with RoPE.

    Weights: wq, wk, wv [M, H, D]; wo [H, D, M]. Without a cache, attends causally within the sequence (and within
    the same segment when segment_ids are given). With a cache {'k','v': [B, L, H, D]} and `cache_index` (a scalar:
    where the new tokens start), writes the new keys/values there and attends to cache positions <= each query's.
    """

    def __init__(self, config, rngs: nnx.Rngs):
        m = config.model
        self.n_heads = m.n_heads
        self.head_dim = m.d_model // m.n_heads
        self.rope_base = m.rope_base
        self.dtype = dtype_of(m.dtype)
        shape_in = (m.d_model, m.n_heads, self.head_dim)
        axes_in = ("embed", "heads", "head_dim")
        self.wq = param(rngs, shape_in, axes_in, m.init_std)
        self.wk = param(rngs, shape_in, axes_in, m.init_std)
        self.wv = param(rngs, shape_in, axes_in, m.init_std)
        # GPT-2 style: scale the residual output projection by 1/sqrt(2 * n_layers).
        self.wo = param(rngs, (m.n_heads, self.head_dim, m.d_model), ("heads", "head_dim", "embed"),
                        m.init_std / (2 * m.n_layers) ** 0.5)

    def __call__(self, x, positions, segment_ids=None, cache=None, cache_index=None):
        """x [B, S, M], positions [B, S] -> ([B, S, M], new cache or None)."""
        dt = self.dtype
        x = x.astype(dt)
        q = jnp.einsum("bsm,mhd->bshd", x, self.wq[...].astype(dt))
        k = jnp.einsum("bsm,mhd->bshd", x, self.wk[...].astype(dt))
        v = jnp.einsum("bsm,mhd->bshd", x, self.wv[...].astype(dt))
        q = constrain(rope(q, positions, self.rope_base), ("batch", "length", "heads", "head_dim"))
        k = constrain(rope(k, positions, self.rope_base), ("batch", "length", "heads", "head_dim"))
        v = constrain(v, ("batch", "length", "heads", "head_dim"))

        new_cache = None
        if cache is not None:
            ck = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, cache_index, 0, 0))
            cv = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, cache_index, 0, 0))
            new_cache = {"k": ck, "v": cv}
            key_pos = jnp.arange(ck.shape[1])
            mask = key_pos[None, None, None, :] <= positions[:, None, :, None]  # [B, 1, S, L]
            out = jax.nn.dot_product_attention(q, ck.astype(dt), cv.astype(dt), mask=mask)
        elif segment_ids is not None:
            same = segment_ids[:, :, None] == segment_ids[:, None, :]
            causal = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
            out = jax.nn.dot_product_attention(q, k, v, mask=(same & causal)[:, None])
        else:
            out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        out = constrain(out, ("batch", "length", "heads", "head_dim"))
        y = jnp.einsum("bshd,hdm->bsm", out, self.wo[...].astype(dt))
        return constrain(y, ("batch", "length", "embed")), new_cache


def activation(name: str):
    return {"gelu": jax.nn.gelu, "silu": jax.nn.silu, "swiglu": jax.nn.silu}[name]


class MLP(nnx.Module):
    """Dense feed-forward. 'gelu'/'silu': w_out(act(w_in x)); 'swiglu': w_out(silu(w_gate x) * w_in x).
    w_in, w_gate [M, F]; w_out [F, M]."""

    def __init__(self, config, rngs: nnx.Rngs):
        m = config.model
        self.kind = m.mlp
        self.dtype = dtype_of(m.dtype)
        self.w_in = param(rngs, (m.d_model, m.d_ff), ("embed", "mlp"), m.init_std)
        if self.kind == "swiglu":
            self.w_gate = param(rngs, (m.d_model, m.d_ff), ("embed", "mlp"), m.init_std)
        self.w_out = param(rngs, (m.d_ff, m.d_model), ("mlp", "embed"), m.init_std / (2 * m.n_layers) ** 0.5)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, S, M] -> [B, S, M]."""
        dt = self.dtype
        x = x.astype(dt)
        h = jnp.einsum("bsm,mf->bsf", x, self.w_in[...].astype(dt))
        if self.kind == "swiglu":
            h = jax.nn.silu(jnp.einsum("bsm,mf->bsf", x, self.w_gate[...].astype(dt))) * h
        else:
            h = activation(self.kind)(h)
        h = constrain(h, ("batch", "length", "mlp"))
        return constrain(jnp.einsum("bsf,fm->bsm", h, self.w_out[...].astype(dt)), ("batch", "length", "embed"))
