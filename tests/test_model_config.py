"""config.typed: parse validates once, resolves 'auto' per backend and builds frozen, hashable pieces in which every
schema field lands; the model's GraphDef is hashable and equal for equal configs (so it can be a static jit
argument); config.json (RunConfig.to_dict) has the ConfigDict's nested keys with resolved values."""

import dataclasses
import json
import pathlib

import pytest

from moe_jax.cli import load_config_file
from moe_jax.config import resolve
from moe_jax.config import schema as config_lib
from moe_jax.config import typed
from moe_jax.config.typed import ModelConfig, MoEConfig, parse
from moe_jax.model import transformer as model

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def test_every_model_and_moe_field_is_read():
    c = config_lib.base_config()
    c.model.dtype, c.model.attention = "float32", "blocked"  # concrete: 'auto' is resolved by parse
    cfg = parse(c).model
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"moe"}
    assert model_fields == set(c.model.keys())
    assert {f.name for f in dataclasses.fields(MoEConfig)} == set(c.moe.keys())
    for name in model_fields:
        assert getattr(cfg, name) == c.model[name], name
    for name in c.moe.keys():
        assert getattr(cfg.moe, name) == c.moe[name], name


def test_every_schema_field_lands_in_a_typed_piece():
    """Every field of every section of base_config() is in RunConfig.to_dict() with the ConfigDict's value (the
    'auto' ones resolved; tuples as lists, as in config.json), and nothing else is."""
    c = config_lib.base_config()
    run = parse(c, "cpu")
    got = run.to_dict()
    want = json.loads(c.to_json_best_effort())
    assert set(got) == set(want)
    for section in want:
        if not isinstance(want[section], dict):
            assert got[section] == want[section], section
            continue
        assert set(got[section]) == set(want[section]), section
        for k, v in want[section].items():
            if v == "auto":
                assert got[section][k] != "auto", f"{section}.{k}"
            else:
                assert json.loads(json.dumps(got[section][k])) == v, f"{section}.{k}"
    assert set(f.name for f in dataclasses.fields(typed.TrainConfig)) == set(c.train.keys())
    assert set(f.name for f in dataclasses.fields(typed.DataConfig)) == set(c.data.keys())
    assert set(f.name for f in dataclasses.fields(typed.MeshConfig)) == set(c.mesh.keys())
    optim = {f.name for f in dataclasses.fields(typed.OptimConfig)} - {"ns"}
    assert optim | {"ns_dtype", "ns_stack", "ns_method"} == set(c.optim.keys())


@pytest.mark.parametrize("backend,dtype,attention,ns", [
    ("cpu", "float32", "blocked", ("bfloat16", "none", "gram")),
    ("gpu", "bfloat16", "cudnn", ("bfloat16", "layers", "standard")),
    ("tpu", "bfloat16", "xla", ("bfloat16", "layers", "standard"))])
def test_parse_resolves_auto_per_backend_name(backend, dtype, attention, ns):
    c = config_lib.base_config()
    run = parse(c, backend)
    assert (run.model.dtype, run.model.attention) == (dtype, attention)
    assert (run.optim.ns.dtype, run.optim.ns.stack, run.optim.ns.method) == ns
    assert run.backend == backend and c.model.dtype == "auto"  # the ConfigDict is not changed
    assert run.to_dict()["optim"]["ns_method"] == ns[2]
    assert f"model.attention auto -> {attention}" in resolve.describe(run.precision())
    c.optim.muon_impl, c.optim.ns_dtype = "optax", "float32"
    assert parse(c, backend).optim.ns == typed.NewtonSchulz("float32", "none", "standard")


def test_parse_validates_once(monkeypatch):
    calls = []
    real = typed.validate
    monkeypatch.setattr(typed, "validate", lambda c: calls.append(1) or real(c))
    parse(load_config_file(CONFIGS / "smoke.py"))
    assert calls == [1]
    c = config_lib.base_config()
    c.model.d_model = 100
    with pytest.raises(config_lib.ConfigError, match="config.model.d_model"):
        parse(c)


def test_frozen_and_hashable():
    c = load_config_file(CONFIGS / "moe.py")
    a, b = parse(c).model, parse(c.copy_and_resolve_references()).model
    assert a == b and hash(a) == hash(b)
    run = parse(c)
    assert hash(run) == hash(parse(c))
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.d_model = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.moe.top_k = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.train.steps = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.optim.ns.dtype = "float32"
    c.moe.top_k = 1
    assert parse(c).model != a
    assert run.replace(train={"steps": 7}).train.steps == 7 and run.train.steps == c.train.steps


def test_lists_become_tuples():
    from moe_jax.config.typed import _frozen
    assert _frozen([1, [2, 3]]) == (1, (2, 3))


def test_config_json_round_trips_through_parse():
    """config.json (RunConfig.config_json) parses back into the same RunConfig (what eval and generate read)."""
    import ml_collections
    run = parse(load_config_file(CONFIGS / "smoke.py"))
    again = parse(ml_collections.ConfigDict(json.loads(run.config_json())))
    assert again == run


def test_derived_values():
    c = load_config_file(CONFIGS / "moe.py")
    cfg = parse(c).model
    assert cfg.head_dim == c.model.d_model // c.model.n_heads
    c.moe.every = 2
    cfg = parse(c).model
    assert [i for i in range(6) if cfg.is_moe_layer(i)] == [1, 3, 5]
    assert cfg.num_moe_layers == 3
    c.moe.num_experts = 0
    assert parse(c).model.num_moe_layers == 0


@pytest.mark.parametrize("kind", ["smoke", "dense"])
def test_graphdef_hashable_and_equal_for_equal_configs(kind):
    c = load_config_file(CONFIGS / f"{kind}.py")
    g1, _ = model.abstract(parse(c).model)
    g2, _ = model.abstract(parse(c.copy_and_resolve_references()).model)
    assert g1 == g2 and hash(g1) == hash(g2)
    c.model.dropout = 0.5
    assert model.abstract(parse(c).model)[0] != g1
