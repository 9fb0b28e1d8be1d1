"""Muon with batched Newton-Schulz: `optax.contrib.muon`'s semantics and state, one Newton-Schulz chain per group.

    tx = muon.muon(learning_rate, ns_steps=5, beta=0.95, eps=1e-8, weight_decay=0.0, nesterov=True,
                   muon_weight_dimension_numbers=dims_fn, consistent_rms=None,
                   group_key=lambda path: ..., ns_dtype=jnp.float32, ns_method='standard')

What is the same as optax.contrib.muon (optax 0.2.8; tests/test_optimizer.py checks updates and state against it):
  - the transformation and its state: partition({'muon': chain(scale_by_muon, scale_by_shape, add_decayed_weights,
    scale_by_learning_rate), 'adam': adamw}) with `optax.contrib.MuonState(count, mu, ns_coeffs)`, so an optimizer
    state (a checkpoint) of either implementation feeds the other;
  - momentum mu <- beta mu + (1 - beta) g, Nesterov mu_hat = beta * mu / (1 - beta^(t+1)) + (1 - beta) g / (1 - beta^t);
  - each matrix (per MuonDimensionNumbers: batch axes, then reduction -> output, as [B, fan_in, fan_out]) is
    transposed to put the smaller side first ([B, m, n], m <= n: the Gram matrix X X^T is m x m), divided by its own
    Frobenius norm + eps, then X <- a X + (b A + c A^2) X, A = X X^T, `ns_steps` times with the coefficients of the
    state (`ns_coeffs`, shape [3]);
  - the shape scale (keller sqrt(max(1, fan_out / fan_in)), or consistent_rms * sqrt(max(fan_in, fan_out))), the
    decoupled weight decay and the learning rate.

What differs: the matrices of one group are orthogonalised by one chain of batched matmuls instead of one chain per
parameter. A group is (group_key(path), B, fan_in, fan_out, dtype): the caller's key decides which parameters may
share a stack. moe_jax/optim/chain.py (`optim.ns_stack`) keys either by the parameter's name with the layer index
dropped ('blocks/*/attn/wq': 'layers', so one weight's copies across layers are stacked on a new leading axis into
[L, B, m, n]; they have the same logical axes, hence the same sharding, and stacking them on a new replicated axis
needs no communication) or by the whole path ('none': one chain per parameter, as optax; experts stay one [E, m, n]
chain). Size-1 axes are dropped ([m, n] for a lone 2-D weight, [L, m, n] for stacked ones). Every matrix keeps its
own norm and its own iteration (the batch axes are never mixed), so the result is the per-matrix result.

`ns_dtype`: the dtype of the iterations' matmul operands (`newton_schulz`). The momentum, the normalisation, the
products' accumulation, the sums and the returned update stay in the input dtype (float32).
`ns_method`: 'standard' (optax's X-space iteration for every matrix) or 'gram' (`newton_schulz_gram`, float32, for
matrices at least GRAM_MIN_ASPECT times as wide as tall, e.g. 384 x 1536 FFN and expert weights; the others as
'standard'). Same function, different rounding: not equal to optax to 1e-6, tested against a float64 reference.

The seeds' torch Muon, as options that are off by default (optim/chain.py passes them): `bias_correction=False`
(momentum without optax's bias correction), `beta` as a schedule (seed 004's momentum warmup), `ns_rounding=
'every_op'` (every op of the iteration rounded to ns_dtype, `newton_schulz_every_op`), `eps` (theirs 1e-7) and `fuse`
(matrices orthogonalised and shape-scaled as one: the seeds' fused qkv; the state stays per parameter).

`distributed=True` (distributed Muon, for FSDP: config.mesh.fsdp): every matrix of one oriented shape [m, n] (all
layers, all experts, wq/wk/wv/wo alike; `group_key` is not used) is concatenated into one stack [S, m, n], padded
with zero matrices to a multiple of the devices, and the stack axis is pinned to the logical axis 'ns_stack'
(sharding.py: every device), so each device orthogonalises S/N whole matrices and XLA moves the matrices between
the parameters' shards and the stack's (distributed_orthogonalize). The per-matrix result is the same.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Hashable

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers, MuonState

from moe_jax import sharding
from moe_jax.config.schema import NS_METHODS, choices_text

METHODS = tuple(m for m in NS_METHODS if m != "auto")  # what `orthogonalize` runs: 'standard' | 'gram'
NS_COEFFS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic (optax's 'standard' preset)


def _is_dims(x) -> bool:
    return isinstance(x, MuonDimensionNumbers)


def _axes(ndim: int, dims: MuonDimensionNumbers) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(batch, reduction, output) axes, non-negative; batch axes are all the others, in order."""
    def as_tuple(a):
        return (a,) if isinstance(a, int) else tuple(a)

    red = tuple(a % ndim for a in as_tuple(dims.reduction_axis))
    out = tuple(a % ndim for a in as_tuple(dims.output_axis))
    if set(red) & set(out):
        raise ValueError(f"muon: reduction axes {red} and output axes {out} overlap ({dims})")
    batch = tuple(a for a in range(ndim) if a not in red and a not in out)
    return batch, red, out


def to_matrices(x: jax.Array, dims: MuonDimensionNumbers) -> jax.Array:
    """[..] -> [B, fan_in, fan_out]: batch axes flattened first, then the reduction axes, then the output axes."""
    batch, red, out = _axes(x.ndim, dims)

    def size(axes):
        return math.prod(x.shape[a] for a in axes)

    return x.transpose(batch + red + out).reshape(size(batch), size(red), size(out))


def from_matrices(m: jax.Array, dims: MuonDimensionNumbers, shape) -> jax.Array:
    """Inverse of to_matrices for an array of `shape`."""
    batch, red, out = _axes(len(shape), dims)
    perm = batch + red + out
    m = m.reshape(tuple(shape[a] for a in perm))
    return m.transpose(tuple(sorted(range(len(shape)), key=lambda i: perm[i])))


def fans(shape, dims: MuonDimensionNumbers) -> tuple[int, int]:
    _, red, out = _axes(len(shape), dims)
    return math.prod(shape[a] for a in red), math.prod(shape[a] for a in out)


def newton_schulz(x: jax.Array, coeffs: jax.Array, steps: int, eps: float, ns_dtype=None,
                  rounding: str = "operands") -> jax.Array:
    """Orthogonalise each matrix of x [..., m, n] (m <= n) on its own: X / (||X||_F + eps), then `steps` times
    X <- a X + (b A + c A^2) X with A = X X^T and (a, b, c) = coeffs [3]. The result has x's dtype.

    `ns_dtype` None or x's dtype: every product and sum in x's dtype (float32: optax's iteration, to rounding).
    A narrower `ns_dtype` (bfloat16): X and the polynomial B = b A + c A^2 are kept in ns_dtype as matmul operands,
    every product is accumulated and returned in x's dtype (`preferred_element_type`), and the sums run there too;
    the last iterate is returned unrounded. On the 2-core AVX512-BF16 CPU, XLA's bfloat16 x bfloat16 -> float32 dot is
    about 2x its float32 dot (353 vs 189 GFLOP/s at 384 x 1536 x 384) while bfloat16 -> bfloat16 is not (172 GFLOP/s);
    on GPUs and TPUs the product accumulates in float32 either way. Rounding only the operands also cuts the error of
    rounding every result to bfloat16 too (the seeds' torch iteration) by 1.3-1.7x (python -m moe_jax.bench --mode
    newton-schulz). rounding='every_op' with a narrower ns_dtype is that torch iteration: `newton_schulz_every_op`."""
    dtype = x.dtype
    if rounding == "every_op" and ns_dtype is not None and jnp.dtype(ns_dtype) != dtype:
        return newton_schulz_every_op(x, coeffs, steps, eps, ns_dtype)
    x = x / (jnp.linalg.norm(x, ord="fro", axis=(-2, -1), keepdims=True) + eps)
    c = coeffs.astype(dtype)
    if ns_dtype is None or jnp.dtype(ns_dtype) == dtype:
        for _ in range(steps):
            a = x @ jnp.swapaxes(x, -1, -2).conj()
            b = c[1] * a + c[2] * a @ a
            x = c[0] * x + b @ x
        return x

    def mm(p, q):  # [.., i, k] @ [.., k, j] -> [.., i, j] in `dtype`, from ns_dtype operands
        return jnp.matmul(p, q, preferred_element_type=dtype)

    y = x.astype(ns_dtype)
    for _ in range(steps):
        a = mm(y, jnp.swapaxes(y, -1, -2).conj())  # [.., m, m]
        a_low = a.astype(ns_dtype)
        b = (c[1] * a + c[2] * mm(a_low, a_low)).astype(ns_dtype)
        x = c[0] * y.astype(dtype) + mm(b, y)  # [.., m, n]
        y = x.astype(ns_dtype)
    return x


def newton_schulz_every_op(x: jax.Array, coeffs: jax.Array, steps: int, eps: float, ns_dtype) -> jax.Array:
    """The seeds' torch Newton-Schulz (`zeropower_via_newtonschulz5`, run eagerly): X = G in ns_dtype (bfloat16 in
    seeds 002/004, float16 in exp5), X / (||X|| + eps) with the norm rounded to ns_dtype, then A = X X^T,
    B = b A + (c A) A, X = a X + B X with EVERY product, scaled copy and sum rounded to ns_dtype (torch computes each
    op in float32 and rounds its result; the coefficients stay float32). Emulated in x's dtype (float32) with
    `jax.lax.reduce_precision` after each op (which XLA never simplifies away, unlike a convert pair; ns_dtype's
    subnormals, which it flushes, rounded by hand), and matmuls at Precision.HIGHEST: products of
    bfloat16 / float16 values are exact in float32, so each matmul is 'ns_dtype operands, float32 accumulation,
    result rounded', as torch's. Returns x's dtype holding ns_dtype values. (Compiled with torch.compile, the seeds'
    fused elementwise kernels round less often; the difference is of the order of one ns_dtype rounding.)"""
    info = jnp.finfo(ns_dtype)
    sub = float(info.smallest_subnormal)  # float16's subnormal spacing 2^-24 (bfloat16 has float32's exponent range)

    def r(v):
        low = jax.lax.reduce_precision(v, exponent_bits=info.nexp, mantissa_bits=info.nmant)
        if info.nexp >= jnp.finfo(v.dtype).nexp:
            return low
        return jnp.where(jnp.abs(v) < float(info.smallest_normal), jnp.round(v / sub) * sub, low)  # flushed there

    def mm(p, q):
        return r(jnp.matmul(p, q, precision=jax.lax.Precision.HIGHEST))

    c = [coeffs[i].astype(x.dtype) for i in range(3)]
    y = r(x)
    y = r(y / r(r(jnp.linalg.norm(y, ord="fro", axis=(-2, -1), keepdims=True)) + eps))
    for _ in range(steps):
        a = mm(y, jnp.swapaxes(y, -1, -2))
        b = r(r(c[1] * a) + mm(r(c[2] * a), a))
        y = r(r(c[0] * y) + mm(b, y))
    return y


GRAM_MIN_ASPECT = 2  # method='gram' runs in Gram space for [m, n] with n >= 2 m (cheaper from n > 1.625 m)


def newton_schulz_gram(x: jax.Array, coeffs: jax.Array, steps: int, eps: float) -> jax.Array:
    """The same polynomial as `newton_schulz`, iterated on the m x m Gram matrix (x [..., m, n], m <= n), in x's
    dtype at Precision.HIGHEST (no TF32 / bfloat16 passes). With X_0 = x / (||x||_F + eps) and A_0 = X_0 X_0^T, every
    NS step is X_{k+1} = Q_k X_k with Q_k = a I + b A_k + c A_k^2, a polynomial in A_k, so all Q's commute with A and
    with each other: A_{k+1} = Q_k A_k Q_k, and after `steps` steps X = (Q_{s-1} ... Q_0) X_0. Cost per matrix:
    4 m^2 n + (8 steps - 6) m^3 FLOPs, against steps (4 m^2 n + 2 m^3) in X space: 44% fewer at 384 x 1536, and only
    one product (A_0) contracts over n.

    Accuracy: A squares the condition number, so this is for float32 only (in bfloat16 the error on ill-conditioned
    matrices reaches 65-1,200%); in float32 it measured 2.6e-6 (well-conditioned) to 2.8e-4 (ill-conditioned)
    relative Frobenius error against float64 X-space NS, where float32 X space has 2e-6 .. 2e-5 and bfloat16 X space
    2e-2 .. 2.3e-1 (python -m moe_jax.bench --mode newton-schulz; docs/optimizer.md)."""
    hi = jax.lax.Precision.HIGHEST
    x = x / (jnp.linalg.norm(x, ord="fro", axis=(-2, -1), keepdims=True) + eps)
    c = coeffs.astype(x.dtype)
    eye = jnp.eye(x.shape[-2], dtype=x.dtype)
    a = jnp.matmul(x, jnp.swapaxes(x, -1, -2).conj(), precision=hi)  # [.., m, m]
    r = None
    for k in range(steps):
        q = c[0] * eye + c[1] * a + c[2] * jnp.matmul(a, a, precision=hi)
        r = q if r is None else jnp.matmul(q, r, precision=hi)
        if k < steps - 1:
            a = jnp.matmul(jnp.matmul(q, a, precision=hi), q, precision=hi)
    return jnp.matmul(r, x, precision=hi)


def _run(stack: jax.Array, coeffs, steps: int, eps: float, ns_dtype, method: str,
         rounding: str = "operands") -> jax.Array:
    """Newton-Schulz of a stack [..., m, n] (m <= n) by `method` (see orthogonalize)."""
    if method == "gram" and stack.shape[-1] >= GRAM_MIN_ASPECT * stack.shape[-2]:
        return newton_schulz_gram(stack, coeffs, steps, eps)
    return newton_schulz(stack, coeffs, steps, eps, ns_dtype, rounding)


def distributed_orthogonalize(mats: list, coeffs: jax.Array, steps: int, eps: float, ns_dtype=None,
                              method: str = "standard", rounding: str = "operands") -> list:
    """Newton-Schulz of every matrix in `mats` (each [B, fan_in, fan_out]) spread over the devices: the matrices of
    one oriented shape [m, n] (m <= n; [n, m] ones transposed) are concatenated into [S, m, n], padded with zero
    matrices (they stay zero) to a multiple of sharding.logical_size('ns_stack') = N, and pinned to
    ('ns_stack', None, None) before and after the iteration: each device holds S/N whole matrices and runs only
    those. Returns the results in `mats`' shapes. Without a mesh N = 1 and this is one batched chain per shape."""
    n_dev = sharding.logical_size("ns_stack")
    groups: dict = {}
    for i, m in enumerate(mats):
        groups.setdefault((min(m.shape[-2:]), max(m.shape[-2:]), m.dtype), []).append(i)
    out = [None] * len(mats)
    for (rows, cols, dtype), members in groups.items():
        parts = [jnp.swapaxes(mats[i], -1, -2) if mats[i].shape[-2] > mats[i].shape[-1] else mats[i]
                 for i in members]
        total = sum(p.shape[0] for p in parts)
        pad = -total % n_dev
        stack = jnp.concatenate(parts + ([jnp.zeros((pad, rows, cols), dtype)] if pad else []))
        stack = sharding.constrain(stack, ("ns_stack", None, None))
        res = sharding.constrain(_run(stack, coeffs, steps, eps, ns_dtype, method, rounding),
                                 ("ns_stack", None, None))
        start = 0
        for i, p in zip(members, parts):
            r = res[start:start + p.shape[0]]
            out[i] = jnp.swapaxes(r, -1, -2) if mats[i].shape[-2] > mats[i].shape[-1] else r
            start += p.shape[0]
    return out


def orthogonalize(tree, dims_tree, coeffs: jax.Array, steps: int, eps: float, ns_dtype=None,
                  group_key: Callable[[tuple], Hashable] = lambda path: None, method: str = "standard",
                  distributed: bool = False, rounding: str = "operands"):
    """NS applied to every leaf of `tree` (with its MuonDimensionNumbers from `dims_tree`, a tree of the same
    structure), one chain per group (group_key(key path), B, fan_in, fan_out, dtype). A leaf's matrices are
    [B, fan_in, fan_out] (B = experts, or 1); a group of L leaves runs as one chain on [L, B, m, n], with the
    size-1 axes dropped: a lone 2-D weight is a plain [m, n] chain and L stacked 2-D weights are [L, m, n] (XLA:CPU
    runs a batched dot with a size-1 batch axis ~1.5x slower than the plain one). Stacking adds a new leading axis and
    never reshapes the existing ones, so a sharded B (experts) stays sharded the same way. method='gram': groups with
    n >= GRAM_MIN_ASPECT m run `newton_schulz_gram` (in the input dtype; `ns_dtype` applies to the other groups).
    `distributed`: distributed_orthogonalize's grouping and placement instead (`group_key` unused). `rounding`:
    newton_schulz's ('every_op': the seeds' arithmetic)."""
    if method not in METHODS:
        raise ValueError(f"muon: unknown Newton-Schulz method {method!r}; choose {choices_text(METHODS)}")
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    dims = treedef.flatten_up_to(dims_tree)
    mats, groups = [], {}
    for i, ((path, x), d) in enumerate(zip(flat, dims)):
        if d is None:
            if x.ndim != 2:
                raise ValueError(f"muon: parameter {jax.tree_util.keystr(path)} of shape {x.shape} has no "
                                 f"MuonDimensionNumbers; only 2-D arrays default to (0 -> 1)")
            d = MuonDimensionNumbers()
        m = to_matrices(x, d)  # [B, fan_in, fan_out]
        mats.append((m if distributed else m[0] if m.shape[0] == 1 else m, d))  # [fan_in, fan_out] when B == 1
        groups.setdefault((group_key(path), m.shape, m.dtype), []).append(i)
    if distributed:
        res = distributed_orthogonalize([m for m, _ in mats], coeffs, steps, eps, ns_dtype, method, rounding)
        return jax.tree_util.tree_unflatten(treedef, [from_matrices(r, d, x.shape)
                                                      for r, (_, d), (_, x) in zip(res, mats, flat)])
    out = [None] * len(flat)
    for members in groups.values():
        stack = mats[members[0]][0] if len(members) == 1 else jnp.stack([mats[i][0] for i in members])
        transposed = stack.shape[-2] > stack.shape[-1]
        if transposed:  # smaller side first: the Gram matrix X X^T is min(fan_in, fan_out) square
            stack = jnp.swapaxes(stack, -1, -2)
        res = _run(stack, coeffs, steps, eps, ns_dtype, method, rounding)
        if transposed:
            res = jnp.swapaxes(res, -1, -2)
        for j, i in enumerate(members):
            r = res if len(members) == 1 else res[j]
            out[i] = from_matrices(r, mats[i][1], flat[i][1].shape)  # reshape restores a dropped B == 1 axis
    return jax.tree_util.tree_unflatten(treedef, out)


def _resolve(dims, updates):
    return dims(updates) if callable(dims) else dims


def _momentum_update(updates, mu, beta, count_inc, nesterov: bool, bias_correction: bool):
    """The update Muon orthogonalises, from the gradient `updates` and the new momentum `mu` (= beta mu + (1 - beta)
    g). bias_correction (optax): Nesterov beta mu / (1 - beta^(t+1)) + (1 - beta) g / (1 - beta^t), plain
    mu / (1 - beta^t). Without (the seeds' torch Muon): beta mu + (1 - beta) g, or mu, never divided; at t = 2 the
    corrected form weighs the current gradient 1.46x more (beta 0.95), at t = 10 1.08x."""
    if not bias_correction:
        return jax.tree.map(lambda m, g: beta * m + (1 - beta) * g, mu, updates) if nesterov else mu
    if nesterov:
        return jax.tree.map(lambda m, g: beta * m + (1 - beta) * g,
                            optax.tree.bias_correction(mu, beta, optax.safe_increment(count_inc)),
                            optax.tree.bias_correction(updates, beta, count_inc))
    return optax.tree.bias_correction(mu, beta, count_inc)


def _fused(fuse, fn, tree):
    """fn(tree), with `fuse` = (fuse_fn, unfuse_fn): unfuse_fn(fn(fuse_fn(tree)), tree) (matrices that are
    orthogonalised and scaled as one, e.g. the seeds' fused qkv: chain.fuse_qkv)."""
    if fuse is None:
        return fn(tree)
    return fuse[1](fn(fuse[0](tree)), tree)


def scale_by_muon(ns_steps: int = 5, beta: float | Callable = 0.95, eps: float = 1e-8, mu_dtype=None, *,
                  nesterov: bool = True, weight_dimension_numbers=None, ns_dtype=None,
                  group_key: Callable[[tuple], Hashable] = lambda path: None,
                  ns_method: str = "standard", distributed: bool = False, ns_rounding: str = "operands",
                  bias_correction: bool = True, fuse=None) -> optax.GradientTransformation:
    """optax.contrib.scale_by_muon (standard coefficients, frobenius preconditioning, not adaptive) with the
    batched Newton-Schulz of `orthogonalize` (`distributed`: spread over the devices). State:
    optax.contrib.MuonState(count, mu, ns_coeffs). The seeds' semantics, off by default: `bias_correction=False`
    (`_momentum_update`), `beta` a schedule count -> momentum (needs bias_correction=False; seed 004's momentum
    warmup), `ns_rounding` (newton_schulz), `fuse` (`_fused`: the momentum stays per parameter; only the
    orthogonalisation sees the fused matrices)."""
    if callable(beta) and bias_correction:
        raise ValueError("muon: a momentum schedule needs bias_correction=False")

    def init_fn(params):
        return MuonState(count=jnp.zeros([], jnp.int32), mu=optax.tree.zeros_like(params, dtype=mu_dtype),
                         ns_coeffs=jnp.asarray(NS_COEFFS))

    def update_fn(updates, state, params=None):
        del params
        if state.ns_coeffs.ndim != 1:
            raise ValueError(f"muon: per-step ns_coeffs of shape {state.ns_coeffs.shape} are not supported; "
                             f"use optim.muon_impl='optax'")
        b = beta(state.count) if callable(beta) else beta
        mu = optax.tree.update_moment(updates, state.mu, b, 1)
        count_inc = optax.safe_increment(state.count)
        mu_hat = _momentum_update(updates, mu, b, count_inc, nesterov, bias_correction)

        def ortho(tree):
            return orthogonalize(tree, _resolve(weight_dimension_numbers, tree), state.ns_coeffs, ns_steps, eps,
                                 ns_dtype, group_key, ns_method, distributed, ns_rounding)

        with jax.named_scope("distributed_muon" if distributed else "muon"):  # names its collectives in the HLO
            new = _fused(fuse, ortho, mu_hat)
        return new, MuonState(count=count_inc, mu=optax.tree.cast(mu, mu_dtype), ns_coeffs=state.ns_coeffs)

    return optax.GradientTransformation(init_fn, update_fn)


def scale_by_shape(weight_dimension_numbers=None, consistent_rms: float | None = None, fuse=None):
    """optax.contrib.scale_by_shape: keller sqrt(max(1, fan_out / fan_in)) or consistent_rms sqrt(max(in, out)).
    `fuse` (as scale_by_muon's): the fans of the fused matrix (the seeds' fused qkv [M, 3M]: sqrt(3))."""

    def scale(u, d):
        fan_in, fan_out = fans(u.shape, d if d is not None else MuonDimensionNumbers())
        if consistent_rms is not None:
            return jnp.sqrt(jnp.maximum(fan_in, fan_out)) * consistent_rms * u
        return jnp.sqrt(jnp.maximum(1, fan_out / fan_in)) * u

    def scale_tree(tree):
        return jax.tree.map(scale, tree, _resolve(weight_dimension_numbers, tree), is_leaf=_is_dims)

    def update_fn(updates, state, params=None):
        del params
        return _fused(fuse, scale_tree, updates), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def muon(learning_rate, ns_steps: int = 5, beta: float = 0.95, eps: float = 1e-8, weight_decay: float = 0.0,
         weight_decay_mask: Any = None, mu_dtype=None, *, nesterov: bool = True, adam_b1: float = 0.9,
         adam_b2: float = 0.999, adam_eps_root: float = 0.0, adam_weight_decay: float = 0.0,
         adam_learning_rate=None, muon_weight_dimension_numbers=None, consistent_rms: float | None = None,
         ns_dtype=None, group_key: Callable[[tuple], Hashable] = lambda path: None,
         ns_method: str = "standard", distributed: bool = False, ns_rounding: str = "operands",
         bias_correction: bool = True, fuse=None) -> optax.GradientTransformation:
    """optax.contrib.muon (optax 0.2.8, same arguments, standard coefficients, frobenius preconditioning), built the
    same way so its state has the same tree, with batched Newton-Schulz (`ns_dtype`, `group_key`, `ns_method`,
    `distributed`: see module doc) and the seeds' options (`ns_rounding`, `bias_correction`, a momentum schedule as
    `beta`, `fuse`: scale_by_muon).
    `muon_weight_dimension_numbers` is required (a tree of MuonDimensionNumbers / None, or a callable)."""
    if muon_weight_dimension_numbers is None:
        raise ValueError("muon: pass muon_weight_dimension_numbers explicitly (optax's default sends every 2-D "
                         "array, embedding included, to Muon)")
    if adam_learning_rate is None:
        adam_learning_rate = learning_rate

    def is_leaf(x):
        return x is None or _is_dims(x)

    def param_labels(params):
        dims = _resolve(muon_weight_dimension_numbers, params)
        return jax.tree.map(lambda d, x: jax.tree.map(lambda _: "muon" if d is not None else "adam", x),
                            dims, params, is_leaf=is_leaf)

    def dims_fn(params):  # dimension numbers where the partition keeps a leaf for Muon, MaskedNode elsewhere
        dims = _resolve(muon_weight_dimension_numbers, params)
        mask = jax.tree.map(lambda label: label == "muon", param_labels(params))
        return jax.tree.map(lambda d, sub: jax.tree.map(lambda m: d if m else optax.MaskedNode(), sub), dims, mask,
                            is_leaf=lambda x: is_leaf(x) or isinstance(x, optax.MaskedNode))

    return optax.partition(
        transforms={
            "muon": optax.chain(
                scale_by_muon(ns_steps, beta, eps, mu_dtype, nesterov=nesterov, weight_dimension_numbers=dims_fn,
                              ns_dtype=ns_dtype, group_key=group_key, ns_method=ns_method,
                              distributed=distributed, ns_rounding=ns_rounding,
                              bias_correction=bias_correction, fuse=fuse),
                scale_by_shape(dims_fn, consistent_rms, fuse),
                optax.add_decayed_weights(weight_decay, weight_decay_mask),
                optax.scale_by_learning_rate(learning_rate),
            ),
            "adam": optax.adamw(learning_rate=adam_learning_rate, b1=adam_b1, b2=adam_b2, eps=eps,
                                eps_root=adam_eps_root, weight_decay=adam_weight_decay, mu_dtype=mu_dtype,
                                nesterov=nesterov),
        },
        param_labels=param_labels,
    )
