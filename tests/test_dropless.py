"""Tests for moe_jax/model/dropless.py and the dropless dispatch of moe.MoEBlock (moe.dispatch='dropless'), and for the
padding-aware routing of both dispatch modes (token_mask).

Claims: dropless equals the capacity path when capacity drops nothing (outputs, auxiliary losses, gradients of every
parameter and of the input; k = 1, 2; gelu and swiglu) and the float64 loop reference of tests/test_moe.py; a token's
output does not depend on any other token (bit for bit); masked (weight-0) positions change nothing for real tokens;
expert parallelism over the mesh 'expert' axis (8 simulated devices) gives one device's loss and gradients and its
compiled step contains all-to-alls; the Megablox kernel (Pallas interpret mode on CPU) equals ragged_dot; the model
trains and decodes with dropless.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from numpy.testing import assert_allclose, assert_array_equal

from moe_jax.model import decode
from moe_jax.model import dropless
from moe_jax.model import transformer as model
from moe_jax import sharding
from moe_jax.train import step as train_step
from moe_jax.optim import chain as optimizer_lib
from smoke_helpers import config_dict, run_config, smoke_config
from test_moe import call_block, moe_config, random_block, random_tokens, ref_moe


def block_pair(top_k=2, mlp="gelu", seed=0, **fields):
    """The same random weights in a capacity block (capacity never binds) and a dropless block."""
    cap = moe_config(top_k=top_k, mlp=mlp, capacity_factor=1000.0, eval_capacity_factor=1000.0, **fields)
    drop = moe_config(top_k=top_k, mlp=mlp, dispatch="dropless", **fields)
    (b_cap, w), (b_drop, _) = random_block(cap, seed=seed), random_block(drop, seed=seed)
    return b_cap, b_drop, w


def block_tokens(block, b=2, s=16, seed=1):
    return np.random.default_rng(seed).standard_normal((b, s, block.cfg.d_model)).astype(np.float32)


def value_and_grads(block, x, ct, **kwargs):
    """(sum(y * ct) + moe aux loss, metrics, grads of every parameter, grad of x)."""
    graphdef, state = nnx.split(block)

    def f(st, x):
        y, m = nnx.merge(graphdef, st)(x, **kwargs)
        return jnp.sum(y * ct) + 0.01 * m["load_balance_loss"] + 0.001 * m["z_loss"], m

    (v, m), (gs, gx) = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(state, jnp.asarray(x))
    return float(v), jax.tree.map(np.asarray, m), nnx.to_pure_dict(gs), np.asarray(gx)


# ------------------------------------------------------------------------------------------------ sort_by_expert


def test_sort_by_expert_groups_in_token_order_and_masked_last():
    idx = jnp.asarray([[2, 0], [0, 1], [2, 1], [0, 2]])
    order, sizes, n_valid = dropless.sort_by_expert(idx, 4)
    assert_array_equal(sizes, [3, 2, 3, 0])
    assert_array_equal(order, [1, 2, 6, 3, 5, 0, 4, 7])  # assignment id = token * K + rank
    order, sizes, n_valid = dropless.sort_by_expert(idx, 4, mask=jnp.asarray([True, False, True, True]))
    assert_array_equal(sizes, [2, 1, 3, 0])
    assert int(n_valid) == 6
    assert_array_equal(order, [1, 6, 5, 0, 4, 7, 2, 3])  # token 1's assignments (2, 3) sort last


def test_grouped_mlp_equals_per_group_loop_and_zeroes_rows_past_the_groups():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 8)).astype(np.float32)
    w = {"w_in": rng.standard_normal((3, 8, 6)).astype(np.float32),
         "w_out": rng.standard_normal((3, 6, 8)).astype(np.float32)}
    sizes = jnp.asarray([3, 0, 4], jnp.int32)
    out = np.asarray(dropless.grouped_mlp(jnp.asarray(x), sizes, jnp.asarray(7), w, "gelu"))
    gelu = jax.nn.gelu
    want = np.concatenate([gelu(x[:3] @ w["w_in"][0]) @ w["w_out"][0], gelu(x[3:7] @ w["w_in"][2]) @ w["w_out"][2]])
    assert_allclose(out[:7], want, rtol=1e-5, atol=1e-5)
    assert np.all(out[7:] == 0)


# ------------------------------------------------------------------------------------- equal to the capacity path


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_dropless_equals_capacity_without_drops(top_k, mlp):
    b_cap, b_drop, _ = block_pair(top_k, mlp, seed=top_k)
    x = block_tokens(b_cap, seed=3)
    ct = jnp.asarray(np.random.default_rng(4).standard_normal(x.shape), jnp.float32)
    v1, m1, g1, gx1 = value_and_grads(b_cap, x, ct, train=True)
    v2, m2, g2, gx2 = value_and_grads(b_drop, x, ct, train=True)
    assert m1["dropped_fraction"] == 0 and m2["dropped_fraction"] == 0
    assert_allclose(v2, v1, rtol=1e-5)
    for k in ("load_balance_loss", "z_loss", "router_confidence", "router_entropy", "load_cv", "load_cv_demand"):
        assert_allclose(m2[k], m1[k], rtol=1e-5, err_msg=k)
    assert_array_equal(m2["tokens_per_expert"], m1["tokens_per_expert"])
    assert_array_equal(m2["tokens_per_expert"], m2["tokens_per_expert_demand"])
    assert_allclose(gx2, gx1, rtol=1e-4, atol=1e-6)
    assert set(g1) == set(g2) == ({"w_router", "w_in", "w_out"} | ({"w_gate"} if mlp == "swiglu" else set()))
    for name in g1:
        assert_allclose(g2[name], g1[name], rtol=1e-4, atol=1e-6, err_msg=name)
        assert np.abs(g2[name]).max() > 0, name


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_dropless_equals_float64_reference(top_k, mlp):
    _, b_drop, w = block_pair(top_k, mlp, seed=10 + top_k)
    x = block_tokens(b_drop, seed=11)
    y, metrics = call_block(b_drop, x, train=True)
    want, (_, idx, _, kept, _) = ref_moe(x, w["w_router"], w["w_in"], w["w_out"], top_k, 16, 16, kind=mlp,
                                         w_gate=w.get("w_gate"))
    assert kept.all()
    assert_allclose(y, want, rtol=1e-4, atol=1e-5)
    assert_array_equal(metrics["tokens_per_expert"], np.bincount(idx.ravel(), minlength=4))
    assert metrics["capacity"] == 0 and metrics["dropped_fraction"] == 0


def test_dropless_reports_the_capacity_paths_routes_as_one_group_with_nothing_dropped():
    b_cap, b_drop, _ = block_pair(top_k=2, seed=12)
    x = block_tokens(b_cap, seed=13)
    mask = np.ones((2, 16), bool)
    mask[0, 12:] = False
    _, m_cap = call_block(b_cap, x, train=True, token_mask=jnp.asarray(mask), routes=True)
    _, m_drop = call_block(b_drop, x, train=True, token_mask=jnp.asarray(mask), routes=True)
    r_cap, r_drop = m_cap["routes"], m_drop["routes"]
    assert r_drop["logits"].shape == (1, 32, 4) and r_drop["expert_index"].shape == (1, 32, 2)
    for k in ("logits", "probs", "expert_index", "gates", "mask"):
        assert_allclose(r_drop[k].reshape(-1), r_cap[k].reshape(-1), rtol=1e-6)
    assert r_drop["kept"].all() and r_drop["mask"].sum() == 28 == m_drop["real_tokens"]
    assert m_drop["tokens_fully_dropped_fraction"] == 0 and m_drop["dropped_fraction"] == 0
    assert_allclose(m_drop["router_topk_prob"], m_cap["router_topk_prob"], rtol=1e-6)


def test_dropless_never_drops_where_capacity_does():
    # a router that sends every token to experts 0 and 1: capacity factor 1.0 drops half the assignments
    cap = moe_config(top_k=2, capacity_factor=1.0, min_capacity=1)
    drop = moe_config(top_k=2, capacity_factor=1.0, min_capacity=1, dispatch="dropless")
    (b_cap, w), (b_drop, _) = random_block(cap, seed=2), random_block(drop, seed=2)
    bias = np.zeros((16, 4), np.float32)
    x = random_tokens(cap, seed=5)
    x[..., 0] = 10.0
    bias[0, :2] = 3.0
    for b in (b_cap, b_drop):
        b.w_router[...] = b.w_router[...] + jnp.asarray(bias)
    w["w_router"] = w["w_router"] + bias
    _, m_cap = call_block(b_cap, x, train=True)
    y, m_drop = call_block(b_drop, x, train=True)
    assert m_cap["dropped_fraction"] >= 0.4
    assert m_drop["dropped_fraction"] == 0
    assert m_drop["load_max_over_mean"] == pytest.approx(2.0)  # all load on 2 of 4 experts, and all of it carried
    # capacity: experts 0 and 1 carry C = 8 per group of 16 (2 groups) of the 32 assignments each demanded
    assert_array_equal(m_cap["tokens_per_expert_demand"], [32, 32, 0, 0])
    assert_array_equal(m_cap["tokens_per_expert"], [16, 16, 0, 0])
    want, _ = ref_moe(x, w["w_router"], w["w_in"], w["w_out"], 2, 16, 16)
    assert_allclose(y, want, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------- no cross-token leak


def test_earlier_tokens_do_not_depend_on_later_tokens_bit_for_bit():
    _, b_drop, _ = block_pair(2, seed=20)
    x = block_tokens(b_drop, b=1, s=32, seed=21)
    y, _ = call_block(b_drop, x, train=True)
    rng = np.random.default_rng(22)
    for cut in (1, 9, 20):
        x2 = x.copy()
        x2[0, cut:] = 3.0 * rng.standard_normal(x2[0, cut:].shape)  # later tokens: other experts, other group sizes
        y2, _ = call_block(b_drop, x2, train=True)
        assert_array_equal(y2[0, :cut], y[0, :cut])
        assert np.abs(y2[0, cut:] - y[0, cut:]).max() > 1e-3


# --------------------------------------------------------------------------------------- padding-aware routing


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_masked_positions_change_nothing_for_real_tokens(dispatch):
    c = moe_config(top_k=2, capacity_factor=1.0, min_capacity=1, dispatch=dispatch)
    block, _ = random_block(c, seed=30)
    x = random_tokens(c, b=2, s=16, seed=31)
    mask = np.ones((2, 16), bool)
    mask[:, 10:] = False  # the last 6 positions of each row are padding
    real = mask.reshape(-1)
    y_pad, m_pad = call_block(block, x, train=True, token_mask=jnp.asarray(mask))
    x2 = x.copy()
    x2[~mask] = 5.0  # 12 identical pad vectors (all routed to the same experts if they counted)
    y2, m2 = call_block(block, x2, train=True, token_mask=jnp.asarray(mask))
    assert_array_equal(y2[mask], y_pad[mask])
    assert np.all(y_pad[~mask] == 0) and np.all(y2[~mask] == 0)  # padding gets no expert output
    for k in m_pad:
        assert_allclose(m2[k], m_pad[k], rtol=1e-6, err_msg=k)
    assert m_pad["tokens_per_expert_demand"].sum() == real.sum() * 2
    # the same real tokens alone, groups of 10 (a 2 x 10 batch): identical routing metrics
    c10 = moe_config(top_k=2, capacity_factor=1.0, min_capacity=1, dispatch=dispatch, group_size=10)
    b10, _ = random_block(c10, seed=30)
    y10, m10 = call_block(b10, x[:, :10], train=True)
    for k in ("load_balance_loss", "z_loss", "router_confidence", "router_entropy", "tokens_per_expert_demand",
              "load_cv_demand"):
        assert_allclose(m_pad[k], m10[k], rtol=1e-5, err_msg=k)
    if dispatch == "dropless":
        assert_allclose(y_pad[:, :10], y10, rtol=1e-5, atol=1e-6)
    # without the mask the pad vectors do take capacity (or, dropless, enter the losses)
    _, m_nomask = call_block(block, x2, train=True)
    assert m_nomask["load_balance_loss"] != pytest.approx(float(m_pad["load_balance_loss"]), rel=1e-4)


def test_capacity_padding_takes_no_slot():
    """Pads at the front of a group, all choosing the real tokens' experts: masked, they leave every slot to the
    real tokens (nothing is dropped at a capacity the real tokens alone fit in)."""
    c = moe_config(top_k=1, num_experts=2, group_size=16, capacity_factor=1.0, min_capacity=1)
    block, _ = random_block(c, seed=40)
    x = random_tokens(c, b=1, s=16, seed=41)
    x[0, :8] = x[0, 8]  # 8 copies of token 8 in front: they choose its expert
    mask = np.zeros((1, 16), bool)
    mask[0, 8:] = True
    _, m_unmasked = call_block(block, x, train=True)
    _, m = call_block(block, x, train=True, token_mask=jnp.asarray(mask))
    assert m["capacity"] == 8  # C = ceil(1 * 16 * 1.0 / 2)
    assert m_unmasked["dropped_fraction"] > 0
    assert m["tokens_per_expert_demand"].sum() == 8 and m["dropped_fraction"] == 0


# ------------------------------------------------------------------------------------------- expert parallelism


def ep_config(dispatch="dropless", mlp="swiglu"):
    """configs/smoke.py with this dispatch and MLP, batch 8 x 32, one micro-batch (a ConfigDict)."""
    return config_dict("smoke", moe=dict(dispatch=dispatch), model=dict(mlp=mlp),
                       train=dict(batch_size=8, seq_len=32, grad_accum=1))


def fixed_batch(config):
    rows, s = config.train.batch_size * config.train.grad_accum, config.train.seq_len
    rng = np.random.default_rng(0)
    weights = np.ones((rows, s), np.float32)
    weights[:3, -7:] = 0.0  # some padding
    return {"inputs": rng.integers(0, config.model.vocab_size, (rows, s), dtype=np.int32),
            "targets": rng.integers(0, config.model.vocab_size, (rows, s), dtype=np.int32), "weights": weights}


def loss_and_grads(config, mesh_shape, devices):
    """Loss, MoE metrics and gradients of the trainer's loss on a fixed batch, jitted on a mesh; + compiled HLO."""
    c = run_config(config, **{"mesh.shape": mesh_shape})
    mesh = sharding.build_mesh(c.mesh, devices)
    graphdef, abstract_nnx = model.abstract(c.model)
    _, params = model.init_params(c.model, c.seed)
    tx = optimizer_lib.build(c.optim, c.train.steps)
    batch = fixed_batch(c)
    shard = train_step.abstract_train_state(abstract_nnx, tx, mesh)
    p_shard = jax.tree.map(lambda s: s.sharding, shard["params"])
    b_shard = train_step.batch_shardings(batch, mesh)

    def f(p, b):
        (loss, (ce, _, _, aux)), g = jax.value_and_grad(
            lambda p: train_step._loss(graphdef, p, b, None, True), has_aux=True)(p)
        return loss, aux, g

    with jax.set_mesh(mesh):
        fn = jax.jit(f, in_shardings=(p_shard, b_shard))
        compiled = fn.lower(jax.device_put(params, p_shard), jax.device_put(batch, b_shard)).compile()
        loss, aux, grads = compiled(jax.device_put(params, p_shard), jax.device_put(batch, b_shard))
    return float(loss), jax.device_get(aux), jax.device_get(grads), compiled.as_text()


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", [(2, 4, 1), (2, 2, 2)])
def test_expert_parallel_equals_one_device_and_exchanges_with_all_to_all(mesh_shape):
    c = ep_config()
    l1, a1, g1, _ = loss_and_grads(c, (1, 1, 1), jax.devices()[:1])
    l8, a8, g8, hlo = loss_and_grads(ep_config(), mesh_shape, jax.devices())
    assert_allclose(l8, l1, rtol=1e-5)
    for k in ("load_balance_loss", "z_loss", "tokens_per_expert"):
        assert_allclose(a8[k], a1[k], rtol=1e-5, err_msg=k)
    flat1 = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(g1)[0]}
    flat8 = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(g8)[0]}
    assert flat1.keys() == flat8.keys()
    for k in flat1:
        assert_allclose(flat8[k], flat1[k], rtol=1e-4, atol=1e-6, err_msg=k)
    # 2 MoE layers x (dispatch rows + expert ids + return) forward, and the transposes in the backward
    assert hlo.count(" all-to-all(") >= 2 * 3, hlo.count("all-to-all")


def test_capacity_and_dropless_models_share_parameters():
    """Switching dispatch is a config change: the same parameter tree (names, shapes, logical axes)."""
    a = nnx.to_pure_dict(model.abstract(run_config(ep_config("capacity")).model)[1])
    b = nnx.to_pure_dict(model.abstract(run_config(ep_config("dropless")).model)[1])
    assert jax.tree.map(lambda s: (s.shape, s.dtype), a) == jax.tree.map(lambda s: (s.shape, s.dtype), b)


# ------------------------------------------------------------------------------------------------------ megablox


def test_megablox_kernel_in_interpret_mode_equals_ragged_dot():
    rng = np.random.default_rng(50)
    x = jnp.asarray(rng.standard_normal((32, 128)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 128, 128)) / 11, jnp.float32)
    sizes = jnp.asarray([9, 0, 20], jnp.int32)  # 29 of 32 rows in groups

    def f(impl):
        def loss(x, w):
            return jnp.sum(jnp.sin(dropless.grouped_mlp(x, sizes, jnp.asarray(29), {"w_in": w, "w_out": w},
                                                        "gelu", impl)))
        return jax.value_and_grad(loss, argnums=(0, 1))(x, w)

    (v1, (gx1, gw1)), (v2, (gx2, gw2)) = f("ragged_dot"), f("megablox")
    assert_allclose(v2, v1, rtol=1e-5)
    assert_allclose(gx2, gx1, rtol=1e-4, atol=1e-5)
    assert_allclose(gw2, gw1, rtol=1e-4, atol=1e-5)
    assert np.all(np.asarray(gx2)[29:] == 0)


# -------------------------------------------------------------------------------------------- model: decode


@pytest.mark.slow  # end to end (a full compile of prefill + decode / two bench configs): full suite only
def test_model_decodes_with_dropless_like_a_full_forward():
    c = run_config("smoke", **{"moe.dispatch": "dropless"})
    graphdef, params = model.init_params(c.model, c.seed)
    p = np.random.default_rng(60).integers(4, 512, size=(2, 5)).astype(np.int32)
    got = decode.generate(graphdef, params, c, p, 8, temperature=0.0).tokens
    full = jax.jit(lambda params, t: model.apply(graphdef, params, t)[0])
    seq = p
    for _ in range(8):  # greedy the slow way: the whole sequence each step, no cache
        seq = np.concatenate([seq, np.argmax(np.asarray(full(params, seq))[:, -1], -1)[:, None]], 1).astype(np.int32)
    assert_array_equal(got, seq)


# --------------------------------------------------------------------------------------------- model: training


@pytest.mark.slow
def test_model_trains_with_dropless(tmp_path, data_cache):
    from moe_jax.train import loop as trainer
    from test_trainer import unigram_entropy
    c = run_config(smoke_config(data_cache), **{"moe.dispatch": "dropless"})
    workdir = str(tmp_path / "run")
    summary = trainer.train(c, workdir)
    assert summary["finished"] and summary["step"] == 60
    h = unigram_entropy(workdir, data_cache)
    assert summary["val_loss"] < h - 0.5, (summary["val_loss"], h)
