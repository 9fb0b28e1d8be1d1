"""Compile the trainer's programs for a real TPU slice or GPU node that is not attached, and predict from the compiled
program what a run there would need and could reach.

    python -m moe_jax.aot --config configs/gpu_moe.py --target v5p-128 [--mesh 16,4,1] [--slices 2] [--decode]
                          [--config.x=y ...] [--json out.json]
    python -m moe_jax.aot --table --configs configs/smoke.py,configs/gpu_moe.py --targets v4-8,h100-8 \
                          --markdown docs/aot_table.md [--table_json docs/aot_table.json]

The real XLA compilers run here on the CPU (libtpu for TPUs, the CUDA PJRT plugin for GPUs; `pip install '.[aot]'`),
for the devices of moe_jax/tools/targets.py. The mesh is built by sharding.build_mesh from those devices exactly as
the trainer builds it on that hardware (jax.make_mesh / create_hybrid_device_mesh over the physical topology), and
the programs are the trainer's own (moe_jax/train/step.py): the train step, the eval step, and with --decode the
prefill of moe_jax/model/decode.py. `compile_programs` is the one place that calls the trainer's code.

Printed per device and written with --json: the compiled memory (arguments, outputs, temporaries, generated code; peak
= arguments + outputs - aliased + temporaries + code) against the device's memory, refused (exit 2) above MEMORY_LIMIT
of it; executed FLOPs (moe_jax/model/flops.py) and device-memory bytes (counted from the optimized HLO,
tools/hlo.traffic_bytes), the TPU compiler's cost analysis beside them (not used: it counts a loop's body once); every
collective in the optimized HLO (tools/hlo.py) with its count and bytes per step, and with --slices those that cross
the slow links between slices or nodes; the kernels XLA did not write (custom calls: Mosaic, Triton, cuDNN); and a
roofline (`roofline`): compute (FLOPs / peak), memory (bytes / HBM bandwidth) and communication (bytes sent / ICI or
DCN bandwidth); the step estimate is the longest of the three, the MFU estimate the model FLOPs (flops.flops_per_step)
over peak x that time, and the MFU ceiling the same with the least memory traffic any schedule needs (an upper bound;
the HLO's byte count is rough). The figures and their sources are tools/hardware.py's. These are compile-time
predictions; nothing here has been measured on an accelerator.

Errors are one `error:` line and exit status 2: a program that does not fit the device's memory (fix: a smaller
train.batch_size with more train.grad_accum, model.remat, a mesh with more model/expert sharding), a mesh the
topology cannot hold (fix: another --mesh), a missing compiler package (fix: the install command).
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import numpy as np

from moe_jax.config import schema as config_lib
from moe_jax.config import typed
from moe_jax.model import flops
from moe_jax import sharding as sharding_lib
from moe_jax.tools import hlo
from moe_jax.tools import targets as targets_lib

MEMORY_LIMIT = 0.9  # refuse a program whose peak exceeds this fraction of the device's memory
PROGRAMS = ("train", "eval", "decode")
GIB = 2.0 ** 30


class AotError(ValueError):
    """Bad input or a program the target cannot run; the message names what and the fix (exit 2)."""


@dataclasses.dataclass(frozen=True)
class Request:
    target: str
    mesh: tuple[int, ...] | None = None  # overrides config.mesh.shape (one slice's shape with slices > 1)
    slices: int = 1
    decode: bool = False
    decode_batch: int = 1
    decode_prompt: int = 0  # 0: half the context


def prepare_config(config, target: targets_lib.Target, request: Request):
    """A copy of the ConfigDict `config` with the request's mesh and slices, parsed (config.typed.parse: validated,
    'auto' resolved for the target's platform). Returns (RunConfig, notes): notes say what differs from a run on the
    hardware."""
    config = config.copy_and_resolve_references()
    notes = []
    if request.mesh is not None:
        config.mesh.shape = tuple(request.mesh)
    if request.slices > 1:
        dcn = tuple(config.mesh.get("dcn_shape", (1, 1, 1)))
        if math.prod(dcn) == 1:
            config.mesh.dcn_shape = (request.slices,) + (1,) * (len(config_lib.MESH_AXES) - 1)
        elif math.prod(dcn) != request.slices:
            raise AotError(f"--slices {request.slices}: config.mesh.dcn_shape {dcn} spans {math.prod(dcn)} slices; "
                           f"make them agree")
    run = typed.parse(config, target.platform)
    notes += _grouped_matmul_notes(run, target)
    requested = config.model.attention
    if run.model.attention == "cudnn":
        run = run.replace(model={"attention": "xla"})
        notes.append(f"model.attention {requested!r} -> 'cudnn' on GPU, but cuDNN is not available to a compile-only "
                     f"GPU client: compiled with 'xla' attention instead (a real run's fused attention uses less "
                     f"memory and time than predicted here)")
    return run, notes


def _grouped_matmul_notes(run, target: targets_lib.Target) -> list[str]:
    """The dropless path's 'megablox' grouped matmul is a Pallas TPU kernel: refused for a GPU target (a GPU run
    would execute it in Pallas interpret mode) and, for a TPU target, refused when its matmul widths are not multiples
    of 128 (the Mosaic lowering's block-shape rule; moe_jax/model/dropless.py compiles the kernel for the platform of
    the mesh, so this is the TPU program itself)."""
    moe = run.moe
    if not (moe.num_experts and moe.dispatch == "dropless" and moe.grouped_matmul == "megablox"):
        return []
    if target.platform != "tpu":
        raise AotError(f"--config.moe.grouped_matmul=megablox: a Pallas TPU kernel, which a {target.name} run would "
                       f"execute in Pallas interpret mode; use --config.moe.grouped_matmul=ragged_dot for a GPU")
    model_shards = max(1, run.mesh.shape[config_lib.MESH_AXES.index("model")])
    widths = {"model.d_model": run.model.d_model, "moe.d_ff / model shards": moe.d_ff // model_shards}
    narrow = {k: v for k, v in widths.items() if v % 128}
    if narrow:
        raise AotError(f"--config.moe.grouped_matmul=megablox: the TPU kernel needs matmul widths that are multiples "
                       f"of 128, got {', '.join(f'{k} = {v}' for k, v in narrow.items())}; widen them or use "
                       f"--config.moe.grouped_matmul=ragged_dot")
    return ["moe.grouped_matmul 'megablox': the expert matmuls compile to the Pallas Mosaic kernel (a "
            "tpu_custom_call)"]


def build_mesh(mesh: typed.MeshConfig, target: targets_lib.Target, slices: int):
    """The trainer's mesh (sharding.build_mesh of the run's MeshConfig) over the target's devices; AotError when the
    topology cannot hold it."""
    devices = targets_lib.topology_devices(target, slices)
    shape = tuple(mesh.shape)
    try:
        return sharding_lib.build_mesh(mesh, devices, slice_of=None)
    except config_lib.ConfigError as e:
        raise AotError(f"--mesh {','.join(map(str, shape))}: {e}") from None
    except (ValueError, NotImplementedError, AssertionError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AotError(f"--mesh {','.join(map(str, shape))}: the {target.name} topology "
                       f"({target.topology or f'{target.chips} GPUs per node'}, x{slices} slices) cannot hold this "
                       f"mesh ({reason[:160]}); use another --mesh, e.g. -1,1,1 or one whose axes follow the "
                       f"physical axes") from None


def _batch_like(run, rows: int) -> dict:
    seq = run.train.seq_len
    out = {"inputs": jax.ShapeDtypeStruct((rows, seq), np.int32),
           "targets": jax.ShapeDtypeStruct((rows, seq), np.int32),
           "weights": jax.ShapeDtypeStruct((rows, seq), np.float32)}
    if run.data.packing == "segments":
        out["segment_ids"] = jax.ShapeDtypeStruct((rows, seq), np.int32)
        out["positions"] = jax.ShapeDtypeStruct((rows, seq), np.int32)
    return out


def compile_programs(run, mesh, request: Request) -> dict:
    """THE adapter to the trainer (moe_jax/train/step.py, model/decode.py, optim/chain.py): {program: (compiled
    executable, compile seconds)} of a RunConfig's 'train', 'eval' and, with request.decode, 'decode' (the prefill),
    built from its typed pieces as moe_jax/train/loop.py builds them. XLA's errors propagate (RESOURCE_EXHAUSTED: out
    of memory on TPU)."""
    from moe_jax.model import decode as decode_lib
    from moe_jax.model import transformer as model_lib
    from moe_jax.optim import chain as optimizer_lib
    from moe_jax.train import loop as loop_lib
    from moe_jax.train import step as step_lib

    t = run.train
    loop_lib.check_batch_fits_mesh(t, mesh)
    graphdef, abstract_nnx = model_lib.abstract(run.model)
    opt = optimizer_lib.build(run.optim, t.steps, distributed_muon=run.mesh.fsdp)
    out = {}
    t0 = time.process_time()
    abs_state = step_lib.abstract_train_state(abstract_nnx, opt, mesh, run.mesh.fsdp)
    out["train"] = (step_lib.compile_train_step(t, graphdef, opt, abs_state, mesh,
                                                _batch_like(run, t.batch_size * t.grad_accum))[0],
                    time.process_time() - t0)
    t0 = time.process_time()
    out["eval"] = (step_lib.compile_eval_step(graphdef, abs_state["params"], mesh,
                                              _batch_like(run, t.batch_size))[0], time.process_time() - t0)
    if request.decode:
        t0 = time.process_time()
        context = decode_lib.context_length(run)
        prompt = request.decode_prompt or context // 2
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        scalar = lambda dt: jax.ShapeDtypeStruct((), dt, sharding=rep)  # noqa: E731
        key_dtype = jax.eval_shape(lambda: jax.random.key(0)).dtype  # abstract: the mesh's devices are not attached
        with jax.set_mesh(mesh):
            lowered = decode_lib.prefill_program.lower(
                graphdef, abs_state["params"], jax.ShapeDtypeStruct((request.decode_batch, prompt), np.int32,
                                                                    sharding=rep),
                scalar(np.int32), scalar(key_dtype),
                scalar(np.float32), scalar(np.int32), scalar(np.float32), scalar(np.float32),
                cache_len=context, candidates=decode_lib.candidate_count(0, run.model.vocab_size))
            out["decode"] = (lowered.compile(), time.process_time() - t0)
    return out


def memory(compiled) -> dict:
    """Compiled memory per device (bytes): arguments, outputs, aliased, temporaries, code, and peak."""
    from moe_jax.train import step as step_lib
    m = step_lib._memory(compiled)
    if not m:
        return {}
    out = {k.replace("_size_in_bytes", "").replace("generated_code", "code"): v for k, v in m.items()}
    out["peak"] = out["argument"] + out["output"] - out.get("alias", 0) + out["temp"] + out.get("code", 0)
    return out


def _cost(compiled) -> dict:
    try:
        c = compiled.cost_analysis()
    except Exception:  # compile-only GPU clients raise or return None
        return {}
    if isinstance(c, (list, tuple)):
        c = c[0] if c else None
    return dict(c) if c else {}


def _position_slices(mesh) -> list[int]:
    """Slice (TPU) or node (GPU) of each device-assignment position (the mesh's devices in order)."""
    return [targets_lib.slice_of(d) for d in mesh.devices.flat]


def collectives(compiled, mesh) -> dict:
    """tools/hlo.summary of the compiled program's collectives, slices taken from the mesh's devices."""
    slices = _position_slices(mesh)
    colls = hlo.collectives(compiled.as_text(), len(slices))
    return hlo.summary(colls, (lambda i: slices[i]) if len(set(slices)) > 1 else None)


def _flops_bytes(compiled, program: str, run, n_devices: int) -> dict:
    """Executed FLOPs and device-memory bytes per device per run, with their sources, counted the same way on every
    platform: FLOPs by moe_jax/model/flops.py (checked against the step's own jaxpr, tests/test_flops.py), bytes from
    the optimized HLO (tools/hlo.traffic_bytes: it skips what the compiler placed on chip). The TPU compiler's own cost
    analysis is kept beside them, not used: it counts a while loop's body once (configs/dense.py, 4 micro-batches
    accumulated in a loop, came out at a quarter of its FLOPs: an 'MFU' above 100%), and its 'bytes accessed' for
    configs/moe.py on v6e-8 was 35 GB against the HLO's 7.5 GB in device memory, 12 GB of results sitting on chip."""
    cost = _cost(compiled)
    t = run.train
    if program == "train":  # the model's work splits over the devices; Newton-Schulz only under distributed Muon
        f = flops.executed_flops_per_step(run, n_devices)
    else:  # forward only: a third of the training FLOPs per token
        rows = t.batch_size if program == "eval" else 1
        f = flops.run_flops_per_token(run)["training"] / 3 * rows * t.seq_len / n_devices
    return {"flops": f, "flops_source": "moe_jax/model/flops.py, executed FLOPs (Newton-Schulz on every device "
                                        "unless distributed)",
            "bytes": hlo.traffic_bytes(compiled.as_text()),
            "bytes_source": "optimized HLO: results in device memory written and read once (tools/hlo.traffic_bytes)",
            "xla_flops": float(cost["flops"]) if cost.get("flops") else None,
            "xla_bytes_accessed": float(cost["bytes accessed"]) if cost.get("bytes accessed") else None}


def roofline(work: dict, colls: dict, device, model_flops: float, n_devices: int, memory: dict) -> dict:
    """Step-time bounds (seconds) and MFU from per-device work, collectives, compiled memory and the device's figures.

    Terms: compute = FLOPs / peak; HBM = bytes / bandwidth, twice: `least_memory_s` from the least traffic any
    schedule needs (the arguments read once, the outputs written once), `memory_s` from the program's count
    (work["bytes"], tools/hlo.traffic_bytes), rough both ways (a result read by several ops counts one read); communication = ICI + DCN wire bytes / their bandwidths. The step takes at least max(compute,
    least_memory, communication) (-> `mfu_ceiling`, an upper bound), about max(compute, memory, communication) (->
    `step_s_estimate`, `mfu_estimate`, `bound`), at most the sum of the terms with the compiler's bytes."""
    by = colls["by_kind"]
    dcn = sum(r["cross_slice_wire_bytes"] for r in by.values())
    ici = sum(r["wire_bytes"] for r in by.values()) - dcn
    least_bytes = memory.get("argument", 0) + memory.get("output", 0)
    times = {"compute_s": work["flops"] / (device.peak_tflops * 1e12),
             "memory_s": work["bytes"] / device.hbm_bytes_per_s,
             "least_memory_s": least_bytes / device.hbm_bytes_per_s,
             "ici_s": ici / device.ici_bytes_per_s, "dcn_s": dcn / device.dcn_bytes_per_s}
    comm = times["ici_s"] + times["dcn_s"]
    low = max(times["compute_s"], times["least_memory_s"], comm)
    estimate = max(times["compute_s"], times["memory_s"], comm)
    high = times["compute_s"] + times["memory_s"] + comm
    bound = max(("compute", times["compute_s"]), ("memory", times["memory_s"]), ("communication", comm),
                key=lambda kv: kv[1])[0]
    mfu = lambda t: model_flops / (n_devices * device.peak_tflops * 1e12 * t) if t > 0 else float("nan")  # noqa
    return {**times, "step_s_min": low, "step_s_estimate": estimate, "step_s_max": high, "bound": bound,
            "mfu_ceiling": mfu(low), "mfu_estimate": mfu(estimate), "model_flops": model_flops,
            "least_bytes": least_bytes, "ici_wire_bytes": ici, "dcn_wire_bytes": dcn,
            "figures": {"peak_tflops": device.peak_tflops, "peak_source": device.peak_source,
                        "hbm_bytes_per_s": device.hbm_bytes_per_s, "hbm_source": device.hbm_source,
                        "ici_bytes_per_s": device.ici_bytes_per_s, "ici_source": device.ici_source,
                        "dcn_bytes_per_s": device.dcn_bytes_per_s, "dcn_source": device.dcn_source}}


def analyse(program: str, compiled, seconds: float, run, target: targets_lib.Target, mesh) -> dict:
    """Everything reported for one compiled program (see the module docstring)."""
    n = mesh.devices.size
    mem = memory(compiled)
    limit = target.memory_bytes
    work = _flops_bytes(compiled, program, run, n)
    colls = collectives(compiled, mesh)
    model_flops = flops.flops_per_step(run) if program == "train" else \
        flops.run_flops_per_token(run)["training"] / 3 * run.train.batch_size * run.train.seq_len
    out = {"program": program, "compile_cpu_s": round(seconds, 2), "memory": mem, "device_memory": limit,
           "peak_fraction": mem["peak"] / limit if mem else None,
           "fits": bool(mem) and mem["peak"] <= MEMORY_LIMIT * limit, **work, "collectives": colls,
           "custom_calls": hlo.custom_calls(compiled.as_text())}
    if program != "decode":
        out["roofline"] = roofline(work, colls, target.hardware, model_flops, n, mem)
    return out


def _oom_error(e: Exception, target: targets_lib.Target, program: str) -> AotError:
    text = str(e)
    line = next((ln.strip() for ln in text.splitlines() if "memory" in ln.lower()), text.strip().splitlines()[0])
    return AotError(f"the {program} step does not fit in the {target.memory_bytes / GIB:.1f} GiB of one "
                    f"{target.hardware.description} ({line[:200]}); fix: lower train.batch_size (raise "
                    f"train.grad_accum to keep the batch), --config.model.remat=True, or shard more with --mesh")


def run(config, request: Request) -> dict:
    """Compile the programs of `config` (a ConfigDict, parsed here for the target: prepare_config) for
    request.target and analyse them. AotError for a bad target, mesh or config, or a program the compiler finds too
    large; the result says `fits` for the memory limit."""
    target = targets_lib.get(request.target)
    targets_lib.check_compiler(target)
    parsed, notes = prepare_config(config, target, request)
    mesh = build_mesh(parsed.mesh, target, request.slices)
    try:
        compiled = compile_programs(parsed, mesh, request)
    except Exception as e:  # XLA's out-of-memory is a runtime error type that jaxlib does not export stably
        if "RESOURCE_EXHAUSTED" in str(e) or "Ran out of memory" in str(e):
            raise _oom_error(e, target, "train") from None
        if isinstance(e, jax.errors.JaxRuntimeError):  # the compiler itself failed: a finding about this target
            first = str(e).strip().splitlines()[0][:300]
            raise AotError(f"the XLA compiler for {target.name} failed on this program ({first}); this is the "
                           "compiler's limit or bug for that target, not a memory verdict") from None
        raise
    programs = {name: analyse(name, c, s, parsed, target, mesh) for name, (c, s) in compiled.items()}
    return {"config": parsed.name, "target": target.name, "platform": target.platform,
            "device": target.hardware.description, "devices": int(mesh.devices.size), "slices": request.slices,
            "mesh": dict(mesh.shape), "batch": {"batch_size": parsed.train.batch_size,
                                                "grad_accum": parsed.train.grad_accum,
                                                "seq_len": parsed.train.seq_len},
            "remat": bool(parsed.model.remat), "attention": parsed.model.attention,
            "dispatch": parsed.moe.dispatch if parsed.moe.num_experts else "dense",
            "jax": jax.__version__, "notes": notes, "programs": programs,
            "fits": all(p["fits"] for p in programs.values()),
            "memory_limit_fraction": MEMORY_LIMIT}


def _gib(x: float) -> str:
    return f"{x / GIB:.2f} GiB"


def _bytes(x: float) -> str:
    """Bytes with a binary unit that keeps 3 significant digits readable (B, KiB, MiB, GiB)."""
    for unit, size in (("GiB", GIB), ("MiB", 2.0 ** 20), ("KiB", 2.0 ** 10)):
        if abs(x) >= size:
            return f"{x / size:.3g} {unit}"
    return f"{x:.0f} B"


def _collective_lines(colls: dict, sliced: bool) -> list[str]:
    lines = []
    for kind, r in colls["by_kind"].items():
        if not r["count"]:
            continue
        cross = (f"; across slices: {r['cross_slice_count']} ({_bytes(r['cross_slice_wire_bytes'])} sent)"
                 if sliced else "")
        lines.append(f"    {kind:<19} {r['count']:>5} x, {_bytes(r['bytes']):>10} held, "
                     f"{_bytes(r['wire_bytes']):>10} sent per device{cross}")
    if colls["unknown_trip_counts"]:
        lines.append(f"    ({colls['unknown_trip_counts']} collectives in loops of unknown trip count, counted once)")
    return lines or ["    none"]


def _program_lines(name: str, p: dict, sliced: bool) -> list[str]:
    m = p["memory"]
    lines = [f"{name} step: compiled in {p['compile_cpu_s']:.1f} CPU-s"]
    if m:
        margin = p["device_memory"] - m["peak"]
        lines += [f"  memory per device: arguments {_bytes(m['argument'])}, outputs {_bytes(m['output'])} (aliased "
                  f"{_bytes(m.get('alias', 0))}), temporaries {_bytes(m['temp'])}, code {_bytes(m.get('code', 0))}",
                  f"  peak {_bytes(m['peak'])} of {_gib(p['device_memory'])} ({100 * p['peak_fraction']:.1f}%), "
                  f"margin {_gib(margin)}: {'fits' if p['fits'] else f'DOES NOT FIT (limit {MEMORY_LIMIT:.0%})'}"]
    lines.append(f"  per device: {p['flops']:.4g} FLOPs ({p['flops_source']}), {_bytes(p['bytes'])} accessed "
                 f"({p['bytes_source']})")
    lines.append("  collectives per step (per device):")
    lines += _collective_lines(p["collectives"], sliced)
    if p.get("custom_calls"):
        lines.append("  kernels XLA did not write (custom calls per step): "
                     + ", ".join(f"{k} {v} x" for k, v in p["custom_calls"].items()))
    r = p.get("roofline")
    if r:
        lines += [f"  roofline: compute {1e3 * r['compute_s']:.3f} ms, HBM {1e3 * r['memory_s']:.3f} ms (at least "
                  f"{1e3 * r['least_memory_s']:.3f}), ICI/NVLink {1e3 * r['ici_s']:.3f} ms, DCN {1e3 * r['dcn_s']:.3f} "
                  f"ms -> step about {1e3 * r['step_s_estimate']:.3f} ms ({r['bound']}-bound), between "
                  f"{1e3 * r['step_s_min']:.3f} and {1e3 * r['step_s_max']:.3f} ms; MFU about "
                  f"{100 * r['mfu_estimate']:.1f}%, at most {100 * r['mfu_ceiling']:.1f}% ({r['model_flops']:.4g} model "
                  f"FLOPs per step)"]
    return lines


def report(result: dict) -> str:
    """The printed report of `run`'s result."""
    sliced = f" in {result['slices']} slices" if result["slices"] > 1 else ""
    lines = [f"{result['config']} on {result['target']}: {result['devices']} x {result['device']}{sliced}, "
             f"mesh {result['mesh']}, "
             f"batch {result['batch']['batch_size']} x accumulation {result['batch']['grad_accum']} x "
             f"{result['batch']['seq_len']} tokens, attention {result['attention']}, dispatch {result['dispatch']}"
             f"{', remat' if result['remat'] else ''} (jax {result['jax']}; compile-time prediction, not a "
             f"measurement)"]
    lines += [f"note: {n}" for n in result["notes"]]
    for name, p in result["programs"].items():
        lines += _program_lines(name, p, result["slices"] > 1)
    r = result["programs"]["train"]["roofline"]["figures"]
    lines += ["figures used (per device):",
              f"  peak {r['peak_tflops']:g} TFLOP/s: {r['peak_source']}",
              f"  HBM {r['hbm_bytes_per_s'] / 1e9:g} GB/s: {r['hbm_source']}",
              f"  ICI/NVLink {r['ici_bytes_per_s'] / 1e9:g} GB/s: {r['ici_source']}",
              f"  DCN {r['dcn_bytes_per_s'] / 1e9:g} GB/s: {r['dcn_source']}"]
    return "\n".join(lines)


def check_fits(result: dict) -> None:
    """AotError naming the first program whose peak exceeds MEMORY_LIMIT of the device's memory."""
    for name, p in result["programs"].items():
        if not p["fits"] and p["memory"]:
            target = targets_lib.get(result["target"])
            raise AotError(f"the {name} step does not fit: it needs {_gib(p['memory']['peak'])} per device, "
                           f"{100 * p['peak_fraction']:.0f}% of the {_gib(p['device_memory'])} of one "
                           f"{target.hardware.description} (limit {MEMORY_LIMIT:.0%}); fix: lower train.batch_size "
                           f"(raise train.grad_accum to keep the batch), --config.model.remat=True, or shard more "
                           f"with --mesh")
