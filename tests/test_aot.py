"""Tests for moe_jax/aot.py, tools/aot.py, tools/aot_table.py, tools/hlo.py and tools/targets.py: the trainer's steps
compiled for a TPU slice (v4-8) and a 2-GPU H100 node with the real XLA compilers on this CPU host.

Compiling is what costs here, so each target's programs are compiled ONCE per module (the `tpu_result` and
`gpu_result` fixtures; the GPU one through the command with --decode --json) and several tests assert on that one
result; the model is smoke with one layer (the least that still routes through experts), and the too-large program is
a one-layer dense model.

- argument bytes per device = the train state (parameters, optimizer state, step, rng) and the batch, each leaf
  divided as its PartitionSpec says (computed here from shapes and specs, not read from the compiler);
- an expert-parallel mesh (expert axis > 1) compiles the MoE dispatch to all-to-all collectives;
- too large a program, a mesh the topology cannot hold, a missing compiler: one `error:` line, exit status 2;
- --decode compiles the prefill: its arguments are the sharded parameters and the prompt, no optimizer state;
- the JSON holds the printed fields; the table is resumable (a computed row is not recompiled);
- the HLO reader's replica-group forms and its byte counts.

The compiler packages come from requirements-aot.txt (CI installs them); without them the compile tests skip.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from moe_jax import cli
from moe_jax.tools import aot, aot_table, hlo, targets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.py")
# smoke with one layer and 8 routing groups of 64 tokens, so the groups split over 4 (TPU) or 2 (GPU) expert shards
EP = {"moe.group_size": 64, "model.n_layers": 1}
TPU = ("v4-8", (1, 4, 1))
GPU = ("h100-2", (1, 2, 1))


def needs(platform: str):
    package = targets.compiler_package(platform)
    return pytest.mark.skipif(importlib.util.find_spec(package) is None,
                              reason=f"{package} not installed (the {platform.upper()} compiler for moe_jax.aot): "
                                     f"pip install -r requirements-aot.txt")


def smoke(overrides=None):
    c = cli.load_config_file(SMOKE)
    for k, v in {**EP, **(overrides or {})}.items():
        section, field = k.split(".")
        c[section][field] = v
    return c


def _shard_shapes(result_config, mesh_shape: dict, params_only: bool = False) -> list[tuple[tuple[int, ...], int]]:
    """(per-device shape, bytes per element) of every train-state array and the batch arrays (or, with params_only,
    of the parameters), divided as their PartitionSpecs say (from shapes and specs, not from the compiler)."""
    from flax import nnx
    from moe_jax import sharding as sharding_lib
    from moe_jax.model import transformer as model_lib
    from moe_jax.optim import chain as optimizer_lib
    from moe_jax.train import step as step_lib

    mesh = jax.sharding.AbstractMesh(tuple(mesh_shape.values()), tuple(mesh_shape))
    _, abstract_nnx = model_lib.abstract(result_config.model)
    opt = optimizer_lib.build(result_config.optim, result_config.train.steps)
    state = jax.eval_shape(lambda p: step_lib.init_state(result_config.seed, p, opt), nnx.to_pure_dict(abstract_nnx))
    specs = step_lib.state_shardings(state, abstract_nnx, mesh)
    if params_only:
        state, specs = state["params"], specs["params"]
    specs = jax.tree.leaves(specs)
    t = result_config.train
    batch = jax.ShapeDtypeStruct((t.batch_size * t.grad_accum, t.seq_len), np.int32)
    batch_spec = sharding_lib.logical_to_spec(("batch", None), tuple(mesh_shape))
    pairs = [(leaf, s.spec) for leaf, s in zip(jax.tree.leaves(state), specs)]
    pairs += [] if params_only else [(batch, batch_spec)] * 3
    out = []
    for leaf, spec in pairs:  # inputs, targets (int32) and weights (float32): 4 bytes each
        shape = list(leaf.shape)
        for i, axes in enumerate(spec):
            for a in (axes,) if isinstance(axes, str) else axes or ():
                shape[i] //= mesh_shape[a]
        out.append((tuple(shape), leaf.dtype.itemsize))
    return out


def _bytes(shards) -> int:
    return sum(math.prod(s) * b for s, b in shards)


def _tiled_bytes(shards) -> int:
    """An upper bound for TPU memory layouts: the last two dimensions padded to whole (8, 128) tiles, 1-D arrays to
    1024 elements, scalars to 4 KiB."""
    total = 0
    for s, b in shards:
        if not s:
            total += 4096
        elif len(s) == 1:
            total += math.ceil(s[0] / 1024) * 1024 * b
        else:
            total += math.prod(s[:-2]) * math.ceil(s[-2] / 8) * 8 * math.ceil(s[-1] / 128) * 128 * b
    return total


def _prepared(target: str, mesh, overrides=None):
    request = aot.Request(target, mesh=mesh)
    config, _ = aot.prepare_config(smoke(overrides), targets.get(target), request)
    return config, request


def _skip_without(platform: str):
    package = targets.compiler_package(platform)
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} not installed (the {platform.upper()} compiler for moe_jax.aot): "
                    f"pip install -r requirements-aot.txt")


def _command(*args):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", "moe_jax.aot", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=300)


def _overrides(overrides: dict) -> list[str]:
    return [f"--config.{k}={v}" for k, v in overrides.items()]


@pytest.fixture(scope="module")
def tpu_result():
    """smoke on v4-8 with 4 expert shards, compiled in this process: {train, eval}."""
    _skip_without("tpu")
    return aot.run(smoke(), aot.Request(TPU[0], mesh=TPU[1]))


@pytest.fixture(scope="module")
def gpu_command(tmp_path_factory):
    """`python -m moe_jax.aot` for smoke on h100-2 with 2 expert shards, --decode --json: (its stdout, its JSON)."""
    _skip_without("gpu")
    path = tmp_path_factory.mktemp("aot") / "h100.json"
    r = _command("--config", SMOKE, "--target", GPU[0], "--mesh", ",".join(map(str, GPU[1])), "--decode",
                 "--json", str(path), *_overrides(EP))
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout, json.loads(path.read_text())


@pytest.fixture(scope="module")
def gpu_result(gpu_command):
    return gpu_command[1]


@pytest.mark.parametrize("which,target,mesh", [("tpu_result", *TPU), ("gpu_result", *GPU)])
def test_arguments_are_the_sharded_state_and_batch(request, which, target, mesh):
    result = request.getfixturevalue(which)
    config, _ = _prepared(target, mesh)
    shards = _shard_shapes(config, result["mesh"])
    want = _bytes(shards)
    got = result["programs"]["train"]["memory"]["argument"]
    if target.startswith("h"):  # GPU memory holds arrays unpadded
        assert got == want
    else:  # TPU memory tiles arrays; smoke's are small, so padding shows: within the whole-tile bound
        assert want <= got <= _tiled_bytes(shards), (got, want)
    assert result["programs"]["train"]["memory"]["alias"] > 0.9 * want - 3 * 2 ** 20  # the donated state


@pytest.mark.parametrize("which", ["tpu_result", "gpu_result"])
def test_expert_parallel_program_has_all_to_all(request, which):
    result = request.getfixturevalue(which)
    assert result["mesh"]["expert"] > 1
    colls = result["programs"]["train"]["collectives"]["by_kind"]
    assert colls["all-to-all"]["count"] > 0 and colls["all-to-all"]["bytes"] > 0
    assert result["fits"]
    r = result["programs"]["train"]["roofline"]
    assert r["step_s_min"] <= r["step_s_estimate"] <= r["step_s_max"]
    assert 0 < r["mfu_estimate"] <= r["mfu_ceiling"] <= 1


def test_gpu_attention_falls_back_and_says_so(gpu_result):
    assert gpu_result["attention"] == "xla"
    assert any("cuDNN" in n for n in gpu_result["notes"])
    assert "flops.py" in gpu_result["programs"]["train"]["flops_source"]  # compile-only GPU: no cost analysis


def test_json_has_the_printed_fields(gpu_command):
    text, result = gpu_command
    train = result["programs"]["train"]
    for key in ("argument", "output", "temp", "code", "peak"):
        assert key in train["memory"]
    for key in ("flops", "bytes", "collectives", "roofline", "fits", "device_memory", "compile_cpu_s"):
        assert key in train
    for key in ("compute_s", "memory_s", "least_memory_s", "ici_s", "dcn_s", "step_s_min", "step_s_estimate",
                "mfu_ceiling", "mfu_estimate", "figures"):
        assert key in train["roofline"]
    assert f"{100 * train['roofline']['mfu_ceiling']:.1f}%" in text
    assert "all-to-all" in text and "peak" in text and result["target"] in text
    for name, program in result["programs"].items():  # each program's printed line matches its JSON
        assert f"{name} step: compiled in {program['compile_cpu_s']:.1f} CPU-s" in text


def test_decode_compiles_the_prefill_with_the_parameters_only(gpu_result):
    """--decode: the prefill's arguments are the parameters as sharded plus the prompt and a few scalars (no
    optimizer state, no batch); it fits and has no roofline (not a training step)."""
    config, _ = _prepared(*GPU)
    decode = gpu_result["programs"]["decode"]
    params = _bytes(_shard_shapes(config, gpu_result["mesh"], params_only=True))
    prompt = 4 * config.train.seq_len // 2  # one row of half the context, int32
    assert params + prompt <= decode["memory"]["argument"] <= params + prompt + 64  # + 7 scalars and the rng key
    assert decode["memory"]["argument"] < gpu_result["programs"]["train"]["memory"]["argument"] / 2
    assert decode["fits"] and "roofline" not in decode


def _error_lines(r):
    return [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]


@needs("gpu")
def test_too_large_exits_2_with_one_line():
    dense = {"model.n_layers": 1, "moe.num_experts": 0, "train.batch_size": 2 ** 21}
    r = _command("--config", SMOKE, "--target", "h100-1", *_overrides(dense))
    assert r.returncode == 2, r.stderr[-2000:]
    lines = _error_lines(r)
    assert len(lines) == 1 and "does not fit" in lines[0] and "train.batch_size" in lines[0], lines


@needs("tpu")
def test_mesh_the_topology_cannot_hold_exits_2_with_one_line():
    r = _command("--config", SMOKE, "--target", "v5p-128", "--mesh", "8,8,1", "--config.train.batch_size=64",
                 "--config.moe.num_experts=8")  # v5p-128 is a 4x4x4 cube: no axis of 8
    assert r.returncode == 2, r.stderr[-2000:]
    lines = _error_lines(r)
    assert len(lines) == 1 and "--mesh 8,8,1" in lines[0] and "cannot hold" in lines[0], lines


@needs("tpu")
def test_dropless_expert_parallel_lowers_to_all_to_all_on_tpu():
    """moe.dispatch='dropless' (sort, ragged_dot grouped matmuls, shard_map with two all_to_alls per MoE layer) with
    2 expert shards on v4-8: the TPU compiler keeps ragged-dot as its own op and exchanges rows with all-to-all."""
    result = aot.run(smoke({"moe.dispatch": "dropless"}), aot.Request("v4-8", mesh=(2, 2, 1)))
    assert result["dispatch"] == "dropless" and result["mesh"]["expert"] == 2 and result["fits"]
    for name, forward_and_back in (("train", 2), ("eval", 1)):
        colls = result["programs"][name]["collectives"]["by_kind"]
        assert colls["all-to-all"]["count"] >= 2 * forward_and_back, (name, colls)


def test_megablox_is_refused_for_a_gpu_and_for_narrow_tpu_matmuls():
    megablox = {"moe.dispatch": "dropless", "moe.grouped_matmul": "megablox"}
    with pytest.raises(aot.AotError, match=r"grouped_matmul=ragged_dot for a GPU"):
        aot.prepare_config(smoke(megablox), targets.get("h100-8"), aot.Request("h100-8"))
    with pytest.raises(aot.AotError, match=r"multiples of 128, got model.d_model = 64"):
        aot.prepare_config(smoke(megablox), targets.get("v4-8"), aot.Request("v4-8", mesh=(2, 2, 1)))
    _, notes = aot.prepare_config(smoke({"moe.dispatch": "dropless"}), targets.get("v4-8"), aot.Request("v4-8"))
    assert not any("megablox" in n for n in notes)


@needs("tpu")
def test_megablox_compiles_to_the_mosaic_kernel_for_a_tpu():
    """On this CPU host the kernel is chosen from the mesh's devices (TPU), not the attached ones: the compiled TPU
    program calls the Mosaic kernel (tpu_custom_call) instead of Pallas' interpret-mode loops."""
    wide = {"moe.dispatch": "dropless", "moe.grouped_matmul": "megablox", "model.d_model": 128, "moe.d_ff": 256,
            "model.d_ff": 256}
    result = aot.run(smoke(wide), aot.Request("v4-8", mesh=(2, 2, 1)))
    assert any("Mosaic kernel" in n for n in result["notes"])
    for name in ("train", "eval"):
        assert result["programs"][name]["custom_calls"].get("tpu_custom_call", 0) >= 2, result["programs"][name]


def test_missing_compiler_is_one_line_with_the_install_command(monkeypatch):
    monkeypatch.setattr(targets, "compiler_package", lambda platform: "no_such_compiler_package")
    with pytest.raises(targets.TargetError, match=r"requirements-aot.txt"):
        aot.run(smoke(), aot.Request("v4-8"))


def test_unknown_target_names_the_choices():
    with pytest.raises(targets.TargetError, match="v5p-128"):
        targets.get("v9-8")


def test_targets_for_a_device_count():
    """moe_jax.budget's check: n devices of a hardware row -> (target, slices)."""
    assert targets.for_devices("h100", 8) == ("h100-8", 1) and targets.for_devices("h100", 4) == ("h100-4", 1)
    assert targets.get("h100-4").chips == 4 and targets.get("h100-4").memory_bytes == targets.get("h100-8").memory_bytes
    assert targets.for_devices("b200", 32) == ("b200-8", 4)
    assert targets.for_devices("v5p", 64) == ("v5p-128", 1) and targets.for_devices("v5e", 32) == ("v5e-16", 2)
    for device, n in (("h100", 12), ("v6e", 3)):
        with pytest.raises(targets.TargetError, match=f"{n} {device}"):
            targets.for_devices(device, n)


def test_cloud_accelerator_types_name_targets():
    """scripts/tpu.sh passes its ACCELERATOR as --target: Cloud TPU's v5litepod-N is the target v5e-N."""
    assert targets.get("v5litepod-8") is targets.TARGETS["v5e-8"]
    assert targets.get("V6E-8") is targets.TARGETS["v6e-8"] and targets.get("v4-8") is targets.TARGETS["v4-8"]


def test_table_is_resumable(tmp_path, monkeypatch, tpu_result):
    """A row is compiled once: the second run over the same file reads it back (aot.run is the compiled result of
    the tpu_result fixture, counted), and a new target adds only its row."""
    calls = []
    monkeypatch.setattr(aot, "run", lambda config, request: calls.append(request.target) or tpu_result)
    cache = str(tmp_path / "table.json")
    out = []
    rows = aot_table.compute([SMOKE], [TPU[0]], cache, out=out.append)
    assert calls == [TPU[0]] and len(rows) == 1 and out[-1].endswith("done")
    row = next(iter(rows.values()))
    assert row["fits"] and row["peak_gib"] > 0 and row["step_ms"][0] > 0 and "all-to-all" in row["collectives"]
    again = aot_table.compute([SMOKE], [TPU[0]], cache, out=out.append)
    assert calls == [TPU[0]] and again == json.loads(open(cache).read()) and out[-1].endswith("cached")
    more = aot_table.compute([SMOKE], [TPU[0], "v5p-8"], cache, out=out.append)
    assert calls == [TPU[0], "v5p-8"] and len(more) == 2 and out[-2].endswith("cached")
    table = aot_table.markdown(again)
    assert f"| configs/smoke.py | {TPU[0]} | yes |" in table.replace(ROOT + os.sep, "")


SHIPPED = ("configs/moe.py", "configs/dense.py", "configs/gpu_dense.py", "configs/gpu_moe.py",
           "configs/seeds/exp5_moe.py", "configs/seeds/seed002_dense.py", "configs/seeds/seed002_moe.py",
           "configs/seeds/seed004_baseline.py")
NAMED_TARGETS = ("v4-8", "v5e-8", "v5e-16", "v5e-256", "v5p-8", "v5p-128", "v6e-8", "h100-1", "h100-8", "h200-1",
                 "h200-8", "b200-8")


def test_committed_table_has_every_shipped_config_on_every_named_target():
    """docs/aot_table.json (the table docs/benchmarks.md reads) holds a row per shipped config and target, each a
    one-line reason or a prediction whose roofline is consistent with its own terms: 'about' is the longest term,
    the low end the longest with the least traffic, the high end their sum, and the MFU estimate / ceiling ratio is
    low / about; docs/aot_table.md is exactly the Markdown of those rows."""
    rows = aot_table.load(os.path.join(ROOT, "docs", "aot_table.json"))
    for config in SHIPPED:
        for target in NAMED_TARGETS:
            key = f"{config}|{target}|slices=1|mesh=config"
            assert key in rows, f"docs/aot_table.json lacks {key}"
            r = rows[key]
            if r["error"]:
                assert "\n" not in r["error"], key
                continue
            assert r["fits"] == (r["peak_gib"] <= aot.MEMORY_LIMIT * r["device_gib"]), key
            t = r["terms_ms"]
            low, about, high = r["step_ms"]
            np.testing.assert_allclose(about, max(t["compute"], t["memory"], t["ici"], t["dcn"]), rtol=1e-9)
            np.testing.assert_allclose(low, max(t["compute"], t["least_memory"], t["ici"], t["dcn"]), rtol=1e-9)
            np.testing.assert_allclose(high, t["compute"] + t["memory"] + t["ici"] + t["dcn"], rtol=1e-9)
            np.testing.assert_allclose(r["mfu_estimate"] / r["mfu_ceiling"], low / about, rtol=1e-9)
    with open(os.path.join(ROOT, "docs", "aot_table.md")) as f:
        assert f.read() == aot_table.markdown(rows)


# ---------------------------------------------------------------------------------------------------------------
# The HLO reader (no compiler needed)

def test_replica_group_forms():
    assert hlo.replica_groups("replica_groups={{0,1},{2,3}}, x", 4) == [[0, 1], [2, 3]]
    assert hlo.replica_groups("replica_groups=[2,4]<=[8], x", 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert hlo.replica_groups("replica_groups=[4,2]<=[2,4]T(1,0), x", 8) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    mesh = "replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}, x"
    assert hlo.replica_groups(mesh, 8) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert hlo.replica_groups("replica_groups={}, x", 8) is None


def test_collectives_count_loop_trips_and_bytes():
    text = """HloModule m

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %ar = f32[8]{0} all-reduce(%x), replica_groups={{0,1},{2,3}}, to_apply=%add
  ROOT %t = (s32[], f32[8]) tuple(%i, %ar)
}

ENTRY %main (a: f32[8]) -> f32[32] {
  %a = f32[8]{0} parameter(0)
  %w = (s32[], f32[8]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %ag = f32[32]{0} all-gather(%a), replica_groups=[1,4]<=[4], dimensions={0}
}
"""
    colls = {c.kind: c for c in hlo.collectives(text, 4)}
    assert colls["all-reduce"].count == 3 and colls["all-reduce"].size_bytes == 32
    assert colls["all-reduce"].wire_bytes == 32  # 2 (n-1)/n with n = 2
    assert colls["all-gather"].size_bytes == 128 and colls["all-gather"].wire_bytes == 96
    s = hlo.summary(list(colls.values()), lambda i: i // 2)  # slices {0,1} and {2,3}
    assert s["by_kind"]["all-reduce"]["cross_slice_count"] == 0
    assert s["by_kind"]["all-gather"]["cross_slice_count"] == 1


def test_traffic_counts_each_result_once_written_once_read_and_kernels_by_target():
    """traffic_bytes: every top-level result 2x its bytes, loop bodies times their trip count, fusion internals not
    at all, and an asynchronous op by its `-done` output (its `-start` tuple also carries the whole operand: counting
    it made a v6e program's 'traffic' half slice-start tuples), and a result in on-chip memory (layout `S(1)`) not at
    all. custom_calls: kernel targets per run."""
    text = """HloModule m

%fused (p: f32[64]) -> f32[64] {
  %p = f32[64]{0} parameter(0)
  ROOT %n = f32[64]{0} negate(%p)
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %k = f32[8]{0} custom-call(%x), custom_call_target="tpu_custom_call"
  ROOT %t = (s32[], f32[8]) tuple(%i, %k)
}

ENTRY %main (a: f32[64]) -> f32[16] {
  %a = f32[64]{0} parameter(0)
  %f = f32[64]{0} fusion(%a), kind=kLoop, calls=%fused
  %v = f32[64]{0:T(256)S(1)} copy(%f)
  %w = (s32[], f32[8]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %ss = ((f32[64]{0}), f32[16]{0}, s32[]) slice-start(%f), slice={[0:16]}
  ROOT %sd = f32[16]{0} slice-done(%ss)
}
"""
    # fusion result 256 B, 3 custom-call results of 32 B, the slice 64 B: each written and read
    assert hlo.traffic_bytes(text) == 2 * (256 + 3 * 32 + 64)
    assert hlo.custom_calls(text) == {"tpu_custom_call": 3}


def test_roofline_ceiling_uses_the_least_traffic_and_the_estimate_the_programs():
    """The MFU ceiling is an upper bound (memory term from the arguments read once and outputs written once); the
    estimate uses the program's byte count; the interval runs from the former's step time to the sum of terms."""
    device = targets.get("h100-8").hardware
    work = {"flops": device.peak_tflops * 1e12 * 0.010, "bytes": device.hbm_bytes_per_s * 0.030}  # 10 ms, 30 ms
    mem = {"argument": device.hbm_bytes_per_s * 0.002, "output": device.hbm_bytes_per_s * 0.002}  # 4 ms in all
    colls = {"by_kind": {"all-reduce": {"wire_bytes": device.ici_bytes_per_s * 0.005, "cross_slice_wire_bytes": 0}}}
    r = aot.roofline(work, colls, device, model_flops=8 * device.peak_tflops * 1e12 * 0.008, n_devices=8, memory=mem)
    assert np.isclose(r["step_s_min"], 0.010) and np.isclose(r["step_s_estimate"], 0.030)
    assert np.isclose(r["step_s_max"], 0.045) and r["bound"] == "memory"
    assert np.isclose(r["mfu_ceiling"], 0.8) and np.isclose(r["mfu_estimate"], 0.008 / 0.030)


def test_prediction_beside_a_measurement():
    """The device check's comparison: a table row (step ms low / about / high, peak GiB) against a measured step
    time and the device's compiled memory analysis."""
    assert aot_table.device_target("NVIDIA H100 80GB HBM3") == "h100-1"
    assert aot_table.device_target("NVIDIA H200") == "h200-1" and aot_table.device_target("cpu") is None
    row = {"target": "h100-1", "step_ms": (10.0, 20.0, 40.0), "mfu_estimate": 0.2, "mfu_ceiling": 0.5,
           "peak_gib": 4.0}
    gib = 2 ** 30
    memory = {"argument_size_in_bytes": 2 * gib, "output_size_in_bytes": 2 * gib, "alias_size_in_bytes": 2 * gib,
              "temp_size_in_bytes": 3 * gib, "generated_code_size_in_bytes": 0}
    c = aot_table.against_measurement(row, 0.030, memory)
    assert c["step_within_range"] and np.isclose(c["measured_over_predicted_step"], 1.5)
    assert np.isclose(c["measured_peak_gib"], 5.0) and np.isclose(c["measured_over_predicted_peak"], 1.25)
    assert not aot_table.against_measurement(row, 0.050, {})["step_within_range"]


def test_shape_bytes():
    assert hlo.shape_bytes("bf16[8,128]{1,0:T(8,128)(2,1)}") == [2048]
    assert hlo.shape_bytes("((bf16[2,4]{1,0}), f32[3]{0})") == [16, 12]
    assert np.isclose(sum(hlo.shape_bytes("(s32[], u32[2])")), 12)


def test_v5p_64_is_32_megacore_chips():
    """Cloud's v5p-64 counts TensorCores: 32 chips (one device each in megacore mode) in a 4x4x2 block, no torus."""
    t = targets.get("v5p-64")
    assert t.chips == 32 and t.topology == "v5:4x4x2" and t.chip_config == "megacore" and not any(t.wrap)
    assert targets.for_devices("v5p", 32) == ("v5p-64", 1)


def test_a_compiler_failure_is_one_line_and_a_table_row(tmp_path, monkeypatch):
    """An XLA internal error while compiling for a target (seen: B200 Triton tiling on configs/moe.py) is an AotError
    naming the target, so the command prints one line and the table records the row instead of stopping."""
    def boom(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("INTERNAL: Couldn't find output tile sizes that satisfy hlo: %dot.640\nmore")
    monkeypatch.setattr(targets, "check_compiler", lambda target: None)
    monkeypatch.setattr(aot, "prepare_config", lambda config, target, request: (config, []))
    monkeypatch.setattr(aot, "build_mesh", lambda mesh, target, slices: None)
    monkeypatch.setattr(aot, "compile_programs", boom)
    config = cli.load_config_file(os.path.join(ROOT, "configs", "smoke.py"))
    with pytest.raises(aot.AotError, match=r"the XLA compiler for b200-8 failed on this program \(INTERNAL: "
                                           r"Couldn't find output tile sizes that satisfy hlo: %dot.640\)"):
        aot.run(config, aot.Request(target="b200-8"))
    rows = aot_table.compute([os.path.join(ROOT, "configs", "smoke.py")], ["b200-8"], str(tmp_path / "t.json"),
                             out=lambda *_: None)
    (row,) = rows.values()
    assert row["error"].startswith("the XLA compiler for b200-8 failed") and row["target"] == "b200-8"


def test_slow_links_join_tpu_slices_and_gpu_nodes_only():
    """The hosts of one TPU slice share its ICI (a one-slice topology's devices carry no slice_index: the v5e-8 and
    v4-8 topologies have two hosts each); across slices, or between GPU nodes (one process each), is DCN."""
    from types import SimpleNamespace as D
    assert targets.slice_of(D(platform="tpu", process_index=1, slice_index=None)) == 0
    assert targets.slice_of(D(platform="tpu", process_index=1)) == 0
    assert targets.slice_of(D(platform="tpu", process_index=3, slice_index=1)) == 1
    assert targets.slice_of(D(platform="gpu", process_index=2)) == 2
