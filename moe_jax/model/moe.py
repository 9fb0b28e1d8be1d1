"""The sparse Mixture-of-Experts feed-forward: router, capacity-based dispatch and combine by einsum, experts.

Two dispatch modes share the router, the parameters and the metrics (moe.dispatch): 'capacity' (below) and
'dropless' (moe_jax/model/dropless.py: assignments sorted by expert, grouped matmuls, no capacity and no drops).

Shapes: B batch, S length, M d_model, F expert d_ff, E experts, K top-k, G routing groups, T tokens per group
(B*S = G*T), C capacity (token slots per expert per group).

Read top to bottom, one forward pass is:
 1. Tokens [B, S, M] are regrouped into [G, T, M] (T <= moe.group_size: the dispatch mask is [G, T, E, C] and
    C grows with T, so its size grows with T^2).
 2. Router in float32: logits [G, T, E] = x @ w_router (float32 inputs, Precision.HIGHEST: precision.router_logits);
    probs = softmax over all E experts; top-k of probs;
    the k weights are renormalised to sum to 1 (moe.renormalize) when k > 1. At k = 1 the gate is the raw top-1
    probability (Switch Transformer), whatever moe.renormalize says: renormalising one weight gives p/p = 1, a
    constant, and the router would get no gradient from the language-model loss (only from the auxiliary losses).
 3. Capacity C = max(ceil(K * T * capacity_factor / E), min_capacity), at most T. Priority: every token's first
    choice is placed before any token's second choice (Switch/flaxformer), and within one choice rank, earlier
    tokens first. An assignment whose slot would be >= C is dropped: the token gets nothing from that expert
    (a token with all its choices dropped gets 0 from the block and is carried by the residual connection).
 4. dispatch [G, T, E, C] (0/1) and combine [G, T, E, C] (routing weight where dispatched).
    Expert inputs   [E, G, C, M] = einsum('GTEC,GTM->EGCM', dispatch, x)   (token- to expert-sharded: all-to-all)
    Expert hidden   [E, G, C, F] = act(einsum('EGCM,EMF->EGCF', inputs, w_in))
    Expert outputs  [E, G, C, M] = einsum('EGCF,EFM->EGCM', hidden, w_out)
    Combined        [G, T, M]    = einsum('GTEC,EGCM->GTM', combine, outputs)  (expert- back to token-sharded)
    computed as einsum('GTEC,EGCM->GTM', dispatch, outputs * slot_gate) with slot_gate [E, G, C] = the gate of the
    token in each slot (sum over T of combine; 0 for an empty slot): the same values, but the backward pass needs no
    einsum('GTM,EGCM->GTEC') for the gradient of combine (one [G, T, E, C, M]-sized contraction per layer fewer).
 5. Auxiliary losses: Switch load balance E * sum_e f_e * P_e, with f_e the fraction of the G*T*K top-k assignments
    made to expert e (before capacity) and P_e the mean router probability of e (equals 1 when uniform), or seed
    exp5's E * sum_e P_e^2 (moe.load_balance_form='prob_squares'); router z-loss
    mean(logsumexp(logits)^2). Metrics: both losses, dropped fraction of assignments, tokens per expert carried
    (after capacity) and demanded (top-k choices, `_demand`), their coefficient of variation and max/mean, router
    confidence (mean top-1 probability).
 6. Only when asked (`routes=True`, e.g. by moe_jax/tools/routing.py; the train and eval steps never ask, so their
    compiled programs are unchanged): the block also returns its routes, metrics['routes'] = {'logits' [G, T, E]
    float32 (as routed: with the router noise when there is any), 'probs' [G, T, E], 'expert_index' [G, T, K],
    'gates' [G, T, K], 'kept' [G, T, K] bool (the assignment got a slot), 'mask' [G, T] bool (a real token)}, and
    three more metrics (`routing_metrics(..., detail=True)`): real_tokens, tokens_fully_dropped_fraction,
    router_topk_prob. Dropless routes all B*S tokens as one group (G = 1) and keeps every assignment.
Padding: a token_mask [B, S] marks real positions; masked ones take no slot (they are left out of the priority
cumsum), get no expert output, and are left out of the losses and metrics (averages over real tokens only).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.model import precision
from moe_jax.model.layers import activation, dtype_of, param
from moe_jax.config.typed import ModelConfig
from moe_jax.sharding import constrain, logical_to_spec


def group_size_for(num_tokens: int, max_group: int) -> int:
    """The largest divisor of num_tokens that is <= max_group (so tokens split into equal groups)."""
    for g in range(min(num_tokens, max_group), 0, -1):
        if num_tokens % g == 0:
            return g
    return 1


def capacity(cfg: ModelConfig, group_size: int, train: bool) -> int:
    """Token slots per expert per routing group: C = max(ceil(k * group_size * cf / E), min_capacity), capped at
    group_size (an expert gets at most one assignment per token, so group_size slots already drop nothing). cf is
    moe.capacity_factor in training and moe.eval_capacity_factor otherwise."""
    moe = cfg.moe
    cf = moe.capacity_factor if train else moe.eval_capacity_factor
    c = math.ceil(moe.top_k * group_size * cf / moe.num_experts)
    return int(min(max(c, moe.min_capacity), group_size))


def top_k_routing(logits: jax.Array, top_k: int, renormalize: bool = True):
    """Router probabilities and choices. logits [..., E] float32 -> (probs [..., E], gates [..., K] (the k weights,
    renormalised to sum to 1 if `renormalize`), expert_index [..., K] int32, highest probability first)."""
    probs = jax.nn.softmax(logits, axis=-1)
    gates, expert_index = jax.lax.top_k(probs, top_k)
    if renormalize and top_k > 1:  # k = 1: p/p = 1 would cut the router off from the LM loss's gradient
        gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    return probs, gates, expert_index


def route(logits: jax.Array, top_k: int, capacity: int, renormalize: bool = True, mask: jax.Array | None = None):
    """Top-k routing with capacity. logits: [G, T, E] float32; mask [G, T] bool (None: every token is real).

    A masked token (padding) takes no slot and gets no expert output. Returns (dispatch [G, T, E, C] float32 in
    {0, 1}, combine [G, T, E, C] float32, info) where info holds probs [G, T, E], expert_index [G, T, K], gates
    [G, T, K] (routing weights), kept [G, T, K] (bool: the assignment got a slot), slot [G, T, K] (its position in
    the expert's buffer) and mask [G, T] (bool).
    """
    g, t, e = logits.shape
    mask = jnp.ones((g, t), bool) if mask is None else mask.astype(bool)
    probs, gates, expert_index = top_k_routing(logits, top_k, renormalize)  # [G, T, K]
    onehot = jax.nn.one_hot(expert_index, e, dtype=jnp.int32) * mask[..., None, None]  # [G, T, K, E]
    # Priority: rank-major order (all first choices, then all second choices, ...), then token order.
    rank_major = jnp.swapaxes(onehot, 1, 2).reshape(g, top_k * t, e)  # [G, K*T, E]
    position = jnp.cumsum(rank_major, axis=1) - 1  # slot each assignment would take in its expert
    position = jnp.swapaxes(position.reshape(g, top_k, t, e), 1, 2)  # [G, T, K, E]
    slot = jnp.sum(position * onehot, axis=-1)  # [G, T, K]
    kept = (slot < capacity) & mask[..., None]
    slot_onehot = jax.nn.one_hot(jnp.where(kept, slot, capacity), capacity, dtype=jnp.float32)  # [G, T, K, C]
    expert_kept = onehot.astype(jnp.float32) * kept[..., None]  # [G, T, K, E]
    # float32 at Precision.HIGHEST: the default would round the gates to TF32 on GPU / bfloat16 passes on TPU
    hi = precision.ROUTER_PRECISION
    dispatch = jnp.einsum("gtke,gtkc->gtec", expert_kept, slot_onehot, precision=hi)
    gate_te = jnp.einsum("gtke,gtk->gte", expert_kept, gates, precision=hi)  # a token picks an expert at most once
    combine = dispatch * gate_te[..., None]
    info = dict(probs=probs, expert_index=expert_index, gates=gates, kept=kept, slot=slot, mask=mask)
    return dispatch, combine, info


def _expert_counts(expert_index: jax.Array, e: int, weight: jax.Array | None = None) -> jax.Array:
    """[E] float32: how many of the assignments expert_index [..., K] go to each expert (weight [..., K]: 0/1)."""
    onehot = jax.nn.one_hot(expert_index, e, dtype=jnp.float32)
    if weight is not None:
        onehot = onehot * weight[..., None].astype(jnp.float32)
    return jnp.sum(onehot.reshape(-1, e), axis=0)


def _mean_probs(probs: jax.Array, w: jax.Array) -> jax.Array:
    """[E]: the router probabilities probs [..., E] averaged over the real tokens (weights w [...], 0/1)."""
    e = probs.shape[-1]
    return jnp.sum((probs * w[..., None]).reshape(-1, e), axis=0) / jnp.maximum(jnp.sum(w), 1.0)


def _real(probs: jax.Array, mask: jax.Array | None) -> jax.Array:
    """[...] float32 0/1 weights of the real tokens of probs [..., E] (mask None: every token)."""
    return jnp.ones(probs.shape[:-1], jnp.float32) if mask is None else mask.astype(jnp.float32)


def load_balance_loss(probs: jax.Array, expert_index: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Switch loss E * sum_e f_e * P_e over real tokens. probs [..., E]; expert_index [..., K] (top-k choices before
    capacity); mask [...] (None: all real). f_e: share of the real assignments made to e; P_e: mean probability of
    e over real tokens."""
    e = probs.shape[-1]
    w = _real(probs, mask)
    counts = _expert_counts(expert_index, e, jnp.broadcast_to(w[..., None], expert_index.shape))
    f = counts / jnp.maximum(jnp.sum(counts), 1.0)
    return e * jnp.sum(f * _mean_probs(probs, w))


def prob_squares_loss(probs: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Seed exp5's load-balance loss E * sum_e P_e^2 over real tokens (moe.load_balance_form='prob_squares'). probs
    [..., E]; P_e: mean probability of e. It ignores the assignments: minimised (at 1) by uniform router
    probabilities, not by balanced load (docs/decisions.md, "Seed fidelity")."""
    return probs.shape[-1] * jnp.sum(jnp.square(_mean_probs(probs, _real(probs, mask))))


def z_loss(logits: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Router z-loss mean(logsumexp(logits)^2) over real tokens. logits [..., E]; mask [...] (None: all real)."""
    sq = jnp.square(jax.nn.logsumexp(logits, axis=-1))
    if mask is None:
        return jnp.mean(sq)
    w = mask.astype(jnp.float32)
    return jnp.sum(sq * w) / jnp.maximum(jnp.sum(w), 1.0)


def _load_stats(counts: jax.Array, suffix: str) -> dict:
    mean = jnp.maximum(jnp.mean(counts), 1e-9)
    return {f"tokens_per_expert{suffix}": counts, f"load_cv{suffix}": jnp.std(counts) / mean,
            f"load_max_over_mean{suffix}": jnp.max(counts) / mean}


def routing_metrics(info: dict, logits: jax.Array, detail: bool = False, balance_form: str = "switch") -> dict:
    """Per-layer diagnostics over real tokens (info['mask']; absent: all real): both auxiliary losses
    (`load_balance_loss` in moe.load_balance_form `balance_form`: load_balance_loss or prob_squares_loss), the dropped
    fraction of assignments, router confidence (mean top-1 probability), router entropy (mean over tokens of
    -sum_e p_e log p_e of the router's softmax, in nats: log E for a uniform router, 0 for a one-hot one) and the
    expert load twice:
    `tokens_per_expert` [E], `load_cv`, `load_max_over_mean` count the assignments the experts carried (after
    capacity); the same names with `_demand` count the top-k choices (before capacity). Dropless: equal.
    detail=True (routing diagnostics only; the training steps never ask) adds `real_tokens` (how many tokens the
    means are over), `tokens_fully_dropped_fraction` (real tokens none of whose k assignments was kept) and
    `router_topk_prob` (mean summed probability of the k choices, before renormalisation)."""
    probs, idx, kept = info["probs"], info["expert_index"], info["kept"]
    e = probs.shape[-1]
    mask = info.get("mask")
    w = _real(probs, mask)
    real = jnp.broadcast_to(w[..., None], idx.shape)
    n_real = jnp.maximum(jnp.sum(w), 1.0)
    metrics = dict(
        load_balance_loss=(prob_squares_loss(probs, mask) if balance_form == "prob_squares"
                           else load_balance_loss(probs, idx, mask)),
        z_loss=z_loss(logits, mask),
        dropped_fraction=1.0 - jnp.sum(kept.astype(jnp.float32) * real) / jnp.maximum(jnp.sum(real), 1.0),
        **_load_stats(_expert_counts(idx, e, kept.astype(jnp.float32) * real), ""),
        **_load_stats(_expert_counts(idx, e, real), "_demand"),
        router_confidence=jnp.sum(jnp.max(probs, axis=-1) * w) / n_real,
        router_entropy=jnp.sum(-jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1) * w) / n_real,
    )
    if detail:
        metrics.update(
            real_tokens=jnp.sum(w),
            tokens_fully_dropped_fraction=jnp.sum(jnp.all(~kept, axis=-1) * w) / n_real,
            router_topk_prob=jnp.sum(jnp.sum(jnp.take_along_axis(probs, idx, axis=-1), axis=-1) * w) / n_real,
        )
    return metrics


def route_record(info: dict, logits: jax.Array) -> dict:
    """The routes of one layer as the block took them, shaped by routing group: logits [G, T, E] (or [N, E]: one
    group) -> {'logits', 'probs' [G, T, E]; 'expert_index', 'gates', 'kept' [G, T, K]; 'mask' [G, T] bool}."""
    g, t, e = (1,) + logits.shape if logits.ndim == 2 else logits.shape
    mask = info.get("mask")
    mask = jnp.ones((g, t), bool) if mask is None else mask.reshape(g, t).astype(bool)
    k = info["expert_index"].shape[-1]
    record = dict(logits=logits.reshape(g, t, e), probs=info["probs"].reshape(g, t, e), mask=mask)
    record.update({name: info[name].reshape(g, t, k) for name in ("expert_index", "gates", "kept")})
    return record


def _layer_outputs(info: dict, logits: jax.Array, routes: bool, balance_form: str = "switch") -> dict:
    """routing_metrics, plus with `routes` the detail metrics and metrics['routes'] = route_record."""
    metrics = routing_metrics(info, logits, detail=routes, balance_form=balance_form)
    if routes:
        metrics["routes"] = route_record(info, logits)
    return metrics


class MoEBlock(nnx.Module):
    """Sparse FFN. Parameters: w_router [M, E] (float32 compute), w_in (and w_gate for swiglu) [E, M, F], w_out
    [E, F, M]; expert weights are sharded over the mesh 'expert' axis."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        m, moe = cfg, cfg.moe
        self.cfg = cfg
        self.num_experts = moe.num_experts
        self.top_k = moe.top_k
        self.kind = m.mlp
        self.dtype = dtype_of(m.dtype)
        e, d, f = moe.num_experts, m.d_model, moe.d_ff
        self.w_router = param(rngs, (d, e), ("embed", "router"), m.init_std)
        self.w_in = param(rngs, (e, d, f), ("expert", "embed", "mlp"), m.init_std)
        if self.kind == "swiglu":
            self.w_gate = param(rngs, (e, d, f), ("expert", "embed", "mlp"), m.init_std)
        self.w_out = param(rngs, (e, f, d), ("expert", "mlp", "embed"), m.init_std / (2 * m.n_layers) ** 0.5)

    def capacity(self, group: int, train: bool, no_drop: bool = False) -> int:
        if no_drop:
            return group  # an expert can take every token of its group: nothing is ever dropped
        return capacity(self.cfg, group, train)

    def experts(self, x: jax.Array) -> jax.Array:
        """The E expert MLPs, batched: x [E, G, C, M] -> [E, G, C, M]. Each expert's G*C slots are one row block
        ([E, G*C, M] @ [E, M, F]): XLA:CPU differentiates that faster than the 4-D einsum (as layers.project;
        docs/benchmarks.md)."""
        dt = self.dtype
        e, g, c, m = x.shape
        x3 = x.reshape(e, g * c, m)
        h = jnp.einsum("enm,emf->enf", x3, self.w_in[...].astype(dt))
        if self.kind == "swiglu":
            h = jax.nn.silu(jnp.einsum("enm,emf->enf", x3, self.w_gate[...].astype(dt))) * h
        else:
            h = activation(self.kind)(h)
        h = constrain(h.reshape(e, g, c, -1), ("expert", "expert_group", "capacity", "mlp"))
        return jnp.einsum("enf,efm->enm", h.reshape(e, g * c, -1), self.w_out[...].astype(dt)).reshape(e, g, c, m)

    def __call__(self, x: jax.Array, *, train: bool = False, rng: jax.Array | None = None, no_drop: bool = False,
                 token_mask: jax.Array | None = None, routes: bool = False):
        """x [B, S, M] -> (y [B, S, M], metrics dict). `rng` drives router noise in training (moe.router_noise_std).
        `no_drop=True` sizes the capacity so no token is dropped (used for decoding; dropless never drops).
        token_mask [B, S] (bool or 0/1; None: all real): masked positions (padding) take no capacity, get no expert
        output (y = 0 there) and are left out of the auxiliary losses and metrics. routes=True: metrics also hold
        the routes taken and the detail metrics (module docstring, step 6)."""
        b, s, d = x.shape
        moe = self.cfg.moe
        # [B*S, E] float32 router at Precision.HIGHEST (precision.router_logits, on one group of all B*S tokens)
        logits = precision.router_logits(x.reshape(1, b * s, d), self.w_router[...])[0]
        if train and moe.router_noise_std > 0 and rng is not None:
            logits = logits + moe.router_noise_std * jax.random.normal(rng, logits.shape, jnp.float32)
        mask = None if token_mask is None else token_mask.reshape(b * s).astype(bool)
        if moe.dispatch == "dropless":
            y, metrics = self._dropless(x.reshape(b * s, d).astype(self.dtype), logits, mask, routes)
        else:
            y, metrics = self._capacity(x.reshape(b * s, d).astype(self.dtype), logits, mask, train, no_drop, routes)
        return y.reshape(b, s, d), metrics

    def _capacity(self, x, logits, mask, train, no_drop, routes=False):
        """x [N, M], logits [N, E], mask [N] or None -> (y [N, M], metrics (with the routes if `routes`))."""
        n, d = x.shape
        dt = self.dtype
        t = group_size_for(n, self.cfg.moe.group_size)
        g = n // t
        xg = constrain(x.reshape(g, t, d), ("group", "group_tokens", "embed"))
        cap = self.capacity(t, train, no_drop)
        dispatch, combine, info = route(logits.reshape(g, t, -1), self.top_k, cap, self.cfg.moe.renormalize,
                                        None if mask is None else mask.reshape(g, t))
        slot_gate = jnp.swapaxes(jnp.sum(combine, axis=1), 0, 1)  # [E, G, C]: each slot holds at most one token
        dispatch = constrain(dispatch.astype(dt), ("group", "group_tokens", None, "capacity"))

        expert_in = constrain(jnp.einsum("gtec,gtm->egcm", dispatch, xg),
                              ("expert", "expert_group", "capacity", "embed"))
        expert_out = constrain(self.experts(expert_in) * slot_gate[..., None].astype(dt),
                               ("expert", "expert_group", "capacity", "embed"))
        y = constrain(jnp.einsum("gtec,egcm->gtm", dispatch, expert_out), ("group", "group_tokens", "embed"))
        metrics = _layer_outputs(info, logits.reshape(g, t, -1), routes, self.cfg.moe.load_balance_form)
        metrics["capacity"] = jnp.asarray(cap, jnp.float32)
        return y.reshape(n, d), metrics

    def _dropless(self, x, logits, mask, routes=False):
        """x [N, M], logits [N, E], mask [N] or None -> (y [N, M], metrics (with the routes if `routes`)). See
        moe_jax/model/dropless.py."""
        from moe_jax.model import dropless  # dropless imports layers only; kept local so the two modules read apart
        n, d = x.shape
        probs, gates, expert_index = top_k_routing(logits, self.top_k, self.cfg.moe.renormalize)
        weights = {k: getattr(self, k)[...].astype(self.dtype) for k in self._expert_names()}
        impl = self.cfg.moe.grouped_matmul
        mesh = jax.sharding.get_abstract_mesh()
        sizes = {} if mesh.empty else dict(mesh.shape)
        shards = sizes.get("data", 1) * sizes.get("expert", 1)
        if not mesh.empty and n % shards == 0 and self.num_experts % sizes.get("expert", 1) == 0:
            specs = {k: logical_to_spec(getattr(self, k).get_metadata()["logical_axes"], mesh.axis_names,
                                        weights[k].shape, sizes) for k in weights}
            full = jnp.ones((n,), bool) if mask is None else mask
            y = dropless.expert_parallel_ffn(x, expert_index, gates, weights, self.kind, full, mesh, impl, specs)
        else:
            y = dropless.dropless_ffn(x, expert_index, gates, weights, self.kind, mask, impl)
        info = dict(probs=probs, expert_index=expert_index, gates=gates, kept=jnp.ones(expert_index.shape, bool),
                    mask=mask)
        metrics = _layer_outputs(info, logits, routes, self.cfg.moe.load_balance_form)
        metrics["capacity"] = jnp.zeros((), jnp.float32)  # no capacity: every assignment is computed
        return y, metrics

    def _expert_names(self) -> tuple[str, ...]:
        return ("w_in", "w_gate", "w_out") if self.kind == "swiglu" else ("w_in", "w_out")


def expected_capacity(cfg: ModelConfig, tokens: int, train: bool = True) -> int:
    """The capacity a micro-batch of `tokens` tokens gets."""
    return capacity(cfg, group_size_for(tokens, cfg.moe.group_size), train)


def capacity_padding_fraction(cfg: ModelConfig, tokens: int, train: bool = True) -> float:
    """Fraction of the expert slots computed that hold no token if routing were perfectly balanced:
    1 - K*T / (E*C). Used by the FLOP counter to report padding FLOPs apart from model FLOPs."""
    moe = cfg.moe
    t = group_size_for(tokens, moe.group_size)
    return max(0.0, 1.0 - moe.top_k * t / (moe.num_experts * expected_capacity(cfg, tokens, train)))
