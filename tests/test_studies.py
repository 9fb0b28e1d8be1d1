"""moe_jax.studies: planning (budgets under every convention against hand counts, arms of different shapes,
replicates, refusals), the three-way document split, and a tiny study end to end: learning rate chosen on the
validation split, the test split read once per selected run, killed mid-study and resumed without retraining."""

from __future__ import annotations

import json
import os
import re

import jax
import ml_collections
import numpy as np
import pytest

from moe_jax.train import checkpoint as ckpt_lib
from moe_jax.config import schema as config_lib
from moe_jax.config.typed import parse
from moe_jax.model import flops
from moe_jax.model import transformer as model_lib
from moe_jax.optim import chain as optimizer_lib
from moe_jax.train import loop as trainer
from moe_jax import eval as eval_lib
from moe_jax.data import pipeline, split as split_lib
from moe_jax.studies import plan as plan_lib
from moe_jax.studies import runner
from study_helpers import tiny_base

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cache_dir(data_cache):
    return data_cache


def tiny_study(cache_dir: str) -> ml_collections.ConfigDict:
    """An MoE of width 32 at batch 4 x seq 32 (with a 2-point Muon LR grid) vs a dense model at batch 2 x seq 64:
    128 tokens per step each, a token budget of 6 steps, one replicate, a test split, 16 evenly spread windows."""
    b = tiny_base(cache_dir)
    b.train.eval_batches = 0
    b.train.checkpoint_every = 3
    b.data.val_window_sampling = "even"
    b.data.test_fraction = 0.05
    s = ml_collections.ConfigDict()
    s.name = "tiny"
    s.base = b
    s.arms = ml_collections.ConfigDict({"moe_short": {}, "dense_long": {"moe": {"num_experts": 0},
                                                                       "train": {"batch_size": 2, "seq_len": 64}}})
    s.arm_names = "moe_short,dense_long"
    s.seeds = (0,)
    s.lr_grid = ml_collections.ConfigDict({"moe_short": (0.003, 0.03)})
    s.budget = ml_collections.ConfigDict({"kinds": ("tokens",), "amount": 0.0, "reference_arm": "moe_short",
                                          "reference_steps": 6})
    s.num_evals = 2
    return s


# ---------------------------------------------------------------------------------------------------------------
# FLOP conventions and planning (no training)


def ns_flops(c) -> float:
    """flops.optimizer_flops_per_step of a ConfigDict (parsed)."""
    run = parse(c)
    return flops.optimizer_flops_per_step(run.model, run.optim)


def test_optimizer_flops_hand_count_and_the_optimizers_own_muon_leaves():
    c = config_lib.base_config()
    for k, v in dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, d_ff=128).items():
        c.model[k] = v
    c.moe.num_experts, c.moe.top_k, c.moe.d_ff = 4, 2, 128
    c.optim.ns_method = "standard"  # X-space counts (Gram space: tests/test_flops.py)
    # by hand: 8 attention matrices [64, 64]: 5 x (4*64^2*64 + 2*64^3); 16 expert matrices [64, 128]:
    # 5 x (4*64^2*128 + 2*64^3)
    hand = 8 * 5 * (4 * 64 ** 3 + 2 * 64 ** 3) + 16 * 5 * (4 * 64 * 64 * 128 + 2 * 64 ** 3)
    assert hand == 272_629_760
    assert ns_flops(c) == hand
    # independently, from the optimizer's Muon dimension numbers on the model's parameter shapes
    run = parse(c)
    _, state = model_lib.abstract(run.model)
    params = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), state.to_pure_dict())
    dims = optimizer_lib.weight_dimension_numbers(params, run.optim)
    total = 0.0
    leaves = jax.tree_util.tree_leaves_with_path(params)
    dims_flat = dict(jax.tree_util.tree_leaves_with_path(dims, is_leaf=lambda x: x is None or hasattr(
        x, "reduction_axis")))
    for path, x in leaves:
        d = dims_flat.get(path)
        if d is None:
            continue
        red = (d.reduction_axis,) if isinstance(d.reduction_axis, int) else tuple(d.reduction_axis)
        out = (d.output_axis,) if isinstance(d.output_axis, int) else tuple(d.output_axis)
        rows = int(np.prod([x.shape[a] for a in red]))
        cols = int(np.prod([x.shape[a] for a in out]))
        batch = int(np.prod([n for a, n in enumerate(x.shape) if a not in red + out]))
        total += batch * flops.newton_schulz_flops(rows, cols, 5)
    assert total == hand
    c.optim.router_muon = True
    assert ns_flops(c) == hand + 2 * 5 * (4 * 4 * 4 * 64 + 2 * 4 ** 3)
    c.optim.name = "adamw"
    assert ns_flops(c) == 0


def test_budgets_under_every_convention_equal_hand_counts_for_arms_of_different_shapes():
    s = tiny_study("/nonexistent")
    s.budget.kinds = ("model_flops", "executed_flops", "tokens")
    s.lr_grid = ml_collections.ConfigDict()
    s.budget.reference_arm = "dense_long"
    s.budget.reference_steps = 100
    s.base.optim.ns_method = "standard"  # X-space Newton-Schulz counts ('auto' is Gram space on CPU: test_flops.py)
    p = plan_lib.plan(s, "/w")
    # dense_long by hand: d 32, 2 layers, F 64, V 512, S 64, gelu (2 matrices), batch 2 x 64 = 128 tokens/step
    fwd = 2 * (2 * 4 * 32 * 32 + 2 * 2 * 32 * 64 + 512 * 32) + 2 * 2 * 64 * 32
    model_step = 3 * fwd * 128
    ns = 8 * 5 * (6 * 32 ** 3) + 4 * 5 * (4 * 32 * 32 * 64 + 2 * 32 ** 3)
    assert (fwd, model_step, ns) == (73_728, 28_311_552, 14_417_920)
    assert p["per_step"]["model_flops"]["dense_long"] == model_step
    # executed: no padding, but S = 64 <= the attention block, so the blocked kernel computes all 64 x 64 scores:
    # 4*D*S per layer and token instead of the causal count's 2*D*S (flops.py)
    exec_step = 3 * (fwd - 2 * 2 * 64 * 32 + 2 * 4 * 64 * 32) * 128
    assert exec_step == 31_457_280
    assert p["per_step"]["executed_flops"]["dense_long"] == exec_step + ns
    assert p["per_step"]["tokens"]["dense_long"] == 128
    assert p["budgets"] == {"model_flops": 100 * model_step, "executed_flops": 100 * (exec_step + ns),
                            "tokens": 12_800}
    moe = parse(p["arms"]["moe_short"])
    fpt = flops.run_flops_per_token(moe)
    moe_exec = fpt["executed_training"] * 128 + ns_flops(p["arms"]["moe_short"])
    assert p["per_step"]["executed_flops"]["moe_short"] == pytest.approx(moe_exec, rel=1e-12)
    assert fpt["dispatch_overhead_training"] > fpt["capacity_padding_training"] > 0  # capacity dispatch
    for kind in p["kinds"]:
        for run in (r for r in p["runs"] if r.kind == kind):
            per = p["per_step"][kind][run.label]
            assert run.steps == max(1, round(p["budgets"][kind] / per)) == run.config.train.steps
            assert abs(run.steps * per - p["budgets"][kind]) <= per / 2
            assert run.costs["model_flops"] == run.steps * flops.flops_per_step(run.config)
            assert run.costs["tokens"] == run.steps * 128
    steps = {(r.kind, r.arm): r.steps for r in p["runs"]}
    assert steps[("tokens", "moe_short")] == steps[("tokens", "dense_long")] == 100  # equal tokens per step
    assert steps[("model_flops", "moe_short")] != steps[("executed_flops", "moe_short")]
    assert {r.config.train.seq_len for r in p["runs"]} == {32, 64}
    assert len({r.run_dir for r in p["runs"]}) == len(p["runs"])


def test_replicates_pair_or_cross_seed_and_data_order():
    s = tiny_study("/nonexistent")
    s.seeds = (0, 1, 2)
    p = plan_lib.plan(s, "/w")
    assert {(r.seed, r.config.seed, r.config.data.shuffle_seed, r.replicate) for r in p["runs"]} == {
        (k, k, k, f"seed{k}") for k in range(3)}
    s.data_orders = (7, 8)
    p = plan_lib.plan(s, "/w")
    assert sorted({(r.config.seed, r.config.data.shuffle_seed) for r in p["runs"]}) == [
        (a, o) for a in range(3) for o in (7, 8)]
    assert len(p["runs"]) == 3 * 6  # 3 variants (2 LRs + 1) x 6 replicates
    assert os.path.join("/w", "moe_short", "lr0.03", "seed1_order8") in {r.run_dir for r in p["runs"]}


def test_plan_validates_each_config_once(monkeypatch):
    """Each arm, each learning-rate variant and each run is one ConfigDict parsed (and so validated) once: the arm's
    own RunConfig serves its base-LR variant, and no config is validated again (2 arms + 2 grid points + 3 runs)."""
    from moe_jax.config import typed
    seen = []
    real = typed.validate
    monkeypatch.setattr(typed, "validate", lambda c: seen.append(c) or real(c))
    monkeypatch.setattr(config_lib, "validate", lambda c: pytest.fail("validated outside parse"))
    s = tiny_study("/nonexistent")
    s.budget.kinds = ("tokens", "model_flops")  # a second convention parses nothing more
    p = plan_lib.plan(s, "/w")
    assert len(p["runs"]) == 2 * 3
    assert len(seen) == len({id(c) for c in seen}) == 2 + 2 + 2 * 3


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.base.data.update({"val_window_sampling": "first"}), "arms differ in train.seq_len"),
    (lambda s: s.base.data.update({"test_fraction": 0.0}), "must be reported on a test split"),
    (lambda s: s.budget.update({"kinds": ("flops",)}), "unknown 'flops'"),
    (lambda s: setattr(s, "seeds", (1, 1)), "give distinct seeds"),
    (lambda s: s.lr_grid.update({"moe_short": (0.01, 0.01)}), "config.lr_grid.moe_short: give distinct"),
    (lambda s: s.arms.dense_long.update({"data": {"shuffle_seed": 4}}), "data.shuffle_seed = 4 differs"),
    (lambda s: setattr(s, "report_split", "train"), "config.report_split"),
])
def test_bad_studies_are_refused(edit, message):
    s = tiny_study("/nonexistent")
    edit(s)
    with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
        plan_lib.plan(s, "/w")


def test_three_way_split_is_disjoint_keeps_the_two_way_validation_and_maps_training_positions():
    two = split_lib.hash_split(5000, 0.05, what="x")
    three = split_lib.hash_split(5000, 0.05, what="x", test_fraction=0.05)
    np.testing.assert_array_equal(two.val_indices, three.val_indices)  # test_fraction 0 -> the old split
    assert three.num_test > 150 and not set(three.val_indices) & set(three.test_indices)
    train = three.train_indices()
    assert len(train) == three.num_train == 5000 - three.num_val - three.num_test
    assert sorted(set(train) | set(three.val_indices) | set(three.test_indices)) == list(range(5000))
    assert [three.train_doc(k) for k in range(0, three.num_train, 97)] == list(train[::97])
    part = split_lib.PartSource(list(range(5000)), three, "test")
    assert [part[k] for k in range(len(part))] == list(three.test_indices)
    tiny = split_lib.hash_split(3, 0.05, what="x", test_fraction=0.05)
    assert (tiny.num_train, tiny.num_val, tiny.num_test) == (1, 1, 1)
    assert split_lib.split_tag(0.05, 0.05) == "val0.05-test0.05" and split_lib.split_tag(0.05) == "val0.05"


def test_even_windows_span_the_split():
    np.testing.assert_array_equal(pipeline.even_indices(10, 4), [0, 3, 6, 9])
    np.testing.assert_array_equal(pipeline.even_indices(3, 8), [0, 1, 2])


# ---------------------------------------------------------------------------------------------------------------
# A tiny study end to end, killed mid-study and resumed


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cache_dir):
    """Runs the tiny study; the first attempt is killed while training its second run (after 3 of its steps).
    Returns (study, workdir, results, calls of the second attempt)."""
    study = tiny_study(cache_dir)
    workdir = str(tmp_path_factory.mktemp("study"))
    devices = jax.devices()[:1]
    real_train = trainer.train
    state = {"n": 0}

    def killed(config, rdir, **kw):
        state["n"] += 1
        if state["n"] == 2:
            real_train(config, rdir, max_steps_this_run=3, **kw)
            raise KeyboardInterrupt("killed mid-study")
        return real_train(config, rdir, **kw)

    trainer.train = killed
    try:
        with pytest.raises(KeyboardInterrupt):
            runner.run_study(study, workdir, command="tiny study", devices=devices, log=lambda m: None)
    finally:
        trainer.train = real_train

    calls = []

    def spy(config, rdir, **kw):
        ck = os.path.join(rdir, "checkpoints")
        calls.append((rdir, ckpt_lib.Checkpointer(rdir, read_only=True).latest_step() if os.path.isdir(ck)
                      else None))
        return real_train(config, rdir, **kw)

    trainer.train = spy
    try:
        results = runner.run_study(study, workdir, command="tiny study", devices=devices, log=lambda m: None)
    finally:
        trainer.train = real_train
    return study, workdir, results, calls


@pytest.mark.slow  # a three-run study trained end to end, killed and resumed (shared by these tests)
def test_killed_study_resumes_without_retraining_finished_runs(tiny_run):
    study, workdir, results, calls = tiny_run
    order = [r["run_dir"] for r in results["runs"]]
    assert len(order) == 3
    # run 1 finished before the kill: not trained again; run 2 resumes from step 3; run 3 starts fresh
    assert calls == [(order[1], 3), (order[2], None)]
    assert [r["skipped"] for r in results["runs"]] == [True, False, False]
    assert all(r["steps"] == 6 for r in results["runs"])


@pytest.mark.slow  # a three-run study trained end to end, killed and resumed (shared by these tests)
def test_lr_is_chosen_on_validation_and_the_report_reads_test_once(tiny_run, monkeypatch):
    study, workdir, results, _ = tiny_run
    moe = [r for r in results["runs"] if r["arm"] == "moe_short"]
    best = min(moe, key=lambda r: r["val_loss"])
    assert results["selected_lrs"]["tokens"]["moe_short"]["lr"] == best["lr"]
    assert [r["selected"] for r in moe] == [r is best for r in moe]
    for r in results["runs"]:
        path = runner.test_eval_path(r["run_dir"], r["steps"])
        assert os.path.exists(path) == r["selected"]  # only the selected runs ever touch the test split
        if r["selected"]:
            ev = json.load(open(path))
            assert ev["split"] == "test" and r["test_loss"] == ev["val_loss"] != r["val_loss"]
        else:
            assert "test_loss" not in r
    table = results["arms"]
    assert table["moe_short"]["test_loss"]["mean"] == best["test_loss"]
    report = open(os.path.join(workdir, "report.md")).read()
    for text in ("## Budget: tokens", "Learning rate chosen on the validation split", "| test loss |",
                 "**test** split", "16 windows spread evenly over the split", "no verdict",
                 "model initialisation **and** the training-document order", "Routing per MoE layer"):
        assert text in report, text
    assert "dropout" not in report.split("## Arms")[0]  # dropout is 0: the header does not claim seeds vary it
    for png in ("val_loss_vs_flops.png", "val_loss_vs_executed_flops.png", "val_loss_per_lr.png",
                "throughput.png"):
        assert os.path.getsize(os.path.join(workdir, "plots", png)) > 1000
    # a third run trains nothing and evaluates nothing
    monkeypatch.setattr(trainer, "train", lambda *a, **k: pytest.fail("trained a finished run"))
    monkeypatch.setattr(eval_lib, "evaluate_workdir", lambda *a, **k: pytest.fail("evaluated test twice"))
    again = runner.run_study(study, workdir, command="tiny study", devices=jax.devices()[:1], log=lambda m: None)
    assert [r.get("test_loss") for r in again["runs"]] == [r.get("test_loss") for r in results["runs"]]


def test_wall_seconds_budget_is_planned_from_a_calibration_kept_for_reruns(tmp_path, monkeypatch):
    s = tiny_study("/nonexistent")
    s.lr_grid = ml_collections.ConfigDict()
    s.budget.kinds = ("wall_seconds", "tokens")
    s.budget.reference_steps = 50
    speed = {"moe_short": 64.0, "dense_long": 256.0}  # tokens/s: 2 s and 0.5 s per 128-token step
    seen = []

    def fake_train(config, rdir, **kw):
        seen.append(os.path.basename(rdir))
        assert config.train.steps == 30 and "calibration" in rdir
        return {"tokens_per_s": speed[os.path.basename(rdir)]}

    monkeypatch.setattr(trainer, "train", fake_train)
    p = runner.plan_study(s, str(tmp_path))
    assert sorted(seen) == ["dense_long", "moe_short"]
    assert json.load(open(tmp_path / "calibration.json")) == {"moe_short": 2.0, "dense_long": 0.5}
    assert p["budgets"]["wall_seconds"] == 100.0  # 50 reference steps x 2 s
    steps = {(r.kind, r.arm): r.steps for r in p["runs"]}
    assert steps[("wall_seconds", "moe_short")] == 50 and steps[("wall_seconds", "dense_long")] == 200
    assert steps[("tokens", "dense_long")] == 50
    assert p["runs"][0].run_dir == os.path.join(str(tmp_path), "wall_seconds", "moe_short", "seed0")
    monkeypatch.setattr(trainer, "train", lambda *a, **k: pytest.fail("calibrated twice"))
    assert [r.steps for r in runner.plan_study(s, str(tmp_path))["runs"]] == [r.steps for r in p["runs"]]
    with pytest.raises(config_lib.ConfigError, match="wall_seconds budget needs measured seconds"):
        plan_lib.plan(s, str(tmp_path))


def test_data_build_serves_a_test_split_only_when_configured(cache_dir):
    from moe_jax import data
    from moe_jax.data.errors import DataError

    c = plan_lib.arm_configs(tiny_study(cache_dir))["moe_short"]
    ds = data.build(parse(c), 0, 1)
    sp = ds.source.split
    assert ds.stats["num_docs_test"] == sp.num_test > 0 and ds.stats["tokens_test"] > 0
    assert not set(sp.test_indices) & set(sp.train_indices()) and not set(sp.test_indices) & set(sp.val_indices)
    val, test = ds.eval_batches(4), ds.eval_batches(4, "test")
    assert len(val) == len(test) == 4  # 16 windows spread evenly over each split, 4 per batch
    assert not np.array_equal(val[0]["inputs"], test[0]["inputs"])
    c.data.test_fraction = 0.0
    with pytest.raises(DataError, match="there is no test split"):
        data.build(parse(c), 0, 1).eval_batches(4, "test")
