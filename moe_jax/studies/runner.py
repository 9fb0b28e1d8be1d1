"""Execute a planned study: train every run (skipping finished ones, resuming interrupted ones), choose each arm's
learning rate on the validation split, report the chosen runs on the test split, and write the report.

Order. Runs are executed replicate-major (replicate 1: every arm, replicate 2: every arm, ...), so a period of heavy
machine load falls on all arms alike rather than on one arm's seeds; the wall seconds in the tables are therefore
comparable across arms.

Resumability. Each run is an ordinary moe_jax.train workdir (orbax checkpoints, metrics.jsonl, summary.json). A run
whose summary says finished at its planned step is never trained again; an interrupted one resumes from its last
checkpoint; a run dir started with a different config is refused; a run two budgets share (plan.py, "Shared runs") is
trained by the first and found finished by the second. A run that a signal stopped (it saved its step)
stops the study (StudyStopped; `python -m moe_jax.studies` exits 3 as `moe_jax.train` does): it is not evaluated
and no other run starts, so nothing unfinished is ever scored.

Evaluation. When a run finishes, its final checkpoint is scored on the whole validation split (the learning rate is
chosen on it) and, where the study reports test, on the whole test split: every target token of the split exactly
once, each arm at its own sequence length (data.pipeline.tile_windows), whatever data.max_val_windows says about the
curves during training; so every arm is scored on the same tokens, and the report refuses runs whose token counts
differ. Each evaluation is written once, as eval_step<N>.json / eval_test_step<N>.json in the run dir with the
per-document results in eval_step<N>_docs.npz / eval_test_step<N>_docs.npz beside it (`document_losses` reads them),
and read back afterwards. The test file is sealed until selection: choosing and bracketing learning rates reads the
validation files only, and the report reads the test file of the selected runs only (a run that is not selected has
one, unread). Scoring test at the end of the run rather than after selection is what lets a finished run drop its
checkpoints (`settle`, study.keep_checkpoints): its record is then about 100 kB (config, metrics, evaluations,
routing diagnostics), so a study's finished runs can be copied to another machine or kept in version control and the
study resumed there without retraining them. The unigram and bigram baselines (baselines.py) are scored on the same
tokens. A wall_seconds budget's calibration is written to <workdir>/calibration.json and reused, so a re-run plans the
same steps.

Learning rates. The selection replicates run every value of each arm's grid; the rate of lowest mean validation loss
is chosen; a choice on the grid's edge grows the grid by one geometric step beyond it (plan.grow_grids, up to
lr_extend steps) and the new runs are trained before choosing again; then the other replicates run the chosen rate.
Everything is decided from finished runs' files, so a re-run of the command retraces the same decisions.

Two processes, one study. The same command may run twice on one workdir (e.g. one per core, `taskset -c 0` and
`taskset -c 1`): each run dir is claimed (an flock on <run dir>/study.claim) by the process that trains or evaluates
it; the other process takes the next unclaimed run and waits where it needs a run the first is still on (before
choosing learning rates and before the report). Both write the same report.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import time

import numpy as np

from moe_jax.config import runs
from moe_jax.train import metrics as metrics_lib
from moe_jax.studies import baselines as baselines_lib
from moe_jax.studies import plan as plan_lib

CALIBRATION_FILE = "calibration.json"
CLAIM_FILE = "study.claim"
POLL_SECONDS = 20.0


@contextlib.contextmanager
def claim(rdir: str):
    """Yields True while this process holds the run dir's claim (a non-blocking flock on <rdir>/study.claim),
    False at once when another process holds it. Released on exit, and by the kernel if the process dies."""
    os.makedirs(rdir, exist_ok=True)
    fd = os.open(os.path.join(rdir, CLAIM_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def each_claimed(items, rdir_of, work, log=print, poll: float = POLL_SECONDS) -> dict:
    """work(item) for every item, in order, each under its run dir's claim; items another process holds are taken
    up again after the rest (waiting `poll` seconds when nothing else is left) until every one is done here or
    found done. Returns {run dir: work's result}."""
    pending, out = list(items), {}
    while pending:
        waiting = []
        for item in pending:
            with claim(rdir_of(item)) as mine:
                if mine:
                    out[rdir_of(item)] = work(item)
                else:
                    waiting.append(item)
        if waiting and len(waiting) == len(pending):
            log(f"waiting for {len(waiting)} run(s) held by another process of this study ...")
            time.sleep(poll)
        pending = waiting
    return out


def check_run_dir(config, rdir: str) -> None:
    """Refuse a run dir whose config.json differs from `config` (a RunConfig; resuming it would mix two experiments;
    config.runs.check_rerun, RERUN_IGNORED aside)."""
    path = os.path.join(rdir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        runs.check_rerun(json.load(f), config, rdir)


class StudyStopped(Exception):
    """A run stopped before its last step (a signal or maintenance event: it saved that step). The study stops too:
    evaluating, choosing rates from or going on past an unfinished run would record it as trained."""


def finished_summary(config, rdir: str) -> dict | None:
    from moe_jax.train import loop as trainer

    path = os.path.join(rdir, trainer.SUMMARY_FILE)
    if os.path.exists(path):
        with open(path) as f:
            summary = json.load(f)
        if summary.get("finished") and summary.get("step") == config.train.steps:
            return summary
    return None


def run_one(config, rdir: str, devices=None) -> dict:
    """Train one run unless its summary says it finished; returns the summary with 'skipped'."""
    from moe_jax.train import loop as trainer

    check_run_dir(config, rdir)
    done = finished_summary(config, rdir)
    if done is not None:
        return done | {"skipped": True}
    ckpt_dir = os.path.join(rdir, "checkpoints")
    if not (os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir))):
        # killed before its first checkpoint: it starts over, so drop the records of the lost attempt
        metrics_lib.truncate_after(rdir, 0)
    return trainer.train(config, rdir, devices=devices) | {"skipped": False}


def eval_path(rdir: str, step: int, split: str = "test") -> str:
    """The run's evaluation JSON of `split` at `step` (eval.result_paths); its per-document .npz lies beside it."""
    from moe_jax import eval as eval_lib

    return eval_lib.result_paths(rdir, split, step)[0]


def test_eval_path(rdir: str, step: int) -> str:
    return eval_path(rdir, step, "test")


def evaluate_split(rdir: str, step: int, split: str, devices=None) -> dict:
    """The run's checkpoint at `step` on the whole `split` ('validation' or 'test'): every target token of the split
    exactly once, at the run's own sequence length (eval.evaluate_workdir(whole_split=True)), with val_tokens (the
    tokens scored) and the per-document .npz. Computed once, then read back (a file that is not of the whole split,
    or has no .npz beside it, is computed again)."""
    from moe_jax import eval as eval_lib

    path, docs = eval_lib.result_paths(rdir, split, step)
    if os.path.exists(path) and os.path.exists(docs):
        with open(path) as f:
            result = json.load(f)
        if result.get("whole_split"):
            return result | {"skipped": True}
    return eval_lib.evaluate_workdir(rdir, step=step, devices=devices, split=split, whole_split=True) | {
        "skipped": False}


def evaluate_test(rdir: str, step: int, devices=None) -> dict:
    """The run's final checkpoint on the whole test split (`evaluate_split`)."""
    return evaluate_split(rdir, step, "test", devices)


def document_losses(rdir: str, split: str, devices=None) -> dict:
    """Per document of the whole `split` ('validation' or 'test'), the finished run's final checkpoint (its
    summary.json step): {'tokens': int64 [n], 'loss_sum': float64 [n] (nats), 'doc_ids': int64 [n] (the source's
    document indices, in split order: the same order for every arm of a study)}. Evaluated once (`evaluate_split`),
    then read from the .npz beside the evaluation JSON."""
    from moe_jax import eval as eval_lib
    from moe_jax.train import loop as trainer

    if split not in ("validation", "test"):
        raise ValueError(f"split must be 'validation' or 'test', got {split!r}")
    path = os.path.join(rdir, trainer.SUMMARY_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: the run has not finished; train it first")
    with open(path) as f:
        step = int(json.load(f)["step"])
    evaluate_split(rdir, step, split, devices)
    with np.load(eval_lib.result_paths(rdir, split, step)[1]) as z:
        return {"tokens": z["tokens"].astype(np.int64), "loss_sum": z["loss_sum"].astype(np.float64),
                "doc_ids": z["doc_ids"].astype(np.int64)}


def settle(study, planned: dict, run, step: int, devices=None) -> None:
    """A finished run's last work: environment.json (report.environment: the CPU or accelerator, library versions
    and code commit of the machine that finished it; a study resumed elsewhere records each run's own), its
    whole-test-split evaluation where the study reports test (sealed until selection, runner docstring); then, where study.keep_checkpoints is False (configs/studies; a study without the field,
    e.g. moe_jax.compare's, keeps them), its routing diagnostics when it is an MoE (<rdir>/routing/, moe_jax.routing,
    which needs the checkpoint) and the removal of its checkpoints (nothing after this reads them). Idempotent: a run
    settled before (or killed half way) is completed, never recomputed."""
    from moe_jax.studies import report as report_lib
    from moe_jax.tools import routing as routing_lib

    rdir = run.run_dir
    ckpt_dir = os.path.join(rdir, "checkpoints")
    if not os.path.exists(os.path.join(rdir, report_lib.ENVIRONMENT_FILE)):
        metrics_lib.write_json(rdir, report_lib.ENVIRONMENT_FILE, report_lib.environment())
    if planned["report_split"] == "test":
        evaluate_split(rdir, step, "test", devices)
    if bool(study.get("keep_checkpoints", True)) or not os.path.isdir(ckpt_dir):
        return
    routing_json = os.path.join(rdir, routing_lib.OUT_DIR, routing_lib.FILES[0])
    if run.config.moe.num_experts and not os.path.exists(routing_json):
        routing_lib.run(rdir, step)
    shutil.rmtree(ckpt_dir)


def calibrate(study, workdir: str, devices=None) -> dict:
    """Seconds per training step of every arm (a learning rate changes no step's cost), from a short run of
    budget.calibration_steps steps each (median over its logging intervals after the first), kept in
    <workdir>/calibration.json and reused. One process calibrates; another of the same study waits for the file."""
    from moe_jax.train import loop as trainer

    path = os.path.join(workdir, CALIBRATION_FILE)
    while not os.path.exists(path):
        with claim(os.path.join(workdir, "calibration")) as mine:
            if not mine:
                time.sleep(POLL_SECONDS)
                continue
            steps = int(study.budget.get("calibration_steps", 30))
            tokens_study = plan_lib.copy_config(study)  # the same arms, planned under a token budget
            tokens_study.budget.kinds = ("tokens",)
            tokens_study.budget.arm_kinds = {}
            p = plan_lib.plan(tokens_study, workdir)
            measured = {}
            for arm in p["arms"]:
                run = next(r for r in p["runs"] if r.arm == arm)
                c = run.config.replace(train=dict(steps=steps, log_every=max(1, steps // 6), eval_every=steps,
                                                  checkpoint_every=steps, plots=False))
                s = trainer.train(c, os.path.join(workdir, "calibration", arm), devices=devices)
                measured[arm] = plan_lib.budget_lib.tokens_per_step(c) / s["tokens_per_s"]
            metrics_lib.write_json(workdir, CALIBRATION_FILE, measured)
    with open(path) as f:
        return json.load(f)


def plan_study(study, workdir: str, devices=None, calibrate_now: bool = True) -> dict:
    kinds = plan_lib.budget_kinds(study)
    seconds = None
    if "wall_seconds" in kinds:
        seconds = calibrate(study, workdir, devices) if calibrate_now else None
    return plan_lib.plan(study, workdir, seconds_per_step=seconds)


def train_and_select(study, workdir: str, planned: dict, devices=None, log=print) -> tuple[dict, list, dict]:
    """Train the planned runs, choose learning rates, grow grids whose choice sits on an edge and train the new
    values, then add and train the other replicates' runs of the chosen rates (runner docstring). Returns the final
    (planned, records, selected)."""
    from moe_jax.studies import report as report_lib

    seconds = None
    if "wall_seconds" in planned["kinds"]:
        seconds = calibrate(study, workdir, devices)

    trained = set()  # run dirs trained by this call (a record's 'skipped' is False for them)

    def train(run):
        summary = run_one(run.config, run.run_dir, devices=devices)
        if not summary.get("finished"):
            raise StudyStopped(f"{run.kind} {run.label} {run.replicate} stopped at step {summary['step']} of "
                               f"{run.config.train.steps} ({summary.get('stop_reason') or 'interrupted'}) and saved "
                               "it; run the same command again to resume the study")
        if not summary["skipped"]:
            trained.add(run.run_dir)
        ev = evaluate_split(run.run_dir, int(summary["step"]), "validation", devices=devices)
        settle(study, planned, run, int(summary["step"]), devices)
        how = "skipped (finished)" if summary["skipped"] else "trained"
        log(f"{run.kind} {run.label} {run.replicate}: {how}{f' (its {run.same_as} run)' if run.same_as else ''}; "
            f"val_loss {ev['val_loss']} on the whole validation split ({ev['val_tokens']} tokens)")
        return summary, ev

    while True:
        done = each_claimed(planned["runs"], lambda r: r.run_dir, train, log)
        records = []
        for run in planned["runs"]:
            summary, ev = done[run.run_dir]
            rec = report_lib.record(run, summary | {"skipped": run.run_dir not in trained})
            rec.update(val_loss=ev["val_loss"], val_accuracy=ev["val_accuracy"],
                       val_perplexity=ev["val_perplexity"], val_tokens=ev["val_tokens"])
            records.append(rec)
        selected = report_lib.select_lrs(planned, records)
        grids = plan_lib.grow_grids(planned, selected)
        chosen = {k: {a: s["lr"] for a, s in per.items()} for k, per in selected.items() if per}
        if grids is None and chosen == planned["chosen"]:
            return planned, records, selected
        if grids is not None:
            log("learning rate on a grid's edge: grids now " + "; ".join(
                f"{k} {a} {g}" for k, per in grids.items() for a, g in per.items() if g))
        planned = plan_lib.plan(study, workdir, seconds, grids or planned["kind_grids"], None if grids else chosen)


def as_lists(x):
    """numpy arrays (and scalars) inside dicts and lists -> lists and Python numbers, for results.json."""
    if isinstance(x, dict):
        return {k: as_lists(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [as_lists(v) for v in x]
    return x.tolist() if hasattr(x, "tolist") else x


def run_study(study, workdir: str, command: str = "", devices=None, log=print) -> dict:
    """Plan, train every run (replicate-major; learning rates chosen and bracketed on validation), evaluate the
    selected runs on test once (with their per-document losses), score the baselines on the same split, and write
    report.md, results.json and plots/ into `workdir`. Returns the results dict."""
    from moe_jax.studies import report as report_lib

    planned = plan_study(study, workdir, devices)
    for line in report_lib.describe_plan(planned):
        log(line)
    planned, records, selected = train_and_select(study, workdir, planned, devices, log)
    split = planned["report_split"]
    if split == "test":
        def evaluate(rec):
            ev = evaluate_test(rec["run_dir"], rec["steps"], devices=devices)
            rec.update(test_loss=ev["val_loss"], test_accuracy=ev["val_accuracy"],
                       test_perplexity=ev["val_perplexity"], test_tokens=ev["val_tokens"],
                       test_documents=as_lists(document_losses(rec["run_dir"], "test", devices)))
            return rec

        each_claimed([r for r in records if r["selected"]], lambda r: r["run_dir"], evaluate, log)
    report_lib.scored_tokens(records)  # one error, before anything is written, if arms were scored on other tokens
    base = baselines_lib.evaluate(planned["runs"][0].config, split)
    results = report_lib.write(workdir, study, planned, records, selected, command or " ".join(sys.argv),
                               baselines=report_lib.baseline_summary(base, split))
    log(f"report: {os.path.join(workdir, report_lib.REPORT_FILE)}")
    return results
