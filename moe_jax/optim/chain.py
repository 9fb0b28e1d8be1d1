"""The optimizer: global-norm clipping, then Muon for hidden matrices and AdamW for everything else.

    tx = optimizer.build(run.optim, run.train.steps)   # an optax.GradientTransformation (run: config.typed.RunConfig)
    opt_state = tx.init(params)           # params: the pure dict from model.init_params(run.model, run.seed)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)

One `tx.update` is one optimizer step. Gradient accumulation is not done here: the trainer scans over the
`train.grad_accum` micro-batches itself, averages their gradients and calls `tx.update` once, so every count in this
module (warmup, cosine decay, Muon/Adam bias corrections) advances once per optimizer step, never per micro-batch.

Which parameter goes where (`param_labels`, `label_table` prints it):

    parameter                           shape     label   Muon dimension numbers (reduction -> output)
    embed/embedding                     [V, M]    adamw   -            (weight decay: yes)
    head (untied output head)           [M, V]    adamw   -            (weight decay: yes)
    */scale (RMSNorm), any 1-D bias     [M]       adamw   -            (weight decay: no; yes: optim.decay_norms)
    blocks/i/ffn/w_router               [M, E]    adamw   -            (muon (0 -> 1) when optim.router_muon)
    blocks/i/attn/{wq,wk,wv}            [M, H, D] muon    0 -> (1, 2)  (all heads as one M x HD matrix; with
                                                                       optim.muon_fused_qkv q, k, v as ONE
                                                                       [M, 3, H, D] -> M x 3HD: fuse_qkv)
    blocks/i/attn/wo                    [H, D, M] muon    (0, 1) -> 2
    blocks/i/ffn/{w_in,w_gate}  dense   [M, F]    muon    0 -> 1
    blocks/i/ffn/w_out          dense   [F, M]    muon    0 -> 1
    blocks/i/ffn/{w_in,w_gate}  experts [E, M, F] muon    1 -> 2, axis 0 batched: each expert on its own
    blocks/i/ffn/w_out          experts [E, F, M] muon    1 -> 2, axis 0 batched

A parameter of rank >= 2 that matches no rule raises ValueError (a new weight must be placed on purpose).

Chain for optim.name == 'muon':
    clip_by_global_norm(optim.clip_norm)                       (omitted when clip_norm == 0)
    partition(labels):
      'muon':  muon.muon(muon schedule, explicit muon_weight_dimension_numbers, beta=momentum,
                         nesterov, ns_steps, weight_decay=muon_weight_decay, eps=ns_eps,
                         consistent_rms=0.2 if muon_scale == 'moonlight' else None,
                         ns_dtype=ns_dtype(optim.ns), group_key=ns_group_key(optim.ns), ns_method=optim.ns.method)
               (optim.muon_impl='batched', the default: optax.contrib.muon's semantics and state, one batched
               Newton-Schulz per group: a weight's copies across layers (optim.ns_stack='layers') or one
               parameter ('none'); wide matrices in float32 Gram space with optim.ns_method='gram' (CPU's
               'auto'); 'optax': optax.contrib.muon itself, float32 only; the seeds' options below are
               'batched' only)
      'adamw': optax.adamw(adamw schedule, b1, b2, eps, weight_decay, mask=rank >= 2)
For optim.name == 'adamw': the same clip, then that AdamW for every parameter (same schedule and decay mask).

Why the non-Muon parameters get a separate `optax.adamw` rather than the Adam branch built into
`optax.contrib.muon`: in optax 0.2.8 that branch is `adamw(..., eps=<muon's eps>, nesterov=<muon's nesterov>)` -
NAdamW whenever Muon uses Nesterov momentum - and its weight decay has no mask, so it would decay the norms. Here
`optax.contrib.muon` only ever sees the Muon-labelled leaves (its own Adam branch is empty) and AdamW is exactly
`optax.adamw` with a decay mask. See docs/optimizer.md.

Learning-rate schedule (per optimizer step s = 0, 1, ..., train.steps - 1; N = optim.horizon(train.steps), i.e.
optim.schedule_steps or train.steps; W = optim.warmup(train.steps), warmup_steps or warmup_fraction of N):
    s < W:  lr = peak * (s + 1) / W                               (linear warmup; step 0 is not wasted at lr 0)
    s >= W: lr = peak * (r + (1 - r) * (1 + cos(pi * p)) / 2),  p = min(1, (s - W) / max(1, N - 1 - W))
with r = optim.min_lr_ratio: step N - 1 (the last step by default) runs at exactly r * peak. Muon uses peak =
optim.muon_lr, AdamW peak = optim.adamw_lr. Weight decay follows optax/PyTorch: the decay term is multiplied by the
scheduled lr. optim.warmup_from_zero (torch LambdaLR's count, the seeds'): s / W in the warmup (the first step at lr
0) and p = (s - W) / (N - W).

The seeds' semantics, each an option that is off by default (configs/seeds/*.py turn on what their seed does;
docs/decisions.md, "Seed fidelity", has each one's measured effect): optim.muon_fused_qkv, muon_bias_correction=False
(Nesterov momentum without bias correction), momentum_warmup_steps/start (seed 004), decay_norms, ns_eps, ns_dtype
'bfloat16'/'float16' with ns_rounding='every_op', schedule_steps (the seeds laid the schedule over micro-batches and
stepped it per optimizer step: warmup 4x as long, cosine stopped at 0.905x), warmup_from_zero; moe.load_balance_form.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax.contrib import MuonDimensionNumbers

from moe_jax.optim import muon as muon_lib
from moe_jax.model import precision

MUON, ADAMW = "muon", "adamw"
QKV, FUSED_QKV = ("wq", "wk", "wv"), "wqkv"

# Muon dimension numbers by parameter kind.
_ATTN_IN = MuonDimensionNumbers(reduction_axis=0, output_axis=(1, 2))  # wq/wk/wv [M, H, D]
_ATTN_QKV = MuonDimensionNumbers(reduction_axis=0, output_axis=(1, 2, 3))  # fused wqkv [M, 3, H, D] (fuse_qkv)
_ATTN_OUT = MuonDimensionNumbers(reduction_axis=(0, 1), output_axis=2)  # wo [H, D, M]
_MATRIX = MuonDimensionNumbers(reduction_axis=0, output_axis=1)  # dense [M, F] / [F, M], router [M, E]
_EXPERTS = MuonDimensionNumbers(reduction_axis=1, output_axis=2)  # experts [E, in, out]: axis 0 is a batch axis


# ---------------------------------------------------------------------------------------------------------------
# Parameter rules


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_str(path) -> str:
    """'blocks/0/attn/wq' from a jax key path."""
    return "/".join(_key_name(k) for k in path)


def _rule(path: str, ndim: int, optim) -> tuple[str, MuonDimensionNumbers | None, bool]:
    """(label, Muon dimension numbers or None, AdamW weight decay?) for one parameter (optim: an OptimConfig)."""
    parts = path.split("/")
    name = parts[-1]
    parent = parts[-2] if len(parts) > 1 else ""
    muon = optim.name == "muon"
    if ndim < 2:  # norm scales, biases
        return ADAMW, None, bool(optim.decay_norms)
    if path == "embed/embedding" or path == "head":
        return ADAMW, None, True
    if parent == "ffn" and name == "w_router" and ndim == 2:
        if muon and optim.router_muon:
            return MUON, _MATRIX, False
        return ADAMW, None, True
    if parent == "attn" and name in QKV and ndim == 3:
        dims = _ATTN_IN
    elif parent == "attn" and name == FUSED_QKV and ndim == 4:  # only inside Muon, with optim.muon_fused_qkv
        dims = _ATTN_QKV
    elif parent == "attn" and name == "wo" and ndim == 3:
        dims = _ATTN_OUT
    elif parent == "ffn" and name in ("w_in", "w_gate", "w_out") and ndim == 2:
        dims = _MATRIX
    elif parent == "ffn" and name in ("w_in", "w_gate", "w_out") and ndim == 3:
        dims = _EXPERTS
    else:
        raise ValueError(f"optimizer: no rule for parameter {path!r} of rank {ndim}; add one to "
                         f"moe_jax/optim/chain.py:_rule (Muon dimension numbers, or AdamW with/without weight decay)")
    if muon:
        return MUON, dims, False
    return ADAMW, None, True


def _map_rules(fn, params, optim):
    """Tree like `params` with fn(rule) at each leaf. Subtrees without leaves (optax MaskedNode) are kept as is."""
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(_rule(path_str(p), np.ndim(x), optim)), params)


def weight_dimension_numbers(params, optim):
    """Pure-dict tree for `muon_weight_dimension_numbers`: MuonDimensionNumbers for Muon leaves, None elsewhere."""
    return _map_rules(lambda r: r[1], params, optim)


def labels_tree(params, optim):
    """Tree of 'muon' | 'adamw' labels, shaped like `params`."""
    return _map_rules(lambda r: r[0], params, optim)


def decay_mask(params, optim):
    """Tree of bools: AdamW weight decay on matrices (embedding, head, router...), not on norms or biases (unless
    optim.decay_norms, as the seeds' AdamW)."""
    return _map_rules(lambda r: r[2], params, optim)


def param_labels(params, optim) -> dict[str, str]:
    """{'blocks/0/attn/wq': 'muon', 'embed/embedding': 'adamw', ...}."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {path_str(p): _rule(path_str(p), np.ndim(x), optim)[0] for p, x in flat}


def _dims_str(dims: MuonDimensionNumbers | None) -> str:
    if dims is None:
        return "-"
    return f"{dims.reduction_axis} -> {dims.output_axis}"


def label_table(params, optim) -> str:
    """Printable table: path, shape, label, Muon dimension numbers, AdamW weight decay; then totals per label."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    rows = [("parameter", "shape", "label", "muon dims (reduction -> output)", "adamw decay")]
    totals = {MUON: 0, ADAMW: 0}
    for p, x in flat:
        path = path_str(p)
        label, dims, decay = _rule(path, np.ndim(x), optim)
        totals[label] += int(np.prod(np.shape(x)))
        rows.append((path, str(list(np.shape(x))), label, _dims_str(dims),
                     ("yes" if decay else "no") if label == ADAMW else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"muon: {totals[MUON]:,} parameters; adamw: {totals[ADAMW]:,} parameters")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Schedules


def _lr_at(peak: float, warmup: int, horizon: int, min_ratio: float, step, from_zero: bool = False):
    """Linear warmup then cosine to min_ratio * peak at step `horizon - 1`; works on ints and traced arrays.
    from_zero (torch LambdaLR's count, the seeds'): warmup s / W (step 0 at lr 0) and p = (s - W) / (horizon - W)."""
    s = jnp.asarray(step, jnp.float32)
    shift = 0.0 if from_zero else 1.0
    warm = peak * (s + shift) / max(warmup, 1)
    p = jnp.clip((s - warmup) / max(1, horizon - shift - warmup), 0.0, 1.0)
    decay = peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + jnp.cos(math.pi * p)))
    return jnp.where(s < warmup, warm, decay)


def schedule(optim, steps: int, peak: float) -> optax.Schedule:
    """The warmup + cosine schedule (see module docstring) of a run of `steps` optimizer steps, for a given peak
    learning rate (optim: an OptimConfig; its schedule_steps and warmup_from_zero choose the seeds' variant)."""
    w, r, n = optim.warmup(steps), float(optim.min_lr_ratio), optim.horizon(steps)
    return lambda count: _lr_at(float(peak), w, n, r, count, bool(optim.warmup_from_zero))


def momentum(optim):
    """Muon's momentum: optim.momentum, or with optim.momentum_warmup_steps = W > 0 the schedule count -> (1 - f)
    momentum_warmup_start + f momentum, f = min(count / W, 1) (seed 004's MuonWithWarmup; count 0 = first step)."""
    w = int(optim.momentum_warmup_steps)
    if w == 0:
        return float(optim.momentum)
    start, end = float(optim.momentum_warmup_start), float(optim.momentum)
    return lambda count: start + (end - start) * jnp.minimum(jnp.asarray(count, jnp.float32) / w, 1.0)


def learning_rates(optim, steps: int, step: int) -> dict[str, float]:
    """{'muon_lr': ..., 'adamw_lr': ...} at optimizer step `step` (0-based) of a `steps`-step run, for logging.
    With optim.name == 'adamw' there is no Muon and muon_lr is 0."""
    out = {"adamw_lr": float(schedule(optim, steps, optim.adamw_lr)(step))}
    out["muon_lr"] = float(schedule(optim, steps, optim.muon_lr)(step)) if optim.name == "muon" else 0.0
    return out


# ---------------------------------------------------------------------------------------------------------------
# The transformation


def _adamw(optim, steps: int) -> optax.GradientTransformation:
    return optax.adamw(schedule(optim, steps, optim.adamw_lr), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                       weight_decay=optim.weight_decay, mask=lambda p: decay_mask(p, optim), nesterov=False)


def ns_dtype(ns):
    """The Newton-Schulz operand dtype of a resolved config.typed.NewtonSchulz (optim.ns; 'auto' was
    config/resolve.py's NS_DTYPE of the backend: bfloat16 everywhere: bfloat16 operands, float32 accumulation:
    measured 24% / 20% faster than float32 for the dense / MoE update on the 2-core CPU, 2.2-2.7% update error;
    GPU/TPU by reference, as the reference Muon runs it, until the device check has timed both).
    docs/optimizer.md has the numbers."""
    return precision.DTYPES[ns.dtype]


def muon_group_key(path) -> str:
    """Which Muon matrices may share one batched Newton-Schulz: the same weight in every layer ('blocks/*/attn/wq').
    Those have the same logical axes, hence the same sharding, so stacking them needs no communication."""
    return "/".join("*" if _key_name(k).isdigit() else _key_name(k) for k in path)


def ns_group_key(ns):
    """The group key for ns.stack: 'layers' = muon_group_key (one chain per weight across layers), 'none' = the
    parameter's own path (one chain per parameter, as optax.contrib.muon; experts stay one [E, m, n] chain). 'auto'
    was config/resolve.py's NS_STACK ('none' on CPU, where XLA runs a loop of plain dots faster than a batched dot;
    'layers' on GPU/TPU, where one batched chain saves launches). docs/optimizer.md has the measurements."""
    return muon_group_key if ns.stack == "layers" else path_str


def _is_attn_qkv(node) -> bool:
    return (isinstance(node, dict) and all(k in node for k in QKV)
            and not any(isinstance(node[k], optax.MaskedNode) for k in QKV))


def fuse_qkv(tree):
    """Each attention's wq, wk, wv [M, H, D] as one wqkv [M, 3, H, D] (outputs (3, H, D), the seeds' fused qkv
    Linear's row order), for Muon's orthogonalisation and shape scale (optim.muon_fused_qkv; reduction 0 -> output
    (1, 2, 3): one [M, 3M] matrix, Keller scale sqrt(3)). Other leaves unchanged."""
    if _is_attn_qkv(tree):
        return {**{k: v for k, v in tree.items() if k not in QKV}, FUSED_QKV: jnp.stack([tree[k] for k in QKV], 1)}
    return {k: fuse_qkv(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def unfuse_qkv(fused, like):
    """fuse_qkv's inverse, laid out as `like` (the unfused tree)."""
    if _is_attn_qkv(like):
        return {k: fused[FUSED_QKV][:, QKV.index(k)] if k in QKV else fused[k] for k in like}
    return {k: unfuse_qkv(fused[k], v) for k, v in like.items()} if isinstance(like, dict) else fused


def _muon(optim, steps: int, distributed: bool = False) -> optax.GradientTransformation:
    o = optim
    kwargs = dict(
        learning_rate=schedule(o, steps, o.muon_lr),
        ns_steps=int(o.ns_steps),
        beta=momentum(o),
        eps=o.ns_eps,
        weight_decay=o.muon_weight_decay,
        nesterov=bool(o.nesterov),
        # Only Muon-labelled leaves reach this transform (the others are masked out by the outer partition), so
        # its built-in Adam branch is empty; its settings are given explicitly all the same.
        adam_b1=o.b1,
        adam_b2=o.b2,
        adam_weight_decay=0.0,
        adam_learning_rate=schedule(o, steps, o.adamw_lr),
        muon_weight_dimension_numbers=lambda p: weight_dimension_numbers(p, o),
        consistent_rms=0.2 if o.muon_scale == "moonlight" else None,
    )
    if o.muon_impl == "optax":  # iterates in the momentum's dtype (float32); validation rejects ns_dtype='bfloat16'
        return optax.contrib.muon(**kwargs)
    return muon_lib.muon(**kwargs, ns_dtype=ns_dtype(o.ns), group_key=ns_group_key(o.ns), ns_method=o.ns.method,
                         distributed=distributed, ns_rounding=o.ns_rounding, bias_correction=o.muon_bias_correction,
                         fuse=(fuse_qkv, unfuse_qkv) if o.muon_fused_qkv else None)


def build(optim, steps: int, distributed_muon: bool = False) -> optax.GradientTransformation:
    """clip_by_global_norm(optim.clip_norm) (if > 0), then Muon + AdamW (optim.name='muon') or AdamW alone, for a run
    of `steps` optimizer steps (the schedules' length; optim: a config.typed.OptimConfig). `distributed_muon`
    (config.mesh.fsdp): each device runs Newton-Schulz on 1/N of the matrices (muon.distributed_orthogonalize);
    same state, same update.

    One call of `update` is one optimizer step: the trainer averages the gradients of its `train.grad_accum`
    micro-batches (a scan) before calling it, so schedules and moment counts advance per optimizer step.
    """
    parts = []
    if optim.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(optim.clip_norm))
    if optim.name == "muon":
        parts.append(optax.partition({MUON: _muon(optim, steps, distributed_muon), ADAMW: _adamw(optim, steps)},
                                     lambda p: labels_tree(p, optim)))
    else:
        parts.append(_adamw(optim, steps))
    return optax.chain(*parts)
