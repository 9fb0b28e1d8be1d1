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
    Muon Newton-Schulz iterations                        `NS_DTYPE[backend]`: bfloat16 operands, float32
                                                         products and sums (muon.newton_schulz), on every backend;
                                                         on CPU wide matrices in float32 Gram space (NS_METHOD)

The compute dtype is `model.dtype`; 'auto' means `COMPUTE_DTYPE[backend]` (bfloat16 on GPU and TPU, float32 on CPU:
the model's matmuls round their results to the compute dtype, and XLA:CPU's bfloat16 -> bfloat16 dot is no faster
than its float32 one; only bfloat16 -> float32 is, which the Newton-Schulz iteration uses). `model.attention='auto'`
means `ATTENTION[backend]` ('cudnn' fused flash attention on GPU, XLA's attention on TPU, the blocked kernel on
CPU). `resolve(config)` replaces both 'auto's by their values once at startup (the trainer and the benchmark call
it, print `describe(...)`, and the run's config.json records the resolved values); code that meets an unresolved
'auto' (a model built directly from a config file) resolves it the same way through `compute_dtype` /
`attention_impl`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

AUTO = "auto"
PARAM_DTYPE = jnp.float32
ROUTER_PRECISION = jax.lax.Precision.HIGHEST

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# backend -> compute dtype for model.dtype='auto'
COMPUTE_DTYPE = {"cpu": "float32", "gpu": "bfloat16", "tpu": "bfloat16"}
# backend -> attention implementation for model.attention='auto'
ATTENTION = {"cpu": "blocked", "gpu": "cudnn", "tpu": "xla"}
# backend -> dtype of Muon's Newton-Schulz iterations (optim.ns_dtype='auto' in optimizer.py)
NS_DTYPE = {"cpu": "bfloat16", "gpu": "bfloat16", "tpu": "bfloat16"}
# backend -> which Muon matrices share one Newton-Schulz chain (optim.ns_stack='auto' in optimizer.py)
NS_STACK = {"cpu": "none", "gpu": "layers", "tpu": "layers"}
# backend -> Newton-Schulz method (optim.ns_method='auto'): 'gram' needs true float32 matmuls, which GPUs and TPUs run
# at a fraction of their bfloat16 rate, so there the bfloat16 X-space iteration stays
NS_METHOD = {"cpu": "gram", "gpu": "standard", "tpu": "standard"}
# implementations that run only on one backend
ATTENTION_BACKEND = {"cudnn": "gpu"}


def backend(name: str | None = None) -> str:
    """'cpu' | 'gpu' | 'tpu' for `name` (default jax.default_backend()); 'cuda'/'rocm' count as 'gpu'."""
    name = jax.default_backend() if name is None else name
    return "gpu" if name in ("gpu", "cuda", "rocm") else name


def _auto(name: str, table: dict, backend_name: str | None, default: str) -> str:
    """`name`, or for 'auto' this backend's entry of `table` (`default` for a backend the table lacks)."""
    return table.get(backend(backend_name), default) if name == AUTO else name


def compute_dtype_name(name: str, backend_name: str | None = None) -> str:
    """model.dtype -> a concrete dtype name ('auto' resolved for the backend)."""
    return _auto(name, COMPUTE_DTYPE, backend_name, "float32")


def compute_dtype(name: str, backend_name: str | None = None):
    """model.dtype -> the jnp dtype matmuls run in."""
    return DTYPES[compute_dtype_name(name, backend_name)]


def attention_impl(name: str, backend_name: str | None = None) -> str:
    """model.attention -> 'blocked' | 'xla' | 'cudnn' ('auto' resolved for the backend)."""
    return _auto(name, ATTENTION, backend_name, "xla")


def ns_dtype_name(name: str = AUTO, backend_name: str | None = None) -> str:
    """The Newton-Schulz dtype name for optim.ns_dtype ('auto' -> NS_DTYPE[backend])."""
    return _auto(name, NS_DTYPE, backend_name, "float32")


def ns_stack_name(name: str = AUTO, backend_name: str | None = None) -> str:
    """optim.ns_stack: 'layers' | 'none' ('auto' -> NS_STACK[backend])."""
    return _auto(name, NS_STACK, backend_name, "layers")


def ns_method_name(name: str = AUTO, backend_name: str | None = None) -> str:
    """optim.ns_method: 'standard' | 'gram' ('auto' -> NS_METHOD[backend])."""
    return _auto(name, NS_METHOD, backend_name, "standard")


def newton_schulz_settings(optim, backend_name: str | None = None) -> dict:
    """{'ns_dtype', 'ns_stack', 'ns_method'}: what Muon's Newton-Schulz runs as for config.optim (any mapping;
    'auto' resolved for the backend). muon_impl='optax' is optax.contrib.muon: float32, X space, one chain per
    parameter, whatever the settings say."""
    if optim.get("muon_impl", "batched") == "optax":
        return {"ns_dtype": "float32", "ns_stack": "none", "ns_method": "standard"}
    return {"ns_dtype": ns_dtype_name(optim.get("ns_dtype", AUTO), backend_name),
            "ns_stack": ns_stack_name(optim.get("ns_stack", AUTO), backend_name),
            "ns_method": ns_method_name(optim.get("ns_method", AUTO), backend_name)}


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


def resolve(config, backend_name: str | None = None) -> dict:
    """Replace 'auto' in config.model.dtype, config.model.attention and config.optim.ns_dtype / ns_stack / ns_method
    by their values for the backend, in place (once, at startup). Returns {'backend', 'model.dtype',
    'model.attention', 'ns_dtype', 'ns_stack', 'ns_method'} with (requested, resolved) pairs. An implementation that
    cannot run on this backend raises config_lib.ConfigError naming the field."""
    from moe_jax.config.schema import ConfigError
    b = backend(backend_name)
    m = config.model
    requested = (m.dtype, m.attention)
    m.dtype = compute_dtype_name(m.dtype, b)
    m.attention = attention_impl(m.attention, b)
    need = ATTENTION_BACKEND.get(m.attention)
    if need is not None and need != b:
        raise ConfigError(f"config.model.attention: {m.attention!r} runs only on {need.upper()}, this backend is "
                          f"{b!r}; use 'auto' (picks {ATTENTION.get(b, 'xla')!r} here), 'blocked' or 'xla'")
    o = config.optim if "optim" in config else {}
    ns = {k: (o.get(k, AUTO), v) for k, v in newton_schulz_settings(o, b).items()}
    for key, (_, value) in ns.items():  # recorded resolved, as model.dtype: config.json says what the update ran
        if key in o:
            o[key] = value
    return {"backend": b, "model.dtype": (requested[0], m.dtype), "model.attention": (requested[1], m.attention),
            **ns}


def describe(info: dict) -> str:
    """One line for the log: 'precision on gpu: model.dtype auto -> bfloat16, ...'."""
    parts = []
    for key in ("model.dtype", "model.attention", "ns_dtype", "ns_stack", "ns_method"):
        req, got = info[key]
        parts.append(f"{key} {req} -> {got}" if req != got else f"{key} {got}")
    return (f"precision on {info['backend']}: " + ", ".join(parts)
            + "; params, optimizer state, router, softmaxes, norms and loss float32")
