"""Several JAX processes on this machine (each with simulated CPU devices, gloo collectives, a local coordinator)
train as one run: the same losses as one process on the same global mesh, each process reading its own half of every
global batch, one set of metrics and one checkpoint, restorable under another process count; a SIGTERM reaching one
process stops all of them at the same step, and rerunning resumes exactly."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import portpicker
import pytest

from moe_jax import checkpoint as ckpt_lib
from moe_jax import metrics as metrics_lib
from moe_jax import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multihost_worker.py")
STEPS = 12
FLAGS = ["--config", "configs/smoke.py", f"--config.train.steps={STEPS}", "--config.train.log_every=1",
         f"--config.train.eval_every={STEPS}", f"--config.train.checkpoint_every={STEPS}",
         "--config.train.eval_batches=2", "--config.train.progress_bar=False", "--config.train.peak_tflops=1"]


def _env(devices: int, cache_dir: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", MOE_JAX_CACHE=cache_dir, PYTHONPATH=ROOT,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    return env


def launch(n: int, workdir: str, cache_dir: str, extra=(), rows_dir: str | None = None) -> list[subprocess.Popen]:
    """Start `n` processes of one run (8 // n devices each); one process runs without any distributed flag."""
    rows_dir = rows_dir or workdir + ".rows"
    port = portpicker.pick_unused_port()
    procs = []
    for i in range(n):
        dist = [] if n == 1 else [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={n}",
                                  f"--process_id={i}"]
        log = open(f"{workdir}.p{i}.log", "w")
        procs.append(subprocess.Popen([sys.executable, WORKER, rows_dir, *FLAGS, "--workdir", workdir, *dist,
                                       *extra], cwd=ROOT, env=_env(8 // n, cache_dir), stdout=log,
                                      stderr=subprocess.STDOUT, text=True))
    return procs


def finish(procs, workdir: str, timeout: float = 300) -> list[int]:
    deadline = time.time() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.time())))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"timed out; logs:\n{logs(workdir, len(procs))}")
    return codes


def logs(workdir: str, n: int) -> str:
    return "\n".join(open(f"{workdir}.p{i}.log").read()[-3000:] for i in range(n))


def run(n, workdir, cache_dir, extra=(), expect=0):
    procs = launch(n, workdir, cache_dir, extra)
    codes = finish(procs, workdir)
    assert codes == [expect] * n, logs(workdir, n)


def train_losses(workdir: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics_lib.read(workdir) if r["kind"] == "train"}


def rows(workdir: str, process: int) -> list[list[str]]:
    with open(os.path.join(workdir + ".rows", f"p{process}.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return os.environ.get("MOE_JAX_CACHE") or str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    """One process x 8 devices with data.shards=2, and 2 processes x 4 devices (shards default to 2), both to STEPS;
    started together."""
    base = tmp_path_factory.mktemp("multihost")
    one, two = str(base / "one"), str(base / "two")
    procs_one = launch(1, one, cache_dir, ["--config.data.shards=2"])
    procs_two = launch(2, two, cache_dir)
    assert finish(procs_one, one) == [0], logs(one, 1)
    assert finish(procs_two, two) == [0, 0], logs(two, 2)
    return {"one": one, "two": two, "base": base}


def test_two_processes_train_like_one(runs):
    one, two = runs["one"], runs["two"]
    a, b = train_losses(one), train_losses(two)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=2e-5)
    # each process fed a disjoint half of every global batch (train and eval), process 0 the first half
    whole, halves = rows(one, 0), [rows(two, 0), rows(two, 1)]
    assert len(whole) == len(halves[0]) == len(halves[1]) == STEPS + 2  # STEPS train batches, 2 eval batches
    for g, (h0, h1) in enumerate(zip(*halves)):
        assert h0 + h1 == whole[g], f"batch {g}"
        assert len(h0) == len(h1) == len(whole[g]) // 2
        if g < STEPS:
            assert not set(h0) & set(h1), f"train batch {g}: the processes read the same rows"
    # written once: one record per step (process 1 wrote none), one checkpoint, the summary and plots
    records = metrics_lib.read(two)
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, STEPS + 1))
    assert len([r for r in records if r["kind"] == "eval"]) == 1
    assert ckpt_lib.Checkpointer(two, read_only=True).all_steps() == [STEPS]
    assert os.path.exists(os.path.join(two, trainer.SUMMARY_FILE))
    assert os.listdir(os.path.join(two, "plots"))
    data_files = os.listdir(os.path.join(two, ckpt_lib.CHECKPOINT_DIR, str(STEPS), "data"))
    assert sorted(f for f in data_files if f.endswith(".json")) == ["process_0-of-2.json", "process_1-of-2.json"]


def test_checkpoints_move_between_process_counts(runs, cache_dir):
    """Two processes' checkpoint resumes in one (then eval and generate run on it); one process's resumes in two;
    both continue to the same losses, since both hold the same state and data shards."""
    import shutil
    two_to_one, one_to_two = str(runs["base"] / "two_to_one"), str(runs["base"] / "one_to_two")
    shutil.copytree(runs["two"], two_to_one)
    shutil.copytree(runs["one"], one_to_two)
    more = [f"--config.train.steps={STEPS + 3}", f"--config.train.eval_every={STEPS + 3}",
            f"--config.train.checkpoint_every={STEPS + 3}"]
    p1 = launch(1, two_to_one, cache_dir, ["--config.data.shards=2", *more])
    p2 = launch(2, one_to_two, cache_dir, more)
    assert finish(p1, two_to_one) == [0], logs(two_to_one, 1)
    assert finish(p2, one_to_two) == [0, 0], logs(one_to_two, 2)
    for w in (two_to_one, one_to_two):
        assert f"resumed from step {STEPS}" in open(w + ".p0.log").read()
    a, b = train_losses(two_to_one), train_losses(one_to_two)
    new = list(range(STEPS + 1, STEPS + 4))
    np.testing.assert_allclose([a[s] for s in new], [b[s] for s in new], rtol=2e-5)
    env = _env(1, cache_dir)
    for cmd in (["-m", "moe_jax.eval", "--workdir", runs["two"], "--eval_batches=1"],
                ["-m", "moe_jax.generate", "--workdir", runs["two"], "--max_new_tokens=8", "--num_samples=1",
                 "--prompt=In the beginning"]):
        out = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.strip()


def test_sigterm_to_one_process_stops_both_at_one_step(runs, cache_dir):
    """Also on a hybrid mesh with the processes as DCN granules: dcn_shape (2, 1, 1) x ICI (4, 1, 1) lays the devices
    out as the plain 8-device mesh does, so the losses still equal the uninterrupted 2-process run's."""
    workdir = str(runs["base"] / "preempted")
    hybrid = ["--config.mesh.shape=(-1,1,1)", "--config.mesh.dcn_shape=(2,1,1)"]
    procs = launch(2, workdir, cache_dir, hybrid)
    deadline = time.time() + 240
    metrics = os.path.join(workdir, metrics_lib.METRICS_FILE)
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if os.path.exists(metrics) and len(metrics_lib.read(workdir)) >= 2:
            break
        time.sleep(0.2)
    assert all(p.poll() is None for p in procs), logs(workdir, 2)
    procs[1].send_signal(signal.SIGTERM)
    assert finish(procs, workdir) == [trainer.EXIT_PREEMPTED] * 2, logs(workdir, 2)
    saved = ckpt_lib.Checkpointer(workdir, read_only=True).all_steps()
    assert len(saved) == 1 and 2 <= saved[0] < STEPS, saved
    for i in range(2):  # both processes agreed on that step, and learned who asked
        assert f"process 1: signal SIGTERM): every process saves step {saved[0]}" in open(
            f"{workdir}.p{i}.log").read()
    run(2, workdir, cache_dir, hybrid)
    assert f"resumed from step {saved[0]}" in open(workdir + ".p0.log").read()
    a, b = train_losses(workdir), train_losses(runs["two"])
    assert sorted(a) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([a[s] for s in range(1, STEPS + 1)], [b[s] for s in range(1, STEPS + 1)], rtol=2e-5)
