"""The mixed-precision policy and the per-backend choices ('auto'), in one place.

What dtype each tensor has (B batch, S length, M d_model, E experts, V vocab):

    parameters [any], optimizer state                    float32, always (model.create; optimizer.build)
    residual stream and activations [B, S, M]            compute dtype
    matmul inputs: q/k/v/o projections, dense MLP,       compute dtype (weights cast at each use: `x.astype(dt)`)
      experts, dispatch/combine einsums, output head
    router logits [G, T, E]                              float32 inputs, float32 product at Precision.HIGHEST
                                                         (`router_logits`: no TF32 on GPU, no bf16 passes on TPU)
    router softmax, top-k, gates, aux losses (z-loss     float32
      logsumexp, load balance)
    attention scores and their softmax                   float32 (blocked: `einsum_f32`; xla:
                                                         jax.nn.dot_product_attention's float32 softmax; cudnn:
                                                         cuDNN's float32 accumulation and softmax)
    RMSNorm, RoPE                                        float32 inside, result cast to the compute dtype
    output logits [B, S, V], cross-entropy, logsumexp    float32 (the head matmul accumulates into float32 and
                                                         returns float32; its backward runs in the compute dtype:
                                                         `einsum_f32`)
    Muon Newton-Schulz iterations                        optim.ns_dtype (resolve.NS_DTYPE): bfloat16 operands, float32
                                                         products and sums (muon.newton_schulz), on every backend;
                                                         on CPU wide matrices in float32 Gram space (resolve.NS_METHOD)

The compute dtype is `model.dtype` and the attention kernel `model.attention`, both resolved for the backend by
`config.typed.parse` ('auto': the per-backend tables of config/resolve.py, which also holds the Newton-Schulz ones),
so a ModelConfig always names concrete values; `DTYPES` is the one name -> jnp dtype map.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

PARAM_DTYPE = jnp.float32
ROUTER_PRECISION = jax.lax.Precision.HIGHEST

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}  # the one name -> dtype map


def router_logits(x: jax.Array, w: jax.Array) -> jax.Array:
    """Router logits in float32: x [G, T, M] (any float dtype) @ w [M, E] -> [G, T, E] float32, at
    Precision.HIGHEST so that neither TF32 (GPU) nor bfloat16 passes (TPU) round the routing decision."""
    return jnp.einsum("gtm,me->gte", x.astype(jnp.float32), w.astype(jnp.float32), precision=ROUTER_PRECISION,
                      preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def einsum_f32(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """jnp.einsum(spec, a, b) with a float32 result (accumulated in float32) from compute-dtype inputs, whose
    backward pass runs in the inputs' dtype: the float32 cotangent is cast to it before the two transposed products.
    Plain autodiff would instead give mixed float32 x bfloat16 products, which GPUs run as float32 (TF32) matmuls at
    half the bfloat16 rate or less. For float32 inputs this is exactly the ordinary einsum and its gradient."""
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _einsum_f32_fwd(spec, a, b):
    return einsum_f32(spec, a, b), (a, b)


def _einsum_f32_bwd(spec, res, g):
    a, b = res
    dt = jnp.result_type(a, b)
    _, vjp = jax.vjp(lambda x, y: jnp.einsum(spec, x, y), a, b)  # products in dt (XLA accumulates in float32)
    return vjp(g.astype(dt))


einsum_f32.defvjp(_einsum_f32_fwd, _einsum_f32_bwd)
