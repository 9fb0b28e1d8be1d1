"""ModelConfig: frozen, hashable, built from every model/moe field of the ConfigDict; the model's GraphDef is
hashable and equal for equal configs (so it can be a static jit argument)."""

import dataclasses
import pathlib

import pytest

from moe_jax.config import schema as config_lib
from moe_jax.model import transformer as model
from moe_jax.cli import load_config_file
from moe_jax.config.typed import ModelConfig, MoEConfig

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def test_every_model_and_moe_field_is_read():
    c = config_lib.base_config()
    cfg = ModelConfig.from_config(c)
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"moe"}
    assert model_fields == set(c.model.keys())
    assert {f.name for f in dataclasses.fields(MoEConfig)} == set(c.moe.keys())
    for name in model_fields:
        assert getattr(cfg, name) == c.model[name], name
    for name in c.moe.keys():
        assert getattr(cfg.moe, name) == c.moe[name], name


def test_frozen_and_hashable():
    c = load_config_file(CONFIGS / "moe.py")
    a, b = ModelConfig.from_config(c), ModelConfig.from_config(c.copy_and_resolve_references())
    assert a == b and hash(a) == hash(b)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.d_model = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.moe.top_k = 1
    c.moe.top_k = 1
    assert ModelConfig.from_config(c) != a
    assert ModelConfig.from_config(a) is a


def test_lists_become_tuples():
    from moe_jax.config.typed import _frozen
    assert _frozen([1, [2, 3]]) == (1, (2, 3))


def test_derived_values():
    c = load_config_file(CONFIGS / "moe.py")
    cfg = ModelConfig.from_config(c)
    assert cfg.head_dim == c.model.d_model // c.model.n_heads
    c.moe.every = 2
    cfg = ModelConfig.from_config(c)
    assert [i for i in range(6) if cfg.is_moe_layer(i)] == [1, 3, 5]
    assert cfg.num_moe_layers == 3
    c.moe.num_experts = 0
    assert ModelConfig.from_config(c).num_moe_layers == 0


@pytest.mark.parametrize("kind", ["smoke", "dense"])
def test_graphdef_hashable_and_equal_for_equal_configs(kind):
    c = load_config_file(CONFIGS / f"{kind}.py")
    g1, _ = model.abstract(c)
    g2, _ = model.abstract(c.copy_and_resolve_references())
    assert g1 == g2 and hash(g1) == hash(g2)
    c.model.dropout = 0.5
    assert model.abstract(c)[0] != g1
