"""moe_jax.studies: planning (budgets under every convention against hand counts, arms of different shapes,
replicates, refusals), the three-way document split, and a tiny study end to end: learning rate chosen on the
validation split, the test split read once per selected run, killed mid-study and resumed without retraining."""

from __future__ import annotations

import json
import os
import re
import shutil

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
from moe_jax.studies import report as report_lib
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
    s.keep_checkpoints = False  # as configs/studies: a finished run drops them (runner.settle)
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
    c.optim.muon_fused_qkv = True  # per layer one [64, 192] instead of three [64, 64]
    fused = 2 * 5 * (4 * 64 * 64 * 192 + 2 * 64 ** 3) - 6 * 5 * (4 * 64 ** 3 + 2 * 64 ** 3)
    assert ns_flops(c) == hand + 2 * 5 * (4 * 4 * 4 * 64 + 2 * 4 ** 3) + fused
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
    # the reference arm gets its 100 steps under every convention: one run, in the first budget's dir
    shared = [r for r in p["runs"] if r.same_as]
    assert {(r.kind, r.arm, r.same_as) for r in shared} == {("executed_flops", "dense_long", "model_flops"),
                                                            ("tokens", "dense_long", "model_flops")}
    first = next(r for r in p["runs"] if r.kind == "model_flops" and r.arm == "dense_long")
    assert all(r.run_dir == first.run_dir and r.config == first.config for r in shared)
    assert len({r.run_dir for r in p["runs"]}) == len(p["runs"]) - len(shared) == 4
    assert any("the same runs as under model_flops" in line for line in report_lib.describe_plan(p))


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
    """Each arm and each run is one ConfigDict parsed (and so validated) once: a step's cost is the arm's (a learning
    rate changes none), and no config is validated again (2 arms + 2 x 3 runs)."""
    from moe_jax.config import typed
    seen = []
    real = typed.validate
    monkeypatch.setattr(typed, "validate", lambda c: seen.append(c) or real(c))
    monkeypatch.setattr(config_lib, "validate", lambda c: pytest.fail("validated outside parse"))
    s = tiny_study("/nonexistent")
    s.budget.kinds = ("tokens", "model_flops")  # a second convention parses nothing more
    p = plan_lib.plan(s, "/w")
    assert len(p["runs"]) == 2 * 3
    assert len(seen) == len({id(c) for c in seen}) == 2 + 2 * 3


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
# Whole-split evaluation, per document


@pytest.fixture(scope="module")
def tiny_trained(tmp_path_factory, cache_dir):
    """A tiny MoE trained 2 steps on one device (checkpoint and evaluation at step 2) with a test split: (RunConfig,
    run dir)."""
    b = tiny_base(cache_dir)
    b.train.steps, b.train.eval_every, b.train.checkpoint_every = 2, 2, 2
    b.data.test_fraction = 0.05
    c = parse(b)
    rdir = str(tmp_path_factory.mktemp("tiny_trained") / "run")
    trainer.train(c, rdir, devices=jax.devices()[:1])
    return c, rdir


def test_whole_split_evaluation_per_document_equals_the_summed_eval_step(tiny_trained, monkeypatch):
    """evaluate_split scores every target token of the split once (the data's token count less the first token),
    its loss equals the summed eval step's on the same windows, the per-document arrays sum to it, and it is
    computed once (a file of sampled windows is computed again)."""
    from moe_jax import data
    from moe_jax.train import restore as inference
    from moe_jax.train import step as step_lib

    c, rdir = tiny_trained
    one = jax.devices()[:1]
    sampled = eval_lib.evaluate_workdir(rdir, devices=one)  # the run's own 16 windows (data.max_val_windows)
    assert not sampled["whole_split"] and sampled["val_tokens"] <= 16 * 32
    for split in ("validation", "test"):
        ev = runner.evaluate_split(rdir, 2, split, devices=one)
        assert ev["whole_split"] and not ev["skipped"] and ev["split"] == split
        ds = data.build(c.replace(data={"max_val_windows": 0}), 0, 1)
        assert ev["val_tokens"] == ds.stats["tokens_val" if split == "validation" else "tokens_test"] - 1
        docs = runner.document_losses(rdir, split)
        np.testing.assert_array_equal(docs["doc_ids"], ds.doc_ids(split))
        assert docs["tokens"].dtype == np.int64 and docs["loss_sum"].dtype == np.float64
        assert docs["tokens"].sum() == ev["val_tokens"] and (docs["tokens"] > 0).all()
        assert docs["loss_sum"].sum() / docs["tokens"].sum() == pytest.approx(ev["val_loss"], rel=1e-12)
    # the summed eval step (the training loop's) on the same whole-split windows gives the same loss
    mesh = inference.inference_mesh(c.mesh, one)
    graphdef, state, _ = inference.restore_train_state(rdir, c, mesh, 2, log=lambda m: None)
    batches = ds.eval_batches(c.train.batch_size, "test")
    eval_fn, shardings = step_lib.compile_eval_step(graphdef, state["params"], mesh,
                                                    step_lib.batch_like(batches[0], c.train.batch_size))
    with jax.set_mesh(mesh):
        summed = step_lib.evaluate(eval_fn, state["params"], batches, shardings)
    assert summed["val_tokens"] == ev["val_tokens"]
    np.testing.assert_allclose(summed["val_loss"], ev["val_loss"], rtol=1e-5)  # float32 sums on the device
    # on 4 devices (one row each) the per-token outputs are gathered whole: the same tokens and documents
    four, four_docs = eval_lib.evaluate_run(rdir, devices=jax.devices()[:4], split="test", whole_split=True)
    assert four["devices"] == 4 and four["val_tokens"] == ev["val_tokens"]
    np.testing.assert_array_equal(four_docs["tokens"], docs["tokens"])
    np.testing.assert_allclose(four_docs["loss_sum"], docs["loss_sum"], rtol=1e-5)
    monkeypatch.setattr(eval_lib, "evaluate_workdir", lambda *a, **k: pytest.fail("evaluated twice"))
    assert runner.evaluate_split(rdir, 2, "test")["skipped"]


def records_with(tokens: dict) -> list[dict]:
    return [{"run_dir": d, "label": d, "selected": sel, "val_tokens": v, **({"test_tokens": t} if sel else {})}
            for d, (sel, v, t) in tokens.items()]


def test_a_study_finished_on_two_machines_says_so_and_one_machine_says_nothing():
    one = [{"machine": "Intel Xeon / cpu"}] * 3 + [{"machine": None}]
    assert report_lib.machines_line(one) == []
    two = one + [{"machine": "AMD EPYC / cpu"}] * 2
    line = report_lib.machines_line(two)[0]
    assert line.startswith("Runs were finished on 2 machines: Intel Xeon / cpu (3 runs); AMD EPYC / cpu (2 runs)")
    assert "bit for bit only on its own machine" in line


def test_the_learning_rate_table_follows_the_config_order_whatever_the_dict_order():
    """results.json stores sorted keys: the report rebuilt from it must list arms as the config orders them and each
    grid ascending (architecture's arms are not alphabetical; a grid value 0.1 sorts before 0.08 as text)."""
    def sel(lrs, chosen):
        grid = {f"{lr:g}": {"mean": 3.0 + lr, "std": 0.0, "min": 3.0 + lr, "max": 3.0 + lr, "n": 1} for lr in lrs}
        return {"from": None, "lr": chosen, "status": "bracketed", "extensions": 0, "grid": grid}

    selected = {"Deeper": sel((0.1, 0.02, 0.04, 0.08), 0.08), "Baseline": sel((0.08, 0.02, 0.04), 0.04),
                "Shared": {"from": "Baseline", "lr": 0.04, "status": "bracketed"}}
    planned = {"arms": {"Baseline": None, "Shared": None, "Deeper": None}, "select_replicates": 1,
               "lr_field": "optim.muon_lr", "lr": {"tied": (), "step": 2.0, "extend": 2}}
    rows = [line.split(" | ")[:2] for line in report_lib._lr_table("model_flops", selected, planned)
            if line.startswith("| ") and not line.startswith("| arm")]
    assert rows == [["| Baseline", "0.02"], ["| Baseline", "0.04"], ["| Baseline", "0.08"], ["| Shared", "0.04"],
                    ["| Deeper", "0.02"], ["| Deeper", "0.04"], ["| Deeper", "0.08"], ["| Deeper", "0.1"]]


def test_scored_tokens_must_be_equal_across_runs():
    ok = records_with({"a": (True, 100, 50), "b": (False, 100, None), "c": (True, 100, 50)})
    assert report_lib.scored_tokens(ok) == {"validation": 100, "test": 50}
    assert report_lib.scored_tokens([{"run_dir": "a", "selected": True}]) == {}  # results from before the counts
    for bad, split in ((records_with({"a": (True, 100, 50), "b": (True, 101, 50)}), "validation"),
                       (records_with({"a": (True, 100, 50), "b": (True, 100, 49)}), "test"),
                       (records_with({"a": (True, 100, 50), "b": (True, None, 50)}), "validation")):
        with pytest.raises(ValueError, match=f"the runs were scored on different {split} tokens"):
            report_lib.scored_tokens(bad)
    with pytest.raises(ValueError, match="the baselines scored 49 test tokens, the runs 50"):
        report_lib.check_baselines({"split": "test", "tokens": 49}, {"test": 50})


def test_environment_records_the_code_commit_versions_and_cpu(monkeypatch):
    import subprocess

    import flax
    import jaxlib
    import optax

    env = report_lib.environment()
    assert (env["jax"], env["jaxlib"], env["flax"], env["optax"]) == (jax.__version__, jaxlib.__version__,
                                                                     flax.__version__, optax.__version__)
    assert env["cpu"] and env["cpu_count"] == os.cpu_count() and env["device_kind"] == jax.devices()[0].device_kind
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert env["commit"] == (git.stdout.strip() if git.returncode == 0 else "unknown")
    assert f"code commit {env['commit']}" in report_lib.machine(env)

    def no_git(*a, **k):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert report_lib.code_commit() == ("unknown", False)


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
        ev = json.load(open(path))  # every run is scored on test when it finishes (runner.settle) ...
        assert ev["split"] == "test" and ev["val_loss"] != r["val_loss"]
        if r["selected"]:  # ... and only the selected runs' test numbers are read
            assert r["test_loss"] == ev["val_loss"]
        else:
            assert "test_loss" not in r
        # settled: the machine recorded, no checkpoints left, the MoE runs' routing diagnostics from the final one
        assert r["machine"] == report_lib.run_machine(r["run_dir"]) == (
            f"{report_lib.cpu_model()} / {jax.devices()[0].device_kind}")
        assert not os.path.exists(os.path.join(r["run_dir"], "checkpoints"))
        routing = os.path.join(r["run_dir"], "routing", "routing.json")
        assert os.path.exists(routing) == (r["arm"] == "moe_short")
        if os.path.exists(routing):
            assert json.load(open(routing))["step"] == r["steps"]
    table = results["arms"]
    assert table["moe_short"]["test_loss"]["mean"] == best["test_loss"]
    # every run scored the whole validation split, every selected run the whole test split: the same tokens for
    # the arm at seq 32 and the arm at seq 64, as many as the baselines, per document in the same order
    selected = [r for r in results["runs"] if r["selected"]]
    seq_len = {r["arm"]: json.load(open(runner.test_eval_path(r["run_dir"], r["steps"])))["seq_len"] for r in selected}
    assert seq_len == {"moe_short": 32, "dense_long": 64}
    assert len({r["val_tokens"] for r in results["runs"]}) == len({r["test_tokens"] for r in selected}) == 1
    assert results["scored_tokens"] == {"validation": selected[0]["val_tokens"], "test": selected[0]["test_tokens"]}
    assert results["baselines"]["tokens"] == selected[0]["test_tokens"] and results["baselines"]["split"] == "test"
    docs = [runner.document_losses(r["run_dir"], "test") for r in selected]
    for r, d in zip(selected, docs):
        np.testing.assert_array_equal(d["doc_ids"], docs[0]["doc_ids"])
        np.testing.assert_array_equal(d["tokens"], docs[0]["tokens"])
        assert d["loss_sum"].sum() / d["tokens"].sum() == pytest.approx(r["test_loss"], rel=1e-12)
    assert results["environment"]["commit"] and "jaxlib" in results["environment"]
    report = open(os.path.join(workdir, "report.md")).read()
    for text in ("## Budget: tokens", "Learning rate chosen on the validation split", "| test loss |",
                 "**test** split", "the curves during training read 16 windows spread evenly over the split",
                 f"{selected[0]['test_tokens']:,} test tokens, the same for every arm", "interpolated bigram",
                 "no verdict",
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


@pytest.mark.slow  # a three-run study trained end to end, killed and resumed (shared by these tests)
def test_test_scores_written_at_a_runs_end_never_move_a_choice(tiny_run, tmp_path, monkeypatch):
    """The test file each run gets when it finishes is sealed until selection: rewrite a run that was not chosen to
    the lowest test loss possible and every choice stays; copied without checkpoints (all a settled run has), the
    study resumes elsewhere and reports the same numbers without training or evaluating anything."""
    study, workdir, results, _ = tiny_run
    copy = str(tmp_path / "copy")
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("study.claim", "train.lock"))
    for r in results["runs"]:
        if not r["selected"]:
            path = runner.test_eval_path(r["run_dir"].replace(workdir, copy), r["steps"])
            ev = json.load(open(path))
            json.dump(ev | {"val_loss": 0.0}, open(path, "w"))
    monkeypatch.setattr(trainer, "train", lambda *a, **k: pytest.fail("trained a finished run"))
    monkeypatch.setattr(eval_lib, "evaluate_workdir", lambda *a, **k: pytest.fail("evaluated again"))
    again = runner.run_study(study, copy, command="tiny study", devices=jax.devices()[:1], log=lambda m: None)
    assert again["selected_lrs"] == results["selected_lrs"]
    assert [(r["selected"], r.get("test_loss")) for r in again["runs"]] == [
        (r["selected"], r.get("test_loss")) for r in results["runs"]]


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


def test_a_run_two_budgets_share_is_trained_once_and_recorded_under_both(tmp_path, monkeypatch):
    """moe_short, the reference, runs 6 steps under both budgets: the runner trains it once (in the tokens dir) and
    records it under each budget; dense_long's steps differ between budgets, so it trains twice."""
    s = tiny_study("/nonexistent")
    s.lr_grid = ml_collections.ConfigDict()
    s.budget.kinds = ("tokens", "model_flops")
    trained = []

    def fake_train(config, rdir, **kw):
        trained.append(os.path.relpath(rdir, tmp_path))
        summary = {"finished": True, "step": config.train.steps, "tokens": config.train.steps * 128, "wall_time": 1.0}
        with open(os.path.join(rdir, trainer.SUMMARY_FILE), "w") as f:
            json.dump(summary, f)
        return summary

    monkeypatch.setattr(trainer, "train", fake_train)
    monkeypatch.setattr(runner, "evaluate_split", lambda rdir, step, split, devices=None: {
        "val_loss": 3.0, "val_accuracy": 0.3, "val_perplexity": 20.0, "val_tokens": 1000})
    settled = []
    monkeypatch.setattr(runner, "settle", lambda study, planned, run, step, devices=None: settled.append(run.run_dir))
    planned, records, _ = runner.train_and_select(s, str(tmp_path), plan_lib.plan(s, str(tmp_path)), log=lambda m: None)
    assert settled == [r["run_dir"] for r in records]  # the shared run is settled on each visit (settle is idempotent)
    assert sorted(trained) == sorted(os.path.join(k, a, "seed0") for k, a in (
        ("tokens", "moe_short"), ("tokens", "dense_long"), ("model_flops", "dense_long")))
    assert [(r["kind"], r["arm"], r["steps"]) for r in records] == [
        ("tokens", "moe_short", 6), ("tokens", "dense_long", 6), ("model_flops", "moe_short", 6),
        ("model_flops", "dense_long", records[3]["steps"])] and records[3]["steps"] != 6
    assert records[2]["run_dir"] == records[0]["run_dir"] == str(tmp_path / "tokens" / "moe_short" / "seed0")
    assert [r.same_as for r in planned["runs"]] == ["", "", "tokens", ""]


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


# ---------------------------------------------------------------------------------------------------------------
# Learning rates bracketed per arm (no training: records made up from a known loss curve in the learning rate)


def made_up_records(planned, optimum: float) -> list[dict]:
    """One record per planned run whose final validation loss is (ln lr - ln optimum)^2 (+ a replicate offset)."""
    out = []
    for run in planned["runs"]:
        lr = run.lr if run.lr is not None else 0.02
        out.append({"kind": run.kind, "arm": run.arm, "lr": run.lr, "label": run.label, "replicate": run.replicate,
                    "run_dir": run.run_dir, "steps": run.steps, "selected": True,
                    "val_loss": 3.0 + (np.log(lr) - np.log(optimum)) ** 2 + 0.001 * run.seed})
    return out


def bracketing_study():
    s = tiny_study("/nonexistent")
    s.seeds = (0, 1, 2)
    s.lr_grid = ml_collections.ConfigDict({"moe_short": (0.04, 0.01, 0.02)})
    s.lr_extend = 1
    s.lr_select_replicates = 1
    s.lr_tied = (("optim.adamw_lr", 0.15),)
    return s


def test_selection_replicates_run_the_grid_and_the_others_only_the_chosen_rate():
    s = bracketing_study()
    p = plan_lib.plan(s, "/w")
    moe = {(r.replicate, r.lr) for r in p["runs"] if r.arm == "moe_short"}
    assert moe == {("seed0", 0.01), ("seed0", 0.02), ("seed0", 0.04)}  # seeds 1, 2 wait for the choice
    assert all(r.config.optim.adamw_lr == pytest.approx(0.15 * r.config.optim.muon_lr) for r in p["runs"]
               if r.arm == "moe_short")  # AdamW tied to the swept Muon rate
    p = plan_lib.plan(s, "/w", chosen={"tokens": {"moe_short": 0.02}})
    moe = {(r.replicate, r.lr) for r in p["runs"] if r.arm == "moe_short"}
    assert moe == {("seed0", 0.01), ("seed0", 0.02), ("seed0", 0.04), ("seed1", 0.02), ("seed2", 0.02)}
    assert len([r for r in p["runs"] if r.arm == "dense_long"]) == 3  # no grid: every replicate at its own rate
    # the selection ignores the non-selection replicates, so their runs cannot move the choice
    recs = made_up_records(p, 0.018)
    for r in recs:
        if r["replicate"] != "seed0":
            r["val_loss"] = -1.0
    from moe_jax.studies import report as report_lib
    sel = report_lib.select_lrs(p, recs)["tokens"]["moe_short"]
    assert (sel["lr"], sel["status"], sel["grid"]["0.02"]["n"]) == (0.02, "bracketed", 1)


@pytest.mark.parametrize("optimum, first, grown, final, status", [
    (0.025, 0.02, None, 0.02, "bracketed"),  # inside the grid: nothing to extend
    (0.045, 0.04, 0.08, 0.04, "bracketed"),  # top edge: 0.08 is added and is worse, so 0.04 is now bracketed
    (0.001, 0.01, 0.005, 0.005, "edge"),  # bottom edge, still on it after the one allowed extension
])
def test_a_choice_on_the_grid_edge_extends_the_grid_or_is_marked_edge(optimum, first, grown, final, status):
    from moe_jax.studies import report as report_lib

    s = bracketing_study()
    p = plan_lib.plan(s, "/w")
    sel = report_lib.select_lrs(p, made_up_records(p, optimum))
    assert sel["tokens"]["moe_short"]["lr"] == first
    grids = plan_lib.grow_grids(p, sel)
    if grown is None:
        assert grids is None and sel["tokens"]["moe_short"]["status"] == "bracketed"
        return
    assert grids["tokens"]["moe_short"] == sorted([0.01, 0.02, 0.04, grown])
    p = plan_lib.plan(s, "/w", grids=grids)
    assert {(r.replicate, r.lr) for r in p["runs"] if r.arm == "moe_short"} == {
        ("seed0", lr) for lr in grids["tokens"]["moe_short"]}
    sel = report_lib.select_lrs(p, made_up_records(p, optimum))
    s_arm = sel["tokens"]["moe_short"]
    assert (s_arm["lr"], s_arm["status"], s_arm["extensions"]) == (final, status, 1)
    assert plan_lib.grow_grids(p, sel) is None  # lr_extend = 1: no second extension
    held = report_lib.withheld_arms(sel["tokens"])
    assert ("moe_short" in held) == (status == "edge")
    if status == "edge":
        assert "on the edge of its grid" in held["moe_short"] and "after 1 extension" in held["moe_short"]
        v = report_lib.verdicts({"moe_short": {"runs": []}, "dense_long": {"runs": []}}, "val_loss",
                                [("moe_short", "dense_long")], withheld=held)
        assert v[0]["decision"] == "no verdict"  # no runs at all; with runs the edge arm's verdict is withheld


def test_lr_from_runs_the_source_arms_choice_and_arm_kinds_sets_its_steps():
    """The seed's SmallBatch as the seed defined it: the reference arm's learning rate and as many micro-batches
    as the reference arm (so, at twice the accumulation, half the optimizer steps and tokens)."""
    s = bracketing_study()
    s.arms.moe_seedlike = ml_collections.ConfigDict({"train": {"batch_size": 2, "grad_accum": 2}})
    s.arm_names = "moe_short,dense_long,moe_seedlike"
    s.lr_from = ml_collections.ConfigDict({"moe_seedlike": "moe_short"})
    s.budget.arm_kinds = ml_collections.ConfigDict({"moe_seedlike": "micro_batches"})
    p = plan_lib.plan(s, "/w")
    assert not [r for r in p["runs"] if r.arm == "moe_seedlike"]  # waits for moe_short's choice
    p = plan_lib.plan(s, "/w", chosen={"tokens": {"moe_short": 0.02}})
    seedlike = [r for r in p["runs"] if r.arm == "moe_seedlike"]
    ref = next(r for r in p["runs"] if r.arm == "moe_short")
    assert [r.lr for r in seedlike] == [0.02] * 3 and ref.steps == 6
    assert all(r.steps == 3 and r.costs["tokens"] == ref.costs["tokens"] // 2 for r in seedlike)
    assert all(r.costs["micro_batches"] == ref.costs["micro_batches"] for r in seedlike)
    from moe_jax.studies import report as report_lib
    sel = report_lib.select_lrs(p, made_up_records(p, 0.025))["tokens"]
    assert sel["moe_seedlike"]["from"] == "moe_short" and sel["moe_seedlike"]["lr"] == sel["moe_short"]["lr"]
    table = "\n".join(report_lib.budget_table(p, "tokens"))
    assert "| moe_seedlike | moe_short's choice |" in table
    assert "moe_seedlike: steps set by the micro_batches convention" in table and "-50.0% of the budget" in table
    s.lr_from.moe_seedlike = "dense_long"
    with pytest.raises(config_lib.ConfigError, match="config.lr_from.moe_seedlike"):
        plan_lib.plan(s, "/w")


def test_train_and_select_trains_the_extension_then_the_other_replicates(tmp_path, monkeypatch):
    """The runner's loop with a made-up trainer and evaluation (whole-split validation loss (ln lr - ln 0.045)^2):
    grid 0.01-0.04 on seed 0, then 0.08 (top edge), then seeds 1 and 2 at the chosen 0.04; a second call trains
    nothing new."""
    s = bracketing_study()
    trained, losses = [], {}

    def fake_run_one(config, rdir, devices=None):
        rel = os.path.relpath(rdir, tmp_path)
        skipped = rel in trained  # finished before: the real run_one skips it
        trained.extend([] if skipped else [rel])
        losses[rdir] = 3.0 + (np.log(config.optim.muon_lr) - np.log(0.045)) ** 2 + 0.001 * config.seed
        return {"step": config.train.steps, "tokens": 0, "finished": True, "skipped": skipped}

    def fake_evaluate(rdir, step, split, devices=None):
        assert split == "validation" and os.path.relpath(rdir, tmp_path) in trained
        return {"val_loss": losses[rdir], "val_accuracy": 0.0, "val_perplexity": 1.0, "val_tokens": 100}

    monkeypatch.setattr(runner, "run_one", fake_run_one)
    monkeypatch.setattr(runner, "evaluate_split", fake_evaluate)
    monkeypatch.setattr(runner, "settle", lambda *a, **k: None)  # test scoring and pruning: the tiny_run tests
    p, records, sel = runner.train_and_select(s, str(tmp_path), plan_lib.plan(s, str(tmp_path)), log=lambda m: None)
    assert sel["tokens"]["moe_short"]["lr"] == 0.04 and sel["tokens"]["moe_short"]["status"] == "bracketed"
    moe = [t for t in trained if t.startswith("moe_short")]
    first = {f"moe_short/lr{lr:g}/seed0" for lr in (0.01, 0.02, 0.04)}
    assert set(moe[:3]) == first and moe[3] == "moe_short/lr0.08/seed0"  # the extension, once the grid is done
    assert set(moe[4:]) - first - {moe[3]} == {"moe_short/lr0.04/seed1", "moe_short/lr0.04/seed2"}
    assert [r["selected"] for r in records if r["arm"] == "moe_short"] == [
        r["lr"] == 0.04 for r in records if r["arm"] == "moe_short"]
    assert len(records) == len(p["runs"]) == 4 + 2 + 3 and {r["val_tokens"] for r in records} == {100}
    again = runner.train_and_select(s, str(tmp_path), plan_lib.plan(s, str(tmp_path)), log=lambda m: None)
    assert len(trained) == 4 + 2 + 3 and again[2] == sel  # a re-run retraces the same decisions, trains nothing


def test_a_run_stopped_by_a_signal_stops_the_study_unevaluated(tmp_path, monkeypatch):
    """A run whose trainer returns unfinished (a SIGTERM saved step 3 of 6) ends the study with StudyStopped naming
    the run and step: it is not evaluated, not recorded as trained and no later run starts (the bug: a study went on
    and scored a run stopped at step 868 of 1,060 as trained)."""
    s = bracketing_study()
    started, evaluated = [], []

    def fake_run_one(config, rdir, devices=None):
        started.append(rdir)
        return {"step": 3, "tokens": 0, "finished": False, "skipped": False, "stop_reason": "signal SIGTERM"}

    monkeypatch.setattr(runner, "run_one", fake_run_one)
    monkeypatch.setattr(runner, "evaluate_split", lambda *a, **k: evaluated.append(a))
    with pytest.raises(runner.StudyStopped, match=r"stopped at step 3 of \d+ \(signal SIGTERM\) and saved it; run "
                                                   r"the same command again"):
        runner.train_and_select(s, str(tmp_path), plan_lib.plan(s, str(tmp_path)), log=lambda m: None)
    assert len(started) == 1 and evaluated == []


STOPPED_PROGRAM = """
import sys
from moe_jax import cli
from moe_jax.studies import __main__ as command, runner


def stopped(*args, **kwargs):
    raise runner.StudyStopped("moe_short lr0.02 seed0 stopped at step 3 of 6 (signal SIGTERM) and saved it; run the "
                              "same command again to resume the study")


runner.run_study = stopped
sys.argv = ["moe_jax.studies", "--config", sys.argv[1], "--workdir", sys.argv[2]]
cli.run(command.main, command.define_flags)
"""


def test_the_study_command_exits_3_with_one_line_when_a_run_was_stopped(tmp_path):
    """`python -m moe_jax.studies` ends a study whose run a signal stopped as `python -m moe_jax.train` ends that
    run: one line on stderr and status 3 (preemption.EXIT_PREEMPTED: resubmit to resume)."""
    import subprocess
    import sys

    from moe_jax.train import preemption

    p = subprocess.run([sys.executable, "-c", STOPPED_PROGRAM, os.path.join(ROOT, "configs", "studies",
                        "smallbatch.py:tiny"), str(tmp_path / "study")], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == preemption.EXIT_PREEMPTED, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.startswith("study stopped:")]
    assert lines == ["study stopped: moe_short lr0.02 seed0 stopped at step 3 of 6 (signal SIGTERM) and saved it; "
                     "run the same command again to resume the study"], p.stderr


def test_two_processes_share_a_study_through_run_claims(tmp_path):
    """A run claimed by another process is skipped, the others done, and it is taken up once the claim is gone."""
    import fcntl
    import threading

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    os.makedirs(a)
    fd = os.open(os.path.join(a, runner.CLAIM_FILE), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # "the other process" holds run a
    threading.Timer(0.3, os.close, (fd,)).start()
    order, waits = [], []
    out = runner.each_claimed([a, b], lambda d: d, lambda d: order.append(d) or len(order), waits.append, poll=0.1)
    assert order == [b, a] and out == {b: 1, a: 2} and waits
    with runner.claim(a) as mine:
        assert mine
        with runner.claim(a) as other:
            assert not other


def test_per_lr_figure_names_every_arm_once_even_an_arm_that_runs_one_rate(tmp_path, monkeypatch):
    """The per-learning-rate figure's legend lists each arm once, in arm order, including an arm (lr_from) that only
    appears in a later panel than the first."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moe_jax.studies import plots as plots_lib

    curve = [{"tokens": 10, "val_loss": 5.0}, {"tokens": 20, "val_loss": 4.0}]
    records = [{"kind": "k", "arm": a, "lr": lr, "curve": curve}
               for a, lrs in (("A", (0.02, 0.04)), ("B", (0.02, 0.04)), ("C", (0.04,))) for lr in lrs for _ in (0, 1)]
    seen, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig: seen.append(
        [t.get_text() for t in fig.axes[0].get_legend().get_texts()]) or close(fig))
    written = []
    plots_lib._per_lr_plot(plt, str(tmp_path), "", "k", records, [0.02, 0.04], "optim.muon_lr", ["A", "B", "C"],
                           {"A": "C0", "B": "C1", "C": "C2"}, written)
    assert seen == [["A", "B", "C"]] and written == [str(tmp_path / "val_loss_per_lr.png")]
