"""The benchmarks (python -m moe_jax.bench, moe_jax/tools/bench/): every mode at a tiny size (its printed and
returned fields), the step mode's numbers against each other, variants as config overrides, and flag errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from moe_jax import cli
from moe_jax.config import schema as config_lib
from moe_jax.model import flops
from moe_jax.tools.bench import common, newton_schulz, step, stop_agreement, update

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, cwd=ROOT):
    # This checkout's package first, whichever is installed (CI installs it with pip install -e .).
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([ROOT] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
    return subprocess.run([sys.executable, "-m", "moe_jax.bench"] + args, cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env)


@pytest.mark.slow  # two configs compiled and timed in a subprocess
def test_step_mode_prints_and_returns_throughput_of_moe_and_dense(tmp_path, load_config):
    out_json = str(tmp_path / "bench.json")
    p = _run(["--config", "configs/smoke.py", "--baseline", "configs/smoke.py", "--baseline.moe.num_experts=0",
              "--baseline.name=smoke_dense", "--config.optim.name=adamw", "--batch", "4", "--seq", "32",
              "--steps", "2", "--warmup", "1", "--matmul_n", "128", "--json", out_json])
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.load(open(out_json))
    names = list(res["configs"])
    assert names == ["smoke_dense (configs/smoke.py)", "smoke (configs/smoke.py)"]
    assert res["peak_tflops"] > 0 and "measured 128x128 float32 matmul" in res["peak_source"]
    smoke_cfg = common.prepare(load_config("smoke"), 4, 32, overrides={"optim.name": "adamw"})
    for name, r in res["configs"].items():
        assert r["tokens_per_step"] == 4 * 32 and len(r["rounds_s"]) == 1
        assert r["step_time_s"] > 0 and r["tokens_per_s"] == pytest.approx(128 / r["step_time_s"])
        assert r["tflops"] == pytest.approx(r["tokens_per_s"] * r["training_flops_per_token"] / 1e12)
        assert r["mfu"] == pytest.approx(r["tflops"] / res["peak_tflops"])
        assert r["loss"] > 0
        # the printed block carries the same numbers
        block = p.stdout.split(f"== {name}:")[1].split("== ")[0]
        assert f"tokens/s {r['tokens_per_s']:,.0f}; TFLOP/s {r['tflops']:.4g}; MFU {r['mfu']:.2%}" in block
        assert f"step time {r['step_time_s'] * 1e3:.1f} ms" in block
        assert "optimizer adamw" in block  # a --config.x=y override applies to the baseline too
    dense, moe = res["configs"][names[0]], res["configs"][names[1]]
    assert dense["dense"] and not moe["dense"]
    assert moe["training_flops_per_token"] == flops.run_flops_per_token(smoke_cfg)["training"]
    assert moe["padding_flops_per_token"] > 0 and dense["padding_flops_per_token"] == 0
    frac = res["fraction_of_dense"]["smoke (configs/smoke.py)"]
    assert frac["of"] == names[0]
    assert frac["tflops"] == pytest.approx(moe["tflops"] / dense["tflops"])
    assert f"smoke (configs/smoke.py): TFLOP/s {frac['tflops']:.1%} of dense (smoke_dense (configs/smoke.py))" \
        in p.stdout
    assert re.search(r"peak: [\d,.]+ GFLOP/s \(measured 128x128 float32 matmul", p.stdout)
    assert "peak re-measured after the runs" in p.stdout


@pytest.mark.slow  # seven subprocesses, ~12 s
def test_bad_flags_exit_2_naming_the_flag(tmp_path):
    """Bad input exits with status 2 and one `error:` line naming the flag (moe_jax/cli.py), from any directory."""
    smoke = os.path.join(ROOT, "configs", "smoke.py")
    for args, words in (([], "--config: --mode step needs a config file"),
                        (["--config", smoke, "--config.moe.nope=3"],
                         "--config.moe.nope: moe has no field 'nope'"),
                        (["--config", smoke, "--baseline", smoke, "--baseline.nope=1"], "--baseline.nope"),
                        (["--mode", "decode", "--config", smoke, "--steps", "3", "--rows", "8"],
                         "--rows, --steps: not read by --mode decode, which reads --config, --batch"),
                        (["--mode", "update", "--config", smoke, "--variant", "optim.nope=1"],
                         "--variant optim.nope=1: optim.nope is not a config field"),
                        (["--config", smoke, "--batch", "1,3"], "--mode step times one batch size"),
                        (["--mode", "newton-schulz", "--rows", "64", "--cols", "16"], "need 0 < rows <= cols")):
        p = _run(args, cwd=str(tmp_path))
        assert p.returncode == 2, (args, p.stderr[-2000:])
        assert p.stderr.strip().splitlines()[-1].startswith("error: ") and words in p.stderr, (args, p.stderr)


def test_prepare_applies_batch_shape_and_overrides(load_config):
    c = load_config("moe")
    b = common.prepare(c, 2, 64, 3, {"moe.group_size": 128, "model.dtype": "bfloat16", "optim.name": "adamw"})
    assert (b.train.batch_size, b.train.seq_len, b.train.grad_accum) == (2, 64, 3)
    assert b.moe.group_size == 128 and b.model.dtype == "bfloat16" and b.optim.name == "adamw"
    assert c.train.batch_size == 24  # the original is untouched
    assert common.prepare(c, 2, 64, 0).train.grad_accum == 4  # 0 keeps the config's
    kept = common.prepare(c)  # no batch shape: the config's
    assert (kept.train.batch_size, kept.train.seq_len) == (c.train.batch_size, c.train.seq_len)
    assert kept.model.dtype != "auto" and kept.optim.ns.dtype != "auto"  # resolved for the backend
    with pytest.raises(config_lib.ConfigError, match="moe.nope is not a config field"):
        common.prepare(c, 2, 64, 1, {"moe.nope": 3})
    with pytest.raises(config_lib.ConfigError, match="model.n_heads"):
        common.prepare(c, 2, 64, 1, {"model.n_heads": 5})


def test_variants_are_config_overrides(load_config):
    """--variant text: a named variant (common.VARIANTS) or field=value overrides, values parsed as the config's
    types; each config is copied once per variant under 'label [variant]'."""
    assert common.parse_variant("batched-bfloat16-none-gram") == ("batched-bfloat16-none-gram", {
        "optim.muon_impl": "batched", "optim.ns_dtype": "bfloat16", "optim.ns_stack": "none",
        "optim.ns_method": "gram"})
    text = "optim.ns_dtype=float32, moe.capacity_factor=2,train.plots=false,mesh.shape=(1,1,1),name=x"
    label, over = common.parse_variant(text)
    assert label == text and over == {"optim.ns_dtype": "float32", "moe.capacity_factor": 2, "train.plots": False,
                                      "mesh.shape": (1, 1, 1), "name": "x"}
    c = load_config("smoke")
    (lab, v), = common.with_variants([("smoke", c)], [("cf2", {"moe.capacity_factor": 2, "optim.ns_stack": "none"})])
    assert lab == "smoke [cf2]" and v.moe.capacity_factor == 2.0 and isinstance(v.moe.capacity_factor, float)
    assert v.optim.ns_stack == "none" and c.optim.ns_stack == "auto"  # a copy
    for text, words in (("nope", "not a named variant"), ("1x=2", "'1x=2' is not field=value")):
        with pytest.raises(config_lib.ConfigError, match=words):
            common.parse_variant(text)
    with pytest.raises(config_lib.ConfigError, match=r"--variant bad: model.d_model='abc'"):
        common.with_variant(c, "bad", {"model.d_model": "abc"})
    # every named variant is a valid override set of the base config
    for name, overrides in common.VARIANTS.items():
        common.prepare(c, overrides=overrides)


@pytest.mark.slow  # end to end (two dispatch modes compiled): full suite only
def test_dispatch_flag_times_each_moe_config_once_per_mode(load_config):
    c = load_config("smoke")
    res = step.benchmark([("smoke", c)], step.StepOptions(batch=2, seq=32, steps=1, warmup=0, matmul_n=128,
                                                          dispatch=("capacity", "dropless")), out=lambda s: None)
    assert list(res["configs"]) == ["smoke [capacity]", "smoke [dropless]"]
    cap, drop = res["configs"]["smoke [capacity]"], res["configs"]["smoke [dropless]"]
    assert (cap["dispatch"], drop["dispatch"]) == ("capacity", "dropless")
    assert cap["training_flops_per_token"] == drop["training_flops_per_token"]  # same model FLOPs
    dropless_cfg = common.prepare(c, 2, 32, overrides={"moe.dispatch": "dropless"})
    assert drop["padding_flops_per_token"] == flops.run_flops_per_token(dropless_cfg)["dispatch_overhead_training"]
    with pytest.raises(config_lib.ConfigError, match="--dispatch nope"):
        step.benchmark([("smoke", c)], step.StepOptions(dispatch=("nope",)), out=lambda s: None)


def test_step_mode_breakdown_returns_the_update_share_of_the_step(load_config):
    """The step mode at a tiny size (one config, 2 steps): its fields, and the breakdown's update share."""
    c = load_config("smoke")
    lines = []
    res = step.benchmark([("smoke", c)], step.StepOptions(batch=2, seq=16, steps=2, warmup=1, matmul_n=64,
                                                          breakdown=True), out=lines.append)
    assert res["num_devices"] == 1 and res["fraction_of_dense"] == {}  # no dense config to compare with
    r = res["configs"]["smoke"]
    assert r["tokens_per_step"] == 32 and r["tokens_per_s"] == pytest.approx(32 / r["step_time_s"])
    optim = common.prepare(c).to_dict()["optim"]  # config.json's record of the resolved settings
    assert r["newton_schulz"] == {k: optim[k] for k in ("ns_dtype", "ns_stack", "ns_method")}
    assert set(r["breakdown_s"]) == {"forward", "forward+backward", "optimizer update"}
    assert all(s > 0 for s in r["breakdown_s"].values())
    assert r["update_share_of_step"] == pytest.approx(r["breakdown_s"]["optimizer update"] / r["step_time_s"])
    assert any("optimizer update:" in line and "of the step" in line for line in lines)


def test_update_mode_times_every_variant_of_every_config(tmp_path):
    """--mode update at a tiny size: one config, a named variant and one written out, one round."""
    out_json = str(tmp_path / "update.json")
    written = "optim.ns_dtype=float32,optim.ns_stack=none"
    p = _run(["--mode", "update", "--config", "configs/smoke.py", "--config.moe.num_experts=2", "--rounds", "1",
              "--variant", "optax-float32", "--variant", written, "--json", out_json])
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.load(open(out_json))
    assert res["rounds"] == 1 and res["variants"] == {"optax-float32": common.VARIANTS["optax-float32"],
                                                      written: {"optim.ns_dtype": "float32", "optim.ns_stack": "none"}}
    assert list(res["results"]) == ["smoke (configs/smoke.py)"]
    times = res["results"]["smoke (configs/smoke.py)"]
    assert list(times) == ["optax-float32", written]
    for variant, r in times.items():
        assert r["rounds_s"] == [r["median_s"]] and r["min_s"] == r["max_s"] == r["median_s"] > 0
        assert re.search(rf"smoke \(configs/smoke.py\)\s+{re.escape(variant)}\s+median\s+\d+ ms", p.stdout)
    assert f"variant {written}: optim.ns_dtype=float32, optim.ns_stack=none" in p.stdout


def test_time_updates_interleaves_rounds_and_defaults_to_every_named_variant(load_config, monkeypatch):
    calls = []
    monkeypatch.setattr(update, "compile_update", lambda c: (lambda *a: calls.append(c.optim.muon_impl), ()))
    entries = [("a", load_config("smoke")), ("b", load_config("smoke"))]
    res = update.time_updates(entries, rounds=2, out=lambda s: None)
    assert list(res) == ["a", "b"] and all(list(v) == list(common.VARIANTS) for v in res.values())
    n = 2 * len(common.VARIANTS)
    assert len(calls) == 2 * n and calls[:n] == calls[n:]  # round 1 runs every pair, then round 2 again
    assert all(len(r["rounds_s"]) == 2 for v in res.values() for r in v.values())
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        update.time_updates(entries, rounds=0)


def test_decode_mode_reports_tokens_per_second(tmp_path):
    """--mode decode at a tiny size: two batch sizes, 4 new tokens, one timed run each."""
    out_json = str(tmp_path / "decode.json")
    p = _run(["--mode", "decode", "--config", "configs/smoke.py", "--batch", "1,2", "--max_new_tokens", "4",
              "--repeats", "1", "--json", out_json])
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.load(open(out_json))
    assert res["config"] == "configs/smoke.py" and res["context"] == 64
    assert res["policy"].startswith("precision on cpu: model.dtype auto -> float32") and res["policy"] in p.stdout
    assert [r["batch"] for r in res["runs"]] == [1, 2]
    for r in res["runs"]:
        assert (r["prompt_len"], r["max_new_tokens"]) == (16, 4)
        assert r["decode_tokens_per_s"] == pytest.approx(r["batch"] * 3 / r["decode_s"])  # 3 loop steps after token 1
        assert r["total_tokens_per_s"] == pytest.approx(r["batch"] * 4 / (r["prefill_s"] + r["decode_s"]))
        assert f"batch {r['batch']}: prompt 16 + 4 new tokens | decode {r['decode_tokens_per_s']:.1f} tokens/s" \
            in p.stdout


def test_newton_schulz_mode_measures_every_chain():
    """--mode newton-schulz (docs/optimizer.md's accuracy table and chain timings) at a tiny size: every chain is
    timed and scored on every spectrum; float32 chains stay near float64, bfloat16 X space does not."""
    lines = []
    res = newton_schulz.run(16, 64, 2, 1, 1, out=lines.append)
    assert set(res["errors"]) == set(newton_schulz.spectra(16)) and len(lines) == 4 + 5 + 3
    for errs in res["errors"].values():
        assert errs["float32 X space"] < 1e-4 and errs["float32 Gram space"] < 2e-3
        assert errs["bfloat16 X space"] > errs["float32 X space"]
    assert all(t > 0 for t in res["times_s"].values()) and len(res["times_s"]) == 5
    assert set(res["dot_gflops"]) == {"float32 -> float32", "bfloat16 -> float32", "bfloat16 -> bfloat16"}
    assert res["shape"] == {"rows": 16, "cols": 64, "stack": 2, "groups": 1, "rounds": 1}
    with pytest.raises(cli.UsageError, match="need 0 < rows <= cols"):
        newton_schulz.run(64, 16, 1, 1, 1)


def test_stop_agreement_mode_times_the_barrier_and_the_gather():
    """--mode stop-agreement at a tiny size: 2 processes, 5 checks; process 0's numbers come back and are printed."""
    lines = []
    r = stop_agreement.run(2, 5, out=lines.append, timeout_s=300)
    assert (r["processes"], r["checks"], r["gathers"]) == (2, 5, stop_agreement.GATHERS)
    for key in ("agreed_stop_check_ms", "process_allgather_ms"):
        assert 0 < r[key]["median"] <= r[key]["p90"]
    assert lines == [f"2 processes: AgreedStop.check median {r['agreed_stop_check_ms']['median']:.2f} ms, p90 "
                     f"{r['agreed_stop_check_ms']['p90']:.2f} ms; process_allgather of the flag median "
                     f"{r['process_allgather_ms']['median']:.2f} ms, p90 {r['process_allgather_ms']['p90']:.2f} ms"]
    with pytest.raises(cli.UsageError, match="must be >= 1"):
        stop_agreement.run(2, 0)
