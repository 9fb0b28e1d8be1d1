"""configs/seeds/* compute the seeds' functions: the seeds' own PyTorch models (tiny, random weights, eval mode) and
moe_jax with the matching seed config and the same weights give the same logits (atol 1e-5) and the same top-k
expert choices in every MoE layer. No PyTorch needed: the fixtures under tests/fixtures/seed_fidelity/ hold the
seeds' weights, tokens, logits and routes, written by scripts/seed_fidelity_fixture.py from the seeds' repositories
(commits in fixtures.json). Each model option the configs set is shown to matter: flipping it breaks the match."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.testing import assert_allclose

import seed_helpers
from moe_jax.config import schema as config_lib
from moe_jax.model import transformer as model
from moe_jax.model import moe
from seed_helpers import ROOT, to_params

FIXTURES = ROOT / "tests" / "fixtures" / "seed_fidelity"
META = json.loads((FIXTURES / "fixtures.json").read_text())
ATOL = 1e-5  # plus RTOL: float32 rounding in two implementations; the wide fixtures' logits reach |8.6| and differ
RTOL = 1e-6  # by up to 8.3e-6 (seed init: 1.8e-7). Measured 2026-11-26, torch 2.13 CPU vs jax 0.10.2 CPU.


def seed_config(seed_model: str, **overrides):
    """configs/seeds/<seed_model>.py shrunk to the fixtures' shape (seed_helpers.seed_config)."""
    return seed_helpers.seed_config(seed_model, META["shape"], META["shape"]["max_seq_len"], **overrides)


def forward(config, params, tokens, monkeypatch, allow_drops=False):
    """Evaluation forward (train=False: no dropout, no noise; capacity from moe.eval_capacity_factor) in float32.
    Returns (logits [B, S, V], {MoE layer: top-k expert indices [B, S, K]}), routes captured at moe.route."""
    routes = []
    real_route = moe.route

    def recording_route(logits, *args, **kwargs):
        out = real_route(logits, *args, **kwargs)
        routes.append(np.asarray(out[2]["expert_index"]))  # [G, T, K]
        assert allow_drops or np.all(np.asarray(out[2]["kept"])), "a seed config dropped a token: capacity < T"
        return out

    monkeypatch.setattr(moe, "route", recording_route)
    graphdef, _ = model.abstract(config.model)
    shapes = jax.tree_util.tree_map(lambda x: x.shape, model.init_params(config.model, config.seed)[1])
    assert jax.tree_util.tree_map(np.shape, params) == shapes, "weight mapping does not give moe_jax's tree"
    logits, _, _ = model.apply(graphdef, jax.tree_util.tree_map(jnp.asarray, params), jnp.asarray(tokens),
                               train=False)
    b, s = tokens.shape
    moe_layers = [i for i in range(config.model.n_layers) if config_lib.is_moe_layer(config, i)]
    return np.asarray(logits), {i: r.reshape(b, s, -1) for i, r in zip(moe_layers, routes)}


def load_fixture(fx: dict):
    z = np.load(FIXTURES / fx["file"])
    return {k: z[k] for k in z.files}


FIXTURE_IDS = [fx["file"].removesuffix(".npz") for fx in META["fixtures"]]


@pytest.mark.parametrize("fx", META["fixtures"], ids=FIXTURE_IDS)
def test_seed_config_matches_seed_logits_and_routes(fx, monkeypatch):
    data = load_fixture(fx)
    config = seed_config(fx["seed_model"])
    logits, routes = forward(config, to_params(data, fx["seed_model"], config), data["tokens"], monkeypatch)
    assert_allclose(logits, data["logits"], rtol=RTOL, atol=ATOL)
    want = {int(k.split("/")[1]): v for k, v in data.items() if k.startswith("route/")}
    assert sorted(routes) == sorted(want) == fx["moe_layers"]
    for i in want:
        np.testing.assert_array_equal(routes[i], want[i], err_msg=f"top-k expert choices differ in layer {i}")


# Each option a seed config sets, flipped back to moe_jax's default (or the other seed's value): the match must break
# by more than the tolerance. (fixture, config field, flipped value)
FLIPS = [
    ("exp5_moe_wide", "model.rope_layout", "adjacent"),
    ("seed002_dense_wide", "model.rope_layout", "halves"),
    ("exp5_moe_wide", "model.mlp", "gelu"),
    ("seed002_moe_wide", "model.embed_scale", False),
    ("exp5_moe_seed", "model.embed_scale", False),
    ("seed002_dense_seed", "model.norm_eps", 1e-6),
    ("seed004_baseline_seed", "model.norm_eps", config_lib.FLOAT32_EPS),
    ("seed002_moe_wide", "moe.eval_capacity_factor", 1.0),
]


@pytest.mark.parametrize("name, field, value", FLIPS, ids=[f"{n}:{f}={v}" for n, f, v in FLIPS])
def test_each_option_matters(name, field, value, monkeypatch):
    fx = next(f for f in META["fixtures"] if f["file"] == f"{name}.npz")
    data = load_fixture(fx)
    config = seed_config(fx["seed_model"], **{field: value})
    logits, _ = forward(config, to_params(data, fx["seed_model"], config), data["tokens"], monkeypatch,
                        allow_drops=field.startswith("moe."))
    diff = float(np.max(np.abs(logits - data["logits"])))
    tolerance = ATOL + RTOL * np.max(np.abs(data["logits"]))
    assert diff > tolerance, f"flipping {field} to {value!r} changed the logits by only {diff:.2e} <= {tolerance:.2e}"
