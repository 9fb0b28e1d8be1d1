"""Throughput benchmark (moe_jax.bench, scripts/bench_step.py): the command line on two tiny configs, its printed and
returned fields, and flag/override errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from moe_jax.tools import bench
from moe_jax.config import schema as config_lib
from moe_jax.model import flops
from smoke_helpers import config_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, tmp_path, script=False, cwd=ROOT):
    cmd = [sys.executable] + ([os.path.join(ROOT, "scripts", "bench_step.py")] if script else ["-m", "moe_jax.bench"])
    # This checkout's package first, whichever is installed (CI installs it with pip install -e .).
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([ROOT] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
    return subprocess.run(cmd + args, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow  # two configs compiled and timed in a subprocess
def test_bench_cli_prints_and_returns_throughput_of_moe_and_dense(tmp_path, load_config):
    out_json = str(tmp_path / "bench.json")
    p = _run(["--config", "configs/smoke.py", "--baseline", "configs/smoke.py", "--baseline.moe.num_experts=0",
              "--baseline.name=smoke_dense", "--config.optim.name=adamw", "--batch", "4", "--seq", "32",
              "--steps", "2", "--warmup", "1", "--matmul_n", "128", "--json", out_json], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.load(open(out_json))
    names = list(res["configs"])
    assert names == ["smoke_dense (configs/smoke.py)", "smoke (configs/smoke.py)"]
    assert res["peak_tflops"] > 0 and "measured 128x128 float32 matmul" in res["peak_source"]
    smoke_cfg = bench.prepare(load_config("smoke"), 4, 32, overrides={"optim.name": "adamw"})
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


def test_bench_script_wrapper_rejects_bad_flags(tmp_path):
    """Bad input exits with status 2 and one `error:` line naming the flag (moe_jax/cli.py), from any directory."""
    cwd = str(tmp_path)
    smoke = os.path.join(ROOT, "configs", "smoke.py")
    for args, words in (([], "--config"),
                        (["--config", smoke, "--config.moe.nope=3"],
                         "--config.moe.nope: moe.nope is not a config field"),
                        (["--config", smoke, "--baseline", smoke, "--baseline.nope=1"], "--baseline.nope")):
        p = _run(args, tmp_path, script=True, cwd=cwd)
        assert p.returncode == 2, (args, p.stderr[-2000:])
        assert p.stderr.strip().splitlines()[-1].startswith("error: ") and words in p.stderr, (args, p.stderr)


def test_prepare_applies_batch_shape_and_overrides(load_config):
    c = load_config("moe")
    b = bench.prepare(c, 2, 64, 3, {"moe.group_size": 128, "model.dtype": "bfloat16", "optim.name": "adamw"})
    assert (b.train.batch_size, b.train.seq_len, b.train.grad_accum) == (2, 64, 3)
    assert b.moe.group_size == 128 and b.model.dtype == "bfloat16" and b.optim.name == "adamw"
    assert c.train.batch_size == 24  # the original is untouched
    assert bench.prepare(c, 2, 64, 0).train.grad_accum == 4  # 0 keeps the config's
    with pytest.raises(config_lib.ConfigError, match="moe.nope is not a config field"):
        bench.prepare(c, 2, 64, 1, {"moe.nope": 3})
    with pytest.raises(config_lib.ConfigError, match="model.n_heads"):
        bench.prepare(c, 2, 64, 1, {"model.n_heads": 5})


@pytest.mark.slow  # end to end (a full compile of prefill + decode / two bench configs): full suite only
def test_dispatch_flag_times_each_moe_config_once_per_mode(load_config):
    c = load_config("smoke")
    res = bench.benchmark([("smoke", c)], batch=2, seq=32, steps=1, warmup=0, matmul_n=128,
                          dispatch=("capacity", "dropless"), out=lambda s: None)
    assert list(res["configs"]) == ["smoke [capacity]", "smoke [dropless]"]
    cap, drop = res["configs"]["smoke [capacity]"], res["configs"]["smoke [dropless]"]
    assert (cap["dispatch"], drop["dispatch"]) == ("capacity", "dropless")
    assert cap["training_flops_per_token"] == drop["training_flops_per_token"]  # same model FLOPs
    dropless_cfg = bench.prepare(c, 2, 32, overrides={"moe.dispatch": "dropless"})
    assert drop["padding_flops_per_token"] == flops.run_flops_per_token(dropless_cfg)["dispatch_overhead_training"]
    with pytest.raises(config_lib.ConfigError, match="--dispatch nope"):
        bench.benchmark([("smoke", c)], dispatch=("nope",), out=lambda s: None)


def test_time_updates_times_every_variant_of_every_config_and_rejects_bad_ones(load_config):
    c = config_dict(load_config("smoke"), train=dict(batch_size=2, seq_len=16))  # entries are ConfigDicts
    lines = []
    variants = ("optax:float32", "batched:float32", "batched:bfloat16:none")
    res = bench.time_updates([("smoke", c)], variants, rounds=2, out=lines.append)
    assert list(res) == ["smoke"] and list(res["smoke"]) == list(variants)
    for r in res["smoke"].values():
        assert len(r["rounds_s"]) == 2 and r["min_s"] <= r["median_s"] <= r["max_s"] and r["min_s"] > 0
    assert len(lines) == 3 and all("median" in line for line in lines)
    with pytest.raises(config_lib.ConfigError, match="is not muon_impl:ns_dtype"):
        bench.time_updates([("smoke", c)], ("batched",), rounds=1)
    with pytest.raises(config_lib.ConfigError, match="optim.ns_stack"):
        bench.time_updates([("smoke", c)], ("batched:float32:experts",), rounds=1)
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        bench.time_updates([("smoke", c)], rounds=0)


def test_breakdown_is_returned_with_the_update_share_of_the_step(load_config):
    c = load_config("smoke")
    lines = []
    res = bench.benchmark([("smoke", c)], batch=2, seq=16, steps=2, warmup=1, matmul_n=64, breakdown=True,
                          out=lines.append)
    r = res["configs"]["smoke"]
    assert set(r["breakdown_s"]) == {"forward", "forward+backward", "optimizer update"}
    assert all(s > 0 for s in r["breakdown_s"].values())
    assert r["update_share_of_step"] == pytest.approx(r["breakdown_s"]["optimizer update"] / r["step_time_s"])
    assert any("optimizer update:" in line and "of the step" in line for line in lines)
