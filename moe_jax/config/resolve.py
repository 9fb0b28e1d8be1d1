"""The per-backend choices behind every 'auto' in a config, and their resolution (once, in `config.typed.parse`).

    model.dtype='auto'      COMPUTE_DTYPE[backend]  bfloat16 on GPU and TPU, float32 on CPU (the model's matmuls round
                            their results to the compute dtype, and XLA:CPU's bfloat16 -> bfloat16 dot is no faster than
                            its float32 one; only bfloat16 -> float32 is, which the Newton-Schulz iteration uses)
    model.attention='auto'  ATTENTION[backend]      'cudnn' fused flash attention on GPU, XLA's attention on TPU, the
                            blocked kernel on CPU
    optim.ns_dtype='auto'   NS_DTYPE[backend]       Muon's Newton-Schulz operand dtype (bfloat16 everywhere)
    optim.ns_stack='auto'   NS_STACK[backend]       which Muon matrices share one Newton-Schulz chain
    optim.ns_method='auto'  NS_METHOD[backend]      'gram' (CPU) or 'standard' (GPU/TPU)

`resolve(config, backend)` reads a validated ConfigDict and returns the resolved values with what was requested,
without changing the ConfigDict; the run's config.json records the resolved values (`RunConfig.to_dict`), and
`describe` is the log line. The numerics those choices feed (dtypes, router precision) are model/precision.py's.
"""

from __future__ import annotations

from moe_jax.config.schema import AUTO, ConfigError

# backend -> compute dtype for model.dtype='auto'
COMPUTE_DTYPE = {"cpu": "float32", "gpu": "bfloat16", "tpu": "bfloat16"}
# backend -> attention implementation for model.attention='auto'
ATTENTION = {"cpu": "blocked", "gpu": "cudnn", "tpu": "xla"}
# backend -> dtype of Muon's Newton-Schulz iterations (optim.ns_dtype='auto')
NS_DTYPE = {"cpu": "bfloat16", "gpu": "bfloat16", "tpu": "bfloat16"}
# backend -> which Muon matrices share one Newton-Schulz chain (optim.ns_stack='auto'): 'none' on CPU, where XLA runs a
# loop of plain dots faster than a batched dot; 'layers' on GPU/TPU, where one batched chain saves launches
NS_STACK = {"cpu": "none", "gpu": "layers", "tpu": "layers"}
# backend -> Newton-Schulz method (optim.ns_method='auto'): 'gram' needs true float32 matmuls, which GPUs and TPUs run
# at a fraction of their bfloat16 rate, so there the bfloat16 X-space iteration stays
NS_METHOD = {"cpu": "gram", "gpu": "standard", "tpu": "standard"}
# implementations that run only on one backend
ATTENTION_BACKEND = {"cudnn": "gpu"}
# muon_impl='optax' is optax.contrib.muon: float32, X space, one chain per parameter, whatever the settings say
OPTAX_NEWTON_SCHULZ = {"ns_dtype": "float32", "ns_stack": "none", "ns_method": "standard"}


def backend(name: str | None = None) -> str:
    """'cpu' | 'gpu' | 'tpu' for `name` (default jax.default_backend()); 'cuda'/'rocm' count as 'gpu'."""
    if name is None:
        import jax
        name = jax.default_backend()
    return "gpu" if name in ("gpu", "cuda", "rocm") else name


def _auto(name: str, table: dict, backend_name: str, default: str) -> str:
    """`name`, or for 'auto' this backend's entry of `table` (`default` for a backend the table lacks)."""
    return table.get(backend_name, default) if name == AUTO else name


def newton_schulz(optim, backend_name: str) -> dict:
    """{'ns_dtype', 'ns_stack', 'ns_method'}: what Muon's Newton-Schulz runs as for config.optim ('auto' resolved for
    the backend; muon_impl='optax' is always OPTAX_NEWTON_SCHULZ)."""
    if optim.muon_impl == "optax":
        return dict(OPTAX_NEWTON_SCHULZ)
    return {"ns_dtype": _auto(optim.ns_dtype, NS_DTYPE, backend_name, "float32"),
            "ns_stack": _auto(optim.ns_stack, NS_STACK, backend_name, "layers"),
            "ns_method": _auto(optim.ns_method, NS_METHOD, backend_name, "standard")}


def resolve(config, backend_name: str | None = None, check_backend: bool = True) -> dict:
    """For a validated ConfigDict: {'backend': b, 'model.dtype': (requested, resolved), 'model.attention': (...),
    'ns_dtype': (...), 'ns_stack': (...), 'ns_method': (...)}. The ConfigDict is not changed. An implementation
    that cannot run on this backend raises ConfigError naming the field (unless not `check_backend`)."""
    b = backend(backend_name)
    m, o = config.model, config.optim
    attention = _auto(m.attention, ATTENTION, b, "xla")
    need = ATTENTION_BACKEND.get(attention)
    if check_backend and need is not None and need != b:
        raise ConfigError(f"config.model.attention: {attention!r} runs only on {need.upper()}, this backend is "
                          f"{b!r}; use 'auto' (picks {ATTENTION.get(b, 'xla')!r} here), 'blocked' or 'xla'")
    ns = newton_schulz(o, b)
    return {"backend": b, "model.dtype": (m.dtype, _auto(m.dtype, COMPUTE_DTYPE, b, "float32")),
            "model.attention": (m.attention, attention), **{k: (o[k], v) for k, v in ns.items()}}


def describe(info: dict) -> str:
    """One line for the log: 'precision on gpu: model.dtype auto -> bfloat16, ...'."""
    parts = []
    for key in ("model.dtype", "model.attention", "ns_dtype", "ns_stack", "ns_method"):
        req, got = info[key]
        parts.append(f"{key} {req} -> {got}" if req != got else f"{key} {got}")
    return (f"precision on {info['backend']}: " + ", ".join(parts)
            + "; params, optimizer state, router, softmaxes, norms and loss float32")
