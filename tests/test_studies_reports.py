"""The committed study reports (docs/studies/<name>/) are the output of their configs (configs/studies/<name>.py, at
the scale named in the recorded command): the same arms, replicates, learning-rate grids, steps and costs as the
planner and the FLOP counter give now, tables whose means equal results.json, a report.md that report.write
reproduces byte for byte from results.json, and the report's rules: baselines on the same tokens, a headline that
gives no ranking where an arm does not beat the bigram, Holm-adjusted verdicts over the stated family, no verdict for
an arm whose learning rate stayed on its grid's edge, 5 replicates where a verdict is drawn. A study whose report is
not committed yet, or was written before these rules (no 'lr_protocol' in its results.json), is skipped, by name.
The rules themselves are checked on made-up results below."""

from __future__ import annotations

import json
import math
import os
import re
import shutil

import pytest

from moe_jax.model import flops
from moe_jax.cli import load_module
from moe_jax.studies import plan as plan_lib
from moe_jax.studies import report as report_lib
from moe_jax.studies import stats
from study_helpers import markdown_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDIES = ("dense_vs_moe", "batch_vs_seqlen", "architecture", "smallbatch")





def committed(name: str) -> tuple[str, dict]:
    """(docs dir, results) of a committed study in the current format; skips otherwise."""
    docs = os.path.join(ROOT, "docs", "studies", name)
    if not os.path.exists(os.path.join(docs, "results.json")):
        pytest.skip(f"docs/studies/{name}/ is not committed yet (see configs/studies/{name}.py for its command)")
    results = json.load(open(os.path.join(docs, "results.json")))
    if "lr_protocol" not in results:
        pytest.skip(f"docs/studies/{name}/ predates the report rules of issue 27 (baselines, Holm, bracketed "
                    f"learning rates); rerun configs/studies/{name}.py")
    return docs, results


def final_plan(study, results: dict, workdir: str = "") -> dict:
    """The plan the study ended with: its grids as extended and its chosen learning rates (selected_lrs)."""
    grids = {k: dict(v) for k, v in plan_lib.plan(study, workdir)["kind_grids"].items()}
    for kind, per in results["selected_lrs"].items():
        for arm, s in per.items():
            if not s["from"]:
                grids[kind][arm] = sorted(float(v) for v in s["grid"])
    chosen = {k: {a: s["lr"] for a, s in per.items()} for k, per in results["selected_lrs"].items() if per}
    return plan_lib.plan(study, workdir, grids=grids, chosen=chosen)


@pytest.mark.parametrize("name", STUDIES)
def test_committed_study_report_matches_its_config_and_the_counter(name):
    docs, results = committed(name)
    report = open(os.path.join(docs, "report.md")).read()
    m = re.fullmatch(rf"python -m moe_jax\.studies --config configs/studies/{name}\.py(?::(\w+))? --workdir \S+",
                     results["command"])
    assert m, results["command"]
    study = load_module(os.path.join(ROOT, "configs", "studies", f"{name}.py")).get_config(m.group(1))
    planned = final_plan(study, results)
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
    workdir and back, so the links and commands read as recorded; the routing diagnostics committed beside the
    report are copied there, since the report links a run's diagnostics where they exist)."""
    docs, _ = committed(name)
    text = open(os.path.join(docs, "results.json")).read()
    m = re.fullmatch(rf"python -m moe_jax\.studies --config configs/studies/{name}\.py(?::(\w+))? --workdir (\S+)",
                     json.loads(text)["command"])
    recorded, workdir = m.group(2), str(tmp_path / "study")
    results = json.loads(text.replace(json.dumps(recorded)[1:-1] + "/", workdir + "/"))
    for rdir in {run["run_dir"] for run in results["runs"]}:  # a run two budgets share is listed under both
        rel = os.path.relpath(rdir, workdir)
        if os.path.exists(os.path.join(docs, rel, "routing", "routing.json")):
            shutil.copytree(os.path.join(docs, rel, "routing"), os.path.join(rdir, "routing"))
    study = load_module(os.path.join(ROOT, "configs", "studies", f"{name}.py")).get_config(m.group(1))
    planned = final_plan(study, results, workdir)
    report_lib.write(workdir, study, planned, results["runs"], results["selected_lrs"], results["command"],
                     results["environment"], baselines=results["baselines"])
    got = open(os.path.join(workdir, report_lib.REPORT_FILE)).read().replace(workdir + "/", recorded + "/")
    assert got == open(os.path.join(docs, "report.md")).read()
    assert sorted(os.listdir(os.path.join(workdir, "plots"))) == sorted(os.listdir(os.path.join(docs, "plots")))


@pytest.mark.parametrize("name", STUDIES)
def test_every_link_of_a_committed_report_resolves(name):
    """The figures and routing diagnostics a committed report.md links are committed beside it."""
    docs, _ = committed(name)
    links = re.findall(r"\]\(([^)\s]+)\)", open(os.path.join(docs, "report.md")).read())
    assert links and [x for x in links if not os.path.exists(os.path.join(docs, x))] == []


@pytest.mark.parametrize("name", STUDIES)
def test_committed_report_follows_the_rules(name):
    """Baselines on the runs' test tokens; the headline's ranking rule; Holm over the whole family; edge arms
    without verdicts; 5 replicates behind every verdict; intervals with the document bootstrap."""
    docs, results = committed(name)
    report = open(os.path.join(docs, "report.md")).read()
    head = report.split("## Headline")[1].split("Command:")[0]
    base = results["baselines"]
    assert base and base["bigram"] < base["unigram"] and base["split"] == "test"
    selected = [r for r in results["runs"] if r["selected"]]
    assert {sum(r["test_documents"]["tokens"]) for r in selected} == {base["tokens"]} == {
        sum(d["tokens"]) for d in base["documents"].values()}
    drawn = []
    for kind in results["kinds"]:
        rows = results["versus_baselines"][kind]
        beats = all(r["bigram"]["hi"] is not None and r["bigram"]["hi"] < 0 for r in rows.values())
        assert results["ranking_given"][kind] == beats
        assert ("no ranking is given" in head) or beats
        edge = {a for a, s in results["selected_lrs"].get(kind, {}).items() if s["status"] == "edge"}
        for v in results["verdicts"][kind]:
            if edge & {v["x"], v["y"]}:
                assert v["decision"] in ("withheld", "no verdict")
            elif v["decision"] not in ("withheld", "no verdict"):
                assert v["n_x"] == v["n_y"] == len(results["seeds"]) == 5 and v["documents"]
                drawn.append(v)
    assert [v["p_holm"] for v in drawn] == pytest.approx(stats.holm([v["p"] for v in drawn]))
    assert all(v["family"] == len(drawn) for v in drawn)
    assert f"The family is every verdict drawn in this study: {len(drawn)} comparisons" in report


# ---------------------------------------------------------------------------------------------------------------
# The report's rules on made-up results (no training): baselines, the headline, the ranking, Holm's family


def made_up(bigram: float, n_docs: int = 30):
    """A two-arm study (A, B; 3 paired replicates, a test split) planned but not trained; records whose test
    losses on n_docs documents are about 3.50 (A) and 3.60 (B) nats/token; baselines on the same documents
    (report.baseline_summary, as the runner gives them): unigram 5.0, bigram `bigram`."""
    from study_helpers import tiny_base
    import ml_collections
    import numpy as np

    b = tiny_base("/nonexistent")
    b.data.test_fraction = 0.05
    s = ml_collections.ConfigDict({"name": "made-up", "base": b, "seeds": (0, 1, 2), "num_evals": 2,
                                   "arms": {"A": {}, "B": {"moe": {"num_experts": 0}}}, "arm_names": "A,B",
                                   "budget": {"kinds": ("tokens",), "amount": 0.0, "reference_arm": "A",
                                              "reference_steps": 4}})
    planned = plan_lib.plan(s, "/w")
    rng = np.random.default_rng(0)
    tokens = rng.integers(300, 900, n_docs)
    difficulty = rng.normal(0, 0.3, n_docs)

    def docs(level, noise):
        loss = (level + difficulty + rng.normal(0, noise, n_docs)) * tokens
        return {"tokens": tokens.tolist(), "loss_sum": loss.tolist(), "doc_ids": list(range(100, 100 + n_docs))}

    records = []
    for run in planned["runs"]:
        d = docs(3.5 if run.arm == "A" else 3.6, 0.02)
        records.append({"kind": run.kind, "arm": run.arm, "lr": None, "label": run.label, "seed": run.seed,
                        "order": run.order, "replicate": run.replicate, "run_dir": run.run_dir, "steps": run.steps,
                        "selected": True, "curve": [], "routing": {}, "tokens_per_s": None,
                        "test_loss": sum(d["loss_sum"]) / sum(d["tokens"]), "test_documents": d,
                        "test_tokens": int(tokens.sum())})
    scored = {name: {"loss": None, "tokens": int(tokens.sum()), "documents": docs(level, 0.0)}
              for name, level in (("unigram", 5.0), ("bigram", bigram))}
    for v in scored.values():
        v["loss"] = sum(v["documents"]["loss_sum"]) / v["tokens"]
    return s, planned, records, report_lib.baseline_summary(scored | {"lambda": 0.9, "smoothing": "made up"}, "test")


def test_headline_says_when_arms_do_not_beat_the_bigram_and_gives_no_ranking(tmp_path):
    s, planned, records, baselines = made_up(bigram=3.55)  # B (3.60) does not beat it
    results = report_lib.write(str(tmp_path), s, planned, records, {}, "made up", env=ENV, baselines=baselines)
    report = open(tmp_path / report_lib.REPORT_FILE).read()
    head = report.split("## Headline")[1].split("Command:")[0]
    assert "1 of 2 arms do not beat the interpolated bigram" in head and "**no ranking is given**" in head
    assert "B +0.05" in head and "A " not in head.split("arm - bigram:")[1]
    assert "Ranking withheld" in report and "| rank | arm |" not in report
    assert results["ranking_given"] == {"tokens": False}
    rows = results["versus_baselines"]["tokens"]
    assert rows["B"]["bigram"]["hi"] > 0 > rows["A"]["bigram"]["hi"] and rows["A"]["unigram"]["hi"] < 0
    assert markdown_table(report, "arm | - unigram")[1]["beats the bigram"] == "**no**"


def test_headline_when_every_arm_beats_the_bigram_gives_the_holm_verdicts_and_a_ranking(tmp_path):
    s, planned, records, baselines = made_up(bigram=3.9)
    results = report_lib.write(str(tmp_path), s, planned, records, {}, "made up", env=ENV, baselines=baselines)
    report = open(tmp_path / report_lib.REPORT_FILE).read()
    head = report.split("## Headline")[1].split("Command:")[0]
    assert "every arm beats the interpolated bigram" in head and "**A is better** than B" in head
    assert re.search(r"by 0\.\d{3} to 0\.\d{3} nats/token", head)
    assert [r["arm"] for r in markdown_table(report, "rank | arm")] == ["A", "B"]
    v = results["verdicts"]["tokens"][0]
    assert v["decision"] == "A" and v["documents"] and v["family"] == 1 and v["p_holm"] == v["p"]
    assert results["bootstrap"] == {"samples": 2000, "documents": 30, "seed": 0}
    assert "The family is every verdict drawn in this study: 1 comparisons" in report
    # the per-document part of the interval is there and the replicate part too: se^2 = se_rep^2 + se_doc^2
    assert v["se"] ** 2 == pytest.approx(v["se_rep"] ** 2 + v["se_doc"] ** 2) and v["se_doc"] > 0


def test_no_baselines_means_no_ranking(tmp_path):
    s, planned, records, _ = made_up(bigram=3.9)
    results = report_lib.write(str(tmp_path), s, planned, records, {}, "made up", env=ENV)
    report = open(tmp_path / report_lib.REPORT_FILE).read()
    assert "no unigram/bigram baseline was scored" in report and "Ranking withheld" in report
    assert results["ranking_given"] == {"tokens": False} and results["baselines"] is None


def test_baselines_scored_on_other_documents_are_refused(tmp_path):
    s, planned, records, baselines = made_up(bigram=3.9)
    baselines["documents"]["bigram"]["doc_ids"][0] = 7
    with pytest.raises(ValueError, match="different documents"):
        report_lib.write(str(tmp_path), s, planned, records, {}, "made up", env=ENV, baselines=baselines)


def test_holm_family_spans_every_budget_and_comparison(tmp_path):
    """Two budgets x one pair: a family of 2, so each verdict's adjusted p is Holm's over both."""
    s, planned, records, baselines = made_up(bigram=3.9)
    s.budget.kinds = ("tokens", "model_flops")
    planned = plan_lib.plan(s, "/w")
    by_key = {(r["arm"], r["replicate"]): r for r in records}
    recs = [dict(by_key[(run.arm, run.replicate)], kind=run.kind, run_dir=run.run_dir) for run in planned["runs"]]
    results = report_lib.write(str(tmp_path), s, planned, recs, {}, "made up", env=ENV, baselines=baselines)
    vs = [results["verdicts"][k][0] for k in ("tokens", "model_flops")]
    assert [v["family"] for v in vs] == [2, 2]
    assert [v["p_holm"] for v in vs] == pytest.approx(stats.holm([v["p"] for v in vs]))


ENV = {"platform": "cpu", "device_kind": "cpu", "device_count": 1, "jax": "x", "cpu_count": 2}
