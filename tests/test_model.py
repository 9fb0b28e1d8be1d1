"""Tests for moe_jax/model/transformer.py: causality, segments, layer placement, head tying, dtypes, dropout, KV cache, loss,
rematerialisation. Tiny configs (smoke: 2 layers, width 64, vocab 512) so each compile takes a second or two."""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from numpy.testing import assert_allclose

from moe_jax.config import schema as config_lib
from moe_jax.config.typed import parse
from moe_jax.model import layers
from moe_jax.model import transformer as model
from moe_jax.model import moe
from moe_jax.cli import load_config_file

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
B, S = 2, 16


def tiny_config(kind="moe", dtype="float32", dropout=0.0, **model_fields):
    c = load_config_file(CONFIGS / "smoke.py")
    c.model.dtype = dtype
    c.model.dropout = dropout
    for k, v in model_fields.items():
        c.model[k] = v
    if kind == "dense":
        c.moe.num_experts = 0
    else:
        # Routing competes for capacity: within a routing group (here both rows of the batch are one group), a
        # token's assignment can take the last slot of an expert and push out another token's assignment - even an
        # EARLIER token's second choice, since all first choices go before any second choice. With a tight capacity
        # a change at position t could then change logits before t through routing alone, though attention is
        # causal. A capacity of T (never reached) removes that coupling; the tests that need it say so.
        c.moe.eval_capacity_factor = 1000.0
    return parse(c)


@functools.lru_cache(maxsize=None)
def forward(kind="moe", dtype="float32", dropout=0.0, train=False, no_drop=False):
    """(config, graphdef, params, jitted f(params, tokens, **kw) -> (logits, aux, cache)), built once per variant."""
    config = tiny_config(kind, dtype, dropout)
    graphdef, params = model.init_params(config.model, config.seed)

    @jax.jit
    def f(params, tokens, positions=None, segment_ids=None, rng=None, cache=None, cache_index=None):
        return model.apply(graphdef, params, tokens, positions=positions, segment_ids=segment_ids, rng=rng,
                           cache=cache, cache_index=cache_index, train=train, no_drop=no_drop)

    return config, graphdef, params, f


def random_tokens(shape=(B, S), seed=0, vocab=512):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, size=shape), jnp.int32)


def max_abs_diff(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


# ------------------------------------------------------------------------------------------------------ causality


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_changing_token_t_changes_no_logit_before_t(kind):
    config, _, params, f = forward(kind)  # MoE: eval capacity factor 1000 -> C = T, nothing dropped (see above)
    tokens = random_tokens()
    logits, aux, _ = f(params, tokens)
    assert logits.shape == (B, S, config.model.vocab_size)
    if kind == "moe":
        assert np.all(np.asarray(aux["dropped_fraction"]) == 0)
    for t in (0, 5, 11, S - 1):
        changed = tokens.at[:, t].set((tokens[:, t] + 1) % config.model.vocab_size)
        logits2, _, _ = f(params, changed)
        assert_allclose(np.asarray(logits2[:, :t]), np.asarray(logits[:, :t]), rtol=1e-5, atol=1e-5)
        assert max_abs_diff(logits2[:, t], logits[:, t]) > 1e-3  # the change itself is seen


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_segment_ids_restrict_attention_to_the_segment(kind):
    # MoE with no_drop: each token's FFN output depends on that token alone, so documents are independent.
    config, _, params, f = forward(kind, no_drop=True)
    la = 6  # document A: 6 tokens, document B: 10 tokens, packed in one row of 16
    docs = random_tokens((B, S), seed=1)
    seg = jnp.asarray([[1] * la + [2] * (S - la)] * B)
    pos = jnp.asarray([list(range(la)) + list(range(S - la))] * B)
    packed, _, _ = f(params, docs, positions=pos, segment_ids=seg)
    # each document alone in its own row (A padded at its end with arbitrary tokens, invisible to A by causality)
    pad = random_tokens((B, S - 2 * la), seed=2)
    alone = jnp.concatenate([jnp.concatenate([docs[:, :la], pad], axis=1), docs[:, la:]], axis=0)
    separate, _, _ = f(params, alone)
    assert_allclose(np.asarray(packed[:, :la]), np.asarray(separate[:B, :la]), rtol=1e-4, atol=1e-4)
    assert_allclose(np.asarray(packed[:, la:]), np.asarray(separate[B:]), rtol=1e-4, atol=1e-4)
    # not vacuous: without segment_ids, document B attends to A and its logits differ
    unsegmented, _, _ = f(params, docs, positions=pos)
    assert max_abs_diff(unsegmented[:, la:], packed[:, la:]) > 1e-3


# --------------------------------------------------------------------------------------------------------- layout


@pytest.mark.parametrize("every, moe_layers", [(1, [0, 1, 2, 3, 4, 5]), (2, [1, 3, 5]), (3, [2, 5]), (6, [5])])
def test_moe_layer_placement_follows_every(every, moe_layers):
    c = load_config_file(CONFIGS / "smoke.py")
    c.model.n_layers = 6
    c.moe.every = every
    m = nnx.eval_shape(lambda: model.create(parse(c).model, c.seed))  # abstract: structure only
    assert [i for i, blk in enumerate(m.blocks) if isinstance(blk.ffn, moe.MoEBlock)] == moe_layers
    assert [i for i, blk in enumerate(m.blocks) if isinstance(blk.ffn, layers.MLP)] == \
        [i for i in range(6) if i not in moe_layers]
    assert [i for i in range(6) if config_lib.is_moe_layer(c, i)] == moe_layers
    graphdef, state = nnx.split(m)
    logits, aux, _ = jax.eval_shape(lambda st, tok: nnx.merge(graphdef, st)(tok), state, random_tokens())
    assert aux["load_balance_loss"].shape == (len(moe_layers),)
    assert aux["tokens_per_expert"].shape == (len(moe_layers), c.moe.num_experts)
    assert logits.shape == (B, S, c.model.vocab_size)


def test_dense_model_has_no_moe_layers_and_zero_aux_loss():
    config, _, params, f = forward("dense")
    assert not any(config_lib.is_moe_layer(config, i) for i in range(config.model.n_layers))
    assert all("w_router" not in blk["ffn"] for blk in params["blocks"].values())
    _, aux, _ = f(params, random_tokens())
    assert set(aux) == {"moe_loss"} and float(aux["moe_loss"]) == 0.0


def test_moe_loss_is_the_weighted_sum_of_layer_losses():
    config, _, params, f = forward("moe")
    _, aux, _ = f(params, random_tokens())
    want = (config.moe.load_balance_weight * np.sum(aux["load_balance_loss"])
            + config.moe.z_loss_weight * np.sum(aux["z_loss"]))
    assert aux["load_balance_loss"].shape == (config.model.n_layers,)
    assert_allclose(aux["moe_loss"], want, rtol=1e-6)
    assert_allclose(np.sum(aux["tokens_per_expert_demand"], axis=1), B * S * config.moe.top_k)


@pytest.mark.parametrize("remat", [False, True])
def test_routes_are_reported_per_moe_layer_only_when_asked(remat):
    """routes=True adds aux['routes'] (each MoE layer's route record, stacked) and the detail metrics, the same with
    rematerialisation; the logits and every other aux entry are unchanged."""
    c = tiny_config("moe", remat=remat)
    graphdef, params = model.init_params(c.model, c.seed)
    tokens = random_tokens(seed=3)
    f = jax.jit(lambda p, routes: model.apply(graphdef, p, tokens, routes=routes), static_argnums=1)
    (logits, aux, _), (logits_r, aux_r, _) = f(params, False), f(params, True)
    assert set(aux_r) == set(aux) | {"routes", "real_tokens", "tokens_fully_dropped_fraction", "router_topk_prob"}
    np.testing.assert_array_equal(logits_r, logits)
    for k, v in aux.items():
        np.testing.assert_array_equal(aux_r[k], v)
    n, k, e = c.model.n_layers, c.moe.top_k, c.moe.num_experts  # smoke: every layer is MoE; B*S = 32 in one group
    assert aux_r["routes"]["logits"].shape == (n, 1, B * S, e) and aux_r["routes"]["kept"].shape == (n, 1, B * S, k)
    for li in range(n):
        np.testing.assert_array_equal(np.bincount(np.asarray(aux_r["routes"]["expert_index"][li]).ravel(),
                                                  minlength=e), aux["tokens_per_expert_demand"][li])
    if remat:
        plain_graphdef, _ = model.abstract(tiny_config("moe").model)
        _, plain, _ = jax.jit(lambda p: model.apply(plain_graphdef, p, tokens, routes=True))(params)
        jax.tree.map(np.testing.assert_array_equal, aux_r["routes"], plain["routes"])


@pytest.mark.parametrize("tied", [True, False])
def test_tied_and_untied_head(tied):
    c = tiny_config("dense", tie_embeddings=tied)
    graphdef, params = model.init_params(c.model, c.seed)
    apply = jax.jit(functools.partial(model.apply, graphdef))
    v, d = c.model.vocab_size, c.model.d_model
    assert params["embed"]["embedding"].shape == (v, d)
    assert ("head" in params) == (not tied)
    tokens = random_tokens()
    logits, _, _ = apply(params, tokens)
    assert np.abs(np.asarray(logits)).max() > 0
    if tied:
        # the head IS the embedding: zeroing all embeddings but token 7 leaves logits only in column 7
        emb = params["embed"]["embedding"]
        params = dict(params, embed={"embedding": jnp.zeros_like(emb).at[7].set(emb[7])})
        logits, _, _ = apply(params, tokens)
        assert np.all(np.asarray(logits)[..., np.arange(v) != 7] == 0)
    else:
        assert params["head"].shape == (d, v)
        params = dict(params, head=jnp.zeros_like(params["head"]))
        logits, _, _ = apply(params, tokens)
        assert np.all(np.asarray(logits) == 0)


# ---------------------------------------------------------------------------------------------------------- dtype


def test_bfloat16_compute_float32_params_and_logits():
    _, _, params16, f16 = forward("moe", dtype="bfloat16")
    _, _, params32, f32 = forward("moe", dtype="float32")
    leaves = jax.tree.leaves(params16)
    assert leaves and all(x.dtype == jnp.float32 for x in leaves)
    tokens = random_tokens()
    logits16, aux16, _ = f16(params16, tokens)
    logits32, _, _ = f32(params32, tokens)
    assert logits16.dtype == jnp.float32
    assert aux16["moe_loss"].dtype == jnp.float32
    # same parameters (same seed); bfloat16 compute gives close but not identical logits
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params16, params32)
    assert 0 < max_abs_diff(logits16, logits32) < 0.05


# -------------------------------------------------------------------------------------------------------- dropout


def test_dropout_identity_without_rng_and_active_with_rng():
    _, _, params, f_drop = forward("moe", dropout=0.1, train=True)
    _, _, params0, f_nodrop = forward("moe", dropout=0.0, train=True)
    tokens = random_tokens()
    det1, _, _ = f_drop(params, tokens)
    det2, _, _ = f_drop(params, tokens)
    ref, _, _ = f_nodrop(params0, tokens)
    np.testing.assert_array_equal(np.asarray(det1), np.asarray(det2))
    assert_allclose(np.asarray(det1), np.asarray(ref), rtol=1e-6, atol=1e-6)  # rng=None: dropout is the identity
    k1, k2 = jax.random.key(1), jax.random.key(2)
    r1, _, _ = f_drop(params, tokens, rng=k1)
    r1_again, _, _ = f_drop(params, tokens, rng=k1)
    r2, _, _ = f_drop(params, tokens, rng=k2)
    assert max_abs_diff(r1, det1) > 1e-3
    assert max_abs_diff(r1, r2) > 1e-3
    np.testing.assert_array_equal(np.asarray(r1), np.asarray(r1_again))  # randomness is a function of the key
    # with dropout 0, a key changes nothing (router noise is 0 in smoke)
    r0, _, _ = f_nodrop(params0, tokens, rng=k1)
    assert_allclose(np.asarray(r0), np.asarray(ref), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_kv_cache_decoding_equals_full_forward(kind):
    # MoE decodes with no_drop=True (as generation does): a token's output then does not depend on its group.
    config, graphdef, params, f = forward(kind, no_drop=True)
    tokens = random_tokens(seed=3)
    full, _, _ = f(params, tokens)
    cache = nnx.merge(graphdef, params).init_cache(B, S + 4, jnp.float32)  # longer than needed: the rest is masked
    assert len(cache) == config.model.n_layers
    assert cache[0]["k"].shape == (B, S + 4, config.model.n_heads, config.model.d_model // config.model.n_heads)
    prefill = 5
    logits, _, cache = f(params, tokens[:, :prefill], cache=cache, cache_index=0)
    assert_allclose(np.asarray(logits), np.asarray(full[:, :prefill]), rtol=1e-4, atol=1e-4)
    for i in range(prefill, S):
        logits, _, cache = f(params, tokens[:, i:i + 1], cache=cache, cache_index=jnp.int32(i))
        assert logits.shape == (B, 1, config.model.vocab_size)
        assert_allclose(np.asarray(logits[:, 0]), np.asarray(full[:, i]), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------- loss


def test_cross_entropy_against_numpy():
    rng = np.random.default_rng(4)
    logits = (3 * rng.standard_normal((2, 5, 7))).astype(np.float32)
    targets = rng.integers(0, 7, size=(2, 5))
    targets[0, :3] = logits[0, :3].argmax(-1)  # some correct predictions
    weights = rng.uniform(size=(2, 5)).astype(np.float32)
    weights[1, 2:] = 0.0

    z = logits.astype(np.float64)
    logz = np.log(np.sum(np.exp(z - z.max(-1, keepdims=True)), axis=-1)) + z.max(-1)
    nll = logz - np.take_along_axis(z, targets[..., None], -1)[..., 0]
    correct = (z.argmax(-1) == targets).astype(np.float64)

    loss, ncorrect, wsum = model.cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
    assert_allclose(loss, np.sum(nll * weights), rtol=1e-5)
    assert_allclose(ncorrect, np.sum(correct * weights), rtol=1e-6)
    assert_allclose(wsum, weights.sum(), rtol=1e-6)
    loss, ncorrect, wsum = model.cross_entropy(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets))
    assert loss.dtype == jnp.float32 and float(wsum) == 10.0
    assert_allclose(loss, np.sum(nll), rtol=2e-2)
    assert float(ncorrect) >= 3


# ---------------------------------------------------------------------------------------------------------- remat


@pytest.mark.slow  # quick tier under 3 min: a full compile per case; the full suite runs it
def test_remat_gives_same_loss_and_grads():
    tokens = random_tokens(seed=5)
    targets = jnp.roll(tokens, -1, axis=1)
    key = jax.random.key(7)
    results = {}
    for remat in (False, True):
        c = tiny_config("moe", dropout=0.1, remat=remat)
        graphdef, params = model.init_params(c.model, c.seed)

        def loss_fn(params):
            logits, aux, _ = model.apply(graphdef, params, tokens, train=True, rng=key)
            nll, _, w = model.cross_entropy(logits, targets)
            return nll / w + aux["moe_loss"]

        grad_fn = jax.jit(jax.value_and_grad(loss_fn))
        results[remat] = grad_fn(params)
        if remat:  # the rematerialisation is really there
            jaxpr = str(jax.make_jaxpr(grad_fn)(params))
            assert "remat" in jaxpr or "checkpoint" in jaxpr
    (l0, g0), (l1, g1) = results[False], results[True]
    assert_allclose(l1, l0, rtol=1e-6)
    jax.tree.map(lambda a, b: assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7), g0, g1)
    assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(g0))
