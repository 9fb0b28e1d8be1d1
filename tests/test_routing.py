"""Tests for moe_jax/tools/routing.py: a hand-built model whose router sends known token ids to known experts gives
exactly the counts, drops and specialisation a naive re-implementation of the priority rule (first choices before
second, earlier tokens first) predicts; the routes the tool reads are the ones the compiled train step takes, in
bfloat16, for both dispatch modes, and the train step does not output them; the CLI on a smoke checkpoint writes
every file; bad flags exit 2 naming them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import cli
from moe_jax.config.typed import parse
from moe_jax.model import moe as moe_lib
from moe_jax.model import transformer as model_lib
from moe_jax.optim import chain as optimizer_lib
from moe_jax.tools import routing
from moe_jax.train import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = M = 64
E, K = 4, 2
B, S, T = 2, 16, 16  # 2 groups of 16 tokens
FIRST = lambda v: v % E  # noqa: E731
SECOND = lambda v: (v + 1) % E  # noqa: E731


def hand_config(**moe):
    """The hand-built model's RunConfig (`moe.<k> = v` for each override)."""
    c = cli.load_config_file(os.path.join(ROOT, "configs", "smoke.py"))
    c.model.vocab_size, c.model.d_model, c.model.n_layers, c.model.n_heads = V, M, 1, 4
    c.moe.num_experts, c.moe.top_k, c.moe.every, c.moe.group_size = E, K, 1, T
    c.moe.capacity_factor, c.moe.eval_capacity_factor, c.moe.min_capacity = 0.5, 1.0, 1  # C = 4 (train), 8 (eval)
    c.train.batch_size, c.train.seq_len = B, S
    c.moe.update(moe)
    return parse(c)


def hand_params(config):
    """Embedding = identity (token v -> e_v), attention output 0, router: token v -> expert v % 4 (logit 16 after the
    norm's x8), then (v + 1) % 4 (logit 8): the top-2 choice is (FIRST(v), SECOND(v)) with a gap far above the noise."""
    graphdef, params = model_lib.init_params(config.model, config.seed)
    params["embed"]["embedding"] = jnp.eye(V, M, dtype=jnp.float32)
    block = params["blocks"][0]
    block["attn"]["wo"] = jnp.zeros_like(block["attn"]["wo"])
    w = np.zeros((M, E), np.float32)
    for v in range(M):
        w[v, FIRST(v)], w[v, SECOND(v)] = 2.0, 1.0
    block["ffn"]["w_router"] = jnp.asarray(w)
    return graphdef, params


def naive_route(groups: np.ndarray, capacity: int):
    """(demanded [E], kept [E], fully dropped tokens, token_expert [E, V]) by the priority rule, one assignment at a
    time."""
    demanded, kept = np.zeros(E), np.zeros(E)
    token_expert = np.zeros((E, V))
    fully = 0
    for group in groups:
        used = np.zeros(E, int)
        got = np.zeros(len(group), int)
        for rank, choose in enumerate((FIRST, SECOND)):
            for i, v in enumerate(group):
                e = choose(int(v))
                demanded[e] += 1
                token_expert[e, v] += 1
                if used[e] < capacity:
                    used[e] += 1
                    kept[e] += 1
                    got[i] += 1
        fully += int(np.sum(got == 0))
    return demanded, kept, fully, token_expert


def test_hand_built_router_counts_drops_and_specialisation():
    config = hand_config()
    graphdef, params = hand_params(config)
    rng = np.random.default_rng(0)
    # ids 0..7 skewed so experts get unequal loads; 3 batches of [2, 16]
    batches = [dict(inputs=rng.choice(8, size=(B, S), p=[.3, .2, .1, .1, .1, .1, .05, .05]).astype(np.int32))
               for _ in range(3)]
    result = routing.analyse(config, graphdef, params, batches, noise_std=1e-2, min_count=1, top=8)
    all_groups = np.concatenate([b["inputs"].reshape(-1, T) for b in batches])
    layer = result["layers"][0]
    assert layer["layer"] == 0 and result["tokens"] == 3 * B * S
    for mode, cap in (("eval", 8), ("train", 4)):
        demanded, kept, fully, token_expert = naive_route(all_groups, cap)
        got = layer[mode]
        assert got["capacity"] == cap and got["group_size"] == T
        assert got["tokens_per_expert_demanded"] == demanded.astype(int).tolist()
        assert got["tokens_per_expert_kept"] == kept.astype(int).tolist()
        np.testing.assert_allclose(got["dropped_fraction"], 1 - kept.sum() / demanded.sum(), atol=1e-12)
        np.testing.assert_allclose(got["tokens_fully_dropped_fraction"], fully / all_groups.size, atol=1e-12)
        np.testing.assert_allclose(got["load_cv"], demanded.std() / demanded.mean(), rtol=1e-9)
        np.testing.assert_allclose(got["load_max_over_mean"], demanded.max() / demanded.mean(), rtol=1e-9)
        assert got["noise_flip_fraction"] == 0.0  # logit gap 8 >> noise 0.01
        p1 = 1 / (1 + np.exp(-8) + 2 * np.exp(-16))  # softmax of logits (16, 8, 0, 0)
        np.testing.assert_allclose(got["top1_prob"], p1, rtol=1e-5)
        np.testing.assert_allclose(got["topk_prob"], p1 * (1 + np.exp(-8)), rtol=1e-5)
        assert got["router_entropy_normalized"] < 0.01
    assert layer["train"]["dropped_fraction"] > 0 and layer["eval"]["dropped_fraction"] < \
        layer["train"]["dropped_fraction"]

    # specialisation: expert e receives exactly the ids v with FIRST(v) == e or SECOND(v) == e
    _, _, _, token_expert = naive_route(all_groups, 8)
    freq = np.bincount(all_groups.ravel(), minlength=V).astype(float)
    for s in layer["specialisation"]:
        e, row = s["expert"], token_expert[s["expert"]]
        assert s["assignments"] == row.sum()
        assert s["top_token"] == int(np.argmax(row))
        np.testing.assert_allclose(s["top_token_share"], row.max() / row.sum())
        np.testing.assert_allclose(s["top_token_text_share"], freq[s["top_token"]] / freq.sum())
        got_tokens = {t["token"] for t in s["top_lift"]}
        assert got_tokens == {v for v in range(8) if freq[v] and e in (FIRST(v), SECOND(v))}
        for t in s["top_lift"]:
            np.testing.assert_allclose(t["lift"], (row[t["token"]] / row.sum()) / (freq[t["token"]] / freq.sum()))
            # every id here always goes to e: its lift is the maximum N / n(e)
            np.testing.assert_allclose(t["lift"], freq.sum() / row.sum())


def test_padding_is_not_counted():
    config = hand_config()
    graphdef, params = hand_params(config)
    ids = np.arange(20, dtype=np.int32) % 8
    batches = routing.text_batches(ids, S, B, pad_id=0)
    assert len(batches) == 1 and batches[0]["inputs"].shape == (B, S) and batches[0]["weights"].sum() == 20
    result = routing.analyse(config, graphdef, params, batches)
    assert result["tokens"] == 20
    assert sum(result["layers"][0]["eval"]["tokens_per_expert_demanded"]) == 20 * K


def test_specialisation_lift_by_hand():
    token_expert = np.array([[6, 0, 2], [2, 4, 2]], float)  # 2 experts, 3 ids; 8 tokens top-2 = 16 assignments
    token_freq = np.array([4, 2, 2], float)
    s = routing.specialisation(token_expert, token_freq, min_count=1, top=3)
    assert s[0]["top_token"] == 0 and s[0]["top_token_share"] == 0.75 and s[0]["share"] == 0.5
    # lift(0, 0) = (6/8) / (4/8) = 1.5; lift(0, 2) = (2/8) / (2/8) = 1; id 1 never sent to expert 0: not ranked
    assert [(t["token"], t["lift"]) for t in s[0]["top_lift"]] == [(0, 1.5), (2, 1.0)]
    assert [(t["token"], t["lift"]) for t in s[1]["top_lift"]] == [(1, 2.0), (2, 1.0), (0, 0.5)]


def test_dense_model_is_refused():
    c = hand_config(num_experts=0)
    graphdef, params = model_lib.init_params(c.model, c.seed)
    with pytest.raises(ValueError, match="dense"):
        routing.analyse(c, graphdef, params, [dict(inputs=np.zeros((B, S), np.int32))])


def smoke_bf16(dispatch: str):
    """configs/smoke.py in bfloat16 (2 MoE layers, 4 experts top-2, 2 groups of 256 tokens) with a train capacity
    that drops, initial parameters, and one batch [8, 64] whose rows end in padding of different lengths (weight 0:
    the step's token_mask)."""
    c = cli.load_config_file(os.path.join(ROOT, "configs", "smoke.py"))
    c.model.dtype, c.moe.dispatch = "bfloat16", dispatch
    c.moe.capacity_factor = 0.5  # C = 64 slots for 128 assignments per expert on average: the train step drops
    c = parse(c)
    graphdef, params = model_lib.init_params(c.model, c.seed)
    b, s = c.train.batch_size, c.train.seq_len
    rng = np.random.default_rng(0)
    inputs = rng.integers(0, c.model.vocab_size, (b, s)).astype(np.int32)
    weights = (np.arange(s)[None, :] < s - 3 * np.arange(b)[:, None]).astype(np.float32)
    batch = dict(inputs=inputs, targets=np.roll(inputs, -1, axis=1), weights=weights)
    return c, graphdef, params, {k: jnp.asarray(v) for k, v in batch.items()}


def counts(routes: dict, e: int, kept: bool) -> np.ndarray:
    """[layers, E]: assignments per expert of real tokens (all choices, or only the kept ones)."""
    idx = np.asarray(routes["expert_index"])
    w = np.asarray(routes["mask"])[..., None] & (np.asarray(routes["kept"], bool) if kept else True)
    w = np.broadcast_to(w, idx.shape)
    return np.stack([np.bincount(idx[li][w[li]].ravel(), minlength=e) for li in range(idx.shape[0])])


@pytest.mark.slow
@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_tool_routes_are_the_train_steps_routes_in_bfloat16(dispatch, monkeypatch):
    """The routes the tool reads (top-k experts and kept flags per layer) are the ones the compiled train step takes,
    bit for bit, in bfloat16; the train step's compiled outputs hold none of them (its metrics are the routing
    metrics only); and the tool's train-capacity counts equal the train step's own metrics."""
    c, graphdef, params, batch = smoke_bf16(dispatch)
    optimizer = optimizer_lib.build(c.optim, c.train.steps)
    state = step_lib.init_state(c.seed, params, optimizer)
    compiled = jax.jit(step_lib.make_train_step(c.train, graphdef, optimizer)).lower(state, batch).compile()
    _, out = compiled.out_info
    routing_keys = set(moe_lib.routing_metrics(dict(probs=jnp.ones((1, 4)), expert_index=jnp.zeros((1, 2), int),
                                                    kept=jnp.ones((1, 2), bool)), jnp.zeros((1, 4))))
    assert set(out) == {"loss", "accuracy", "grad_norm", "param_norm", "tokens", "finite", "moe/moe_loss",
                        "moe/capacity"} | {f"moe/{k}" for k in routing_keys}
    assert "router_topk_prob" not in routing_keys and all(v.ndim <= 2 for v in out.values())
    _, metrics = compiled(state, batch)

    tool = jax.jit(lambda p, b: routing.forward_routes(graphdef, p, b, train=True))(params, batch)["routes"]
    real_apply = model_lib.apply  # the same train step, asked for its routes (returned in its metrics)
    with monkeypatch.context() as patch:
        patch.setattr(model_lib, "apply", lambda *a, **kw: real_apply(*a, routes=True, **kw))
        _, asked = jax.jit(step_lib.make_train_step(c.train, graphdef, optimizer))(state, batch)
    np.testing.assert_array_equal(np.asarray(tool["expert_index"]), asked["moe/routes"]["expert_index"])
    np.testing.assert_array_equal(np.asarray(tool["kept"], np.float32), asked["moe/routes"]["kept"])
    np.testing.assert_array_equal(np.asarray(tool["mask"]), np.broadcast_to(
        np.asarray(batch["weights"] > 0).reshape(tool["mask"].shape[1:]), tool["mask"].shape))
    real = np.asarray(tool["mask"])[..., None]
    assert (dispatch == "dropless") == bool(np.all(np.asarray(tool["kept"]) | ~real))  # only capacity drops

    e = c.moe.num_experts
    np.testing.assert_array_equal(counts(tool, e, kept=False), metrics["moe/tokens_per_expert_demand"])
    np.testing.assert_array_equal(counts(tool, e, kept=True), metrics["moe/tokens_per_expert"])
    result = routing.analyse(c, graphdef, params, [{k: batch[k] for k in ("inputs", "weights")}])
    for li, layer in enumerate(result["layers"]):
        assert layer["train"]["tokens_per_expert_demanded"] == metrics["moe/tokens_per_expert_demand"][li].tolist()
        assert layer["train"]["tokens_per_expert_kept"] == metrics["moe/tokens_per_expert"][li].tolist()
        assert layer["train"]["capacity"] == metrics["moe/capacity"][li]


@pytest.fixture(scope="module")
def workdir(smoke_run, tmp_path_factory):
    """A copy of the session's shared smoke run (4 steps, checkpoint at step 4): routing writes into its workdir."""
    path = str(tmp_path_factory.mktemp("routing") / "run")
    shutil.copytree(smoke_run["workdir"], path)
    return path


@pytest.mark.slow  # quick tier under 3 min: a full compile per case; the full suite runs it
def test_cli_writes_every_file(workdir):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "moe_jax.routing", "--workdir", workdir, "--batches", "2"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "routing of" in r.stdout and "drop eval" in r.stdout
    out = os.path.join(workdir, routing.OUT_DIR)
    for f in routing.FILES:
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    with open(os.path.join(out, "routing.json")) as f:
        result = json.load(f)
    assert result["step"] == 4 and result["batches"] == 2 and result["source"] == "validation split"
    assert [layer["layer"] for layer in result["layers"]] == [0, 1]  # smoke: 2 layers, both MoE
    for layer in result["layers"]:
        for mode in routing.MODES:
            assert sum(layer[mode]["tokens_per_expert_demanded"]) == result["tokens"] * 2
            assert 0 <= layer[mode]["dropped_fraction"] <= 1
        assert layer["train"]["capacity"] < layer["eval"]["capacity"]
        assert len(layer["specialisation"]) == 4
    with open(os.path.join(out, "specialisation.txt")) as f:
        table = f.read()
    assert "layer 1" in table and "'\u2581" in table  # token ids shown as their sentencepiece pieces ('▁the')


@pytest.mark.slow
def test_text_file(workdir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("In the beginning God created the heaven and the earth. " * 30)
    routing.command(workdir, text=str(text))
    assert "routing of" in capsys.readouterr().out
    with open(os.path.join(workdir, routing.OUT_DIR, "routing.json")) as f:
        result = json.load(f)
    from moe_jax import data
    n = len(data.load_tokenizer(os.path.join(workdir, "tokenizer.model")).encode(text.read_text()))
    assert result["source"] == f"text {text}" and result["tokens"] == n


@pytest.mark.parametrize("extra,needle", [
    (dict(batches=-1), "--batches -1"),
    (dict(text="/nonexistent.txt"), "--text /nonexistent.txt"),
    (dict(step=999), "--step 999"),
    (dict(noise_std=-1), "--noise_std -1"),
])
def test_bad_flags_are_named(workdir, extra, needle):
    with pytest.raises(cli.UsageError) as e:
        routing.command(workdir, **extra)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_bad_workdir_and_unknown_flag_exit_2(tmp_path):
    with pytest.raises(cli.UsageError, match=f"--workdir {tmp_path}: no config.json"):
        routing.command(str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "moe_jax.routing", "--workdir", str(tmp_path), "--layers", "2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "error: Unknown command line flag 'layers'" in r.stderr, r.stderr


@pytest.mark.slow
def test_remat_run_is_analysed_like_its_plain_twin():
    config = hand_config()
    graphdef, params = hand_params(config)
    batches = [dict(inputs=(np.arange(B * S, dtype=np.int32) % 8).reshape(B, S))]
    plain = routing.analyse(config, graphdef, params, batches)
    config = config.replace(model={"remat": True})
    remat_graphdef, _ = model_lib.abstract(config.model)
    assert routing.analyse(config, remat_graphdef, params, batches) == plain
