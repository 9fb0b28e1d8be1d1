"""The train loop: data -> compiled step -> metrics, evaluation, checkpoints; resumable and preemption-safe.

`train(config, workdir)` is the whole job behind `python -m moe_jax.train`. What it guarantees:
  * the config is validated before anything heavy, with model.dtype and model.attention 'auto' resolved for the
    backend (precision.resolve) and printed; one trainer per workdir (workdir.lock: a second one exits naming the
    holder); a resumed run's (resolved) config is checked against the run's config.json before anything is written
    (workdir.check_resume_config), and config.json is written (and appended to config_history.jsonl) only after
    a successful restore or a fresh start;
  * both steps are compiled ahead of time and their memory use is printed before step 1;
  * a workdir with checkpoints resumes from the newest intact one (params, optimizer, step, data iterator, RNG; a
    damaged step is named and skipped: checkpoint.restore_verified), and the resumed run's losses equal an
    uninterrupted run's;
  * metrics are fetched one step late, so the host never waits on the device between steps;
  * SIGTERM/SIGINT (or a Cloud TPU maintenance event) reaching any process finish the current step, and every
    process saves the same step and returns (summary['stop_reason']; the CLI exits with EXIT_PREEMPTED);
  * the step reports whether its loss, gradient norm and new state are finite: a non-finite step raises
    NonFiniteError (train.on_nonfinite='stop') naming the step and the newest checkpoint, before any save of the bad
    state, or has its update dropped ('skip') until train.max_skipped_steps in a row;
  * a failed save raises checkpoint.CheckpointError at the step it is noticed (the step of the save when it is
    synchronous, the next step that finds the async save finished otherwise).
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from moe_jax.train import checkpoint as ckpt_lib
from moe_jax.config import schema as config_lib
from moe_jax import data
from moe_jax.model import flops
from moe_jax.optim import chain as optimizer_lib
from moe_jax.train import metrics as metrics_lib
from moe_jax.model import transformer as model_lib
from moe_jax.model import precision
from moe_jax.train import preemption
from moe_jax import sharding as sharding_lib
from moe_jax.train import step as step_lib
from moe_jax.train import workdir as workdir_lib


SUMMARY_FILE = "summary.json"
EXIT_PREEMPTED = preemption.EXIT_PREEMPTED  # exit status of the CLI when a signal stopped the run before the end
# With several processes, they agree whether to stop every STOP_CHECK_EVERY steps (one coordinator barrier each;
# see preemption.py and docs/decisions.md for its cost)
STOP_CHECK_EVERY = 1


class NonFiniteError(FloatingPointError):
    """A step produced a non-finite loss, gradient or state; the message names the step and the newest checkpoint."""


def log(msg: str) -> None:
    if jax.process_index() == 0:
        tqdm.write(msg, file=sys.stdout)
        sys.stdout.flush()


def check_batch_fits_mesh(config, mesh) -> None:
    shards = mesh.shape["data"] * mesh.shape["expert"]
    if config.train.batch_size % shards:
        raise config_lib.ConfigError(
            f"config.train.batch_size: {config.train.batch_size} sequences cannot be split over the "
            f"{shards} batch shards of mesh {dict(mesh.shape)} (data x expert); use a multiple of {shards}")


def _summarise_train(m: dict) -> dict:
    """Host-side record from the step's metrics tree (per-layer MoE arrays become lists)."""
    rec = {}
    for k, v in m.items():
        v = np.asarray(v)
        rec[k] = v.item() if v.ndim == 0 else v.tolist()
    if "moe/dropped_fraction" in rec:
        rec["moe/dropped_fraction_mean"] = float(np.mean(m["moe/dropped_fraction"]))
        rec["moe/load_balance_loss_mean"] = float(np.mean(m["moe/load_balance_loss"]))
        rec["moe/z_loss_mean"] = float(np.mean(m["moe/z_loss"]))
    rec["perplexity"] = math.exp(min(rec["loss"], 50.0)) if math.isfinite(rec["loss"]) else float("nan")
    return rec


def train(config, workdir: str, *, max_steps_this_run: int | None = None, devices=None,
          restore_step: int | None = None, allow_config_change=()) -> dict[str, Any]:
    """Train (or resume) `config` in `workdir`. `max_steps_this_run` stops early after that many steps (a save is
    made there), as a preemption would. `restore_step`: resume from exactly this step (newer steps are set aside).
    `allow_config_change`: config fields (or sections) a resumed run may change beyond workdir.SAFE_FIELDS.
    Returns a summary dict (also written as metrics records)."""
    config_lib.validate(config)
    lock = workdir_lib.lock(workdir)
    try:
        return _train(config, workdir, max_steps_this_run, devices, restore_step, tuple(allow_config_change))
    finally:
        workdir_lib.unlock(lock)


def _train(config, workdir, max_steps_this_run, devices, restore_step, allow_config_change) -> dict[str, Any]:
    t_setup = time.time()
    checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.train.keep_checkpoints,
                                         async_save=config.train.async_checkpoint)
    try:
        if restore_step is not None and restore_step not in checkpointer.all_steps():
            raise config_lib.ConfigError(f"--restore_step {restore_step}: no such checkpoint in "
                                         f"{checkpointer.directory}; have {checkpointer.all_steps()}")
        return _run(config, workdir, max_steps_this_run, devices, restore_step, allow_config_change, checkpointer,
                    t_setup)
    finally:
        checkpointer.close()


def _run(config, workdir, max_steps_this_run, devices, restore_step, allow_config_change, checkpointer,
         t_setup) -> dict[str, Any]:
    mesh = sharding_lib.build_mesh(config, devices)
    check_batch_fits_mesh(config, mesh)
    t = config.train
    log(f"mesh {dict(mesh.shape)} on {len(mesh.devices.flat)} {jax.devices()[0].platform} device(s)")
    log(precision.describe(precision.resolve(config, mesh.devices.flat[0].platform)))  # config.json records it
    if checkpointer.all_steps() and os.path.exists(os.path.join(workdir, ckpt_lib.CONFIG_FILE)):
        # the resolved config against the run's (also resolved): before anything is written to the workdir
        workdir_lib.check_resume_config(ckpt_lib.load_config(workdir), config, allow_config_change, log)

    ds = data.build(config)
    if ds.tokenizer.vocab_size != config.model.vocab_size:
        raise config_lib.ConfigError(f"config.model.vocab_size: {config.model.vocab_size} differs from the "
                                     f"tokenizer's {ds.tokenizer.vocab_size}; set it to {ds.tokenizer.vocab_size}")
    log(f"data: {ds.stats}")

    graphdef, abstract_state = model_lib.abstract(config)
    opt = optimizer_lib.build(config)
    global_rows = t.batch_size * t.grad_accum
    example = next(iter(ds.val_batches(t.batch_size)))
    train_like = step_lib.batch_like(example, global_rows)
    eval_like = step_lib.batch_like(example, t.batch_size)
    compiled = step_lib.compile_steps(config, graphdef, abstract_state, opt, mesh, train_like, eval_like)
    mem = compiled.memory
    if mem:
        log("compiled train step memory per device: " + ", ".join(f"{k.replace('_size_in_bytes', '')} "
                                                                  f"{v / 2**20:.1f} MiB" for k, v in mem.items()))

    meta: dict = {}
    if checkpointer.latest_step() is not None:
        with jax.set_mesh(mesh):
            state, meta, start = ckpt_lib.restore_verified(
                checkpointer, compiled.abstract_state, restore_step,
                data_args=data.checkpoint_restore_args(ds.train_iter), log=log, workdir=workdir)
        if jax.process_index() == 0:  # metrics.jsonl has one writer: two processes rewriting it raced on its rename
            metrics_lib.truncate_after(workdir, start)
        log(f"resumed from step {start} of {t.steps}")
    else:
        with jax.set_mesh(mesh):
            state = step_lib.init_sharded_state(config, opt, compiled.state_sharding)
        start = 0
    step = int(jax.device_get(state["step"]))
    if step != start:
        raise RuntimeError(f"checkpoint step {start} holds state step {step}")
    ckpt_lib.write_run_files(workdir, config, ds.tokenizer.path, step=start)

    counts = flops.param_counts(config)
    flops_per_token = flops.flops_per_token(config)["training"]
    tokens_per_step = global_rows * t.seq_len
    peak, peak_source = flops.devices_peak_tflops(per_device_tflops=t.peak_tflops)
    log(f"params: total {counts['total']:,}, active {counts['active']:,}; training FLOPs/token "
        f"{flops_per_token:.4g}; peak {peak:.3g} TFLOP/s ({peak_source})")
    is_main = jax.process_index() == 0
    writer = metrics_lib.MetricsWriter(workdir, enabled=is_main)
    val_batches = list(ds.val_batches(t.batch_size))
    if t.eval_batches:
        val_batches = val_batches[:t.eval_batches]
    eval_shardings = step_lib.batch_shardings(eval_like, mesh)
    wall0 = float(meta.get("wall_time", 0.0))
    best = float(meta.get("best_val_loss", float("inf")))
    log(f"setup took {time.time() - t_setup:.1f}s")

    stop_at = t.steps if max_steps_this_run is None else min(t.steps, step + max_steps_this_run)
    clock0 = time.time()
    pending = None  # (step, device metrics) of the last dispatched step, fetched after the next dispatch
    interval = {"t": time.time(), "steps": 0, "tps": float("nan"), "step_time": float("nan")}
    last_eval = None
    skipped = {"in_row": 0, "total": 0}
    bar = tqdm(total=t.steps, initial=step, disable=not (t.progress_bar and is_main), dynamic_ncols=True,
               file=sys.stderr)

    def wall() -> float:
        return wall0 + time.time() - clock0

    def fetch(p, inflight=None) -> None:
        """Read back step p's metrics (blocks until it is done); log every log_every steps. `inflight`: the metrics of
        the step dispatched after p, if any. Throughput counts dispatched steps over wall time, and at a log point
        waits for the in-flight step too, so the interval is exact whether dispatch is asynchronous (GPU/TPU) or
        runs the step inline (small programs on CPU), at the cost of one pipeline bubble per log line."""
        s, m = p
        m = jax.device_get(m)
        loss = float(m["loss"])
        if not bool(m["finite"]):
            what = (f"loss ({loss})" if not math.isfinite(loss) else f"gradient norm ({float(m['grad_norm'])})"
                    if not math.isfinite(float(m["grad_norm"])) else "updated parameters or optimizer state")
            newest = checkpointer.latest_step()
            newest = ("no checkpoint was saved before it" if newest is None else
                      f"the newest checkpoint, step {newest} ({checkpointer.step_dir(newest)}), was saved from a "
                      "finite state")
            if t.on_nonfinite == "skip":
                skipped["in_row"] += 1
                skipped["total"] += 1
                writer.write({"kind": "skipped", "step": s, "loss": loss, "grad_norm": float(m["grad_norm"]),
                              "in_row": skipped["in_row"]})
                log(f"step {s}: non-finite {what}: update skipped ({skipped['in_row']} in a row, "
                    f"train.max_skipped_steps={t.max_skipped_steps})")
                if skipped["in_row"] >= t.max_skipped_steps:
                    raise NonFiniteError(f"non-finite {what} at step {s}: {skipped['in_row']} steps in a row "
                                         f"skipped (train.max_skipped_steps); stopping: {newest}")
            else:
                raise NonFiniteError(f"non-finite {what} at step {s}; stopped before saving it: {newest}; lower the "
                                     "learning rate (resume with --allow_config_change=optim) or set "
                                     "train.on_nonfinite='skip'")
        else:
            skipped["in_row"] = 0
        bar.update(1)
        if s % t.log_every == 0 or s == stop_at:
            if inflight is not None:
                jax.block_until_ready(inflight)
            if interval["steps"]:
                elapsed = max(time.time() - interval["t"], 1e-9)
                interval.update(tps=interval["steps"] * tokens_per_step / elapsed,
                                step_time=elapsed / interval["steps"])
            # else: this step was in flight at the last log point and its time was counted there: reuse that rate
            tps = interval["tps"]
            rec = _summarise_train(m)
            rec.update(kind="train", step=s, tokens=s * tokens_per_step, wall_time=wall(),
                       tokens_per_s=tps, step_time=interval["step_time"],
                       tflops=tps * flops_per_token / 1e12, mfu=flops.mfu(tps, config, peak),
                       **optimizer_lib.learning_rates(config, s - 1))
            writer.write(rec)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}", mfu=f"{100 * rec['mfu']:.1f}%")
            log(f"step {s}: loss {loss:.4f} acc {rec['accuracy']:.3f} grad_norm {rec['grad_norm']:.3f} "
                f"{tps:,.0f} tok/s {rec['tflops']:.3g} TFLOP/s MFU {100 * rec['mfu']:.1f}%"
                + (f" dropped {rec['moe/dropped_fraction_mean']:.3f}" if "moe/dropped_fraction_mean" in rec else ""))
            interval.update(t=time.time(), steps=0)

    def save(s: int, val_loss=None) -> None:
        checkpointer.save(s, state, data.checkpoint_save_args(ds.train_iter),
                          meta={"step": s, "tokens": s * tokens_per_step, "wall_time": wall(),
                                "best_val_loss": best, "val_loss": val_loss}, val_loss=val_loss)

    try:
        with preemption.LocalStop() as local, jax.set_mesh(mesh):
            stop = preemption.AgreedStop(local, every=STOP_CHECK_EVERY, run_key=f"{os.path.abspath(workdir)}@{step}")
            watch_maintenance_events(local)
            stopping = False
            while step < stop_at and not stopping:
                batch = step_lib.to_global(next(ds.train_iter), compiled.batch_sharding)
                state, m = compiled.train(state, batch)
                step += 1
                interval["steps"] += 1
                checkpointer.poll(step=step)  # an async save that failed is reported here, at the step it is noticed
                if pending is not None:
                    fetch(pending, inflight=m)
                pending = (step, m)
                stopping = stop.check(step)
                is_eval = step % t.eval_every == 0 or step == t.steps
                is_ckpt = step % t.checkpoint_every == 0 or step == stop_at or is_eval
                if is_eval or is_ckpt or stopping:
                    fetch(pending)
                    pending = None
                val_loss = None
                if is_eval:
                    ev = step_lib.evaluate(compiled.eval, state["params"], val_batches, eval_shardings)
                    val_loss = ev["val_loss"]
                    best = min(best, val_loss)
                    writer.write({"kind": "eval", "step": step, "tokens": step * tokens_per_step,
                                  "wall_time": wall(), **ev})
                    log(f"eval step {step}: val_loss {ev['val_loss']:.4f} val_acc {ev['val_accuracy']:.4f} "
                        f"val_ppl {ev['val_perplexity']:.2f}")
                    last_eval = ev
                if is_ckpt:
                    save(step, val_loss)
                if is_eval or is_ckpt:
                    interval.update(t=time.time(), steps=0)
            if pending is not None:
                fetch(pending)
                pending = None
            if stopping:
                print(f"process {jax.process_index()}: stop requested ({stop.reason}): every process saves step "
                      f"{step} and exits", flush=True)
                if step not in checkpointer.all_steps():
                    save(step)
            checkpointer.poll(block=True)
    finally:
        bar.close()
        writer.close()

    summary = {"step": step, "finished": step >= t.steps, "tokens": step * tokens_per_step, "wall_time": wall(),
               "params_total": counts["total"], "params_active": counts["active"],
               "training_flops_per_token": flops_per_token, "best_val_loss": best,
               "interrupted": step < stop_at, "stop_reason": stop.reason,
               "skipped_steps": skipped["total"]}
    if last_eval:
        summary.update(last_eval)
    records = metrics_lib.read(workdir) if is_main else []
    tps = [r["tokens_per_s"] for r in records if r.get("kind") == "train" and r["step"] > t.log_every]
    if tps:
        summary["tokens_per_s"] = float(np.median(tps))
        summary["mfu"] = flops.mfu(summary["tokens_per_s"], config, peak)
    if is_main:
        metrics_lib.write_json(workdir, SUMMARY_FILE, summary)
        if t.plots and step >= t.steps:
            metrics_lib.plot(workdir)
    return summary


def watch_maintenance_events(local) -> None:
    """On Cloud TPU, start a MaintenanceWatcher so a host maintenance event stops the run like a SIGTERM does."""
    if jax.devices()[0].platform == "tpu":
        preemption.MaintenanceWatcher(local).start()
