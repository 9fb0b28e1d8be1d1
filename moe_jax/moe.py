"""The sparse Mixture-of-Experts feed-forward: router, capacity-based dispatch and combine by einsum, experts.

Shapes: B batch, S length, M d_model, F expert d_ff, E experts, K top-k, G routing groups, T tokens per group
(B*S = G*T), C capacity (token slots per expert per group).

Read top to bottom, one forward pass is:
 1. Tokens [B, S, M] are regrouped into [G, T, M] (T <= moe.group_size: the dispatch mask is [G, T, E, C] and
    C grows with T, so its size grows with T^2).
 2. Router in float32: logits [G, T, E] = x @ w_router (float32 inputs, Precision.HIGHEST: precision.router_logits);
    probs = softmax over all E experts; top-k of probs;
    the k weights are renormalised to sum to 1 (moe.renormalize).
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
    made to expert e (before capacity) and P_e the mean router probability of e (equals 1 when uniform); router z-loss
    mean(logsumexp(logits)^2). Metrics: both losses, dropped fraction of assignments, tokens per expert, their
    coefficient of variation and max/mean, router confidence (mean top-1 probability).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax import precision
from moe_jax.layers import activation, dtype_of, param
from moe_jax.model_config import ModelConfig
from moe_jax.sharding import constrain


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


def route(logits: jax.Array, top_k: int, capacity: int, renormalize: bool = True):
    """Top-k routing with capacity. logits: [G, T, E] float32.

    Returns (dispatch [G, T, E, C] float32 in {0, 1}, combine [G, T, E, C] float32, info) where info holds
    probs [G, T, E], expert_index [G, T, K], gates [G, T, K] (routing weights), kept [G, T, K] (bool: the assignment
    got a slot) and slot [G, T, K] (its position in the expert's buffer).
    """
    g, t, e = logits.shape
    probs = jax.nn.softmax(logits, axis=-1)
    gates, expert_index = jax.lax.top_k(probs, top_k)  # [G, T, K]
    if renormalize:
        gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    onehot = jax.nn.one_hot(expert_index, e, dtype=jnp.int32)  # [G, T, K, E]
    # Priority: rank-major order (all first choices, then all second choices, ...), then token order.
    rank_major = jnp.swapaxes(onehot, 1, 2).reshape(g, top_k * t, e)  # [G, K*T, E]
    position = jnp.cumsum(rank_major, axis=1) - 1  # slot each assignment would take in its expert
    position = jnp.swapaxes(position.reshape(g, top_k, t, e), 1, 2)  # [G, T, K, E]
    slot = jnp.sum(position * onehot, axis=-1)  # [G, T, K]
    kept = slot < capacity
    slot_onehot = jax.nn.one_hot(jnp.where(kept, slot, capacity), capacity, dtype=jnp.float32)  # [G, T, K, C]
    expert_kept = onehot.astype(jnp.float32) * kept[..., None]  # [G, T, K, E]
    # float32 at Precision.HIGHEST: the default would round the gates to TF32 on GPU / bfloat16 passes on TPU
    hi = precision.ROUTER_PRECISION
    dispatch = jnp.einsum("gtke,gtkc->gtec", expert_kept, slot_onehot, precision=hi)
    gate_te = jnp.einsum("gtke,gtk->gte", expert_kept, gates, precision=hi)  # a token picks an expert at most once
    combine = dispatch * gate_te[..., None]
    info = dict(probs=probs, expert_index=expert_index, gates=gates, kept=kept, slot=slot)
    return dispatch, combine, info


def load_balance_loss(probs: jax.Array, expert_index: jax.Array) -> jax.Array:
    """Switch loss E * sum_e f_e * P_e. probs [..., E]; expert_index [..., K] (top-k choices before capacity)."""
    e = probs.shape[-1]
    counts = jnp.sum(jax.nn.one_hot(expert_index, e, dtype=jnp.float32), axis=tuple(range(expert_index.ndim)))
    f = counts / jnp.sum(counts)
    p = jnp.mean(probs.reshape(-1, e), axis=0)
    return e * jnp.sum(f * p)


def z_loss(logits: jax.Array) -> jax.Array:
    """Router z-loss mean(logsumexp(logits)^2) over all tokens. logits [..., E]."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))


def routing_metrics(info: dict, logits: jax.Array) -> dict:
    """Per-layer diagnostics: losses, dropped fraction, tokens per expert [E] and their CV and max/mean."""
    probs, idx, kept = info["probs"], info["expert_index"], info["kept"]
    e = probs.shape[-1]
    tokens_per_expert = jnp.sum(jax.nn.one_hot(idx, e, dtype=jnp.float32), axis=tuple(range(idx.ndim)))
    mean = jnp.mean(tokens_per_expert)
    return dict(
        load_balance_loss=load_balance_loss(probs, idx),
        z_loss=z_loss(logits),
        dropped_fraction=1.0 - jnp.mean(kept.astype(jnp.float32)),
        tokens_per_expert=tokens_per_expert,
        load_cv=jnp.std(tokens_per_expert) / mean,
        load_max_over_mean=jnp.max(tokens_per_expert) / mean,
        router_confidence=jnp.mean(jnp.max(probs, axis=-1)),
    )


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

    def __call__(self, x: jax.Array, *, train: bool = False, rng: jax.Array | None = None, no_drop: bool = False):
        """x [B, S, M] -> (y [B, S, M], metrics dict). `rng` drives router noise in training (moe.router_noise_std).
        `no_drop=True` sizes the capacity so no token is dropped (used for decoding)."""
        b, s, d = x.shape
        dt = self.dtype
        t = group_size_for(b * s, self.cfg.moe.group_size)
        g = b * s // t
        xg = constrain(x.reshape(g, t, d).astype(dt), ("group", "group_tokens", "embed"))

        logits = precision.router_logits(xg, self.w_router[...])  # [G, T, E] float32, Precision.HIGHEST
        noise_std = self.cfg.moe.router_noise_std
        if train and noise_std > 0 and rng is not None:
            logits = logits + noise_std * jax.random.normal(rng, logits.shape, jnp.float32)
        cap = self.capacity(t, train, no_drop)
        dispatch, combine, info = route(logits, self.top_k, cap, self.cfg.moe.renormalize)
        slot_gate = jnp.swapaxes(jnp.sum(combine, axis=1), 0, 1)  # [E, G, C]: each slot holds at most one token
        dispatch = constrain(dispatch.astype(dt), ("group", "group_tokens", None, "capacity"))

        expert_in = constrain(jnp.einsum("gtec,gtm->egcm", dispatch, xg),
                              ("expert", "expert_group", "capacity", "embed"))
        expert_out = constrain(self.experts(expert_in) * slot_gate[..., None].astype(dt),
                               ("expert", "expert_group", "capacity", "embed"))
        y = constrain(jnp.einsum("gtec,egcm->gtm", dispatch, expert_out), ("group", "group_tokens", "embed"))

        metrics = routing_metrics(info, logits)
        metrics["capacity"] = jnp.asarray(cap, jnp.float32)
        return y.reshape(b, s, d), metrics


def expected_capacity(config, tokens: int, train: bool = True) -> int:
    """The capacity a micro-batch of `tokens` tokens gets (config: a ModelConfig or a ConfigDict)."""
    cfg = ModelConfig.from_config(config)
    return capacity(cfg, group_size_for(tokens, cfg.moe.group_size), train)


def capacity_padding_fraction(config, tokens: int, train: bool = True) -> float:
    """Fraction of the expert slots computed that hold no token if routing were perfectly balanced:
    1 - K*T / (E*C). Used by the FLOP counter to report padding FLOPs apart from model FLOPs."""
    moe = ModelConfig.from_config(config).moe
    t = group_size_for(tokens, moe.group_size)
    return max(0.0, 1.0 - moe.top_k * t / (moe.num_experts * expected_capacity(config, tokens, train)))
