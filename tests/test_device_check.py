"""scripts/device_check.sh --cpu: the device check runs end to end on CPU with smoke-sized configs, so that the
script that runs on the GPU machine cannot rot. Every step must succeed (the seed anchor is GPU-only: skipped)."""

import json
import os
import subprocess
import sys

import pytest

from moe_jax.tools.bench import common as bench_common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_device_check_runs_on_cpu(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, PYTHON=sys.executable, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device, as on a single accelerator
    p = subprocess.run(["bash", "scripts/device_check.sh", "--cpu", "--out", str(out), "--work", str(work)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    r = json.loads((out / "device_check.json").read_text())
    steps = r["steps"]
    assert {k: v["status"] for k, v in steps.items()} == {
        "env": "ok", "attention": "ok", "bench": "ok", "profile": "ok", "update": "ok", "train": "ok", "decode": "ok",
        "compare": "ok", "seeds": "skipped", "tests": "ok", "prediction": "skipped"}
    assert "no prediction row" in steps["prediction"]["why"]  # CPU: moe_jax.aot predicts for TPUs and GPUs only
    assert steps["env"]["backend"] == "cpu" and "model.dtype auto -> float32" in steps["env"]["policy"]
    att = steps["attention"]["results"]
    assert {"blocked/float32/causal", "xla/bfloat16/segments"} <= set(att) and all(a["pass"] for a in att.values())
    bench = steps["bench"]
    # dense, MoE, and the MoE at capacity factors 1.0 / 2.0 and dropless (issue 16's dispatch comparison)
    assert len(bench["configs"]) == 5 and all(c["tokens_per_s"] > 0 and c["memory_bytes"]
                                              for c in bench["configs"].values())
    assert len(bench["dispatch_step_time_s"]) == 4 and all(t > 0 for t in bench["dispatch_step_time_s"].values())
    assert bench["moe_step_over_flop_equal_dense_step"] > 0
    assert len(bench["update_share_of_step"]) == 5 and all(0 < u < 1 for u in bench["update_share_of_step"].values())
    upd = steps["update"]["results"]
    assert set(upd) == {"smoke dense", "smoke moe"} and all(
        list(v) == list(bench_common.VARIANTS) for v in upd.values()) and len(bench_common.VARIANTS) == 7
    assert steps["profile"]["top_ops"] and steps["profile"]["top_ops"][0]["ms_per_step"] > 0
    train = steps["train"]
    assert train["resumed_from_step"] >= 4 and train["summary"]["finished"] and train["summary"]["step"] == 40
    runs = steps["decode"]["runs"]
    assert [run["batch"] for run in runs] == [2] and runs[0]["decode_tokens_per_s"] > 0
    assert steps["decode"]["config"] == "configs/smoke.py" and steps["decode"]["policy"].startswith("precision on cpu")
    assert steps["compare"]["results"]["arms"]
    assert " passed" in steps["tests"]["summary"]
    log = (out / "device_check.log").read_text()
    assert "== train: ok" in log and "resumed from step" in log


def test_seeds_step_times_the_seed_code_given_or_says_why_it_skips(tmp_path):
    """The seeds step runs scripts/seed_timing.py (on a stand-in of seed 002's source: tests/test_seed_timing.py) when
    given the seeds' sources and a Python with torch, and otherwise records a one-line reason."""
    from test_seed_timing import PYTHON, _has_torch, _stand_in

    def seeds_step(*flags):
        env = dict(os.environ, JAX_PLATFORMS="cpu", STAND_IN_LOG=str(tmp_path / "calls.log"))
        env.pop("MOE_JAX_SEEDS_DIR", None)
        p = subprocess.run([sys.executable, "scripts/device_check.py", "--cpu", "--only", "seeds", "--out",
                            str(tmp_path / "out"), "--work", str(tmp_path / "work"), *flags],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        return json.loads((tmp_path / "out" / "device_check.json").read_text())["steps"]["seeds"]

    skipped = seeds_step()
    if not os.path.isdir(os.path.join(ROOT, ".seeds", "repos")):
        assert skipped == {"status": "skipped", "seconds": 0.0, "why": "no seed sources: give --seeds_dir DIR (or "
                           "MOE_JAX_SEEDS_DIR) holding llm-moe/ (scripts/seed_timing.py)"}
    repos, _ = _stand_in(tmp_path)
    assert seeds_step("--seeds_dir", str(tmp_path))["why"] == (
        f"--seeds_dir {tmp_path}: llm-moe/ is missing (scripts/seed_timing.py says what goes there)")
    if not _has_torch():
        pytest.skip(f"torch is not importable by {PYTHON}; set MOE_JAX_TORCH_PYTHON to a Python that has it")
    seeds = seeds_step("--seeds_dir", str(repos), "--seeds_python", PYTHON)
    assert seeds["status"] == "ok", seeds
    runs = seeds["runs"]
    assert sorted(runs) == ["seed002_dense", "seed002_moe"]
    assert runs["seed002_dense"]["results"]["seed002_dense"]["shape"]["d_ff"] == 128
    assert runs["seed002_moe"]["results"]["seed002_moe"]["shape"]["d_ff"] == 64
    d, m = (runs[k]["results"][k]["ms_per_step_median"] for k in ("seed002_dense", "seed002_moe"))
    assert seeds["seed_moe_step_over_dense_step"] == pytest.approx(m / d)
