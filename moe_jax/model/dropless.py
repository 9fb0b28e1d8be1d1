"""Dropless MoE dispatch: sort the (token, expert) assignments by expert, run the experts as grouped matmuls over
ragged groups, un-sort and combine with the gates. No capacity, no padding slots, no drops, and no token's output
depends on another token (the capacity path's priority lets a later token decide whether an earlier token's second
choice is kept; here every assignment is computed).

Shapes: N tokens (of this device under expert parallelism), K top-k, E experts, M d_model, F expert d_ff,
R = N*K assignments, X devices on the mesh 'expert' axis, El = E / X experts per device.

One device (`dropless_ffn`):
    expert_index [N, K], gates [N, K], mask [N]  (masked = padding: no expert output)
    order        [R]       assignment ids (token*K + rank) sorted by expert (stable: token order within an expert);
                           masked assignments get the key E and sort last, outside every group
    group_sizes  [E]       assignments per expert (real tokens only)
    xs           [R, M]    x[order // K]: the tokens, sorted (rows past sum(group_sizes) are zeroed)
    out          [R, M]    expert MLP by grouped matmuls, for the rows of group e:
                           act(xs @ w_in[e]) @ w_out[e]  (swiglu: (silu(xs @ w_gate[e]) * (xs @ w_in[e])) @ w_out[e])
    y            [N, M]    sum_k gates[n, k] * out[position of assignment (n, k) in order]

Expert parallelism (`expert_parallel_ffn`, inside `jax.shard_map` over the whole mesh): tokens are split over
('data', 'expert'), experts over 'expert', expert d_ff over 'model'. Each device routes its own N tokens, sorts its
R assignments by expert and sends each 'expert'-axis peer j the rows for j's El experts with one `all_to_all`. The
send buffer per peer has the static size R (a device can send all its assignments to one peer), so nothing is ever
dropped: the price is X*R rows of buffer and exchange where R are used (padding rows are zeros and are not
computed: they sort past every group). The receiver sorts what it got by its local expert, runs the grouped matmuls
(partial sums over the 'model' slices of F are added with psum), un-sorts, and a second `all_to_all` returns the
rows. `jax.lax.ragged_all_to_all` would send exactly the counts; it is not used because XLA:CPU (where the tests
run) does not implement it (see docs/decisions.md).

Grouped matmul (`grouped_matmul`): `jax.lax.ragged_dot` (impl 'ragged_dot'). On XLA:CPU, jax lowers ragged_dot to
one dense dot of every row against all E groups with a mask (E times the active expert FLOPs); on TPU it is
a native op.
impl 'megablox' selects the Pallas TPU kernel `jax.experimental.pallas.ops.tpu.megablox.gmm` (TPU only; elsewhere it
runs in Pallas interpret mode, which the tests use to check it and which is far too slow to train with). The platform
is the one compiled for (the mesh in context), so a TPU program compiled ahead of time on a CPU host gets the Mosaic
kernel; Mosaic needs the kernel's widths (d_model, d_ff / model shards) to be multiples of 128.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moe_jax.model.layers import activation

GROUPED_MATMULS = ("ragged_dot", "megablox")


def sort_by_expert(expert_index: jax.Array, num_experts: int, mask: jax.Array | None = None):
    """expert_index [N, K] int, mask [N] bool (None: all real) -> (order [R] int32, group_sizes [E] int32, n_valid
    int32 scalar = sum(group_sizes)). order lists assignment ids (n*K + k) by expert, masked ones last."""
    n, k = expert_index.shape
    key = expert_index.reshape(-1).astype(jnp.int32)
    if mask is not None:
        key = jnp.where(jnp.repeat(mask.astype(bool), k), key, num_experts)
    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    group_sizes = jnp.bincount(key, length=num_experts + 1)[:num_experts].astype(jnp.int32)
    return order, group_sizes, jnp.sum(group_sizes)


def _compile_platform() -> str:
    """The platform the program is being compiled for: the mesh in context's devices (under jax.set_mesh, as the
    train step compiles; for `python -m moe_jax.aot` a TPU topology that is not attached), else the default device."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.devices()[0].platform


def _megablox_gmm(x, w, group_sizes):
    from jax.experimental.pallas.ops.tpu.megablox import gmm  # TPU kernel; imported only when selected
    r, m = x.shape
    n = w.shape[-1]
    tiling = (min(128, r), min(128, m), min(128, n))
    interpret = _compile_platform() != "tpu"
    return gmm(x, w, group_sizes, preferred_element_type=x.dtype, tiling=tiling, interpret=interpret)


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, impl: str = "ragged_dot") -> jax.Array:
    """x [R, M] rows sorted by group, w [E, M, F], group_sizes [E] -> [R, F]: rows of group e times w[e]. Rows past
    sum(group_sizes) are unspecified (ragged_dot: 0; megablox: garbage): callers mask them."""
    if impl == "ragged_dot":
        return jax.lax.ragged_dot(x, w, group_sizes)
    if impl == "megablox":
        return _megablox_gmm(x, w, group_sizes)
    raise ValueError(f"grouped matmul {impl!r}: choose one of {GROUPED_MATMULS}")


def grouped_mlp(xs: jax.Array, group_sizes: jax.Array, n_valid: jax.Array, weights: dict, kind: str,
                impl: str = "ragged_dot") -> jax.Array:
    """The expert MLPs on sorted rows. xs [R, M]; group_sizes [E]; weights {'w_in', ('w_gate'), 'w_out'} with
    w_in/w_gate [E, M, F], w_out [E, F, M] -> [R, M]; rows >= n_valid are exactly 0 (value and gradient)."""
    valid = (jnp.arange(xs.shape[0]) < n_valid)[:, None]
    xs = jnp.where(valid, xs, 0)
    h = grouped_matmul(xs, weights["w_in"], group_sizes, impl)
    if kind == "swiglu":
        h = jax.nn.silu(grouped_matmul(xs, weights["w_gate"], group_sizes, impl)) * h
    else:
        h = activation(kind)(h)
    h = jnp.where(valid, h, 0)
    return jnp.where(valid, grouped_matmul(h, weights["w_out"], group_sizes, impl), 0)


def _combine(out_sorted: jax.Array, order: jax.Array, gates: jax.Array) -> jax.Array:
    """out_sorted [R, M] in `order` -> y [N, M] = sum_k gates[n, k] * output of assignment (n, k)."""
    n, k = gates.shape
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    out = out_sorted[inverse].reshape(n, k, -1)  # [N, K, M] in assignment order
    return jnp.sum(out * gates[..., None].astype(out.dtype), axis=1)


def dropless_ffn(x: jax.Array, expert_index: jax.Array, gates: jax.Array, weights: dict, kind: str,
                 mask: jax.Array | None = None, impl: str = "ragged_dot") -> jax.Array:
    """One device: x [N, M], expert_index/gates [N, K], mask [N] -> y [N, M] (see module docstring)."""
    n, k = expert_index.shape
    e = weights["w_in"].shape[0]
    order, group_sizes, n_valid = sort_by_expert(expert_index, e, mask)
    out = grouped_mlp(x[order // k], group_sizes, n_valid, weights, kind, impl)
    if mask is not None:
        gates = jnp.where(mask[:, None], gates, 0)
    return _combine(out, order, gates)


def _local_experts(x, expert_index, gates, mask, weights, *, kind, impl, x_axis, n_shards, model_axis):
    """Body of the shard_map (per device): x [N, M], expert_index/gates [N, K], mask [N], weights with El experts
    and F/P columns -> y [N, M]. Buffers exchanged over `x_axis`: [X*R, M] (R rows per peer, see module docstring)."""
    n, k = expert_index.shape
    r = n * k
    el = weights["w_in"].shape[0]
    e = el * n_shards
    order, counts, _ = sort_by_expert(expert_index, e, mask)  # counts [E]: this device's assignments per expert
    per_peer = counts.reshape(n_shards, el)  # [X, El]
    sent = jnp.sum(per_peer, axis=1)  # [X] rows for each peer
    start = jnp.cumsum(sent) - sent  # first sorted row of each peer's block
    row = jnp.arange(r, dtype=jnp.int32)
    src = jnp.minimum(start[:, None] + row[None, :], r - 1)  # [X, R]: sorted row that goes to slot r of peer j
    used = row[None, :] < sent[:, None]  # [X, R]
    send_x = jnp.where(used[..., None], x[order[src] // k], 0).reshape(n_shards * r, -1)
    expert_of = jnp.take(expert_index.reshape(-1), order[src])  # [X, R] global expert id
    send_e = jnp.where(used, expert_of - jnp.arange(n_shards, dtype=jnp.int32)[:, None] * el, el).reshape(-1)
    if n_shards > 1:
        send_x = jax.lax.all_to_all(send_x, x_axis, 0, 0, tiled=True)  # now [X*R, M]: block i came from peer i
        send_e = jax.lax.all_to_all(send_e, x_axis, 0, 0, tiled=True)
    # local grouped matmuls over what arrived (padding rows have local expert El: sorted last, in no group)
    order2, gs2, n_valid2 = sort_by_expert(send_e[:, None], el)
    out2 = grouped_mlp(send_x[order2], gs2, n_valid2, weights, kind, impl)
    if model_axis is not None:
        out2 = jax.lax.psum(out2, model_axis)  # the 'model' slices of F each gave a partial w_out product
    back = jnp.zeros_like(out2).at[order2].set(out2)  # un-sort to arrival order
    if n_shards > 1:
        back = jax.lax.all_to_all(back, x_axis, 0, 0, tiled=True)  # block j: my rows, as computed by peer j
    # sorted row i went to peer dest[i] at slot i - start[dest[i]]
    sorted_expert = jnp.take(expert_index.reshape(-1), order)
    dest = jnp.minimum(sorted_expert // el, n_shards - 1)
    slot = jnp.clip(row - start[dest], 0, r - 1)
    out_sorted = back.reshape(n_shards, r, -1)[dest, slot]
    real = row < jnp.sum(sent)
    out_sorted = jnp.where(real[:, None], out_sorted, 0)
    if mask is not None:
        gates = jnp.where(mask[:, None], gates, 0)
    return _combine(out_sorted, order, gates)


def expert_parallel_ffn(x, expert_index, gates, weights: dict, kind: str, mask, mesh, impl: str = "ragged_dot",
                        weight_specs: dict | None = None):
    """Dropless FFN with experts over the mesh 'expert' axis (see module docstring). x [N, M] (N global tokens,
    divisible by the product of the 'data' and 'expert' axis sizes), expert_index/gates [N, K], mask [N] bool ->
    y [N, M]. weight_specs: the PartitionSpecs the expert weights are sharded with (their F dimension may be split
    over 'model')."""
    from jax.sharding import PartitionSpec as P
    sizes = dict(mesh.shape)
    token_axes = tuple(a for a in ("data", "expert") if a in sizes)
    tokens = P(token_axes)
    n_shards = sizes.get("expert", 1)
    model_axis = "model" if sizes.get("model", 1) > 1 and weight_specs is not None and any(
        "model" in jax.tree.leaves(tuple(s)) for s in weight_specs.values()) else None
    specs = weight_specs or {k: P("expert") for k in weights}
    body = functools.partial(_local_experts, kind=kind, impl=impl, x_axis="expert", n_shards=n_shards,
                             model_axis=model_axis)
    fn = jax.shard_map(body, mesh=mesh, in_specs=(tokens, tokens, tokens, tokens, specs), out_specs=tokens,
                       check_vma=False)
    return fn(x, expert_index, gates, mask, weights)
