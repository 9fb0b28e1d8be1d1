"""Analytic parameter and FLOP counts for any config, device peaks, and MFU.

Notation: V vocab, M d_model, H heads, D head_dim (H*D = M), F dense d_ff, Fe expert d_ff, E experts, k top_k,
L layers (L_moe of them MoE, L_dense = L - L_moe), S sequence length; f = 2 matrices per MLP ('gelu', 'silu':
w_in, w_out) or 3 ('swiglu': w_in, w_gate, w_out).

Parameters (`param_counts`):
    embedding     V*M
    head          M*V when untied (0 when tied: the embedding is reused)
    attention     L * 4*M*M                  (wq, wk, wv [M,H,D]; wo [H,D,M])
    dense_ffn     L_dense * f*M*F
    experts_total L_moe * E*f*M*Fe,   experts_active = L_moe * k*f*M*Fe
    router        L_moe * M*E
    norms         (2L + 1) * M
    total = all of the above; active = total - experts_total + experts_active (what one token touches).

FLOPs per token, forward (`flops_per_token`; one multiply-add = 2 FLOPs):
    matmul           2 * (attention + dense_ffn + experts_active + V*M)
                     - the embedding lookup is a gather (0 FLOPs); the output head [M,V] is a matmul, counted
                       once whether or not it is tied to the embedding; only the k active experts count.
    attention_scores L * 2*2*S*(H*D)/2 = 2*L*S*M   (QK^T and AV over S keys, halved by the causal mask)
    router           L_moe * 2*M*E
    forward = matmul + attention_scores + router;   training = 3 * forward (backward = 2x forward): the model-FLOP
    convention (MFU, model_flops budgets); what a step executes is counted apart (executed_training, below).
Norms, activations, softmaxes, RoPE and the loss are elementwise (O(M) or O(V) per token) and not counted.

Executed FLOPs (`executed_training` per token, `executed_flops_per_step`): what a training step makes the hardware
compute, counted from the dot products the compiled step runs (tests/test_flops.py counts them in the step's program):
    3 x (matmul + router)              forward, and two gradient products (w.r.t. the input and the weight) each;
    attention as the kernel computes it: `attention_entries` score entries per head and sequence, each costing
                                       2*D for QK^T and 2*D for AV forward (`attention_executed`), times 3 in training
                                       (two gradient products per forward product), 3.5 for cuDNN's flash kernel (its
                                       backward recomputes QK^T: 5 products against 2). 'blocked' computes, for query
                                       blocks of `model.attention_block` rows, every key up to the block's last row:
                                       at S <= block the whole S x S (twice the causal count above), causal savings
                                       only for whole key blocks above the diagonal; 'xla' computes S x S; 'cudnn'
                                       skips key tiles above the diagonal (tile CUDNN_TILE assumed), and where it
                                       cannot take the inputs (float32, odd head sizes) falls back to 'xla';
    + dispatch_overhead_training       (below);
    + with model.remat, the forward of each block recomputed in the backward pass, except the block's last
      contraction (the dense MLP's output matrix; an MoE layer's combine einsum), whose output the backward pass does
      not need (jax drops it).
Norms, softmaxes, activations and the loss stay uncounted (elementwise).

Capacity padding (reported apart, never in `training`): per MoE layer and token, with T tokens per routing group and
C slots per expert (moe.expected_capacity), the experts compute E*C/T slots per token of which k hold a token when
routing is balanced: padding = (E*C/T - k) * 2*f*M*Fe = padding_fraction * (E*C/T) * 2*f*M*Fe; plus the dispatch
('GTEC,GTM->EGCM') and combine ('GTEC,EGCM->GTM') einsums, 2*E*C*M each per token. These are FLOPs the hardware
spends that the model does not need (an implementation cost), so MFU excludes them. `capacity_padding` is the forward
count; `capacity_padding_training` is what training executes: the padded expert slots 3x; the dispatch and combine
einsums 2x each, not 3x: the 0/1 dispatch mask is built from integer choices and has no gradient, so the dispatch
einsum's only gradient is w.r.t. the tokens and the combine einsum's only one w.r.t. the expert outputs (moe.py applies
the gates to the slots elementwise, so no einsum computes the gradient of a [G, T, E, C] combine tensor).

Dispatch overhead (`dispatch_overhead`, forward; `dispatch_overhead_training`, executed in training): the FLOPs the
MoE dispatch executes beyond the model FLOPs, for the config's `moe.dispatch`:
    capacity  = capacity_padding (above; training: capacity_padding_training) + the two einsums that build the
                dispatch mask and the gate of each chosen expert from the top-k choices ('GTKE,GTKC->GTEC', 2*K*E*C,
                no gradient: 1x in training; 'GTKE,GTK->GTE', 2*K*E, one gradient w.r.t. the gates: 2x);
    dropless  = L_moe * 2*k*M (the gate-weighted sum of each token's k expert outputs)
                + on XLA:CPU, L_moe * k*(E-1) * 2*f*M*Fe: jax lowers `ragged_dot` there to one dense dot of every
                  row against all E experts' weights with a mask (E times the active expert FLOPs; on TPU/GPU it is
                  a grouped matmul and this term is 0; moe.grouped_matmul='megablox' never has it); training 3x
                  (each ragged_dot has two gradient products).
    Sorting (argsort of k integer keys per token), the gathers into and out of expert order and the all-to-alls
    move data and are counted as 0 FLOPs: their cost shows in the step time, not in this count.
`platform` (default: jax.default_backend()) decides the XLA:CPU term.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from moe_jax.config.typed import ModelConfig

# Dense bf16 peak TFLOP/s per chip (no sparsity). Matched on jax.devices()[0].device_kind, first pattern wins
# (so 'v5 lite' is tested before 'v5'). CPU has no entry: its peak is measured (`measure_matmul_tflops`).
PEAK_TFLOPS: dict[str, float] = {
    "H100": 989.0,
    "H200": 989.0,
    "B200": 2250.0,  # NVIDIA HGX B200 dense BF16 (datasheet 4.5 PFLOPS with 2:4 sparsity, i.e. 2.25 dense)
    "A100": 312.0,
    "TPU v4": 275.0,
    "TPU v5e": 197.0,
    "TPU v5 lite": 197.0,  # device_kind of v5e
    "TPU v5p": 459.0,
    "TPU v5": 459.0,  # device_kind of v5p
    "TPU v6e": 918.0,
    "TPU v6 lite": 918.0,  # device_kind of v6e (Trillium)
}


def _mlp_mats(model: ModelConfig) -> int:
    return 3 if model.mlp == "swiglu" else 2


def _layer_counts(model: ModelConfig) -> tuple[int, int]:
    """(dense layers, MoE layers)."""
    return model.n_layers - model.num_moe_layers, model.num_moe_layers


def param_counts(model: ModelConfig) -> dict[str, int]:
    """Parameter counts by kind (see module docstring). 'head' is 0 when tied."""
    m, moe = model, model.moe
    v, d, f = m.vocab_size, m.d_model, _mlp_mats(model)
    n_dense, n_moe = _layer_counts(model)
    hd = m.n_heads * m.head_dim
    e, k = moe.num_experts, moe.top_k
    per_expert = f * d * moe.d_ff if n_moe else 0
    c = dict(
        embedding=v * d,
        head=0 if m.tie_embeddings else d * v,
        attention=m.n_layers * 4 * d * hd,
        dense_ffn=n_dense * f * d * m.d_ff,
        experts_total=n_moe * e * per_expert,
        experts_active=n_moe * k * per_expert,
        router=n_moe * d * e,
        norms=(2 * m.n_layers + 1) * d,
    )
    c["total"] = (c["embedding"] + c["head"] + c["attention"] + c["dense_ffn"] + c["experts_total"] + c["router"]
                  + c["norms"])
    c["active"] = c["total"] - c["experts_total"] + c["experts_active"]
    return c


CUDNN_TILE = 128  # query and key rows per tile assumed for cuDNN's flash attention (not exposed by cuDNN)
# training FLOPs / forward FLOPs of the attention scores, by kernel (module docstring)
ATTENTION_TRAINING_FACTOR = {"blocked": 3.0, "xla": 3.0, "cudnn": 3.5}


def attention_kernel(model: ModelConfig) -> str:
    """The attention the model runs in training: model.attention, or 'xla' where cuDNN cannot take the inputs
    (layers.cudnn_fallback_reason: float32, head_dim not a multiple of 8 or over 128)."""
    if model.attention != "cudnn":
        return model.attention
    from moe_jax.model import layers
    q = jax.ShapeDtypeStruct((1, 1, model.n_heads, model.head_dim), layers.dtype_of(model.dtype))
    return "xla" if layers.cudnn_fallback_reason(q) else "cudnn"


def attention_entries(seq_len: int, kernel: str, block: int = 0) -> int:
    """Query-key score entries one head computes for one sequence of `seq_len` tokens: 'xla' S*S; 'blocked'
    (layers.blocked_causal_attention) every key up to each query block's last row, blocks of `block` rows (<= 0 or
    >= S: one block, S*S); 'cudnn' the same at CUDNN_TILE."""
    s = seq_len
    if kernel == "xla":
        return s * s
    block = CUDNN_TILE if kernel == "cudnn" else block
    block = s if block <= 0 else min(block, s)
    return sum((min(start + block, s) - start) * min(start + block, s) for start in range(0, s, block))


def _capacity_overhead(model: ModelConfig, tokens: int) -> tuple[float, ...]:
    """Per MoE layer and token, capacity dispatch FLOPs beyond the model's (module docstring): (padding forward,
    padding training, mask and gate einsums forward, the same in training, the combine einsum's forward)."""
    from moe_jax.model import moe as moe_lib  # model code: imported lazily so counting stays cheap to import
    m, moe = model, model.moe
    t = moe_lib.group_size_for(tokens, moe.group_size)
    cap = moe_lib.expected_capacity(model, tokens, train=True)
    frac = moe_lib.capacity_padding_fraction(model, tokens, train=True)
    padded = frac * moe.num_experts * cap / t * 2.0 * _mlp_mats(model) * m.d_model * moe.d_ff
    einsum = 2.0 * moe.num_experts * cap * m.d_model  # dispatch, and combine, each
    mask, gates = 2.0 * moe.top_k * moe.num_experts * cap, 2.0 * moe.top_k * moe.num_experts
    return padded + 2 * einsum, 3 * padded + 4 * einsum, mask + gates, mask + 2 * gates, einsum


def flops_per_token(model: ModelConfig, seq_len: int, batch_size: int,
                    platform: str | None = None) -> dict[str, float]:
    """Per-token FLOPs (see module docstring) at sequence length `seq_len`; batch_size (sequences per micro-batch)
    only matters for the capacity padding (the routing group size depends on the tokens per micro-batch); platform
    ('cpu', 'gpu', 'tpu'; default jax.default_backend()) only for the dropless dispatch overhead. A run's:
    `run_flops_per_token(run)`."""
    m, moe = model, model.moe
    s = seq_len
    p = param_counts(model)
    n_dense, n_moe = _layer_counts(model)
    hd = m.n_heads * m.head_dim

    matmul = 2.0 * (p["attention"] + p["dense_ffn"] + p["experts_active"] + m.vocab_size * m.d_model)
    attention_scores = m.n_layers * 2.0 * 2.0 * s * hd / 2.0
    router = n_moe * 2.0 * m.d_model * moe.num_experts
    forward = matmul + attention_scores + router
    kernel = attention_kernel(model)
    attention_executed = m.n_layers * 4.0 * hd * attention_entries(s, kernel, m.attention_block) / s

    padding = padding_training = overhead = overhead_training = combine = 0.0
    if n_moe and moe.dispatch == "dropless":
        platform = jax.default_backend() if platform is None else platform
        overhead = combine = n_moe * 2.0 * moe.top_k * m.d_model  # the gate-weighted sum: the layer's last step
        if platform == "cpu" and moe.grouped_matmul == "ragged_dot":
            overhead += n_moe * moe.top_k * (moe.num_experts - 1) * 2.0 * _mlp_mats(model) * m.d_model * moe.d_ff
        overhead_training = 3.0 * overhead
    elif n_moe:
        padding, padding_training, masks, masks_training, combine = (
            n_moe * x for x in _capacity_overhead(model, batch_size * s))
        overhead, overhead_training = padding + masks, padding_training + masks_training
    executed = (3.0 * (matmul + router) + ATTENTION_TRAINING_FACTOR[kernel] * attention_executed
                + overhead_training)
    if m.remat:  # each block's forward again, but its last contraction (module docstring)
        executed += (matmul - 2.0 * m.vocab_size * m.d_model + attention_executed + router + overhead - combine
                     - n_dense * 2.0 * m.d_model * m.d_ff)
    return dict(forward=forward, training=3.0 * forward, matmul=matmul, attention_scores=attention_scores,
                router=router, capacity_padding=padding, capacity_padding_training=padding_training,
                dispatch_overhead=overhead, dispatch_overhead_training=overhead_training,
                attention_executed=attention_executed, executed_training=executed)


def run_flops_per_token(run) -> dict[str, float]:
    """flops_per_token of a config.typed.RunConfig at its train.seq_len and train.batch_size."""
    return flops_per_token(run.model, run.train.seq_len, run.train.batch_size)


def newton_schulz_flops(rows: int, cols: int, iterations: int, method: str = "standard") -> float:
    """FLOPs of `iterations` Newton-Schulz iterations on one [rows, cols] matrix (optax.contrib.muon's quintic).
    With m = min(rows, cols), n = max(rows, cols) (Muon transposes so that X is [m, n]), one X-space iteration is
    A = X X^T (2 m^2 n), B = b A + c A^2 (2 m^3; the scalings are elementwise, not counted), X' = a X + B X
    (2 m^2 n): 4 m^2 n + 2 m^3. method='gram' (muon.newton_schulz_gram, for n >= muon.GRAM_MIN_ASPECT m; other
    matrices run X space) computes A_0 = X X^T and R X_0 (2 m^2 n each) and 4 iterations - 3 m x m products:
    4 m^2 n + (8 iterations - 6) m^3. The normalisation before the first iteration is O(mn) and not counted."""
    from moe_jax.optim.muon import GRAM_MIN_ASPECT
    m, n = min(rows, cols), max(rows, cols)
    if method == "gram" and n >= GRAM_MIN_ASPECT * m:
        return 4.0 * m * m * n + (8.0 * iterations - 6.0) * m ** 3
    return iterations * (4.0 * m * m * n + 2.0 * m ** 3)


def muon_matrices(model: ModelConfig, optim) -> list[tuple[int, int, int]]:
    """(count, rows, cols) of the matrices Muon orthogonalises each step (optimizer.py's dimension numbers): per
    layer wq, wk, wv as [M, H*D] (with optim.muon_fused_qkv one [M, 3*H*D]) and wo as [H*D, M]; a dense FFN's f
    matrices; an MoE layer's E*f expert matrices (each expert on its own) and the router [M, E] when
    optim.router_muon. Empty when optim.name != 'muon'."""
    if optim.name != "muon":
        return []
    m, moe = model, model.moe
    d, f = m.d_model, _mlp_mats(model)
    hd = m.n_heads * m.head_dim
    n_dense, n_moe = _layer_counts(model)
    qkv = [(m.n_layers, d, 3 * hd)] if optim.muon_fused_qkv else [(3 * m.n_layers, d, hd)]
    out = qkv + [(m.n_layers, hd, d)]
    if n_dense:
        out.append((n_dense * f, d, m.d_ff))
    if n_moe:
        out.append((n_moe * moe.num_experts * f, d, moe.d_ff))
        if optim.router_muon:
            out.append((n_moe, d, moe.num_experts))
    return out


def optimizer_flops_per_step(model: ModelConfig, optim, devices: int = 1) -> float:
    """Newton-Schulz FLOPs of one optimizer step (optim: a config.typed.OptimConfig): sum over `muon_matrices` of
    count x newton_schulz_flops(rows, cols, optim.ns_steps, optim.ns.method) (5 steps by default; the method as
    resolved for the backend, 'standard' for muon_impl='optax'). Once per optimizer step, whatever train.grad_accum
    is. Momentum, AdamW and clipping are elementwise (O(parameters)) and not counted; 0 for optim.name='adamw'.

    `devices` > 1: the FLOPs ONE device runs under distributed Muon (config.mesh.fsdp; muon.distributed_orthogonalize)
    over that many devices: the matrices of one oriented shape [min, max] form one stack, padded to a multiple of
    `devices`, so each device runs ceil(count / devices) of them. devices=1: every device runs them all (replicated)."""
    it = int(optim.ns_steps)
    stacks: dict = {}
    for c, r, k in muon_matrices(model, optim):
        stacks[(min(r, k), max(r, k))] = stacks.get((min(r, k), max(r, k)), 0) + c
    return float(sum(-(-c // devices) * newton_schulz_flops(r, k, it, optim.ns.method)
                     for (r, k), c in stacks.items()))


def executed_flops_per_step(run, devices: int = 1) -> float:
    """What one optimizer step of a config.typed.RunConfig makes the hardware compute, as counted here: flops_per_token's
    executed_training (the model's products and their gradients as executed, attention as its kernel computes it, the
    dispatch's overhead, remat's recomputation) times the tokens of a step, plus the optimizer's Newton-Schulz FLOPs
    (optimizer_flops_per_step).

    `devices` > 1: what ONE of that many devices computes: its share of the model's work, plus Newton-Schulz as it
    runs there (every matrix, unless config.mesh.fsdp distributes it: optimizer_flops_per_step's `devices`)."""
    ns_devices = devices if run.mesh.fsdp else 1
    return (run_flops_per_token(run)["executed_training"] * run.train.tokens_per_step / devices
            + optimizer_flops_per_step(run.model, run.optim, ns_devices))


def flops_per_step(run) -> float:
    """Training FLOPs of one optimizer step of a RunConfig: training FLOPs/token x batch_size x grad_accum x
    seq_len."""
    return run_flops_per_token(run)["training"] * run.train.tokens_per_step


# ---------------------------------------------------------------------------------------------------------------
# Peaks and MFU


def lookup_peak_tflops(device_kind: str) -> float | None:
    """Table peak for a device_kind string, or None when it is not in PEAK_TFLOPS."""
    kind = device_kind.lower()
    for pattern, tflops in PEAK_TFLOPS.items():
        if pattern.lower() in kind:
            return tflops
    return None


def measure_matmul_tflops(n: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
    """Achieved TFLOP/s of one jitted [n,n] @ [n,n] matmul (2*n^3 FLOPs) on the default device: compiled and run
    once to warm up, then the best of `repeats` timed runs (best, because on a shared machine the slow runs measure
    the neighbours). This is the CPU 'peak' MFU is measured against."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
    mm = jax.jit(jnp.matmul)
    mm(a, b).block_until_ready()
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        mm(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best / 1e12


def peak_tflops(device=None, measured_cpu: float | None = None) -> float:
    """Peak TFLOP/s of one device: the PEAK_TFLOPS table for accelerators; for a CPU `measured_cpu` if given, else
    `measure_matmul_tflops()`. An accelerator missing from the table raises ValueError (set train.peak_tflops)."""
    device = jax.devices()[0] if device is None else device
    if device.platform == "cpu":
        return float(measured_cpu) if measured_cpu is not None else measure_matmul_tflops()
    peak = lookup_peak_tflops(device.device_kind)
    if peak is None:
        raise ValueError(f"no peak TFLOP/s for device_kind {device.device_kind!r} in flops.PEAK_TFLOPS; set "
                         f"config.train.peak_tflops to its bf16 peak")
    return peak


def devices_peak_tflops(devices=None, per_device_tflops: float = 0.0, matmul_n: int = 2048,
                        dtype=jnp.float32) -> tuple[float, str]:
    """Peak TFLOP/s of `devices` together (default: all) and where it comes from: `per_device_tflops` x n when > 0
    (config.train.peak_tflops); on a CPU one measured matmul (`measure_matmul_tflops(matmul_n, dtype)` on the first
    device; simulated CPU devices share the host's cores, so it is not multiplied); else the PEAK_TFLOPS table x n."""
    devices = list(jax.devices() if devices is None else devices)
    dev, n = devices[0], len(devices)
    if per_device_tflops > 0:
        return per_device_tflops * n, f"config: {per_device_tflops:g} x {n}"
    if dev.platform == "cpu":
        with jax.default_device(dev):
            tf = measure_matmul_tflops(matmul_n, dtype)
        return tf, f"measured {matmul_n}x{matmul_n} {jnp.dtype(dtype).name} matmul, best of 5"
    return peak_tflops(dev) * n, f"table peak of {dev.device_kind} x {n}"


def mfu(tokens_per_s: float, training_flops_per_token: float, peak: float) -> float:
    """Model FLOP utilisation: tokens/s x training FLOPs/token (flops_per_token's 'training': padding excluded) /
    (peak TFLOP/s x 1e12)."""
    return tokens_per_s * training_flops_per_token / (peak * 1e12)
