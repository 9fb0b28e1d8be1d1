"""Tests for moe_jax/sharding.py: the mesh builder and its errors, the logical-axis rules, and the end-to-end claim
that sharding changes nothing but the layout: one jitted train step (loss, gradients, Muon + AdamW update) on an
8-device 2x2x2 ('data', 'expert', 'model') CPU mesh gives the same loss and parameters as on one device, with the
stacked expert weights really split over 'expert' and attention/MLP/vocab dimensions over 'model'.

tests/conftest.py gives the session 8 simulated CPU devices.
"""

import dataclasses
import pathlib
import re

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax.config import schema as config_lib
from moe_jax.config.typed import parse
from moe_jax.model import transformer as model
from moe_jax.optim import chain as optimizer
from moe_jax import sharding
from moe_jax.tools import hlo
from moe_jax.train import step as train_step
from moe_jax.cli import load_config_file

SMOKE = pathlib.Path(__file__).resolve().parent.parent / "configs" / "smoke.py"

AXES = ("data", "expert", "model")


def test_eight_devices():
    assert len(jax.devices()) == 8


# ------------------------------------------------------------------------------------------------ build_mesh


@pytest.mark.parametrize("shape,expected", [
    ((-1, 1, 1), (8, 1, 1)),
    ((2, -1, 2), (2, 2, 2)),
    ((1, 1, -1), (1, 1, 8)),
    ((2, 2, 2), (2, 2, 2)),
    ((4, 2, 1), (4, 2, 1)),
])
def test_build_mesh_fills_one_minus_one(shape, expected):
    c = load_config_file(SMOKE)
    c.mesh.shape = shape
    mesh = sharding.build_mesh(parse(c).mesh)
    assert mesh.axis_names == AXES
    assert tuple(mesh.shape[a] for a in AXES) == expected
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())
    # the classic GSPMD behaviour (docs/decisions.md): Auto axis types, not jax.make_mesh's Explicit default
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_build_mesh_from_shape_and_device_subset():
    mesh = sharding.build_mesh((1, 1, -1), devices=jax.devices()[:2])
    assert dict(mesh.shape) == {"data": 1, "expert": 1, "model": 2}
    mesh1 = sharding.build_mesh((-1, 1, 1), devices=jax.devices()[:1])
    assert mesh1.devices.size == 1


@pytest.mark.parametrize("shape,words", [
    ((3, 3, 1), "9 devices but 8 are available"),      # does not multiply to the device count
    ((3, -1, 1), "does not divide 8"),                  # the fixed sizes can't fill 8
    ((-1, -1, 1), "at most one -1"),                    # two -1s
    ((2, 2), "needs 3 sizes"),                          # wrong rank
])
def test_build_mesh_rejects_bad_shapes(shape, words):
    # a MeshConfig that skipped parse's validation (build_mesh checks the shape against the devices itself)
    mesh = dataclasses.replace(parse(load_config_file(SMOKE)).mesh, shape=shape)
    with pytest.raises(config_lib.ConfigError, match=r"^config\.mesh\.shape: ") as err:
        sharding.build_mesh(mesh)
    assert words in str(err.value)
    assert str(shape).replace(" ", "") in str(err.value).replace(" ", "")  # the offending shape is quoted


# ------------------------------------------------------------------------------------------------ logical rules


def test_logical_to_spec_follows_the_rules_table():
    rules = dict(sharding.LOGICAL_RULES)
    assert rules["expert"] == "expert" and rules["mlp"] == "model" and rules["heads"] == "model"
    assert rules["vocab"] == "model" and rules["batch"] == ("data", "expert") and rules["embed"] is None
    spec = sharding.logical_to_spec
    assert spec(("batch", "length", "embed"), AXES) == P(("data", "expert"), None, None)
    assert spec(("expert", "embed", "mlp"), AXES) == P("expert", None, "model")      # expert w_in
    assert spec(("expert", "mlp", "embed"), AXES) == P("expert", "model", None)      # expert w_out
    assert spec(("embed", "heads", "head_dim"), AXES) == P(None, "model", None)      # wq/wk/wv
    assert spec(("heads", "head_dim", "embed"), AXES) == P("model", None, None)      # wo
    assert spec(("vocab", "embed"), AXES) == P("model", None)                        # embedding
    assert spec(("embed", "router"), AXES) == P(None, None)                          # router: replicated
    assert spec(("norm",), AXES) == P(None)
    assert spec(("expert", "expert_group", "capacity", "embed"), AXES) == P("expert", "data", None, None)
    assert spec((None, "mlp"), AXES) == P(None, "model")


def test_logical_to_spec_mesh_axis_used_once_and_dropped_when_absent():
    spec = sharding.logical_to_spec
    assert spec(("heads", "mlp"), AXES) == P("model", None)  # 'model' already used by the first dimension
    assert spec(("batch", "expert"), AXES) == P(("data", "expert"), None)  # 'expert' taken by the batch
    assert spec(("batch", "mlp"), ("data", "model")) == P("data", "model")  # no 'expert' axis in this mesh
    with pytest.raises(KeyError, match="no rule"):
        spec(("nonsense",), AXES)


def test_logical_to_spec_drops_axes_that_do_not_divide():
    spec = sharding.logical_to_spec
    mesh_shape = {"data": 2, "expert": 2, "model": 2}
    assert spec(("vocab", "embed"), AXES, (511, 64), mesh_shape) == P(None, None)  # odd vocab: replicated
    assert spec(("vocab", "embed"), AXES, (512, 64), mesh_shape) == P("model", None)
    assert spec(("batch", "length"), AXES, (2, 64), mesh_shape) == P("data", None)  # 2 rows: only 'data' fits
    assert spec(("batch", "length"), AXES, (4, 64), mesh_shape) == P(("data", "expert"), None)
    assert spec(("batch", "length"), AXES, (6, 64), mesh_shape) == P("data", None)


# ------------------------------------------------------------------------------------------------ 8 devices vs 1


def equivalence_config():
    c = load_config_file(SMOKE)  # width 64, 2 layers, both MoE with 4 experts top-2
    c.model.dropout = 0.0
    c.moe.router_noise_std = 0.0
    c.train.grad_accum = 2  # the scan over micro-batches is part of what must agree
    c.moe.group_size = 64   # 8 rows x 64 = 512 tokens per micro-batch -> 8 routing groups, split over the mesh
    c.optim.ns_dtype = "float32"  # bfloat16 operands would round differently ordered sharded sums apart (~1e-5)
    return c


def fixed_batch(config) -> dict:
    t = config.train
    rows, s = t.batch_size * t.grad_accum, t.seq_len
    rng = np.random.default_rng(0)
    weights = np.ones((rows, s), np.float32)
    weights[:, -5:] = 0.0  # some unscored padding
    segment_ids = np.where(np.arange(s) < s // 3, 1, 2).astype(np.int32) * np.ones((rows, 1), np.int32)
    positions = np.where(segment_ids == 1, np.arange(s), np.arange(s) - s // 3).astype(np.int32)
    batch = {"inputs": rng.integers(0, config.model.vocab_size, (rows, s), dtype=np.int32),
             "targets": rng.integers(0, config.model.vocab_size, (rows, s), dtype=np.int32),
             "weights": weights, "segment_ids": segment_ids, "positions": positions}
    assert set(batch) == set(train_step.BATCH_KEYS)
    return batch


def run_steps(mesh_shape, devices, n_steps=2):
    """Compile the trainer's step for `mesh_shape` on `devices` and run it n_steps times on one fixed batch.
    Returns (final state, losses, last metrics, host copy of the params after each step)."""
    c = equivalence_config()
    c.mesh.shape = mesh_shape
    c = parse(c)
    mesh = sharding.build_mesh(c.mesh, devices)
    graphdef, abstract_nnx = model.abstract(c.model)
    tx = optimizer.build(c.optim, c.train.steps)
    batch = fixed_batch(c)
    compiled = train_step.compile_steps(c.train, graphdef, abstract_nnx, tx, mesh, batch, batch)
    _, params = model.init_params(c.model, c.seed)
    state = jax.device_put(train_step.init_state(c.seed, params, tx), compiled.state_sharding)
    dev_batch = {k: jax.device_put(v, compiled.batch_sharding[k]) for k, v in batch.items()}
    losses, history = [], []
    for _ in range(n_steps):
        state, metrics = compiled.train(state, dev_batch)  # donates the old state
        losses.append(float(metrics["loss"]))
        history.append(jax.device_get(state["params"]))
    return state, losses, metrics, history


@pytest.fixture(scope="module")
def runs():
    one = run_steps((1, 1, 1), jax.devices()[:1])
    eight = run_steps((2, 2, 2), jax.devices())
    return one, eight


def leaves_by_path(tree) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def first_update_tolerance(before, after, path):
    """Per-element bound on |8-device - 1-device| of a parameter after the first update, from the error model.

    Both runs compute the same gradient g with float32 sums in a different order (sharded partial sums, then an
    all-reduce), so g differs by |dg| <= sqrt(N) * u * G (u = 2^-24; N = 1024 summed token terms per step: 2 micro-
    batches x 8 rows x 64; G = 1 bounds a term's size: the gradient is clipped to global norm clip_norm = 1).
    - Muon (the other matrices): the update is ns_steps Newton-Schulz iterations in float32 of the normalised
      momentum (= g here); each iteration carries the relative error of its input (sqrt(N) * u from g) plus its own
      rounding, so the update moves by <= ns_steps * sqrt(N) * u * max|update| of that tensor (read from the
      1-device run: before - after, Muon has no weight decay here). Parameters near 0 (26 of 4,096 entries of wk in
      one measurement, off by 5e-9) need this term; a relative tolerance alone does not hold there.
    - AdamW (embedding, head, router, norms: optim/chain.py's table): the first step's bias-corrected moments are m = g,
      sqrt(v) = |g|, so the update is lr0 * g / (|g| + eps), whose derivative in g is lr0 * eps / (|g| + eps)^2.
      Where |g| >> eps the update is lr0 * sign(g) and the orders agree to rounding; where the batch's terms nearly
      cancel (|g| within a few thousand eps) dg is amplified: the 1.09e-6 once measured on one of 32,768 embedding
      entries is this case, above a flat atol of 1e-6 but inside lr0 * eps * dg / (|g| + eps)^2.
      |g| is read back from the 1-device update itself: after = before * (1 - lr0 * wd) - lr0 * g / (|g| + eps),
      so s = |g| / (|g| + eps) = |before * (1 - lr0 * wd) - after| / lr0 (resolved to ulp(p) / lr0, which the
      floor below covers).
    Plus a floor of 8 ulp of the largest operand (before, or the step before - after: both runs round the same
    formula, each op <= 1/2 ulp of its operands; a parameter that ends near 0 keeps the rounding of the larger
    operands, e.g. 4e-10 on a router entry whose update cancels its value).
    lr0 = adamw_lr * 1 / warmup steps (linear warmup from step 0)."""
    c = equivalence_config()
    u, n_terms, term_bound = 2.0 ** -24, 2 * 8 * 64, c.optim.clip_norm
    dg = np.sqrt(n_terms) * u * term_bound
    lr0 = c.optim.adamw_lr / max(parse(c).warmup_steps, 1)
    eps = c.optim.eps
    before, after = before.astype(np.float64), after.astype(np.float64)
    adamw_leaf = after.ndim < 2 or any(k in path for k in ("embed", "head", "router"))  # optim/chain.py's table
    decay = c.optim.weight_decay if after.ndim >= 2 else 0.0  # AdamW's decay mask: matrices only
    s = np.clip(np.abs(before * (1 - lr0 * decay) - after) / lr0, 0.0, 1.0 - 1e-12)
    g = eps * s / (1.0 - s)  # |g| from s = |g| / (|g| + eps)
    adamw = lr0 * eps * dg / (g + eps) ** 2
    muon = c.optim.ns_steps * np.sqrt(n_terms) * u * np.abs(before - after).max()
    terms = np.maximum(np.abs(before), np.abs(before - after))  # the largest operand the update formula rounds
    floor = 8 * np.spacing(terms.astype(np.float32)).astype(np.float64)
    return floor + (np.minimum(adamw, 2 * lr0) if adamw_leaf else muon)


@pytest.mark.slow  # quick tier under 3 min: a full compile per case; the full suite runs it
def test_eight_device_step_matches_one_device(runs):
    (s1, l1, m1, h1), (s8, l8, m8, h8) = runs
    assert np.isfinite(l1).all() and l1[1] < l1[0]  # it trains: the second step's loss is lower
    np.testing.assert_allclose(l8, l1, rtol=1e-5)  # both steps' losses
    for k in ("grad_norm", "param_norm", "accuracy", "moe/load_balance_loss", "moe/z_loss", "moe/dropped_fraction"):
        np.testing.assert_allclose(np.asarray(m8[k]), np.asarray(m1[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    c = parse(equivalence_config())
    init = leaves_by_path(model.init_params(c.model, c.seed)[1])
    after1, after1_8 = leaves_by_path(h1[0]), leaves_by_path(h8[0])
    assert list(after1) == list(after1_8) == list(init)
    for path in init:
        np.testing.assert_array_less(np.abs(after1_8[path] - after1[path]), first_update_tolerance(init[path],
                                     after1[path], path), err_msg=path)
        assert not np.allclose(after1[path], init[path]), path  # every parameter was updated
    # After the second update, AdamW divides each moment by sqrt(v): for the few entries whose gradients are ~1e-3 of
    # the largest (rare tokens' embedding rows), float32 reduction-order noise (~1e-7 of the largest gradient) becomes
    # ~1e-3 of that entry's step, up to a few 1e-6 absolute (measured 3.3e-6 at lr 6.7e-3). Hence atol 1e-5 here.
    after2, after2_8 = leaves_by_path(h1[1]), leaves_by_path(h8[1])
    for path in init:
        np.testing.assert_allclose(after2_8[path], after2[path], rtol=1e-5, atol=1e-5, err_msg=path)
    assert int(s8["step"]) == int(s1["step"]) == 2


def test_expert_weights_sharded_over_expert_axis(runs):
    _, (s8, _, _, _) = runs
    params = s8["params"]
    for layer in (0, 1):  # smoke: both layers are MoE
        ffn = params["blocks"][layer]["ffn"]
        assert ffn["w_in"].shape == (4, 64, 128)
        assert ffn["w_in"].sharding.spec == P("expert", None, "model")   # ('expert', 'embed', 'mlp')
        assert ffn["w_out"].sharding.spec == P("expert", "model", None)  # ('expert', 'mlp', 'embed')
        assert ffn["w_in"].addressable_shards[0].data.shape == (2, 64, 64)  # 2 of 4 experts, half of d_ff
        # each expert slice lives on exactly half of the devices (the 'expert' coordinate)
        owners = {tuple(s.index[0].indices(4)) for s in ffn["w_in"].addressable_shards}
        assert owners == {(0, 2, 1), (2, 4, 1)}
        assert ffn["w_router"].sharding.spec == P(None, None)
        attn = params["blocks"][layer]["attn"]
        for w in ("wq", "wk", "wv"):
            assert attn[w].sharding.spec == P(None, "model", None), w  # ('embed', 'heads', 'head_dim')
        assert attn["wo"].sharding.spec == P("model", None, None)      # ('heads', 'head_dim', 'embed')
        assert params["blocks"][layer]["attn_norm"]["scale"].sharding.spec == P(None)
    assert params["embed"]["embedding"].sharding.spec == P("model", None)  # ('vocab', 'embed')


def test_optimizer_moments_sharded_like_their_parameter(runs):
    """Muon's momentum for the experts and AdamW's moments for the embedding follow the parameter's layout."""
    _, (s8, _, _, _) = runs
    specs = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(s8["opt_state"])[0]:
        key = jax.tree_util.keystr(path)
        if hasattr(leaf, "sharding") and leaf.ndim:
            specs[key] = leaf.sharding.spec
    muon_w_in = [v for k, v in specs.items() if re.search(r"\.mu\['blocks'\]\[1\]\['ffn'\]\['w_in'\]$", k)]
    assert muon_w_in == [P("expert", None, "model")]
    emb = [v for k, v in specs.items() if k.endswith("['embed']['embedding']")]
    assert len(emb) == 2 and all(v == P("model", None) for v in emb)  # AdamW mu and nu


def _coords(mesh):
    """device id -> its (data, expert, model) index in `mesh`."""
    return {d.id: idx for idx, d in np.ndenumerate(mesh.devices)}


def test_hybrid_mesh_puts_slices_on_the_outer_data_index():
    """Two simulated slices of 4 devices (ids 0-3, 4-7): with dcn_shape (2, 1, 1) each slice fills one half of the
    'data' axis (DCN index outer), and within a slice its ICI shape; the other axes never mix slices."""
    devices = jax.devices()
    slice_of = lambda d: devices.index(d) // 4  # noqa: E731
    mesh = sharding.build_mesh((-1, 1, 1), devices, dcn_shape=(2, 1, 1), slice_of=slice_of)
    assert dict(mesh.shape) == {"data": 8, "expert": 1, "model": 1}
    for dev_id, (d, e, m) in _coords(mesh).items():
        assert d // 4 == slice_of(next(x for x in devices if x.id == dev_id))
    mesh = sharding.build_mesh((1, 2, 2), devices, dcn_shape=(2, 1, 1), slice_of=slice_of)
    assert dict(mesh.shape) == {"data": 2, "expert": 2, "model": 2}
    for d in range(2):  # each data index is one whole slice: experts and tensor parallelism stay inside it
        assert {slice_of(x) for x in mesh.devices[d].flat} == {d}
    cfg = load_config_file(SMOKE)
    cfg.mesh.shape, cfg.mesh.dcn_shape = (-1, 2, 1), (2, 1, 1)
    mesh = sharding.build_mesh(parse(cfg).mesh, devices, slice_of=slice_of)
    assert dict(mesh.shape) == {"data": 4, "expert": 2, "model": 1}
    assert {slice_of(x) for x in mesh.devices[:2].flat} == {0} and {slice_of(x) for x in mesh.devices[2:].flat} == {1}


def test_dcn_shape_refuses_experts_and_tensor_parallelism_across_slices():
    devices = jax.devices()
    slice_of = lambda d: devices.index(d) // 4  # noqa: E731
    for dcn, axis in (((1, 2, 1), "expert"), ((1, 1, 2), "model")):
        with pytest.raises(config_lib.ConfigError, match=rf"config\.mesh\.dcn_shape: .*\['{axis}'\] across the slow "
                                                         r"links .*only \('data',\) may cross"):
            sharding.build_mesh((-1, 1, 1), devices, dcn_shape=dcn, slice_of=slice_of)
    # the rule is a table entry: a caller may allow more axes explicitly
    assert sharding.check_dcn_shape((1, 2, 1), allowed=("data", "expert")) == (1, 2, 1)
    with pytest.raises(config_lib.ConfigError, match=r"config\.mesh\.dcn_shape: \(2, 1, 1\) needs 2 slices or "
                                                     r"processes, but the 8 devices come from 1 process"):
        sharding.build_mesh((-1, 1, 1), devices, dcn_shape=(2, 1, 1))  # no slices here and one process
    with pytest.raises(config_lib.ConfigError, match=r"config\.mesh\.dcn_shape: \(3, 1, 1\) \(3 slices\) does not"):
        sharding.build_mesh((-1, 1, 1), devices, dcn_shape=(3, 1, 1), slice_of=slice_of)
    cfg = load_config_file(SMOKE)
    cfg.mesh.dcn_shape = (-1, 1, 1)
    with pytest.raises(config_lib.ConfigError, match=r"mesh\.dcn_shape"):
        parse(cfg)


# ------------------------------------------------------------------------------------------------ FSDP


def test_fsdp_rules_split_parameters_not_activations():
    """config.mesh.fsdp: parameters' replicated dimensions go over the data-parallel devices; activations keep the
    base table (batch-sharded, 'embed' replicated); an expert weight keeps 'expert' on its experts."""
    spec = sharding.logical_to_spec
    assert spec(("embed", "heads", "head_dim"), AXES, fsdp=True) == P(("data", "expert"), "model", None)
    assert spec(("expert", "embed", "mlp"), AXES, fsdp=True) == P("expert", "data", "model")
    assert spec(("vocab", "embed"), AXES, fsdp=True) == P("model", ("data", "expert"))
    assert spec(("norm",), AXES, fsdp=True) == P(("data", "expert"))
    assert spec(("batch", "length", "embed"), AXES) == P(("data", "expert"), None, None)  # activations: unchanged
    assert set(dict(sharding.FSDP_PARAM_RULES)) <= set(dict(sharding.LOGICAL_RULES))  # a variant, no new names


FSDP_MESH = (4, 2, 1)  # data x expert: experts split 2 ways, FSDP over all 8 devices


def fsdp_run(fsdp: bool, n_steps: int):
    """The smoke MoE (equivalence_config: 2 micro-batches, float32 Newton-Schulz) on the 8-device mesh FSDP_MESH,
    replicated parameters or FSDP + distributed Muon (+ remat, which must change nothing), n_steps on one batch."""
    c = equivalence_config()
    c.mesh.shape, c.mesh.fsdp, c.model.remat = FSDP_MESH, fsdp, fsdp
    run = parse(c)
    mesh = sharding.build_mesh(run.mesh)
    graphdef, abstract_nnx = model.abstract(run.model)
    tx = optimizer.build(run.optim, run.train.steps, distributed_muon=run.mesh.fsdp)
    batch = fixed_batch(run)
    compiled = train_step.compile_steps(run.train, graphdef, abstract_nnx, tx, mesh, batch, batch, run.mesh.fsdp)
    _, params = model.init_params(run.model, run.seed)
    state = jax.device_put(train_step.init_state(run.seed, params, tx), compiled.state_sharding)
    dev_batch = {k: jax.device_put(v, compiled.batch_sharding[k]) for k, v in batch.items()}
    losses = []
    for _ in range(n_steps):
        state, metrics = compiled.train(state, dev_batch)
        losses.append(float(metrics["loss"]))
    return {"losses": losses, "state": state, "compiled": compiled, "batch": batch,
            "params": leaves_by_path(jax.device_get(state["params"]))}


@pytest.fixture(scope="module")
def fsdp_runs():
    return {f: fsdp_run(f, 20) for f in (False, True)}


@pytest.mark.slow  # two compiles of the 8-device step (~15 s each) and 2 x 20 steps
def test_fsdp_twenty_steps_equal_the_replicated_run(fsdp_runs):
    """20 steps with FSDP + expert parallelism + distributed Muon + remat = the replicated run, to float32 reduction
    order: both compute the same sums in a different order (sharded partial sums, then reduce-scatter vs all-reduce),
    so the bounds are those of the 8-vs-1 device test's second step (rtol 1e-5 on the loss; atol 1e-5 on params, from
    AdamW's 1/sqrt(v) amplification of rare rows' gradient noise). Measured: loss 5e-7, parameters 1e-6 after 20."""
    rep, fsdp = fsdp_runs[False], fsdp_runs[True]
    assert rep["losses"][-1] < rep["losses"][0] - 1.0  # it trains (6.26 -> 0.19 on this one batch)
    np.testing.assert_allclose(fsdp["losses"], rep["losses"], rtol=1e-5)
    assert list(fsdp["params"]) == list(rep["params"])
    for path, value in rep["params"].items():
        np.testing.assert_allclose(fsdp["params"][path], value, rtol=1e-5, atol=1e-5, err_msg=path)
    # and every parameter and optimizer-state array is split 8 ways (all of the smoke model's dimensions divide)
    for path, leaf in jax.tree_util.tree_flatten_with_path(fsdp["state"]["params"])[0]:
        assert leaf.addressable_shards[0].data.size * 8 == leaf.size, jax.tree_util.keystr(path)
    for path, leaf in jax.tree_util.tree_flatten_with_path(fsdp["state"]["opt_state"])[0]:
        if leaf.ndim >= 1 and leaf.size > 8:  # the moments; not counts or the 3 Newton-Schulz coefficients
            assert leaf.addressable_shards[0].data.size * 8 == leaf.size, jax.tree_util.keystr(path)


def _shard_bytes(sharding_, shape, dtype) -> int:
    return int(np.prod(sharding_.shard_shape(shape))) * np.dtype(dtype).itemsize


@pytest.mark.slow  # shares test_fsdp_twenty_steps_equal_the_replicated_run's compiles
def test_fsdp_argument_bytes_are_the_total_over_n(fsdp_runs):
    """Per device, the compiled FSDP step's arguments (XLA's memory analysis) are the state's total bytes / 8 plus
    the few replicated scalars, plus the device's batch rows; the replicated-parameter step holds ~5x more."""
    fsdp = fsdp_runs[True]
    abstract = fsdp["compiled"].abstract_state
    total = sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract))
    per_device = sum(_shard_bytes(x.sharding, x.shape, x.dtype) for x in jax.tree.leaves(abstract))
    replicated = sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract)
                     if x.sharding.is_fully_replicated)
    assert replicated < 1024  # step, rng, counts, Newton-Schulz coefficients
    assert per_device == (total - replicated) / 8 + replicated
    batch = sum(_shard_bytes(fsdp["compiled"].batch_sharding[k], v.shape, v.dtype) for k, v in fsdp["batch"].items())
    assert fsdp["compiled"].memory["argument_size_in_bytes"] == per_device + batch
    assert fsdp_runs[False]["compiled"].memory["argument_size_in_bytes"] > 4 * (per_device + batch)


def collective_lines(text: str) -> list[tuple[str, str, str]]:
    """(kind, result type, op_name) of every collective executed by a compiled module's text."""
    comps, entry = hlo.computations(text)
    runs = hlo.executions(comps, entry)
    out = []
    for comp, instrs in comps.items():
        if runs.get(comp, (0, True))[0] == 0:
            continue
        for _, type_text, op, rest in instrs:
            kind = op.removesuffix("-start")
            if kind in hlo.COLLECTIVES or kind == "ragged-all-to-all":
                name = re.search(r'op_name="([^"]*)"', rest)
                out.append((kind, type_text, name.group(1) if name else ""))
    return out


def _sizes(type_text: str) -> list[int]:
    return [int(np.prod([int(d) for d in dims.split(",") if d])) for _, dims in hlo._SHAPE.findall(type_text)]


@pytest.mark.slow  # shares test_fsdp_twenty_steps_equal_the_replicated_run's compiles
def test_fsdp_step_has_the_expected_collectives_and_no_others(fsdp_runs):
    """Every collective the FSDP step has beyond the replicated step's is one of these. In the micro-batch loop
    (forward and backward): a weight's all-gather, of a whole parameter as the replicated layout holds it, where a
    layer uses it; a gradient's reduction (reduce-scatter, which XLA:CPU writes as all-reduce + slice) of a
    parameter's size, which XLA may fuse with the routing metrics' (<= 8 numbers); the embedding lookup's all-to-all
    / index gather (the table is split by columns, the tokens by rows). After the loop (clipping, Muon, AdamW: all
    elementwise in the parameters' layout but Newton-Schulz): distributed Muon moving whole matrices to and from the
    stack layout (all-to-all, permute, gather; XLA places them where the data is produced, so they are not always
    named by its scope), and scalar reductions (norms, the finite check)."""
    rep_lines = collective_lines(fsdp_runs[False]["compiled"].train.as_text())
    assert not any("distributed_muon" in n for _, _, n in rep_lines)
    seen_in_replicated = {(k, t) for k, t, _ in rep_lines}
    mesh = sharding.build_mesh(FSDP_MESH)
    _, abstract_nnx = model.abstract(parse(equivalence_config()).model)
    specs = jax.tree.leaves(sharding.param_specs(abstract_nnx, mesh), is_leaf=lambda x: isinstance(x, P))
    shapes = [v.shape for v in jax.tree.leaves(abstract_nnx)]
    shard_sizes = {int(np.prod(NamedSharding(mesh, spec).shard_shape(shape))) for spec, shape in zip(specs, shapes)}
    muon, gathered, unexplained = [], [], []
    for kind, type_text, name in collective_lines(fsdp_runs[True]["compiled"].train.as_text()):
        sizes = _sizes(type_text)
        reduction = kind in ("all-reduce", "reduce-scatter")
        if (kind, type_text) in seen_in_replicated:
            ok = True
        elif "while/body" not in name:  # after the micro-batch loop: the optimizer
            ok = all(s == 1 for s in sizes) if reduction else True
            muon += [] if reduction else [kind]
        elif kind == "all-gather" and all(s in shard_sizes for s in sizes):
            ok = True
            gathered += sizes
        elif reduction:
            ok = all(s in shard_sizes or s <= 8 for s in sizes)
        else:
            ok = "_take" in name and kind in ("all-to-all", "all-gather")  # the embedding lookup, its transpose
        if not ok:
            unexplained.append(f"{kind} {type_text} {name}")
    assert not unexplained, "\n".join(unexplained)
    assert "all-to-all" in muon and set(muon) <= {"all-to-all", "collective-permute", "all-gather"}
    # every parameter is gathered where it is used (or already was in the replicated step: the experts' halves)
    assert shard_sizes <= set(gathered) | {s for k, t, _ in rep_lines if k == "all-gather" for s in _sizes(t)}
