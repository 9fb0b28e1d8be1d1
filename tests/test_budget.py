"""Tests for moe_jax/budget.py and moe_jax/tools/hardware.py: the written config spends the budget (training FLOPs x steps
within 5% of usd / price x 3600 x peak x MFU, worked out here from the table, not from the module), the pick sits
at ~20 tokens per (active) parameter, the written file loads, validates and trains, and bad budgets, devices and
flags exit 2 with one line naming the problem."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import pytest

from moe_jax.tools import budget
from moe_jax import cli
from moe_jax.config.typed import parse
from moe_jax.model import flops
from moe_jax.tools import hardware

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = [  # (usd, device, moe, hours)
    (0.05, "h100", False, None),
    (5.0, "h100", True, None),
    (50.0, "h100", False, None),
    (50.0, "h100", True, 4.0),
    (20.0, "b200", False, None),
    (3.0, "v5e", True, None),
    (200.0, "v5p", False, 2.0),
    (1000.0, "v6e", True, None),
    (10.0, "h200", False, None),
]


def expected_flops(usd: float, device: str, mfu: float) -> float:
    d = hardware.DEVICES[device]
    return usd / d.usd_per_hour * 3600.0 * d.peak_tflops * 1e12 * mfu


@pytest.mark.parametrize("usd,device,moe,hours", CASES)
def test_written_config_spends_the_budget(usd, device, moe, hours):
    p = budget.plan(budget.Options(usd=usd, device=device, moe=moe, hours=hours))
    c = parse(p.config)
    want = expected_flops(usd, device, hardware.DEFAULT_MFU)
    got = flops.flops_per_step(c) * c.train.steps
    assert abs(got / want - 1) <= 0.05, (got, want)
    assert p.usd == pytest.approx(usd, rel=0.05)
    # the pick's shape is one config_lib accepts, with d_ff = 4 d_model and the requested routing
    m = c.model
    assert m.d_model % m.n_heads == 0 and (m.d_model // m.n_heads) in (64, 128) and m.d_ff == 4 * m.d_model
    if moe:
        assert (c.moe.num_experts, c.moe.top_k, c.moe.d_ff) == (8, 2, 4 * m.d_model)
    else:
        assert c.moe.num_experts == 0
    # Chinchilla: ~20 tokens per (active) parameter; the grid and the aspect preference allow PICK_TOLERANCE
    tokens_per_param = c.train.steps * c.train.batch_size * c.train.grad_accum * c.train.seq_len / \
        flops.param_counts(c.model)["active"]
    tol = 1 + budget.PICK_TOLERANCE
    assert budget.TOKENS_PER_PARAM / tol <= tokens_per_param <= budget.TOKENS_PER_PARAM * tol
    if hours is not None:
        assert p.devices == math.ceil(want / (hardware.DEVICES[device].peak_tflops * 1e12 * hardware.DEFAULT_MFU)
                                      / 3600 / hours)
        assert p.hours <= hours * 1.05
        assert c.train.batch_size % p.devices == 0


def test_mfu_override_and_default_source():
    d = hardware.get("H100")
    assert hardware.mfu_for(d, 0.5) == (0.5, "--mfu")
    mfu, source = hardware.mfu_for(d)
    assert mfu == hardware.DEFAULT_MFU and "docs/benchmarks.md" in source
    a = budget.plan(budget.Options(usd=10, device="h100", mfu=0.5))
    assert a.budget_flops == pytest.approx(expected_flops(10, "h100", 0.5))


def test_b200_peak_in_flops_table():
    assert flops.lookup_peak_tflops("NVIDIA B200") == 2250.0
    assert flops.lookup_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0


def test_every_device_row_names_its_sources():
    for d in hardware.DEVICES.values():
        assert d.usd_per_hour > 0 and d.peak_tflops > 0 and d.memory_gib > 0
        assert d.price_source and d.peak_source


def _load(path):
    return cli.load_config_file(path)


@pytest.mark.parametrize("moe", [False, True])
def test_write_loads_validates_and_matches(tmp_path, capsys, moe):
    path = str(tmp_path / "cfg" / "x.py")
    kwargs = dict(moe=True, experts=4, top_k=1) if moe else {}
    budget.command(7, "v6e", write=path, argv=["--usd", "7"], **kwargs)
    out = capsys.readouterr().out
    assert "candidates at their 20-tokens/parameter point" in out and "pick:" in out and f"wrote {path}" in out
    assert ("MoE caveat" in out) == moe
    c = _load(path)
    run = parse(c)
    p = budget.plan(budget.Options(usd=7, device="v6e", moe=moe, experts=4, top_k=1))
    assert flops.flops_per_step(run) * run.train.steps == pytest.approx(p.steps * p.flops_per_step)
    assert abs(flops.flops_per_step(run) * run.train.steps / expected_flops(7, "v6e", hardware.DEFAULT_MFU) - 1) <= 0.05
    assert c.to_dict() == p.config.to_dict()


def test_too_small_budget_states_the_minimum():
    with pytest.raises(cli.UsageError) as e:
        budget.command(0.00001, "v5e")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("--usd 1e-05: too small")
    minimum = float(msg.rsplit("$", 1)[1])
    budget.plan(budget.Options(usd=minimum, device="v5e"))  # the stated minimum is enough


@pytest.mark.parametrize("kwargs,needle", [
    (dict(usd=5, device="a100"), "--device 'a100': unknown device; choose one of h100, h200, b200, v4, v5e, v5p, v6e"),
    (dict(usd=-1, device="h100"), "--usd -1"),
    (dict(usd=5, device="h100", mfu=1.5), "--mfu 1.5"),
    (dict(usd=5, device="h100", hours=0), "--hours 0"),
    (dict(usd=5, device="h100", moe=True, top_k=9), "--top_k 9"),
    (dict(usd=5, device="h100", top_k=1), "--experts/--top_k need --moe"),
    (dict(usd=5, device="h100", write="x.json"), "--write x.json"),
])
def test_bad_flags_are_named(kwargs, needle):
    with pytest.raises(cli.UsageError) as e:
        budget.command(**kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("argv,needle", [
    (["--usd", "5", "--device", "a100"], "error: --device 'a100': unknown device; choose one of"),
    (["--usd", "5", "--device", "h100", "--budget", "5"], "error: Unknown command line flag 'budget'"),
])
def test_cli_exits_2_with_one_error_line(argv, needle):
    r = subprocess.run([sys.executable, "-m", "moe_jax.budget", *argv], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.slow
def test_written_config_trains_as_is(tmp_path):
    """The train CLI runs the written file (2 steps of it here, every other field as written)."""
    path = str(tmp_path / "tiny.py")
    budget.command(0.0002, "h100", vocab=512, seq=128, write=path)
    c = _load(path)
    assert c.model.n_layers <= 4 and c.model.d_model <= 512
    cache = os.environ.get("MOE_JAX_CACHE") or str(tmp_path / "cache")
    env = dict(os.environ, JAX_PLATFORMS="cpu", MOE_JAX_CACHE=cache)
    r = subprocess.run([sys.executable, "-m", "moe_jax.train", "--config", path, "--workdir", str(tmp_path / "run"),
                        "--config.train.steps=2", "--config.train.progress_bar=False", "--config.train.plots=False"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "done: step 2" in r.stdout


# ---------------------------------------------------------------------------------------------------------------
# --write's compile check (moe_jax.aot): skipped in one line without the compilers, run with them

def _lines(text: str, prefix: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith(prefix)]


def test_write_check_is_skipped_in_one_line_without_the_compiler(tmp_path, capsys, monkeypatch):
    from moe_jax.tools import targets
    monkeypatch.setattr(targets, "compiler_package", lambda platform: "no_such_compiler_package")
    path = str(tmp_path / "tiny.py")
    p = budget.command(0.0002, "h100", vocab=512, seq=128, write=path)
    [line] = _lines(capsys.readouterr().out, "compile check")
    assert line.startswith("compile check skipped:") and "h100-1" in line and "requirements-aot.txt" in line
    assert _load(path).to_dict() == p.config.to_dict()


@pytest.mark.skipif(importlib.util.find_spec("jax_cuda12_plugin") is None,
                    reason="jax_cuda12_plugin not installed (pip install -r requirements-aot.txt)")
def test_write_check_compiles_the_config_for_its_devices(tmp_path, capsys):
    path = str(tmp_path / "tiny.py")
    p = budget.command(0.0002, "h100", vocab=512, seq=128, write=path)
    [line] = _lines(capsys.readouterr().out, "compile check")
    assert line.startswith("compile check on h100-1, as planned: peak ") and line.endswith(": fits"), line
    assert _load(path).to_dict() == p.config.to_dict() and not p.config.model.remat


def test_write_check_tries_remat_then_smaller_micro_batches(capsys, monkeypatch):
    """The remedies in order, each compiled (aot.run, faked here to fit from a quarter of the micro-batch with
    remat): the first that fits is written, with the tokens per step unchanged."""
    from moe_jax.tools import aot, targets
    p = budget.plan(budget.Options(usd=0.0002, device="h100", vocab=512, seq=128))
    rows = p.config.train.batch_size
    assert rows >= 4 and not p.config.model.remat
    tried = []

    def run(config, request):
        tried.append((bool(config.model.remat), config.train.batch_size, config.train.grad_accum))
        fits = config.model.remat and config.train.batch_size <= rows // 4
        train = {"memory": {"peak": (1 if fits else 100) * aot.GIB}, "device_memory": 80 * aot.GIB}
        return {"fits": fits, "programs": {"train": train}}

    monkeypatch.setattr(aot, "run", run)
    monkeypatch.setattr(targets, "check_compiler", lambda target: None)
    q = budget.compile_check(p)
    accum = p.config.train.grad_accum
    assert tried == [(False, rows, accum), (True, rows, accum), (True, rows // 2, 2 * accum),
                     (True, rows // 4, 4 * accum)]
    assert q.config.model.remat and q.config.train.batch_size * q.config.train.grad_accum == rows * accum
    out = capsys.readouterr().out
    assert len(_lines(out, "compile check on h100-1")) == 4 and "does not fit" in out
    assert f"writing the config with model.remat=True, train.batch_size={rows // 4}" in out


def test_a_model_whose_state_does_not_fit_one_device_gets_fsdp(tmp_path):
    """$20,000 of H100s in 24 h picks an ~8 B model on 335 devices: its ~20 bytes/parameter of state (~160 GB) do not
    fit one 80 GB device, so the written config shards it (mesh.fsdp=True) and the per-device estimate is 1/335 of
    it; $2,000 (a 2.7 B model, ~54 GB, under 70% of 80 GB) stays replicated, and so does the $50 single-device pick."""
    big = budget.plan(budget.Options(usd=20000, device="h100", hours=24))
    memory = budget.MEMORY_FRACTION * big.device.memory_gib * 2 ** 30
    assert big.devices > 1 and budget.BYTES_PER_PARAM * big.pick.params > memory
    assert big.config.mesh.fsdp is True
    path = tmp_path / "big.py"
    path.write_text(budget.config_source(big))
    assert _load(str(path)).mesh.fsdp is True and parse(_load(str(path))).mesh.fsdp is True
    small = budget.plan(budget.Options(usd=2000, device="h100", hours=24))
    assert budget.BYTES_PER_PARAM * small.pick.params < memory and small.config.mesh.fsdp is False
    assert "mesh.fsdp" not in budget.config_source(small)
    assert budget.plan(budget.Options(usd=50, device="h100")).config.mesh.fsdp is False
