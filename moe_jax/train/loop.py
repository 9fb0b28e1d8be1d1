"""The train loop: data -> compiled step -> metrics, evaluation, checkpoints; resumable and preemption-safe.

`train(config, workdir)` is the whole job behind `python -m moe_jax.train`. What it guarantees:
  * the config arrives parsed (config.typed.parse at the command line: validated, 'auto' resolved for the backend);
    its resolution is printed; one trainer per workdir (workdir.lock: a second one exits naming the
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

import dataclasses
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
from moe_jax.config import resolve as resolve_lib
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


def begin(phase: str) -> None:
    """Say what the trainer starts doing now (a phase that may take minutes), in the log and for the message of a
    signal arriving during it (preemption.SignalWatcher)."""
    preemption.set_phase(phase)
    log(f"{phase} ...")


def describe_config(run) -> str:
    """The resolved config, one line per section ('model: d_model=64, n_layers=2, ...'; top-level fields first): the
    values config.json records, in a form that fits a terminal."""
    d = run.to_dict()
    top = ", ".join(f"{k}={v!r}" for k, v in d.items() if not isinstance(v, dict))
    lines = [f"config: {top}"] + [f"  {k}: " + ", ".join(f"{f}={x!r}" for f, x in v.items())
                                   for k, v in d.items() if isinstance(v, dict)]
    return "\n".join(lines)


def tensorboard_hint(workdir: str) -> str:
    return f"TensorBoard: tensorboard --logdir {os.path.join(workdir, 'tb')}"


def check_batch_fits_mesh(train, mesh) -> None:
    """train.batch_size (a TrainConfig's) must split over the mesh's batch shards (data x expert)."""
    shards = mesh.shape["data"] * mesh.shape["expert"]
    if train.batch_size % shards:
        raise config_lib.ConfigError(
            f"config.train.batch_size: {train.batch_size} sequences cannot be split over the "
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


@dataclasses.dataclass
class Setup:
    """What the loop runs with: built by `_setup`; the peak and the metrics writer are added by `_start`, after the
    restore (which may truncate metrics.jsonl)."""
    run: Any  # config.typed.RunConfig
    workdir: str
    checkpointer: Any
    mesh: Any
    ds: Any  # data.Data
    compiled: step_lib.Compiled
    writer: metrics_lib.MetricsWriter | None
    val_batches: list
    eval_shardings: dict
    counts: dict  # flops.param_counts
    flops_per_token: float  # training FLOPs per token
    peak: float  # TFLOP/s of the devices together
    is_main: bool

    @property
    def tokens_per_step(self) -> int:
        return self.run.train.tokens_per_step


@dataclasses.dataclass
class Progress:
    """The loop's mutable state: the train state and its step, the last dispatched step's metrics (fetched after the
    next dispatch), the throughput interval since the last log line, skipped steps, the best and last evaluation."""
    state: dict
    step: int
    stop_at: int
    wall0: float  # wall time of the run before this process started (from the checkpoint)
    best: float
    clock0: float = dataclasses.field(default_factory=time.time)
    pending: tuple | None = None  # (step, device metrics)
    interval_t: float = dataclasses.field(default_factory=time.time)
    interval_steps: int = 0
    tps: float = float("nan")
    step_time: float = float("nan")
    skipped_in_row: int = 0
    skipped_total: int = 0
    last_eval: dict | None = None
    stop_reason: str | None = None

    def wall(self) -> float:
        return self.wall0 + time.time() - self.clock0

    def restart_interval(self) -> None:
        self.interval_t, self.interval_steps = time.time(), 0


def train(run, workdir: str, *, max_steps_this_run: int | None = None, devices=None,
          restore_step: int | None = None, allow_config_change=()) -> dict[str, Any]:
    """Train (or resume) `run` (a config.typed.RunConfig: config.typed.parse of the config) in `workdir`.
    `max_steps_this_run` stops early after that many steps (a save is made there), as a preemption would.
    `restore_step`: resume from exactly this step (newer steps are set aside). `allow_config_change`: config fields
    (or sections) a resumed run may change beyond config.runs.SAFE_FIELDS. Returns a summary dict (also written as
    metrics records)."""
    lock = workdir_lib.lock(workdir)
    try:
        checkpointer = ckpt_lib.Checkpointer(workdir, keep=run.train.keep_checkpoints,
                                             async_save=run.train.async_checkpoint)
        try:
            if restore_step is not None and restore_step not in checkpointer.all_steps():
                raise config_lib.ConfigError(f"--restore_step {restore_step}: no such checkpoint in "
                                             f"{checkpointer.directory}; have {checkpointer.all_steps()}")
            return _train(run, workdir, checkpointer, max_steps_this_run, devices, restore_step,
                          tuple(allow_config_change))
        finally:
            checkpointer.close()
    finally:
        workdir_lib.unlock(lock)


def _train(run, workdir, checkpointer, max_steps_this_run, devices, restore_step, allow) -> dict[str, Any]:
    t_setup = time.time()
    setup, opt = _setup(run, workdir, checkpointer, devices, allow)
    state, meta, start = _restore_or_init(setup, opt, restore_step)
    try:
        progress = _start(setup, state, meta, start, max_steps_this_run)
        log(f"setup took {time.time() - t_setup:.1f}s")
        _loop(setup, progress)
    finally:
        if setup.writer is not None:
            setup.writer.close()
    preemption.set_phase(f"writing the summary (step {progress.step} is saved)")
    return _summary(setup, progress)


def _setup(run, workdir, checkpointer, devices, allow) -> tuple[Setup, dict]:
    """Mesh, resume check, data, compiled steps (the state comes next: `_restore_or_init`). Returns the setup and the
    optimizer."""
    mesh = sharding_lib.build_mesh(run.mesh, devices)
    check_batch_fits_mesh(run.train, mesh)
    t = run.train
    log(describe_config(run))
    log(f"mesh {dict(mesh.shape)} on {len(mesh.devices.flat)} {jax.devices()[0].platform} device(s)")
    log(resolve_lib.describe(run.precision()))  # config.json records the resolved values
    if checkpointer.all_steps() and os.path.exists(os.path.join(workdir, ckpt_lib.CONFIG_FILE)):
        # the resolved config against the run's (also resolved): before anything is written to the workdir
        workdir_lib.check_resume_config(ckpt_lib.load_config(workdir), run, allow, log)

    begin("preparing data")
    ds = data.build(run)
    if ds.tokenizer.vocab_size != run.model.vocab_size:
        raise config_lib.ConfigError(f"config.model.vocab_size: {run.model.vocab_size} differs from the "
                                     f"tokenizer's {ds.tokenizer.vocab_size}; set it to {ds.tokenizer.vocab_size}")
    log(f"data: {ds.stats}")

    graphdef, abstract_state = model_lib.abstract(run.model)
    opt = optimizer_lib.build(run.optim, t.steps, distributed_muon=run.mesh.fsdp)
    example = next(iter(ds.val_batches(t.batch_size)))
    train_like = step_lib.batch_like(example, t.rows_per_step)
    eval_like = step_lib.batch_like(example, t.batch_size)
    begin("compiling the train step")
    compiled = step_lib.compile_steps(t, graphdef, abstract_state, opt, mesh, train_like, eval_like, run.mesh.fsdp)
    if compiled.memory:
        log(f"compiled train step memory per device: {step_lib.format_bytes(step_lib.memory_needed(compiled.memory))}"
            " (" + ", ".join(f"{k.replace('_size_in_bytes', '')} {step_lib.format_bytes(v)}"
                             for k, v in compiled.memory.items()) + ")")
    step_lib.check_memory(compiled.memory, next(d for d in mesh.devices.flat if d.process_index == jax.process_index()))
    val_batches = list(ds.val_batches(t.batch_size))
    if t.eval_batches:
        val_batches = val_batches[:t.eval_batches]
    is_main = jax.process_index() == 0
    setup = Setup(run=run, workdir=workdir, checkpointer=checkpointer, mesh=mesh, ds=ds, compiled=compiled,
                  writer=None, val_batches=val_batches, eval_shardings=step_lib.batch_shardings(eval_like, mesh),
                  counts=flops.param_counts(run.model), flops_per_token=flops.run_flops_per_token(run)["training"],
                  peak=0.0, is_main=is_main)
    return setup, opt


def _restore_or_init(setup: Setup, opt, restore_step) -> tuple[dict, dict, int]:
    """The newest intact checkpoint (or `restore_step`) restored onto the mesh, or a fresh state. Then config.json,
    config_history.jsonl and the tokenizer are written. Returns (state, checkpoint meta, step)."""
    run, workdir, mesh, compiled = setup.run, setup.workdir, setup.mesh, setup.compiled
    meta: dict = {}
    if setup.checkpointer.latest_step() is not None:
        preemption.set_phase(f"restoring step {setup.checkpointer.latest_step()}")
        with jax.set_mesh(mesh):
            state, meta, start = ckpt_lib.restore_verified(
                setup.checkpointer, compiled.abstract_state, restore_step,
                data_args=data.checkpoint_restore_args(setup.ds.train_iter), log=log, workdir=workdir)
        if setup.is_main:  # metrics.jsonl has one writer: two processes rewriting it raced on its rename
            metrics_lib.truncate_after(workdir, start)
        log(f"resumed from step {start} of {run.train.steps}")
    else:
        preemption.set_phase("initialising the parameters")
        with jax.set_mesh(mesh):
            state = step_lib.init_sharded_state(run.model, run.seed, opt, compiled.state_sharding)
        start = 0
    step = int(jax.device_get(state["step"]))
    if step != start:
        raise RuntimeError(f"checkpoint step {start} holds state step {step}")
    ckpt_lib.write_run_files(workdir, run, setup.ds.tokenizer.path, step=start)
    return state, meta, start


def _start(setup: Setup, state, meta: dict, start: int, max_steps_this_run) -> Progress:
    """The devices' peak, the metrics writer and the loop's starting Progress."""
    t = setup.run.train
    setup.peak, peak_source = flops.devices_peak_tflops(per_device_tflops=t.peak_tflops)
    log(f"params: total {setup.counts['total']:,}, active {setup.counts['active']:,}; training FLOPs/token "
        f"{setup.flops_per_token:.4g}; peak {setup.peak:.3g} TFLOP/s ({peak_source})")
    setup.writer = metrics_lib.MetricsWriter(setup.workdir, enabled=setup.is_main)
    log(tensorboard_hint(setup.workdir))
    stop_at = t.steps if max_steps_this_run is None else min(t.steps, start + max_steps_this_run)
    return Progress(state=state, step=start, stop_at=stop_at, wall0=float(meta.get("wall_time", 0.0)),
                    best=float(meta.get("best_val_loss", float("inf"))))


def _loop(setup: Setup, p: Progress) -> None:
    """Dispatch steps until stop_at or an agreed stop; fetch, evaluate and save on their cadences."""
    t, compiled = setup.run.train, setup.compiled
    bar = tqdm(total=t.steps, initial=p.step, disable=not (t.progress_bar and setup.is_main), dynamic_ncols=True,
               file=sys.stderr)
    try:
        with preemption.LocalStop() as local, jax.set_mesh(setup.mesh):
            stop = preemption.AgreedStop(local, every=STOP_CHECK_EVERY,
                                         run_key=f"{os.path.abspath(setup.workdir)}@{p.step}")
            watch_maintenance_events(local)
            local.next_check = stop.next_check(p.step)
            stopping = False
            while p.step < p.stop_at and not stopping:
                batch = step_lib.to_global(next(setup.ds.train_iter), compiled.batch_sharding)
                p.state, m = compiled.train(p.state, batch)
                p.step += 1
                p.interval_steps += 1
                setup.checkpointer.poll(step=p.step)  # a failed async save is reported at the step it is noticed
                if p.pending is not None:
                    _fetch(setup, p, bar, inflight=m)
                p.pending = (p.step, m)
                stopping = stop.check(p.step)
                local.next_check = stop.next_check(p.step)
                _cadence(setup, p, bar, stopping)
            if p.pending is not None:
                _fetch(setup, p, bar)
            p.stop_reason = stop.reason
            if stopping:
                print(f"process {jax.process_index()}: stop requested ({stop.reason}): every process saves step "
                      f"{p.step} and exits", flush=True)
                if p.step not in setup.checkpointer.all_steps():
                    _save(setup, p)
            setup.checkpointer.poll(block=True)
    finally:
        bar.close()


def _cadence(setup: Setup, p: Progress, bar, stopping: bool) -> None:
    """After a dispatched step: fetch it, evaluate and save when the cadence (or a stop) asks."""
    t = setup.run.train
    is_eval = p.step % t.eval_every == 0 or p.step == t.steps
    is_ckpt = p.step % t.checkpoint_every == 0 or p.step == p.stop_at or is_eval
    if is_eval or is_ckpt or stopping:
        _fetch(setup, p, bar)
    val_loss = _evaluate(setup, p) if is_eval else None
    if is_ckpt:
        _save(setup, p, val_loss)
    if is_eval or is_ckpt:
        p.restart_interval()


def _fetch(setup: Setup, p: Progress, bar, inflight=None) -> None:
    """Read back the pending step's metrics (blocks until it is done); log every log_every steps. `inflight`: the
    metrics of the step dispatched after it, if any. Throughput counts dispatched steps over wall time, and at a log
    point waits for the in-flight step too, so the interval is exact whether dispatch is asynchronous (GPU/TPU) or
    runs the step inline (small programs on CPU), at the cost of one pipeline bubble per log line."""
    s, m = p.pending
    p.pending = None
    m = jax.device_get(m)
    _check_finite(setup, p, s, m)
    bar.update(1)
    t = setup.run.train
    if s % t.log_every == 0 or s == p.stop_at:
        if inflight is not None:
            jax.block_until_ready(inflight)
        if p.interval_steps:
            elapsed = max(time.time() - p.interval_t, 1e-9)
            p.tps, p.step_time = p.interval_steps * setup.tokens_per_step / elapsed, elapsed / p.interval_steps
        # else: this step was in flight at the last log point and its time was counted there: reuse that rate
        _log_train(setup, p, bar, s, m)
        p.restart_interval()


def _check_finite(setup: Setup, p: Progress, s: int, m: dict) -> None:
    """Step s's loss, gradient norm and state must be finite: raise NonFiniteError (train.on_nonfinite='stop'), or
    count a skipped update ('skip') and raise after train.max_skipped_steps in a row."""
    t = setup.run.train
    if bool(m["finite"]):
        p.skipped_in_row = 0
        return
    loss, grad_norm = float(m["loss"]), float(m["grad_norm"])
    what = (f"loss ({loss})" if not math.isfinite(loss) else f"gradient norm ({grad_norm})"
            if not math.isfinite(grad_norm) else "updated parameters or optimizer state")
    newest = setup.checkpointer.latest_step()
    newest = ("no checkpoint was saved before it" if newest is None else
              f"the newest checkpoint, step {newest} ({setup.checkpointer.step_dir(newest)}), was saved from a "
              "finite state")
    if t.on_nonfinite != "skip":
        raise NonFiniteError(f"non-finite {what} at step {s}; stopped before saving it: {newest}; lower the "
                             "learning rate (resume with --allow_config_change=optim) or set "
                             "train.on_nonfinite='skip'")
    p.skipped_in_row += 1
    p.skipped_total += 1
    setup.writer.write({"kind": "skipped", "step": s, "loss": loss, "grad_norm": grad_norm,
                        "in_row": p.skipped_in_row})
    log(f"step {s}: non-finite {what}: update skipped ({p.skipped_in_row} in a row, "
        f"train.max_skipped_steps={t.max_skipped_steps})")
    if p.skipped_in_row >= t.max_skipped_steps:
        raise NonFiniteError(f"non-finite {what} at step {s}: {p.skipped_in_row} steps in a row "
                             f"skipped (train.max_skipped_steps); stopping: {newest}")


def _log_train(setup: Setup, p: Progress, bar, s: int, m: dict) -> None:
    """Write step s's train record and its log line."""
    run = setup.run
    rec = _summarise_train(m)
    rec.update(kind="train", step=s, tokens=s * setup.tokens_per_step, wall_time=p.wall(),
               tokens_per_s=p.tps, step_time=p.step_time, tflops=p.tps * setup.flops_per_token / 1e12,
               mfu=flops.mfu(p.tps, setup.flops_per_token, setup.peak),
               **optimizer_lib.learning_rates(run.optim, run.train.steps, s - 1))
    setup.writer.write(rec)
    loss = rec["loss"]
    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{p.tps:,.0f}", mfu=f"{100 * rec['mfu']:.1f}%")
    log(f"step {s}: loss {loss:.4f} acc {rec['accuracy']:.3f} grad_norm {rec['grad_norm']:.3f} "
        f"{p.tps:,.0f} tok/s {rec['tflops']:.3g} TFLOP/s MFU {100 * rec['mfu']:.1f}%"
        + (f" dropped {rec['moe/dropped_fraction_mean']:.3f}" if "moe/dropped_fraction_mean" in rec else ""))


def _evaluate(setup: Setup, p: Progress) -> float:
    """Evaluate the current parameters on the validation batches; write and log the record. Returns val_loss."""
    ev = step_lib.evaluate(setup.compiled.eval, p.state["params"], setup.val_batches, setup.eval_shardings)
    p.best = min(p.best, ev["val_loss"])
    setup.writer.write({"kind": "eval", "step": p.step, "tokens": p.step * setup.tokens_per_step,
                        "wall_time": p.wall(), **ev})
    log(f"eval step {p.step}: val_loss {ev['val_loss']:.4f} val_acc {ev['val_accuracy']:.4f} "
        f"val_ppl {ev['val_perplexity']:.2f}")
    p.last_eval = ev
    return ev["val_loss"]


def _save(setup: Setup, p: Progress, val_loss=None) -> None:
    s = p.step
    setup.checkpointer.save(s, p.state, data.checkpoint_save_args(setup.ds.train_iter),
                            meta={"step": s, "tokens": s * setup.tokens_per_step, "wall_time": p.wall(),
                                  "best_val_loss": p.best, "val_loss": val_loss}, val_loss=val_loss)


def _summary(setup: Setup, p: Progress) -> dict[str, Any]:
    """The run's summary (summary.json on process 0), with the median throughput and MFU of its log lines."""
    t, step = setup.run.train, p.step
    summary = {"step": step, "finished": step >= t.steps, "tokens": step * setup.tokens_per_step,
               "wall_time": p.wall(), "params_total": setup.counts["total"], "params_active": setup.counts["active"],
               "training_flops_per_token": setup.flops_per_token, "best_val_loss": p.best,
               "interrupted": step < p.stop_at, "stop_reason": p.stop_reason, "skipped_steps": p.skipped_total}
    if p.last_eval:
        summary.update(p.last_eval)
    records = metrics_lib.read(setup.workdir) if setup.is_main else []
    tps = [r["tokens_per_s"] for r in records if r.get("kind") == "train" and r["step"] > t.log_every]
    if tps:
        summary["tokens_per_s"] = float(np.median(tps))
        summary["mfu"] = flops.mfu(summary["tokens_per_s"], setup.flops_per_token, setup.peak)
    if setup.is_main:
        metrics_lib.write_json(setup.workdir, SUMMARY_FILE, summary)
        if t.plots and step >= t.steps:
            metrics_lib.plot(setup.workdir)
    return summary


def watch_maintenance_events(local) -> None:
    """On Cloud TPU, start a MaintenanceWatcher so a host maintenance event stops the run like a SIGTERM does."""
    if jax.devices()[0].platform == "tpu":
        preemption.MaintenanceWatcher(local).start()
