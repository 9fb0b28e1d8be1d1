"""moe_jax/train/cpu_pool.py: XLA:CPU's thread pool sized for the whole machine however the process is pinned, so that
the weight-gradient products (a long contraction over the tokens, a small output), which XLA:CPU splits across the
pool's threads, round the same pinned or not. Each case runs in a fresh process (the pool is made when the backend
starts), pinned with sched_setaffinity as `taskset` would."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []

# a projection's weight gradient at 2,048 tokens: [2048, 128]^T [2048, 128] -> [128, 128]
PRODUCT = """
import hashlib, json, os, sys
if len(sys.argv) > 2:  # pinned, as `taskset -c N` would (set here: forking a pinned child from pytest is unsafe)
    os.sched_setaffinity(0, {int(sys.argv[2])})
import numpy as np
if sys.argv[1] == "start":
    from moe_jax.train import cpu_pool
    info = cpu_pool.start()
else:
    info = None
import jax
from jax import lax
rng = np.random.default_rng(0)
a, b = (rng.standard_normal((2048, 128), dtype=np.float32) for _ in range(2))
out = jax.jit(lambda a, b: lax.dot_general(a, b, (((0,), (0,)), ((), ()))))(a, b)
threads = sorted({c for t in os.listdir("/proc/self/task") for c in os.sched_getaffinity(int(t))})
print(json.dumps({"bits": hashlib.sha256(np.asarray(out).tobytes()).hexdigest(), "info": info, "threads_on": threads}))
"""


def product(start: bool, pin_to=None) -> dict:
    import json
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device
    cmd = [sys.executable, "-c", PRODUCT, "start" if start else "plain"] + ([] if pin_to is None else [str(pin_to)])
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(len(CPUS) < 2, reason="needs at least 2 CPUs to pin to fewer")
def test_pinned_and_unpinned_runs_compute_the_same_bits():
    free = product(start=True)
    pinned = product(start=True, pin_to=CPUS[0])
    assert pinned["bits"] == free["bits"]
    # the pool was sized for the machine, and every thread went back to the one CPU it was pinned to
    assert pinned["info"] == {"cpus": os.cpu_count(), "pinned_to": 1, "pool": len(CPUS)}
    assert pinned["threads_on"] == [CPUS[0]] and free["threads_on"] == CPUS
    # without cpu_pool the pinned process rounds differently (the cause; docs/decisions.md): were it not so here,
    # the two equalities above would prove nothing
    assert product(start=False, pin_to=CPUS[0])["bits"] != free["bits"]
    assert product(start=False)["bits"] == free["bits"]


def test_start_after_the_backend_started_changes_nothing():
    out = subprocess.run([sys.executable, "-c", "import jax; jax.devices(); from moe_jax.train import cpu_pool; "
                          "print(cpu_pool.start())"], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == str({"cpus": os.cpu_count(), "pinned_to": len(CPUS), "pool": None})


@pytest.mark.skipif(len(CPUS) < 2, reason="needs at least 2 CPUs to pin to fewer")
def test_the_pool_size_can_be_set_to_reproduce_pinned_runs():
    """MOE_JAX_CPU_POOL=1 computes what a process pinned to one CPU computed before cpu_pool existed (how the
    committed studies ran), wherever this process runs."""
    os.environ["MOE_JAX_CPU_POOL"] = "1"
    try:
        one = product(start=True)
    finally:
        del os.environ["MOE_JAX_CPU_POOL"]
    assert one["info"]["pool"] == 1 and one["threads_on"] == CPUS
    assert one["bits"] == product(start=False, pin_to=CPUS[0])["bits"]


@pytest.mark.parametrize("value", ["0", "x", str((os.cpu_count() or 1) + 1)])
def test_a_bad_pool_size_is_one_line(value, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, MOE_JAX_CPU_POOL=value)
    out = subprocess.run([sys.executable, "-m", "moe_jax.train", "--config", "configs/smoke.py", "--workdir",
                          str(tmp_path / "w")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip().splitlines() == [
        f"error: $MOE_JAX_CPU_POOL={value!r}: give the XLA:CPU thread pool's size, an integer from 1 to "
        f"{os.cpu_count()} (this machine's CPUs), or unset it for all of them"]
