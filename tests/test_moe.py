"""Tests for moe_jax/model/moe.py against a naive per-token, per-expert numpy reference.

The reference is written from the formulas in moe.py's module docstring, not from its code: softmax over all experts,
top-k, renormalise the k weights, capacity C = max(ceil(K*T*cf/E), min_capacity) capped at T, priority "all first
choices in token order, then all second choices", each kept assignment adds gate * expert_mlp(x) to the token.
"""

import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from numpy.testing import assert_allclose

from moe_jax.config.typed import parse
from moe_jax.model import moe
from moe_jax.cli import load_config_file

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


# ------------------------------------------------------------------------------------------------------ reference


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def silu(x):
    return x / (1.0 + np.exp(-x))


def ref_routing(logits: np.ndarray, top_k: int, capacity: int, renormalize: bool = True):
    """Per-group, per-token loops. logits [G, T, E]. Returns expert_index, gates, kept, slot, each [G, T, K]."""
    g_n, t_n, e_n = logits.shape
    expert_index = np.zeros((g_n, t_n, top_k), np.int64)
    gates = np.zeros((g_n, t_n, top_k))
    kept = np.zeros((g_n, t_n, top_k), bool)
    slot = np.full((g_n, t_n, top_k), -1, np.int64)
    for g in range(g_n):
        for t in range(t_n):
            z = logits[g, t].astype(np.float64)
            p = np.exp(z - z.max())
            p = p / p.sum()
            order = sorted(range(e_n), key=lambda e: (-p[e], e))[:top_k]  # highest prob first
            w = np.array([p[e] for e in order])
            if renormalize and top_k > 1:  # k=1 keeps the raw probability (Switch): see moe.route
                w = w / w.sum()
            expert_index[g, t] = order
            gates[g, t] = w
        used = [0] * e_n  # slots taken in each expert's buffer for this group
        for r in range(top_k):  # all first choices (in token order), then all second choices, ...
            for t in range(t_n):
                e = expert_index[g, t, r]
                if used[e] < capacity:
                    kept[g, t, r] = True
                    slot[g, t, r] = used[e]
                    used[e] += 1
    return expert_index, gates, kept, slot


def ref_moe(x, w_router, w_in, w_out, top_k, capacity, group, kind="gelu", w_gate=None, renormalize=True):
    """x [B, S, M] -> (y [B, S, M], routing of ref_routing). Tokens are grouped in row-major (b, s) order."""
    b, s, m = x.shape
    tokens = x.reshape(-1, m).astype(np.float64)
    g_n = tokens.shape[0] // group
    logits = (tokens @ w_router.astype(np.float64)).reshape(g_n, group, -1)
    expert_index, gates, kept, slot = ref_routing(logits, top_k, capacity, renormalize)
    y = np.zeros_like(tokens)
    for g in range(g_n):
        for t in range(group):
            xt = tokens[g * group + t]
            for r in range(top_k):
                if not kept[g, t, r]:
                    continue
                e = expert_index[g, t, r]
                h = xt @ w_in[e]
                if kind == "swiglu":
                    h = silu(xt @ w_gate[e]) * h
                else:
                    h = gelu_tanh(h) if kind == "gelu" else silu(h)
                y[g * group + t] += gates[g, t, r] * (h @ w_out[e])
    return y.reshape(b, s, m), (logits, expert_index, gates, kept, slot)


# ---------------------------------------------------------------------------------------------------- block setup


def moe_config(top_k=2, num_experts=4, d_model=16, d_ff=32, group_size=16, mlp="gelu", **moe_fields):
    c = load_config_file(CONFIGS / "smoke.py")
    c.model.d_model = d_model
    c.model.n_heads = 2
    c.model.mlp = mlp
    c.model.dtype = "float32"
    c.moe.num_experts = num_experts
    c.moe.top_k = top_k
    c.moe.d_ff = d_ff
    c.moe.group_size = group_size
    for k, v in moe_fields.items():
        c.moe[k] = v
    return parse(c)


def random_block(config, seed=0, router_std=1.0):
    """A MoEBlock with O(1) random weights (so outputs are not tiny), and the weights as float64 numpy arrays."""
    block = moe.MoEBlock(config.model, nnx.Rngs(params=0))
    rng = np.random.default_rng(seed)
    m, e, f = config.model.d_model, config.moe.num_experts, config.moe.d_ff
    w = dict(w_router=router_std * rng.standard_normal((m, e)) / np.sqrt(m),
             w_in=rng.standard_normal((e, m, f)) / np.sqrt(m),
             w_out=rng.standard_normal((e, f, m)) / np.sqrt(f))
    if config.model.mlp == "swiglu":
        w["w_gate"] = rng.standard_normal((e, m, f)) / np.sqrt(m)
    w = {k: v.astype(np.float32) for k, v in w.items()}
    for k, v in w.items():
        getattr(block, k)[...] = jnp.asarray(v)
    return block, {k: v.astype(np.float64) for k, v in w.items()}


def call_block(block, x, **kwargs):
    graphdef, state = nnx.split(block)
    fn = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x, **kwargs))
    y, metrics = fn(state, jnp.asarray(x))
    return np.asarray(y), jax.tree.map(np.asarray, metrics)


def random_tokens(config, b=2, s=16, seed=1):
    return np.random.default_rng(seed).standard_normal((b, s, config.model.d_model)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------- group size


def test_group_size_is_largest_divisor_at_most_max():
    assert moe.group_size_for(32, 16) == 16
    assert moe.group_size_for(32, 12) == 8
    assert moe.group_size_for(24, 1024) == 24
    assert moe.group_size_for(7, 4) == 1
    assert moe.group_size_for(36, 10) == 9


# ------------------------------------------------------------------------------------------------------ capacity


@pytest.mark.parametrize("k, t, cf, e, min_cap, want", [
    (2, 64, 1.25, 4, 4, 40),   # ceil(2*64*1.25/4) = 40
    (1, 10, 1.0, 4, 1, 3),     # ceil(2.5) = 3
    (1, 8, 1.0, 8, 4, 4),      # ceil(1) = 1 < min_capacity
    (2, 4, 4.0, 2, 1, 4),      # ceil(16) = 16, capped at T = 4
    (2, 2, 1.0, 8, 4, 2),      # min_capacity 4 > T = 2: capped at T
    (2, 512, 1.25, 8, 4, 160),
])
def test_capacity_formula(k, t, cf, e, min_cap, want):
    c = moe_config(top_k=k, num_experts=e, min_capacity=min_cap, capacity_factor=cf, eval_capacity_factor=cf)
    assert want == min(max(math.ceil(k * t * cf / e), min_cap), t)
    cfg = c.model
    assert moe.capacity(cfg, t, train=True) == want
    assert moe.capacity(cfg, t, train=False) == want
    block = nnx.eval_shape(lambda: moe.MoEBlock(cfg, nnx.Rngs(params=0)))  # abstract: no parameters allocated
    assert block.capacity(t, train=True) == want
    assert block.capacity(t, train=False) == want
    assert block.capacity(t, train=True, no_drop=True) == t


def test_capacity_uses_train_or_eval_factor():
    c = moe_config(top_k=2, num_experts=4, capacity_factor=1.0, eval_capacity_factor=2.0, min_capacity=1)
    block = nnx.eval_shape(lambda: moe.MoEBlock(c.model, nnx.Rngs(params=0)))
    assert block.capacity(64, train=True) == 32
    assert block.capacity(64, train=False) == 64
    cfg = c.model
    assert (moe.capacity(cfg, 64, train=True), moe.capacity(cfg, 64, train=False)) == (32, 64)
    assert moe.expected_capacity(c.model, 128, train=True) == 8  # group_size 16 -> T = 16: ceil(2*16/4) = 8


# --------------------------------------------------------------------------------------------------------- route


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("capacity", [2, 5, 12])
@pytest.mark.parametrize("renormalize", [True, False])
def test_route_matches_reference(top_k, capacity, renormalize):
    rng = np.random.default_rng(10 * top_k + capacity)
    g, t, e = 3, 12, 4
    logits = (2.0 * rng.standard_normal((g, t, e))).astype(np.float32)
    dispatch, combine, info = moe.route(jnp.asarray(logits), top_k, capacity, renormalize)
    idx, gates, kept, slot = ref_routing(logits, top_k, capacity, renormalize)

    p = np.exp(logits - logits.max(-1, keepdims=True))
    assert_allclose(np.asarray(info["probs"]), p / p.sum(-1, keepdims=True), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(info["expert_index"]), idx)
    assert_allclose(np.asarray(info["gates"]), gates, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(info["kept"]), kept)
    np.testing.assert_array_equal(np.asarray(info["slot"])[kept], slot[kept])

    want_dispatch = np.zeros((g, t, e, capacity))
    want_combine = np.zeros((g, t, e, capacity))
    for gi, ti, r in zip(*np.nonzero(kept)):
        want_dispatch[gi, ti, idx[gi, ti, r], slot[gi, ti, r]] = 1.0
        want_combine[gi, ti, idx[gi, ti, r], slot[gi, ti, r]] = gates[gi, ti, r]
    assert dispatch.shape == (g, t, e, capacity)
    np.testing.assert_array_equal(np.asarray(dispatch), want_dispatch)
    assert_allclose(np.asarray(combine), want_combine, rtol=1e-5, atol=1e-7)
    # every expert slot holds at most one token
    assert np.asarray(dispatch).sum(axis=1).max() <= 1.0
    if capacity >= t:
        assert kept.all()


def test_route_priority_first_choices_before_second_choices():
    # 4 tokens, 2 experts, top-2, capacity 2. First choices: e0, e0, e1, e0; second choices: the other expert.
    logits = jnp.asarray([[[2.0, 0.0], [1.0, 0.0], [0.0, 1.5], [3.0, 0.0]]])
    _, combine, info = moe.route(logits, top_k=2, capacity=2)
    # Rank-major: e0 <- t0 (slot 0), t1 (slot 1), t3 dropped; e1 <- t2 (slot 0); then second choices:
    # e1 <- t0 (slot 1), t1 dropped; e0 full: t2, t3 dropped. (Token order would instead keep both of t0 and t1.)
    want_kept = np.array([[[True, True], [True, False], [True, False], [False, False]]])
    np.testing.assert_array_equal(np.asarray(info["kept"]), want_kept)
    np.testing.assert_array_equal(np.asarray(info["slot"])[want_kept], [0, 1, 1, 0])
    # token 3 has no choice left: it gets nothing from any expert
    assert np.all(np.asarray(combine)[0, 3] == 0)


# ---------------------------------------------------------------------------------------------------- MoEBlock


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("mode", ["no_drop", "huge_capacity_factor"])
def test_block_matches_reference_without_drops(top_k, mode):
    c = moe_config(top_k=top_k, eval_capacity_factor=1000.0)
    block, w = random_block(c, seed=top_k)
    x = random_tokens(c)
    y, metrics = call_block(block, x, train=False, no_drop=(mode == "no_drop"))
    t = 16  # group_size 16, 2*16 tokens: G = 2 groups
    want, (logits, idx, gates, kept, _) = ref_moe(x, w["w_router"], w["w_in"], w["w_out"], top_k, t, t)
    assert kept.all()
    assert_allclose(y, want, rtol=1e-4, atol=1e-5)
    assert metrics["dropped_fraction"] == 0.0
    assert metrics["capacity"] == t
    np.testing.assert_array_equal(metrics["tokens_per_expert"], np.bincount(idx.ravel(), minlength=4))
    assert metrics["tokens_per_expert"].sum() == 2 * t * top_k  # G * T * K


def test_gates_per_slot_equal_the_combine_einsum_in_value_and_gradient():
    """The block weights each expert slot by its token's gate and combines with the 0/1 dispatch mask; that equals
    the textbook einsum('GTEC,EGCM->GTM', combine, outputs), gradients (router, experts, input) included, with drops."""
    c = moe_config(top_k=2, capacity_factor=0.5)
    block, _ = random_block(c, seed=7)
    x = jnp.asarray(random_tokens(c))
    ct = jnp.asarray(np.random.default_rng(8).standard_normal(x.shape), jnp.float32)
    graphdef, state = nnx.split(block)

    def textbook(st, x):
        b = nnx.merge(graphdef, st)
        xg = x.reshape(2, 16, -1)
        logits = jnp.einsum("gtm,me->gte", xg, b.w_router[...])
        dispatch, combine, _ = moe.route(logits, 2, b.capacity(16, train=True))
        out = b.experts(jnp.einsum("gtec,gtm->egcm", dispatch, xg))
        return jnp.einsum("gtec,egcm->gtm", combine, out).reshape(x.shape)

    def ours(st, x):
        return nnx.merge(graphdef, st)(x, train=True)[0]

    def loss(fn):
        return jax.jit(jax.value_and_grad(lambda st, x: jnp.sum(fn(st, x) * ct), argnums=(0, 1)))(state, x)

    (v1, (g1s, g1x)), (v2, (g2s, g2x)) = loss(ours), loss(textbook)
    assert call_block(block, np.asarray(x), train=True)[1]["dropped_fraction"] > 0  # drops are exercised
    assert_allclose(v1, v2, rtol=1e-5)
    assert_allclose(g1x, g2x, rtol=1e-4, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g1s), jax.tree.leaves(g2s)):
        assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert float(jnp.max(jnp.abs(g1s["w_router"][...]))) > 0


def test_block_matches_reference_swiglu():
    c = moe_config(top_k=2, mlp="swiglu")
    block, w = random_block(c, seed=3)
    x = random_tokens(c, seed=4)
    y, _ = call_block(block, x, train=False, no_drop=True)
    want, _ = ref_moe(x, w["w_router"], w["w_in"], w["w_out"], 2, 16, 16, kind="swiglu", w_gate=w["w_gate"])
    assert_allclose(y, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2])
def test_block_drops_exactly_the_reference_assignments(top_k):
    # Training capacity factor 0.5, min_capacity 1: C = ceil(K * 16 * 0.5 / 4) = 2K slots per expert per group for
    # 16K assignments, so at least half of them are dropped.
    c = moe_config(top_k=top_k, capacity_factor=0.5, min_capacity=1)
    cap = math.ceil(top_k * 16 * 0.5 / 4)
    block, w = random_block(c, seed=10 + top_k, router_std=2.0)
    x = random_tokens(c, seed=20 + top_k)
    y, metrics = call_block(block, x, train=True)  # router_noise_std is 0: training routing is deterministic
    want, (logits, idx, gates, kept, slot) = ref_moe(x, w["w_router"], w["w_in"], w["w_out"], top_k, cap, 16)

    assert metrics["capacity"] == cap
    assert_allclose(metrics["dropped_fraction"], 1.0 - kept.mean(), rtol=1e-6)
    assert kept.mean() <= 0.5
    # the kept flags of route itself, on the block's router logits
    _, _, info = moe.route(jnp.asarray(logits, jnp.float32), top_k, cap)
    np.testing.assert_array_equal(np.asarray(info["kept"]), kept)

    assert_allclose(y, want, rtol=1e-4, atol=1e-5)
    y_tok, x_tok = y.reshape(2, 16, -1), x.reshape(2, 16, -1).astype(np.float64)
    all_dropped = ~kept.any(-1)
    partial = kept.any(-1) & ~kept.all(-1)
    assert all_dropped.any()
    assert np.all(y_tok[all_dropped] == 0.0)  # exactly zero: carried by the residual connection alone
    if top_k == 2:
        assert partial.any() and kept.all(-1).any()
        for g, t in zip(*np.nonzero(partial)):
            r = int(np.argmax(kept[g, t]))
            e = idx[g, t, r]
            expert = gelu_tanh(x_tok[g, t] @ w["w_in"][e]) @ w["w_out"][e]
            assert_allclose(y_tok[g, t], gates[g, t, r] * expert, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2])
def test_block_reports_the_reference_routes_only_when_asked(top_k):
    """routes=True returns the routes taken (logits, probabilities, choices, gates, kept flags of the float64
    reference, by group) and the detail metrics, and changes neither the output nor any other metric."""
    c = moe_config(top_k=top_k, capacity_factor=0.5, min_capacity=1)
    cap = math.ceil(top_k * 16 * 0.5 / 4)
    block, w = random_block(c, seed=10 + top_k, router_std=2.0)
    x = random_tokens(c, seed=20 + top_k)
    y, metrics = call_block(block, x, train=True)
    y_r, metrics_r = call_block(block, x, train=True, routes=True)
    detail = {"routes", "real_tokens", "tokens_fully_dropped_fraction", "router_topk_prob"}
    assert not detail & set(metrics) and set(metrics_r) == set(metrics) | detail
    np.testing.assert_array_equal(y_r, y)
    for k, v in metrics.items():
        np.testing.assert_array_equal(metrics_r[k], v)

    _, (logits, idx, gates, kept, _) = ref_moe(x, w["w_router"], w["w_in"], w["w_out"], top_k, cap, 16)
    r = metrics_r["routes"]
    assert r["logits"].shape == r["probs"].shape == (2, 16, 4) and r["mask"].all()
    assert_allclose(r["logits"], logits, rtol=1e-5, atol=1e-5)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    assert_allclose(r["probs"], probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(r["expert_index"], idx)
    assert_allclose(r["gates"], gates, rtol=1e-5)
    np.testing.assert_array_equal(r["kept"], kept)
    assert metrics_r["real_tokens"] == 32
    assert_allclose(metrics_r["tokens_fully_dropped_fraction"], np.mean(~kept.any(-1)), rtol=1e-6)
    assert_allclose(metrics_r["router_topk_prob"], np.mean(np.take_along_axis(probs, idx, -1).sum(-1)), rtol=1e-5)


def test_routes_and_detail_metrics_leave_out_masked_tokens():
    c = moe_config(top_k=2, capacity_factor=0.5, min_capacity=1)
    block, _ = random_block(c, seed=30, router_std=2.0)
    x = random_tokens(c, seed=31)
    mask = np.ones((2, 16), bool)
    mask[1, 5:] = False  # 21 real tokens
    _, m = call_block(block, x, train=True, token_mask=jnp.asarray(mask), routes=True)
    r = m["routes"]
    np.testing.assert_array_equal(r["mask"], mask)  # group size 16: one row per group
    assert not r["kept"][~mask].any() and m["real_tokens"] == 21
    real = mask[..., None] & np.ones_like(r["kept"], bool)
    np.testing.assert_array_equal(m["tokens_per_expert"], np.bincount(r["expert_index"][r["kept"]], minlength=4))
    np.testing.assert_array_equal(m["tokens_per_expert_demand"], np.bincount(r["expert_index"][real], minlength=4))
    assert_allclose(m["tokens_fully_dropped_fraction"], np.sum(~r["kept"].any(-1) & mask) / 21, rtol=1e-6)
    top = np.take_along_axis(r["probs"], r["expert_index"], -1).sum(-1)
    assert_allclose(m["router_topk_prob"], top[mask].mean(), rtol=1e-5)


def test_router_noise_only_in_training_with_rng():
    c = moe_config(top_k=1, router_noise_std=5.0)
    block, _ = random_block(c, seed=6)
    x = random_tokens(c, seed=7)
    clean, _ = call_block(block, x, train=False, no_drop=True)
    key = jax.random.key(0)
    eval_with_rng, _ = call_block(block, x, train=False, rng=key, no_drop=True)
    train_no_rng, _ = call_block(block, x, train=True, no_drop=True)
    noisy, _ = call_block(block, x, train=True, rng=key, no_drop=True)
    np.testing.assert_array_equal(eval_with_rng, clean)
    np.testing.assert_array_equal(train_no_rng, clean)
    assert np.max(np.abs(noisy - clean)) > 1e-3  # std-5 noise on the logits changes some top-1 choices


# ----------------------------------------------------------------------------------------------- losses, metrics


def test_load_balance_loss_is_one_for_uniform_router():
    c = moe_config(top_k=2)
    block, _ = random_block(c)
    block.w_router[...] = jnp.zeros_like(block.w_router[...])
    _, metrics = call_block(block, random_tokens(c), train=False)
    assert_allclose(metrics["load_balance_loss"], 1.0, rtol=1e-6)
    assert_allclose(metrics["router_confidence"], 0.25, rtol=1e-6)
    assert_allclose(metrics["router_entropy"], np.log(4.0), rtol=1e-6)  # uniform over E = 4: the maximum
    # logits are all 0: logsumexp = log(E)
    assert_allclose(metrics["z_loss"], np.log(4.0) ** 2, rtol=1e-6)


def test_load_balance_loss_balanced_assignment_and_by_hand():
    e = 4
    probs = jnp.full((2, 8, e), 1.0 / e)
    balanced = jnp.asarray(np.arange(16).reshape(2, 8, 1) % e)
    assert_allclose(moe.load_balance_loss(probs, balanced), 1.0, rtol=1e-6)
    # by hand: f = (3/4, 1/4, 0, 0) over 4 assignments, P = mean of two rows
    probs = jnp.asarray([[0.7, 0.1, 0.1, 0.1], [0.1, 0.5, 0.2, 0.2]])
    idx = jnp.asarray([[0, 1], [0, 0]])
    p_mean = np.array([0.4, 0.3, 0.15, 0.15])
    want = e * np.sum(np.array([0.75, 0.25, 0.0, 0.0]) * p_mean)
    assert_allclose(moe.load_balance_loss(probs, idx), want, rtol=1e-6)


def test_prob_squares_loss_is_exp5s_and_ignores_the_assignments():
    """moe.load_balance_form='prob_squares' (seed exp5): E * sum_e P_e^2, 1 for uniform probabilities whatever the
    choices, masked tokens left out; routing_metrics reports it as load_balance_loss."""
    e = 4
    uniform = jnp.full((2, 8, e), 1.0 / e)
    assert_allclose(moe.prob_squares_loss(uniform), 1.0, rtol=1e-6)
    probs = jnp.asarray([[0.7, 0.1, 0.1, 0.1], [0.1, 0.5, 0.2, 0.2], [0.0, 0.0, 0.0, 1.0]])
    mask = jnp.asarray([True, True, False])
    p_mean = np.array([0.4, 0.3, 0.15, 0.15])
    assert_allclose(moe.prob_squares_loss(probs, mask), e * np.sum(p_mean ** 2), rtol=1e-6)
    idx = jnp.asarray([[0, 1], [0, 0], [3, 2]])
    info = dict(probs=probs, expert_index=idx, kept=jnp.ones(idx.shape, bool), mask=mask)
    m = moe.routing_metrics(info, jnp.log(probs + 1e-9), balance_form="prob_squares")
    assert_allclose(m["load_balance_loss"], e * np.sum(p_mean ** 2), rtol=1e-6)
    assert_allclose(moe.routing_metrics(info, jnp.log(probs + 1e-9))["load_balance_loss"],
                    moe.load_balance_loss(probs, idx, mask), rtol=1e-6)  # the default: Switch


@pytest.mark.parametrize("top_k", [1, 2])
def test_load_balance_loss_grows_with_imbalance(top_k):
    e, t = 4, 32
    losses = []
    for alpha in (0.0, 0.5, 1.0, 2.0, 4.0, 8.0):
        # every token prefers expert 0 (then expert 1), more and more sharply
        logits = jnp.broadcast_to(jnp.asarray([alpha, alpha / 2, 0.0, 0.0]), (1, t, e))
        _, _, info = moe.route(logits, top_k, capacity=t)
        losses.append(float(moe.load_balance_loss(info["probs"], info["expert_index"])))
    assert_allclose(losses[0], 1.0, rtol=1e-6)
    assert all(b > a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] > 0.9 * e / top_k  # nearly all mass on the top-k experts


def test_z_loss_by_hand():
    logits = jnp.asarray([[0.0, 0.0], [np.log(3.0), 0.0]], jnp.float32)
    # logsumexp: log 2 and log 4 = 2 log 2 -> mean of squares = (1 + 4) / 2 * log(2)^2
    assert_allclose(moe.z_loss(logits), 2.5 * np.log(2.0) ** 2, rtol=1e-6)
    big = jnp.asarray([[[10.0, 10.0, 10.0]]])
    assert_allclose(moe.z_loss(big), (10.0 + np.log(3.0)) ** 2, rtol=1e-6)


def test_routing_metrics_by_hand():
    probs = jnp.asarray([[[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]]])
    idx = jnp.asarray([[[0, 1], [2, 0]]])
    kept = jnp.asarray([[[True, False], [True, True]]])
    logits = jnp.log(probs)
    m = moe.routing_metrics(dict(probs=probs, expert_index=idx, kept=kept), logits)
    tpe = np.array([2.0, 1.0, 1.0])  # demand: the top-k choices
    np.testing.assert_array_equal(m["tokens_per_expert_demand"], tpe)
    assert m["tokens_per_expert_demand"].sum() == 1 * 2 * 2  # G * T * K
    assert_allclose(m["dropped_fraction"], 0.25)
    assert_allclose(m["load_cv_demand"], np.std(tpe) / np.mean(tpe), rtol=1e-6)
    assert_allclose(m["load_max_over_mean_demand"], 2.0 / (4.0 / 3.0), rtol=1e-6)
    kept_load = np.array([2.0, 0.0, 1.0])  # carried: token 0's second choice (expert 1) was dropped
    np.testing.assert_array_equal(m["tokens_per_expert"], kept_load)
    assert_allclose(m["load_cv"], np.std(kept_load) / np.mean(kept_load), rtol=1e-6)
    assert_allclose(m["load_max_over_mean"], 2.0 / 1.0, rtol=1e-6)
    assert_allclose(m["router_confidence"], 0.6, rtol=1e-6)
    h = [-(0.6 * np.log(0.6) + 0.3 * np.log(0.3) + 0.1 * np.log(0.1)), -(2 * 0.2 * np.log(0.2) + 0.6 * np.log(0.6))]
    assert_allclose(m["router_entropy"], np.mean(h), rtol=1e-6)
    assert_allclose(m["z_loss"], 0.0, atol=1e-6)  # log-probabilities: logsumexp = 0


def test_block_metrics_tokens_per_expert_sum_and_aux_with_train_capacity():
    c = moe_config(top_k=2)
    block, _ = random_block(c, seed=5)
    _, metrics = call_block(block, random_tokens(c, b=4, s=16), train=True)
    assert metrics["tokens_per_expert"].shape == (4,)
    assert metrics["tokens_per_expert_demand"].sum() == 4 * 16 * 2  # G=4 groups of T=16, K=2
    assert_allclose(metrics["tokens_per_expert"].sum(), 4 * 16 * 2 * (1 - metrics["dropped_fraction"]), rtol=1e-6)
    assert metrics["capacity"] == moe.capacity(c.model, 16, train=True)
    assert 0.0 <= metrics["dropped_fraction"] <= 1.0


def test_capacity_padding_fraction():
    c = moe_config(top_k=2, capacity_factor=1.25, min_capacity=1)
    # T = 16: C = ceil(2*16*1.25/4) = 10 -> 1 - 32 / 40
    assert_allclose(moe.capacity_padding_fraction(c.model, 64), 1.0 - 32 / 40)
