"""The committed study reports (docs/studies/<name>/) are the output of their configs (configs/studies/<name>.py, at
the scale named in the recorded command): the same arms, replicates, learning-rate grids, steps and costs as the
planner and the FLOP counter give now, tables whose means equal results.json, and a report.md that report.write
reproduces byte for byte from results.json. A study whose report is not committed yet is skipped, by name."""

from __future__ import annotations

import json
import math
import os
import re

import pytest

from moe_jax.model import flops
from moe_jax.cli import load_module
from moe_jax.studies import plan as plan_lib
from moe_jax.studies import report as report_lib
from study_helpers import markdown_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDIES = ("dense_vs_moe", "batch_vs_seqlen", "architecture")





@pytest.mark.parametrize("name", STUDIES)
def test_committed_study_report_matches_its_config_and_the_counter(name):
    docs = os.path.join(ROOT, "docs", "studies", name)
    if not os.path.exists(os.path.join(docs, "results.json")):
        pytest.skip(f"docs/studies/{name}/ is not committed yet (see configs/studies/{name}.py for its command)")
    results = json.load(open(os.path.join(docs, "results.json")))
    report = open(os.path.join(docs, "report.md")).read()
    m = re.fullmatch(rf"python -m moe_jax\.studies --config configs/studies/{name}\.py(?::(\w+))? --workdir \S+",
                     results["command"])
    assert m, results["command"]
    study = load_module(os.path.join(ROOT, "configs", "studies", f"{name}.py")).get_config(m.group(1))
    planned = plan_lib.plan(study, "")
    assert results["kinds"] == planned["kinds"] and results["budgets"] == planned["budgets"]
    assert results["seeds"] == [int(s) for s in study.seeds] and len(study.seeds) >= 3
    assert len(results["runs"]) == len(planned["runs"])
    for kind in planned["kinds"]:
        for arm, p in results["plans"][kind].items():
            run = next(r for r in planned["runs"] if r.kind == kind and r.arm == arm)
            assert p["steps"] == run.steps and p["model_flops"] == run.costs["model_flops"]
            assert p["executed_flops"] == run.costs["executed_flops"] and p["tokens"] == run.costs["tokens"]
            fpt = flops.run_flops_per_token(run.config)
            assert {k: fpt[k] for k in p["flops_per_token"]} == p["flops_per_token"]
            # reports written before flops.py's dispatch_overhead: for capacity dispatch it is the capacity padding
            assert fpt["dispatch_overhead"] == p["flops_per_token"].get("dispatch_overhead", fpt["capacity_padding"])
            assert p["optimizer_flops_per_step"] == flops.optimizer_flops_per_step(run.config.model, run.config.optim)
        runs = [r for r in results["runs"] if r["kind"] == kind]
        assert all(r["steps"] == next(q.steps for q in planned["runs"] if q.kind == kind and q.label == r["label"])
                   for r in runs)
        # every selected run was scored on the split the report reads; no other run touched the test split
        for r in runs:
            assert ("test_loss" in r) == (r["selected"] and results["split"] == "test")
    key = results["metric"]
    label = dict((k, lab) for k, lab, *_ in report_lib.fields(results["split"]))[key]
    rows = {r["arm"]: r for r in markdown_table(report, "arm | runs")}
    first = results["tables"][planned["kinds"][0]]
    for arm, row in rows.items():
        assert row[label].startswith(f"{first[arm][key]['mean']:.4f}")
    assert "## What this supports and what it does not" in report
    # MoE arms report per-layer routing next to the loss: one value per MoE layer for each diagnostic
    moe_runs = [r for r in results["runs"] if r.get("routing")]
    if any(planned_run.config.moe.num_experts for planned_run in planned["runs"]):
        assert moe_runs and "| arm | dropped fraction | load CV | router confidence | router entropy (nats) |" in report
        for r in moe_runs:
            c = next(q.config for q in planned["runs"] if q.label == r["label"])
            n_moe = sum(i % c.moe.every == c.moe.every - 1 for i in range(c.model.n_layers))
            assert all(len(v) == n_moe for v in r["routing"].values()), r["label"]
            assert all(0.0 <= h <= math.log(64) for h in r["routing"]["moe/router_entropy"])
    for png in ("val_loss_vs_flops.png", "throughput.png"):
        names = [f for f in os.listdir(os.path.join(docs, "plots")) if f.endswith(png)]
        assert names and all(os.path.getsize(os.path.join(docs, "plots", f)) > 1000 for f in names)


@pytest.mark.parametrize("name", STUDIES)
def test_committed_report_is_what_report_write_gives_from_its_results(name, tmp_path):
    """report.write (tables: report.py; figures: plots.py) given the committed results.json's runs reproduces the
    committed report.md byte for byte and the same figures (the run directories are mapped to a temporary
    workdir and back, so the links and commands read as recorded)."""
    docs = os.path.join(ROOT, "docs", "studies", name)
    if not os.path.exists(os.path.join(docs, "results.json")):
        pytest.skip(f"docs/studies/{name}/ is not committed yet")
    text = open(os.path.join(docs, "results.json")).read()
    m = re.fullmatch(rf"python -m moe_jax\.studies --config configs/studies/{name}\.py(?::(\w+))? --workdir (\S+)",
                     json.loads(text)["command"])
    recorded, workdir = m.group(2), str(tmp_path / "study")
    results = json.loads(text.replace(json.dumps(recorded)[1:-1] + "/", workdir + "/"))
    study = load_module(os.path.join(ROOT, "configs", "studies", f"{name}.py")).get_config(m.group(1))
    report_lib.write(workdir, study, plan_lib.plan(study, workdir), results["runs"], results["selected_lrs"],
                     results["command"], results["environment"])
    got = open(os.path.join(workdir, report_lib.REPORT_FILE)).read().replace(workdir + "/", recorded + "/")
    assert got == open(os.path.join(docs, "report.md")).read()
    assert sorted(os.listdir(os.path.join(workdir, "plots"))) == sorted(os.listdir(os.path.join(docs, "plots")))
