"""The device check: the whole project exercised on one accelerator in one command, results in one JSON + log.

    bash scripts/device_check.sh [--out DIR]        # GPU/TPU: the real check (<= 8 minutes on one H100/H200)
    bash scripts/device_check.sh --cpu --out DIR    # CPU, smoke-sized: what CI runs (tests/test_device_check.py)

Steps (each timed, its outcome recorded as ok / failed (with the error) / skipped (with why); one failing step does
not stop the others; steps that would overrun the time budget are skipped):
  env        JAX/jaxlib/flax/optax/orbax versions, backend, devices, the precision policy 'auto' resolves to;
  attention  every attention implementation this backend runs (CPU: blocked, xla; GPU: + cudnn) in float32 and
             bfloat16, with and without packed segments, against a float64 numpy reference; cudnn's gradients against
             the blocked kernel's in float32;
  bench      dense vs MoE train steps (`python -m moe_jax.bench`'s step mode: tokens/s, model TFLOP/s, MFU vs
             flops.PEAK_TFLOPS, step time, compiled memory, MoE step time / FLOP-equal dense step time) at
             configs/gpu_dense.py + gpu_moe.py in bfloat16 (CPU: smoke-sized), the MoE's step time at capacity
             factors 1.0 / 1.25 / 2.0 and dropless, and each config's forward / forward+backward / update times with
             the update's share of the step;
  profile    a jax.profiler trace of MoE steps, summarised as the top ops by time (device ops on GPU/TPU);
  prediction moe_jax.aot's compile-time prediction of the bench configs for this GPU (docs/aot_table.json: roofline
             step time, compiled peak memory) beside what the bench measured (CPU: skipped, no prediction row);
  update     the optimizer update alone at the bench configs under each named variant (`--mode update`,
             moe_jax/tools/bench/common.py VARIANTS: optim.muon_impl optax / batched, optim.ns_dtype float32 /
             bfloat16, optim.ns_stack layers / none, optim.ns_method standard / gram), 5 interleaved rounds: the
             measurement behind optim.ns_* 'auto' on GPU;
  train      configs/moe.py (CPU: configs/smoke.py) trained in the compute dtype with periodic checkpoints, killed
             (SIGKILL) after the first checkpoint, resumed to the end; checks it resumed from that step and finished;
  tests      pytest on the modules that matter on an accelerator (model, layers, MoE, precision, and from the
             optimizer, decode and trainer modules the Newton-Schulz, cached-decoding, smoke-training and exact-resume
             tests), with JAX_DEFAULT_MATMUL_PRECISION=highest (the tests compare against float64 references) and
             deterministic GPU reductions (exact resume); 4 pytest-xdist workers where installed; CPU: one module;
  decode     decode tokens/s at configs/moe.py's shapes (`--mode decode`; CPU: smoke);
  seeds      the seeds' own PyTorch training step timed (scripts/seed_timing.py) at the GPU configs' shape (CPU:
             tiny), when their sources are given (--seeds_dir, $MOE_JAX_SEEDS_DIR or .seeds/repos from
             scripts/device_prepare.sh --seeds) and torch is importable (--seeds_python); otherwise skipped, saying
             why;
  compare    python -m moe_jax.compare --config configs/compare_smoke.py (CPU: one seed, fewer steps).
Writes OUT/device_check.json and OUT/device_check.log (OUT: --out, else $OUT, else runs/device_check).
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


class Check:
    """Runs named steps under a time budget, logs to stdout and OUT/device_check.log, collects one JSON."""

    def __init__(self, out_dir: str, budget_s: float, cpu: bool):
        self.out_dir, self.budget_s, self.cpu = out_dir, budget_s, cpu
        os.makedirs(out_dir, exist_ok=True)
        self.log_file = open(os.path.join(out_dir, "device_check.log"), "w")
        self.t0 = time.time()
        self.result = {"mode": "cpu" if cpu else "accelerator", "started": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                                         time.gmtime()),
                       "budget_s": budget_s, "steps": {}}

    def log(self, msg: str) -> None:
        line = f"[{time.time() - self.t0:6.1f}s] {msg}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def left(self) -> float:
        return self.budget_s - (time.time() - self.t0)

    def step(self, name: str, fn, need_s: float) -> None:
        """Run fn() -> dict as step `name` if at least need_s seconds of the budget are left."""
        if self.left() < need_s:
            self.result["steps"][name] = {"status": "skipped", "why": f"time budget: {self.left():.0f} s left, "
                                                                      f"the step needs ~{need_s:.0f} s"}
            self.log(f"== {name}: skipped ({self.result['steps'][name]['why']})")
            return
        self.log(f"== {name}")
        t = time.time()
        try:
            out = fn() or {}
            status = out.pop("_status", "ok")
            self.result["steps"][name] = {"status": status, "seconds": round(time.time() - t, 1), **out}
        except Exception as e:  # recorded, and the check goes on
            self.log(traceback.format_exc())
            self.result["steps"][name] = {"status": "failed", "seconds": round(time.time() - t, 1),
                                          "error": f"{type(e).__name__}: {e}"[:2000]}
        self.log(f"== {name}: {self.result['steps'][name]['status']} in {time.time() - t:.1f} s")
        self.write()

    def write(self) -> None:
        self.result["elapsed_s"] = round(time.time() - self.t0, 1)
        with open(os.path.join(self.out_dir, "device_check.json"), "w") as f:
            json.dump(self.result, f, indent=2, default=str)

    def run(self, cmd: list[str], timeout: float, env: dict | None = None, cwd: str = ROOT) -> tuple[int, str]:
        """Run a subprocess, stream its output into the log; (returncode, output). Timeout -> rc 124."""
        self.log("$ " + " ".join(cmd))
        e = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=e, cwd=cwd,
                             start_new_session=True)
        lines: list[str] = []

        def pump():  # a reader thread, so that a silent, hung child still times out
            for line in p.stdout:
                lines.append(line)
                self.log_file.write("    " + line)
        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            rc = 124
            lines.append(f"(killed after {timeout:.0f} s)\n")
        reader.join(timeout=10)
        self.log_file.flush()
        out = "".join(lines)
        print("".join("    " + ln for ln in out.splitlines(True)[-25:]), flush=True)
        return rc, out


def python() -> str:
    return sys.executable


# ----------------------------------------------------------------------------------------------------------- steps


def step_env(check: Check) -> dict:
    import jax

    from moe_jax.config import schema as config_lib
    from moe_jax.config import resolve, typed
    versions = {"python": platform.python_version(), "jax": jax.__version__}
    for mod in ("jaxlib", "flax", "optax", "orbax.checkpoint", "numpy", "grain", "ml_collections", "torch"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            versions[mod] = getattr(m, "__version__", getattr(m, "version", "?"))
        except Exception as e:
            versions[mod] = f"missing ({type(e).__name__})"
    devices = [f"{d.platform}:{d.device_kind}" for d in jax.devices()]
    policy = resolve.describe(typed.parse(config_lib.base_config()).precision())
    out = {"versions": versions, "backend": jax.default_backend(), "devices": devices, "policy": policy}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        out["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    for k, v in out.items():
        check.log(f"{k}: {v}")
    return out


def attention_reference(q, k, v, segment_ids=None):
    """softmax(q k^T / sqrt(D) + causal (+ segment) mask) v in float64 numpy. q, k, v [B, S, H, D]."""
    import numpy as np
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    s = q.shape[1]
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    visible = np.tril(np.ones((s, s), bool))[None, None]
    if segment_ids is not None:
        seg = np.asarray(segment_ids)
        visible = visible & (seg[:, None, :, None] == seg[:, None, None, :])
    scores = np.where(visible, scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def step_attention(check: Check, shape) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from moe_jax.model import layers
    from moe_jax.config import resolve
    b, s, h, d = shape
    rng = np.random.default_rng(0)
    q32, k32, v32 = (rng.normal(size=(b, s, h, d)).astype(np.float32) for _ in range(3))
    seg = np.repeat(np.arange(4), s // 4)[None].repeat(b, 0).astype(np.int32)
    impls = {"blocked": lambda q, k, v, sg: layers.blocked_causal_attention(q, k, v, sg, 128 if s > 128 else 0),
             "xla": layers.xla_attention}
    backend = resolve.backend()
    if backend == "gpu":
        impls["cudnn"] = layers.cudnn_attention
    tol = {"float32": 2e-4, "bfloat16": 3e-2}
    results, ok = {}, True
    for name, fn in impls.items():
        for dt in ("float32", "bfloat16"):
            if name == "cudnn" and dt == "float32":
                continue  # cuDNN takes bfloat16/float16 only (float32 falls back to xla: tests/test_precision.py)
            for segmented in (False, True):
                q, k, v = (jnp.asarray(a, dt) for a in (q32, k32, v32))
                sg = jnp.asarray(seg) if segmented else None
                got = np.asarray(jax.jit(fn)(q, k, v, sg), np.float64)
                want = attention_reference(*(np.asarray(a.astype(jnp.float32)) for a in (q, k, v)),
                                           seg if segmented else None)
                err = float(np.max(np.abs(got - want)))
                passed = err < tol[dt]
                ok &= passed
                key = f"{name}/{dt}/{'segments' if segmented else 'causal'}"
                results[key] = {"max_abs_err": err, "tol": tol[dt], "pass": bool(passed)}
                check.log(f"{key}: max |err| vs float64 {err:.2e} (tol {tol[dt]:.0e}) {'ok' if passed else 'FAIL'}")
    if "cudnn" in impls:  # gradients: cuDNN bfloat16 vs the blocked kernel in float32 (itself tested vs float64)
        for segmented in (False, True):
            sg = jnp.asarray(seg) if segmented else None

            def loss(fn, dt):
                return lambda q, k, v: jnp.sum(jnp.sin(fn(q.astype(dt), k.astype(dt), v.astype(dt), sg)
                                                       .astype(jnp.float32)))
            ref = jax.jit(jax.grad(loss(impls["blocked"], jnp.float32), (0, 1, 2)))(q32, k32, v32)
            got = jax.jit(jax.grad(loss(impls["cudnn"], jnp.bfloat16), (0, 1, 2)))(q32, k32, v32)
            rel = max(float(jnp.linalg.norm(g - r) / jnp.linalg.norm(r)) for g, r in zip(got, ref))
            passed = rel < 3e-2
            ok &= passed
            key = f"cudnn/grad/{'segments' if segmented else 'causal'}"
            results[key] = {"max_rel_err_vs_blocked_f32": rel, "tol": 3e-2, "pass": bool(passed)}
            check.log(f"{key}: relative error vs blocked float32 {rel:.2e} {'ok' if passed else 'FAIL'}")
    return {"shape_bshd": list(shape), "results": results, "_status": "ok" if ok else "failed"}


def load(path: str):
    from moe_jax import cli
    return cli.load_config_file(os.path.join(ROOT, path))


def step_bench(check: Check, args, keep: list) -> dict:
    from moe_jax.tools.bench import common, step
    if args.cpu:
        dense, moe = load("configs/smoke.py"), load("configs/smoke.py")
        dense.name, dense.moe.num_experts = "smoke_dense", 0
        moe.moe.d_ff = dense.model.d_ff // 2  # FLOP-equal: top-2 experts of half the dense width
        options = step.StepOptions(batch=4, seq=64, steps=2, rounds=1, matmul_n=256, breakdown=True)
        entries = [("dense (configs/smoke.py, num_experts=0)", dense), ("moe (configs/smoke.py)", moe)]
    else:
        dense, moe = load("configs/gpu_dense.py"), load("configs/gpu_moe.py")
        options = step.StepOptions(batch=dense.train.batch_size, seq=dense.train.seq_len, steps=args.bench_steps,
                                   rounds=2, matmul_n=2048, breakdown=True)
        entries = [("dense (configs/gpu_dense.py)", dense), ("moe (configs/gpu_moe.py)", moe)]
    # Issue 16's GPU question: the same MoE with capacity factors 1.0 / 1.25 (the config's) / 2.0 and dropless.
    moe_label = entries[1][0]
    entries += [(f"{moe_label} {label}", c) for label, c in common.variant_configs(moe, [
        ("capacity_factor=1.0", {"moe.capacity_factor": 1.0}), ("capacity_factor=2.0", {"moe.capacity_factor": 2.0}),
        ("dropless", {"moe.dispatch": "dropless"})])]
    r = step.benchmark(entries, options, out=check.log, benches_out=keep)
    # Issue 19's GPU question: the optimizer update's share of the step (batched Muon, ns_dtype auto).
    r["update_share_of_step"] = {label: c["update_share_of_step"] for label, c in r["configs"].items()}
    r["dispatch_step_time_s"] = {label: r["configs"][label]["step_time_s"] for label, _ in entries[1:]
                                 if label in r["configs"]}
    frac = r["fraction_of_dense"].get(moe_label, {})
    r["moe_step_over_flop_equal_dense_step"] = frac.get("step_time")
    for label, c in r["configs"].items():
        check.log(f"{label}: MFU {c['mfu']:.1%}, {c['tokens_per_s']:,.0f} tokens/s, step {c['step_time_s'] * 1e3:.1f} "
                  f"ms, memory {c.get('memory_bytes')}")
    return r


def step_update(check: Check, args) -> dict:
    """The optimizer update alone at the bench configs under every named variant (issue 19: batched vs optax's
    per-leaf Newton-Schulz, float32 vs bfloat16, stacked across layers or not, X or Gram space), interleaved over
    rounds."""
    from moe_jax.tools.bench import update
    if args.cpu:
        dense, moe = load("configs/smoke.py"), load("configs/smoke.py")
        dense.moe.num_experts = 0
        entries = [("smoke dense", dense), ("smoke moe", moe)]
    else:
        entries = [("gpu_dense", load("configs/gpu_dense.py")), ("gpu_moe", load("configs/gpu_moe.py"))]
    return {"results": update.time_updates(entries, rounds=2 if args.cpu else 5, out=check.log)}


def step_profile(check: Check, keep: list, n: int) -> dict:
    import jax
    moe = [b for b in keep if b.config.moe.num_experts > 0]
    if not moe:
        return {"_status": "skipped", "why": "no compiled MoE step (bench step failed)"}
    b = moe[0]
    trace_dir = os.path.join(check.work, "trace")
    b.run(1)
    t = time.time()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        b.run(n)
    wall = time.time() - t
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True))
    if not files:
        return {"_status": "failed", "error": f"no perfetto_trace.json.gz under {trace_dir}"}
    with gzip.open(files[-1]) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    procs = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    device_pids = {p for p, name in procs.items() if "/device:" in name}
    by_op: Counter = Counter()
    count: Counter = Counter()
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        if device_pids and e["pid"] not in device_pids:
            continue
        if not device_pids and (e["name"].startswith("$") or "Execute" in e["name"] or "Pjit" in e["name"]):
            continue  # host trace (CPU): keep XLA's op events, not Python frames or the dispatch wrappers
        by_op[e["name"]] += e["dur"]
        count[e["name"]] += 1
    total = sum(by_op.values())
    top = [{"op": k, "ms_per_step": v / 1e3 / n, "fraction": v / total if total else 0.0,
            "calls_per_step": count[k] / n} for k, v in by_op.most_common(25)]
    for t_ in top[:15]:
        check.log(f"  {t_['fraction']:6.1%} {t_['ms_per_step']:8.2f} ms/step  {t_['op'][:90]}")
    size = os.path.getsize(files[-1])
    if size < 12 * 2**20:  # small enough to come back with the results
        import shutil
        shutil.copyfile(files[-1], os.path.join(check.out_dir, "moe_step_trace.json.gz"))
    return {"config": b.name, "steps_traced": n, "wall_s": wall, "source": "device ops" if device_pids else "host ops",
            "traced_op_ms_per_step": total / 1e3 / n, "top_ops": top, "trace_bytes": size}


def step_bench_and_profile(check: Check, args) -> None:
    """bench + profile in a child process (`--inner`): it alone preallocates the accelerator's memory, as a training
    job would, and gives it all back when it exits, before the other steps' processes (train, tests, torch) start."""
    sub_out, sub_work = os.path.join(check.work, "bench_out"), os.path.join(check.work, "bench_work")
    cmd = [python(), os.path.abspath(__file__), "--inner", "--only", "bench,profile", "--out", sub_out, "--work",
           sub_work, "--bench_steps", str(args.bench_steps), "--profile_steps", str(args.profile_steps)]
    if args.cpu:
        cmd.append("--cpu")
    t = time.time()
    rc, out = check.run(cmd, timeout=max(60.0, check.left() - 150), env={"XLA_PYTHON_CLIENT_PREALLOCATE": "true"})
    path = os.path.join(sub_out, "device_check.json")
    steps = json.load(open(path))["steps"] if os.path.exists(path) else {}
    for name in ("bench", "profile"):
        check.result["steps"][name] = steps.get(name) or {
            "status": "failed", "seconds": round(time.time() - t, 1),
            "error": f"the bench process exited with {rc} before recording this step", "tail": out[-2000:]}
        check.log(f"== {name}: {check.result['steps'][name]['status']}")
    trace = os.path.join(sub_out, "moe_step_trace.json.gz")
    if os.path.exists(trace):
        import shutil
        shutil.copyfile(trace, os.path.join(check.out_dir, "moe_step_trace.json.gz"))
    check.write()


def train_cmd(args, workdir: str) -> list[str]:
    if args.cpu:
        over = {"train.steps": 40, "train.checkpoint_every": 4, "train.log_every": 4, "train.eval_every": 40,
                "train.eval_batches": 2, "train.batch_size": 4}
        cfg = "configs/smoke.py"
    else:
        over = {"train.steps": args.train_steps, "train.checkpoint_every": args.train_steps // 3,
                "train.log_every": 25, "train.eval_every": args.train_steps, "train.eval_batches": 8,
                "model.dtype": "bfloat16"}
        cfg = "configs/moe.py"
    over.update({"train.plots": False, "train.progress_bar": False, "train.async_checkpoint": False,
                 "train.keep_checkpoints": 2})
    return ([python(), "-m", "moe_jax.train", "--config", cfg, "--workdir", workdir]
            + [f"--config.{k}={v}" for k, v in over.items()])


def step_prediction(check: Check, args) -> dict:
    """moe_jax.aot's compile-time prediction for this GPU (docs/aot_table.json, computed on a CPU host) beside the
    bench's measurement of the same configs: step time against the roofline's estimate and interval, compiled peak
    memory against the predicted peak."""
    from moe_jax.tools import aot_table
    bench = check.result["steps"].get("bench", {})
    if bench.get("status") != "ok":
        return {"_status": "skipped", "why": "the bench step did not measure"}
    kind = next(iter(check.result["steps"].get("env", {}).get("devices", [])), "")
    target = aot_table.device_target(kind)
    rows = aot_table.load(os.path.join(ROOT, "docs", "aot_table.json"))
    out = {"target": target, "table": "docs/aot_table.json", "configs": {}}
    for label, config in (("dense (configs/gpu_dense.py)", "configs/gpu_dense.py"),
                          ("moe (configs/gpu_moe.py)", "configs/gpu_moe.py")):
        row = rows.get(f"{config}|{target}|slices=1|mesh=config")
        measured = bench.get("configs", {}).get(label)
        if row and not row.get("error") and measured:
            out["configs"][config] = aot_table.against_measurement(row, measured["step_time_s"],
                                                                   measured.get("memory_bytes", {}))
            check.log(f"{config} on {target}: {out['configs'][config]}")
    if not out["configs"]:
        return {"_status": "skipped", "why": f"no prediction row for {kind!r} ({target}) in docs/aot_table.json",
                **out}
    out["note"] = ("predictions compiled XLA attention (no cuDNN in a compile-only GPU client); the bench measured "
                   "the config's attention")
    return out


def step_train(check: Check, args) -> dict:
    workdir = os.path.join(check.work, "train")
    cmd = train_cmd(args, workdir)
    first_ckpt = 4 if args.cpu else args.train_steps // 3
    ckpt_dir = os.path.join(workdir, "checkpoints", str(first_ckpt))
    check.log("$ " + " ".join(cmd) + "   (killed with SIGKILL once step %d is saved)" % first_ckpt)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t = time.time()
    with open(os.path.join(check.work, "train_first.log"), "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        deadline = time.time() + args.train_timeout
        while p.poll() is None and not os.path.isdir(ckpt_dir) and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)  # orbax renames the finished step directory into place: let the rename land
        killed = p.poll() is None
        if killed:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    first_s = time.time() - t
    with open(os.path.join(check.work, "train_first.log")) as f:
        first_log = f.read()
    check.log_file.write(first_log)
    ckpts = os.path.join(workdir, "checkpoints")
    check.log(f"first run: {'killed' if killed else 'exited with ' + str(p.returncode)} after {first_s:.1f} s; "
              f"checkpoints: {sorted(os.listdir(ckpts)) if os.path.isdir(ckpts) else None}")
    if not killed:
        return {"_status": "failed", "error": f"the first run ended (rc {p.returncode}) before step {first_ckpt} was "
                                              f"saved", "log_tail": first_log[-2000:]}
    rc, out = check.run(cmd, timeout=args.train_timeout)
    resumed = [ln for ln in out.splitlines() if "resumed from step" in ln]
    summary_path = os.path.join(workdir, "summary.json")
    summary = json.load(open(summary_path)) if os.path.exists(summary_path) else {}
    every = 4 if args.cpu else args.train_steps // 3
    try:
        resumed_at = int(resumed[0].split("resumed from step")[1].split()[0]) if resumed else None
    except ValueError:
        resumed_at = None
    # killed at or after the first save: it must resume from a saved step (the first, or a later one that completed)
    ok = (rc == 0 and resumed_at is not None and resumed_at >= first_ckpt and resumed_at % every == 0
          and bool(summary.get("finished")))
    mem = [ln.strip() for ln in (first_log + out).splitlines() if "compiled train step memory" in ln][:1]
    return {"command": " ".join(cmd), "killed_after_s": first_s, "resumed_from_step": resumed_at, "rc": rc,
            "summary": summary, "compiled_memory": mem, "_status": "ok" if ok else "failed"}


def step_decode(check: Check, args) -> dict:
    from moe_jax.tools.bench import decode
    path = "configs/smoke.py" if args.cpu else "configs/moe.py"
    return decode.run(load(path), path, (2,) if args.cpu else (1, 8), prompt_len=16,
                      max_new_tokens=16 if args.cpu else 200, repeats=1 if args.cpu else 3, out=check.log)


def step_compare(check: Check, args) -> dict:
    workdir = os.path.join(check.work, "compare")
    cmd = [python(), "-m", "moe_jax.compare", "--config", "configs/compare_smoke.py", "--workdir", workdir]
    if args.cpu:
        cmd += ["--config.seeds=(0,)", "--config.budget.reference_steps=4", "--config.base.train.eval_batches=2"]
    rc, out = check.run(cmd, timeout=args.compare_timeout)
    path = os.path.join(workdir, "results.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    keep = {k: results[k] for k in ("arms", "budget_flops", "seeds") if k in results}
    return {"command": " ".join(cmd), "rc": rc, "results": keep or {"tail": out[-1500:]},
            "_status": "ok" if rc == 0 and results else "failed"}


def seeds_source(args) -> tuple[str, str]:
    """(the seed sources folder, the Python to time them with), or ("", why the step is skipped) in one line."""
    folder = args.seeds_dir or os.environ.get("MOE_JAX_SEEDS_DIR", "")
    if not folder and os.path.isdir(os.path.join(ROOT, ".seeds", "repos")):
        folder = os.path.join(ROOT, ".seeds", "repos")  # where scripts/device_prepare.sh --seeds puts them
    if not folder:
        return "", ("no seed sources: give --seeds_dir DIR (or MOE_JAX_SEEDS_DIR) holding llm-moe/ "
                    "(scripts/seed_timing.py)")
    if not os.path.isdir(os.path.join(folder, "llm-moe")):
        return "", f"--seeds_dir {folder}: llm-moe/ is missing (scripts/seed_timing.py says what goes there)"
    py = args.seeds_python or os.environ.get("MOE_JAX_TORCH_PYTHON") or python()
    if subprocess.run([py, "-c", "import torch"], capture_output=True).returncode != 0:
        return "", f"torch is not importable by {py} (--seeds_python: a Python that has it)"
    return folder, py


def step_seeds(check: Check, args) -> dict:
    """The seeds' own PyTorch training step (scripts/seed_timing.py: seed 002's dense model and its MoE with every
    layer MoE) at the shapes of configs/gpu_dense.py and gpu_moe.py (CPU: tiny), with the seeds' float16 autocast on
    CUDA; the MoE step time over the dense one, to set beside moe_jax's (bench)."""
    folder, py = seeds_source(args)
    if not folder:
        return {"_status": "skipped", "why": py}
    if args.cpu:
        shape = dict(d_model=64, n_heads=4, n_layers=2, experts=4, top_k=2, vocab=512, seq=64, batch=4)
        d_ff, steps = {"seed002_dense": 128, "seed002_moe": 64}, ["--steps", "3", "--warmup", "1"]
    else:
        c = load("configs/gpu_moe.py")
        shape = dict(d_model=c.model.d_model, n_heads=c.model.n_heads, n_layers=c.model.n_layers,
                     experts=c.moe.num_experts, top_k=c.moe.top_k, vocab=c.model.vocab_size, seq=c.train.seq_len,
                     batch=c.train.batch_size)
        d_ff, steps = {"seed002_dense": c.model.d_ff, "seed002_moe": c.moe.d_ff}, ["--steps", "10", "--warmup", "3"]
    flags = [f"--{k}={v}" for k, v in shape.items()] + ["--grad_accum=1", *steps]
    out = {"seeds_dir": folder, "python": py, "runs": {}}
    for model, ff in d_ff.items():
        js = os.path.join(check.work, f"seed_timing_{model}.json")
        every_layer = ["--set", "moe_layers=all"] if model == "seed002_moe" else []
        rc, text = check.run([py, os.path.join(ROOT, "scripts", "seed_timing.py"), "--seedrepos", folder,
                              "--models", model, f"--d_ff={ff}", "--json", js, *every_layer, *flags],
                             timeout=args.seeds_timeout)
        if rc != 0 or not os.path.exists(js):
            return {**out, "_status": "failed", "error": f"scripts/seed_timing.py --models {model} exited with {rc}",
                    "tail": text[-1500:]}
        with open(js) as f:
            out["runs"][model] = json.load(f)
    d, m = (out["runs"][k]["results"][k]["ms_per_step_median"] for k in ("seed002_dense", "seed002_moe"))
    out["seed_moe_step_over_dense_step"] = m / d
    check.log(f"seeds' PyTorch: MoE step {m:.1f} ms / dense step {d:.1f} ms = {m / d:.3f}")
    return out


GPU_TESTS = ["tests/test_precision.py", "tests/test_layers.py", "tests/test_model.py", "tests/test_moe.py",
             "tests/test_muon.py", "tests/test_optimizer.py", "tests/test_decode.py", "tests/test_trainer.py",
             "tests/test_gpu_configs.py"]
# All of the numerics modules; from the slower ones the tests that matter most on a new backend (Newton-Schulz,
# cached decoding, training below unigram entropy, exact resume). Tests that need 8 devices cannot run on one chip.
GPU_SELECT = ("(test_precision or test_layers or test_model or test_moe or test_muon or test_gpu_configs "
              "or orthogonalised or cached_greedy_equals or smoke_trains or resume_is_exact) and not 8_device")


def step_tests(check: Check, args) -> dict:
    env = {"JAX_DEFAULT_MATMUL_PRECISION": "highest", "MOE_JAX_CACHE": os.path.join(check.work, "test_cache")}
    if args.cpu:
        cmd = [python(), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu_configs.py"]
    else:
        import jax
        env["JAX_PLATFORMS"] = os.environ.get("JAX_PLATFORMS") or {"gpu": "cuda"}.get(jax.default_backend(),
                                                                                       jax.default_backend())
        env["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_deterministic_ops=true").strip()
        cmd = [python(), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", GPU_SELECT] + GPU_TESTS
        try:  # compiling is the tests' cost and is CPU-bound: 4 workers share the chip (no preallocation)
            import xdist  # noqa: F401
            cmd[3:3] = ["-n", "4"]
            env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
        except ImportError:
            pass
    # leave ~2 minutes of the budget for the steps after this one
    rc, out = check.run(cmd, timeout=max(60.0, min(200.0, check.left() - 120)), env=env)
    tail = [ln for ln in out.splitlines() if ln.strip()][-30:]
    summary = next((ln for ln in reversed(tail) if " passed" in ln or " failed" in ln or " error" in ln), "")
    failed = [ln for ln in tail if ln.startswith("FAILED") or ln.startswith("ERROR")]
    return {"command": " ".join(cmd), "env": env, "rc": rc, "summary": summary, "failed": failed,
            "_status": "ok" if rc == 0 else ("failed" if rc != 124 else "timeout")}


# ------------------------------------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="run on CPU with smoke-sized configs (what CI runs)")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "runs", "device_check"))
    ap.add_argument("--work", default="", help="scratch directory (default: a fresh one under /tmp)")
    ap.add_argument("--budget_s", type=float, default=0,
                    help="time budget; steps that would overrun it are skipped (default: 450 s; CPU: none)")
    ap.add_argument("--only", default="", help="comma-separated steps to run (default: all)")
    ap.add_argument("--skip", default="", help="comma-separated steps to skip")
    ap.add_argument("--bench_steps", type=int, default=10)
    ap.add_argument("--profile_steps", type=int, default=3)
    ap.add_argument("--train_steps", type=int, default=300)
    ap.add_argument("--train_timeout", type=float, default=150)
    ap.add_argument("--compare_timeout", type=float, default=150)
    ap.add_argument("--seeds_timeout", type=float, default=90)
    ap.add_argument("--seeds_dir", default="", help="the seeds' sources for the seeds step (scripts/seed_timing.py; "
                    "default: $MOE_JAX_SEEDS_DIR, else .seeds/repos if present; without them the step is skipped)")
    ap.add_argument("--seeds_python", default="", help="the Python (with torch) that times them (default: "
                    "$MOE_JAX_TORCH_PYTHON, else this one)")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)  # the bench/profile child process
    args = ap.parse_args(argv)
    if args.cpu:
        os.environ["JAX_PLATFORMS"] = "cpu"
    budget = args.budget_s or (float("inf") if args.cpu else 450.0)
    check = Check(os.path.abspath(args.out), budget, args.cpu)
    import tempfile
    check.work = args.work or tempfile.mkdtemp(prefix="moe_jax_device_check_")
    os.makedirs(check.work, exist_ok=True)
    os.environ.setdefault("MOE_JAX_CACHE", os.path.join(check.work, "cache"))
    check.result["command"] = " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:] if argv is None else argv)
    check.result["work_dir"] = check.work
    only = set(filter(None, args.only.split(",")))
    skip = set(filter(None, args.skip.split(",")))
    keep: list = []
    # (name, function, seconds of budget it needs to start), in order of what the check is for
    steps = [("env", lambda: step_env(check), 0),
             ("attention", lambda: step_attention(check, (2, 256, 4, 64) if not args.cpu else (2, 64, 2, 16)), 10),
             ("bench", lambda: step_bench(check, args, keep), 60),
             ("profile", lambda: step_profile(check, keep, args.profile_steps), 10),
             ("prediction", lambda: step_prediction(check, args), 0),
             ("update", lambda: step_update(check, args), 40 if not args.cpu else 10),
             ("train", lambda: step_train(check, args), 60 if not args.cpu else 30),
             ("tests", lambda: step_tests(check, args), 60 if not args.cpu else 10),
             ("decode", lambda: step_decode(check, args), 20 if not args.cpu else 5),
             ("seeds", lambda: step_seeds(check, args), 50),
             ("compare", lambda: step_compare(check, args), 60 if not args.cpu else 25)]
    for name, fn, need in steps:
        if (only and name not in only) or name in skip:
            check.result["steps"][name] = {"status": "skipped", "why": "not selected"}
            continue
        if name in ("bench", "profile") and not args.inner:
            if name == "bench":
                if check.left() < need:
                    check.step(name, fn, need)  # records the skip
                else:
                    step_bench_and_profile(check, args)
            elif "profile" not in check.result["steps"]:
                check.result["steps"][name] = {"status": "skipped", "why": "bench not run"}
            continue
        check.step(name, fn, need)
    check.write()
    statuses = {k: v["status"] for k, v in check.result["steps"].items()}
    check.log(f"done in {time.time() - check.t0:.0f} s: {statuses}")
    check.log(f"results: {os.path.join(check.out_dir, 'device_check.json')}")
    return 0 if all(s in ("ok", "skipped") for s in statuses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
