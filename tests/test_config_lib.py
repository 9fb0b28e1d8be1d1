"""Tests for moe_jax/config/schema.py and configs/*.py: every rejected field gets a message naming it; the seed configs
validate and carry the seed exp5 values."""

import pathlib
import re

import pytest

from moe_jax.config import schema as config_lib
from moe_jax.model import moe as moe_lib
from moe_jax.cli import load_config_file
from moe_jax.config.typed import ModelConfig
from moe_jax.config.typed import parse

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def set_field(config, path: str, value):
    *parents, leaf = path.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value


# (changes to the smoke config, the field the message must name, a word the message must contain)
REJECTED = [
    ({"model.d_model": 66}, "model.d_model", "divisible"),                 # 66 % 4 heads != 0
    ({"model.d_model": 24, "model.n_heads": 8}, "model.n_heads", "even"),  # head_dim 3: RoPE needs it even
    ({"moe.top_k": 5}, "moe.top_k", "num_experts"),                        # smoke has 4 experts
    ({"moe.capacity_factor": 0.0}, "moe.capacity_factor", "> 0"),
    ({"moe.capacity_factor": -1.0}, "moe.capacity_factor", "> 0"),
    ({"moe.eval_capacity_factor": 0.0}, "moe.eval_capacity_factor", "> 0"),
    ({"model.dtype": "float8"}, "model.dtype", "float8"),
    ({"model.mlp": "relu"}, "model.mlp", "relu"),
    ({"optim.name": "sgd"}, "optim.name", "sgd"),
    ({"mesh.shape": (-1, -1, 1)}, "mesh.shape", "-1"),
    ({"moe.num_experts": 8, "mesh.shape": (1, 3, 1)}, "mesh.shape", "expert"),
    ({"optim.warmup_steps": 100, "train.steps": 50}, "optim.warmup_steps", "train.steps"),
    ({"optim.warmup_steps": 50, "train.steps": 50}, "optim.warmup_steps", "train.steps"),
    ({"data.source": "web"}, "data.source", "web"),
    ({"data.source": "tfds", "data.tfds_name": ""}, "data.tfds_name", "tfds"),
    ({"data.source": "files", "data.files": ""}, "data.files", "glob"),
    ({"moe.every": 3}, "moe.every", "n_layers"),                           # smoke has 2 layers: no MoE layer
    ({"model.dropout": 1.0}, "model.dropout", "[0, 1)"),
    ({"train.steps": 0}, "train.steps", ">= 1"),
    ({"mesh.shape": (2, 2)}, "mesh.shape", "axis"),
    ({"model.attention": "flash"}, "model.attention", "flash"),
    ({"model.attention_block": -1}, "model.attention_block", ">= 0"),
    ({"model.rope_layout": "interleaved"}, "model.rope_layout", "adjacent"),
    ({"model.norm_eps": 0.0}, "model.norm_eps", "FLOAT32_EPS"),
    ({"model.norm_eps": -1e-6}, "model.norm_eps", "(0, 1)"),
    ({"mesh.fsdp": True, "optim.muon_impl": "optax"}, "mesh.fsdp", "muon_impl='batched'"),
    ({"optim.ns_rounding": "always"}, "optim.ns_rounding", "every_op"),
    ({"optim.ns_rounding": "every_op", "optim.ns_method": "gram"}, "optim.ns_method", "standard"),
    ({"optim.ns_eps": 0.0}, "optim.ns_eps", "(0, 1)"),
    ({"optim.momentum_warmup_steps": 10}, "optim.momentum_warmup_steps", "muon_bias_correction=False"),
    ({"optim.momentum_warmup_steps": -1, "optim.muon_bias_correction": False}, "optim.momentum_warmup_steps",
     ">= 0"),
    ({"optim.muon_fused_qkv": True, "optim.muon_impl": "optax"}, "optim.muon_fused_qkv", "muon_impl='batched'"),
    ({"optim.muon_bias_correction": False, "optim.muon_impl": "optax"}, "optim.muon_bias_correction",
     "muon_impl='batched'"),
    ({"optim.schedule_steps": 10}, "optim.schedule_steps", "shorter than train.steps"),  # smoke: 60 steps
    ({"optim.schedule_steps": 100, "optim.warmup_steps": 100}, "optim.warmup_steps", "schedule_steps=100"),
    ({"moe.load_balance_form": "entropy"}, "moe.load_balance_form", "prob_squares"),
    ({"optim.ns_dtype": "float16", "optim.muon_impl": "optax"}, "optim.ns_dtype", "muon_impl='batched'"),
]


@pytest.mark.parametrize("changes, field, word", REJECTED,
                         ids=[f"{r[1]}={list(r[0].values())}" for r in REJECTED])
def test_validate_rejects_naming_the_field(changes, field, word):
    c = load_config_file(CONFIGS / "smoke.py")
    config_lib.validate(c)  # valid before the change
    for path, value in changes.items():
        set_field(c, path, value)
    with pytest.raises(config_lib.ConfigError, match=re.escape(f"config.{field}:")) as err:
        config_lib.validate(c)
    assert word in str(err.value)
    assert isinstance(err.value, ValueError)


def test_accepts_edge_values():
    c = load_config_file(CONFIGS / "smoke.py")
    c.moe.top_k = c.moe.num_experts  # top_k == E is allowed
    c.mesh.shape = (1, 4, -1)  # expert axis 4 divides 4 experts; one -1
    c.data.source = "tfds"
    c.data.tfds_name = "lm1b"
    config_lib.validate(c)
    c = load_config_file(CONFIGS / "smoke.py")
    c.moe.num_experts = 0  # dense: MoE fields are not checked
    c.moe.top_k = 99
    config_lib.validate(c)


def test_seed_moe_config_has_exp5_values():
    c = config_lib.validate(load_config_file(CONFIGS / "moe.py"))
    m, moe, t = c.model, c.moe, c.train
    assert (m.d_model, m.n_layers, m.n_heads, m.d_ff) == (384, 6, 8, 1536)
    assert (moe.num_experts, moe.top_k, moe.every, moe.d_ff) == (8, 2, 1, 1536)
    assert t.seq_len == 512 and m.dropout == 0.1
    assert (t.batch_size, t.grad_accum, t.steps) == (24, 4, 20000)
    assert c.optim.name == "muon"
    assert all(config_lib.is_moe_layer(c, i) for i in range(6))


def test_seed_dense_config_has_exp5_values():
    c = config_lib.validate(load_config_file(CONFIGS / "dense.py"))
    m, t = c.model, c.train
    assert (m.d_model, m.n_layers, m.n_heads, m.d_ff) == (384, 6, 8, 1536)
    assert c.moe.num_experts == 0
    assert not any(config_lib.is_moe_layer(c, i) for i in range(6))
    assert t.seq_len == 512 and m.dropout == 0.1
    assert (t.batch_size, t.grad_accum, t.steps) == (24, 4, 20000)


def test_smoke_config_validates_and_is_tiny():
    c = config_lib.validate(load_config_file(CONFIGS / "smoke.py"))
    assert c.model.n_layers == 2 and c.model.d_model == 64 and c.model.vocab_size <= 512
    assert c.moe.num_experts == 4 and c.moe.top_k == 2


def test_base_config_validates():
    config_lib.validate(config_lib.base_config())


def test_warmup_steps_and_head_dim():
    c = load_config_file(CONFIGS / "moe.py")
    assert parse(c).warmup_steps == 1000  # 5% of 20,000
    c.optim.warmup_steps = 300
    assert parse(c).warmup_steps == 300
    assert parse(c).model.head_dim == 48


def test_is_moe_layer_every_two():
    c = load_config_file(CONFIGS / "moe.py")
    c.moe.every = 2
    assert [i for i in range(6) if config_lib.is_moe_layer(c, i)] == [1, 3, 5]


SEED_CONFIGS = {  # name: (d_model, n_layers, n_heads, mlp, rope_layout, norm_eps, experts, top_k, MoE layers, steps)
    "exp5_moe": (384, 6, 8, "gelu_exact", "halves", config_lib.FLOAT32_EPS, 8, 2, [0, 1, 2, 3, 4, 5], 5000),
    "seed002_dense": (384, 6, 8, "silu", "adjacent", config_lib.FLOAT32_EPS, 0, 2, [], 530),
    "seed002_moe": (384, 6, 8, "silu", "adjacent", config_lib.FLOAT32_EPS, 8, 2, [1, 3, 5], 431),
    "seed004_baseline": (512, 8, 16, "silu", "adjacent", 1e-5, 16, 2, list(range(8)), 150),
}


@pytest.mark.parametrize("name", sorted(SEED_CONFIGS))
def test_seed_configs_validate_with_the_seeds_values(name):
    """configs/seeds/*: full size, the seed's numerics, no drops (capacity = group size), no z-loss, embed x sqrt(d)."""
    c = config_lib.validate(load_config_file(CONFIGS / "seeds" / f"{name}.py"))
    d, n, h, mlp, rope, eps, e, k, moe_layers, steps = SEED_CONFIGS[name]
    m = c.model
    assert (m.d_model, m.n_layers, m.n_heads, m.mlp, m.rope_layout, m.norm_eps) == (d, n, h, mlp, rope, eps)
    assert m.embed_scale and m.tie_embeddings and c.moe.num_experts == e and c.train.steps == steps
    assert [i for i in range(n) if config_lib.is_moe_layer(c, i)] == moe_layers
    if e:
        assert c.moe.top_k == k and c.moe.z_loss_weight == 0.0
        for train in (True, False):
            assert moe_lib.expected_capacity(c, c.moe.group_size, train) == c.moe.group_size


def test_default_numerics_unchanged():
    m = config_lib.base_config().model
    assert (m.mlp, m.rope_layout, m.embed_scale, m.norm_eps) == ("gelu", "halves", False, 1e-6)


def test_mesh_fsdp_reaches_the_typed_mesh_config():
    c = load_config_file(CONFIGS / "smoke.py")
    assert parse(c).mesh.fsdp is False  # the default: replicated parameters
    c.mesh.fsdp = True
    assert parse(c).mesh.fsdp is True and parse(c).to_dict()["mesh"]["fsdp"] is True


# The seeds' training semantics (docs/decisions.md, "Seed fidelity"): the value each seed config sets, against
# moe_jax's default (tests/test_seed_training.py shows that each reproduces the seed and turning it off breaks that).
SEED_TRAINING = {  # field: (seed configs, default)
    "optim.muon_fused_qkv": (True, False),
    "optim.muon_bias_correction": (False, True),
    "optim.decay_norms": (True, False),
    "optim.ns_rounding": ("every_op", "operands"),
    "optim.ns_eps": (1e-7, 1e-8),
    "optim.warmup_from_zero": (True, False),
}
SEED_SPECIFIC = {  # name: (ns_dtype, schedule_steps = the seed's max_steps in micro-batches, momentum warmup, aux form)
    "exp5_moe": ("float16", 20000, 0, "prob_squares"),
    "seed002_dense": ("bfloat16", 2122, 0, "switch"),
    "seed002_moe": ("bfloat16", 1724, 0, "switch"),
    "seed004_baseline": ("bfloat16", 300, 300, "switch"),
}


def get(config, path: str):
    section, field = path.split(".")
    return config[section][field]


@pytest.mark.parametrize("name", sorted(SEED_SPECIFIC))
def test_seed_configs_turn_on_the_seeds_training_semantics(name):
    c = config_lib.validate(load_config_file(CONFIGS / "seeds" / f"{name}.py"))
    for field, (seed_value, _) in SEED_TRAINING.items():
        assert get(c, field) == seed_value, field
    ns_dtype, schedule, momentum_warmup, form = SEED_SPECIFIC[name]
    o = c.optim
    assert (o.ns_dtype, o.ns_method, o.schedule_steps, o.momentum_warmup_steps, c.moe.load_balance_form) == (
        ns_dtype, "standard", schedule, momentum_warmup, form)
    assert o.schedule_steps >= c.train.steps * c.train.grad_accum  # the seed ran a quarter (half) of its schedule
    run = parse(c)  # the seed's LambdaLR: 5% of its micro-batches as warmup, floor(N / 20) in the seed's code
    assert run.warmup_steps == schedule // 20


def test_moe_config_keeps_the_corrected_semantics():
    c = config_lib.validate(load_config_file(CONFIGS / "moe.py"))
    for field, (_, default) in SEED_TRAINING.items():
        assert get(c, field) == default, field
    assert (c.optim.schedule_steps, c.optim.momentum_warmup_steps, c.moe.load_balance_form) == (0, 0, "switch")
