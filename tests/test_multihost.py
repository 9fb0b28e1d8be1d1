"""Several JAX processes on this machine (each with simulated CPU devices, gloo collectives, a local coordinator)
train as one run: 2 x 4 and 4 x 2 devices reach the same losses as 1 process x 8 on the same global mesh, each
process reading its own 1/N of every global batch, one set of metrics and one checkpoint, restorable under another
process count; a SIGTERM reaching one process stops all of them at the same step, and rerunning resumes exactly."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import portpicker
import pytest

from moe_jax.train import checkpoint as ckpt_lib
from moe_jax.train import metrics as metrics_lib
from moe_jax.train import loop as trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multihost_worker.py")
STEPS = 12
FLAGS = ["--config", "configs/smoke.py", f"--config.train.steps={STEPS}", "--config.train.log_every=1",
         f"--config.train.eval_every={STEPS}", f"--config.train.checkpoint_every={STEPS}",
         "--config.train.eval_batches=2", "--config.train.progress_bar=False", "--config.train.peak_tflops=1",
         "--config.data.shards=4",  # 4 data shards: 1, 2 or 4 processes read the same global batches
         "--config.optim.ns_dtype=float32"]  # bfloat16 operands would round differently sharded sums apart (6e-4)


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
    """The same run to STEPS on 1 process x 8 devices, 2 x 4 and 4 x 2 (the global mesh is (8, 1, 1) each time),
    one after the other: gloo gives its processes 30 s to connect, which 7 processes starting at once on a loaded
    2-core machine missed (2026-11-26)."""
    base = tmp_path_factory.mktemp("multihost")
    out = {"base": base}
    for n in (1, 2, 4):
        out[n] = str(base / f"p{n}")
        assert finish(launch(n, out[n], cache_dir), out[n]) == [0] * n, logs(out[n], n)
    return out


@pytest.mark.slow  # 1, 2 and 4 training processes
def test_several_processes_train_like_one(runs):
    one = runs[1]
    a = train_losses(one)
    assert sorted(a) == list(range(1, STEPS + 1))
    whole = rows(one, 0)
    assert len(whole) == STEPS + 2  # STEPS train batches, then 2 eval batches
    for n in (2, 4):
        b = train_losses(runs[n])
        assert sorted(b) == sorted(a)
        np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=2e-5)
        # each process fed its own 1/n of every global batch (train and eval), in process order
        parts = [rows(runs[n], i) for i in range(n)]
        assert all(len(p) == len(whole) for p in parts)
        for g in range(len(whole)):
            assert sum((p[g] for p in parts), []) == whole[g], f"{n} processes, batch {g}"
            assert all(len(p[g]) == len(whole[g]) // n for p in parts)
            if g < STEPS:
                assert len(set().union(*(set(p[g]) for p in parts))) == len(whole[g]), \
                    f"{n} processes, train batch {g}: rows read twice"
    # written once: one record per step (the other processes wrote none), one checkpoint, the summary and plots
    two = runs[2]
    records = metrics_lib.read(two)
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, STEPS + 1))
    assert len([r for r in records if r["kind"] == "eval"]) == 1
    assert ckpt_lib.Checkpointer(two, read_only=True).all_steps() == [STEPS]
    assert os.path.exists(os.path.join(two, trainer.SUMMARY_FILE))
    assert os.listdir(os.path.join(two, "plots"))
    data_files = os.listdir(os.path.join(two, ckpt_lib.CHECKPOINT_DIR, str(STEPS), "data"))
    assert sorted(f for f in data_files if f.endswith(".json")) == [f"process_{k}-of-4.json" for k in range(4)]


@pytest.mark.slow  # training subprocesses, eval and generate
def test_checkpoints_move_between_process_counts(runs, cache_dir):
    """Two processes' checkpoint resumes in one (then eval and generate run on it); one process's resumes in two;
    both continue to the same losses, since both hold the same state and data shards."""
    import shutil
    two_to_one, one_to_two = str(runs["base"] / "two_to_one"), str(runs["base"] / "one_to_two")
    shutil.copytree(runs[2], two_to_one)
    shutil.copytree(runs[1], one_to_two)
    more = [f"--config.train.steps={STEPS + 3}", f"--config.train.eval_every={STEPS + 3}",
            f"--config.train.checkpoint_every={STEPS + 3}"]
    p1 = launch(1, two_to_one, cache_dir, more)
    p2 = launch(2, one_to_two, cache_dir, more)
    assert finish(p1, two_to_one) == [0], logs(two_to_one, 1)
    assert finish(p2, one_to_two) == [0, 0], logs(one_to_two, 2)
    for w in (two_to_one, one_to_two):
        assert f"resumed from step {STEPS}" in open(w + ".p0.log").read()
    a, b = train_losses(two_to_one), train_losses(one_to_two)
    new = list(range(STEPS + 1, STEPS + 4))
    np.testing.assert_allclose([a[s] for s in new], [b[s] for s in new], rtol=2e-5)
    env = _env(1, cache_dir)
    for cmd in (["-m", "moe_jax.eval", "--workdir", runs[2], "--eval_batches=1"],
                ["-m", "moe_jax.generate", "--workdir", runs[2], "--max_new_tokens=8", "--num_samples=1",
                 "--prompt=In the beginning"]):
        out = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.strip()


def wait_until_training(procs, workdir, records: int = 2, timeout: float = 240) -> None:
    """Wait until the run has written `records` metrics records (so every process is past compiling), asserting that
    no process has exited meanwhile."""
    deadline = time.time() + timeout
    metrics = os.path.join(workdir, metrics_lib.METRICS_FILE)
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if os.path.exists(metrics) and len(metrics_lib.read(workdir)) >= records:
            break
        time.sleep(0.2)
    assert all(p.poll() is None for p in procs), logs(workdir, 2)


@pytest.mark.slow  # two 2-process training runs
def test_sigterm_to_one_process_stops_both_at_one_step(runs, cache_dir):
    """Also on a hybrid mesh with the processes as DCN granules: dcn_shape (2, 1, 1) x ICI (4, 1, 1) lays the devices
    out as the plain 8-device mesh does, so the losses still equal the uninterrupted 2-process run's."""
    workdir = str(runs["base"] / "preempted")
    hybrid = ["--config.mesh.shape=(-1,1,1)", "--config.mesh.dcn_shape=(2,1,1)"]
    procs = launch(2, workdir, cache_dir, hybrid)
    wait_until_training(procs, workdir)
    procs[1].send_signal(signal.SIGTERM)
    assert finish(procs, workdir) == [trainer.EXIT_PREEMPTED] * 2, logs(workdir, 2)
    saved = ckpt_lib.Checkpointer(workdir, read_only=True).all_steps()
    assert len(saved) == 1 and 2 <= saved[0] < STEPS, saved
    for i in range(2):  # both processes agreed on that step, and learned who asked
        assert f"process 1: signal SIGTERM): every process saves step {saved[0]}" in open(
            f"{workdir}.p{i}.log").read()
    run(2, workdir, cache_dir, hybrid)
    assert f"resumed from step {saved[0]}" in open(workdir + ".p0.log").read()
    a, b = train_losses(workdir), train_losses(runs[2])
    assert sorted(a) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([a[s] for s in range(1, STEPS + 1)], [b[s] for s in range(1, STEPS + 1)], rtol=2e-5)


def coordinator_port(procs) -> int:
    return int(next(a for a in procs[0].args if a.startswith("--coordinator_address=")).rsplit(":", 1)[1])


def port_closed_within(port: int, timeout: float) -> bool:
    """Whether nothing listens on 127.0.0.1:`port` (a connection is refused) within `timeout` seconds."""
    import socket
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except ConnectionRefusedError:
            return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


@pytest.mark.slow  # a 2-process training run and a 30 s heartbeat timeout, each
@pytest.mark.parametrize("killed", [1, 0])
def test_kill_9_of_one_process_ends_the_other_in_one_line(tmp_path, cache_dir, killed):
    """The survivor's collective fails (or hangs); its peer watchdog names the lost process within
    preemption.PEER_TIMEOUT_S and exits with EXIT_PEER_LOST, instead of a traceback or the runtime's abort with a dump
    of its state. Process 0 too: the coordination service runs in a child of process 0 that outlives it (without it,
    the runtime aborted the survivor from C++ 0.3 s after the kill), and ends once the survivor has gone."""
    from moe_jax.train import preemption
    workdir = str(tmp_path / "killed")
    procs = launch(2, workdir, cache_dir, ["--config.train.steps=100000", "--config.train.eval_every=100000",
                                           "--config.train.checkpoint_every=100000"])
    survivor = 1 - killed
    try:
        wait_until_training(procs, workdir)
        procs[killed].kill()
        start = time.time()
        code = procs[survivor].wait(timeout=preemption.PEER_TIMEOUT_S + 60)
        took = time.time() - start
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    log = open(f"{workdir}.p{survivor}.log").read()
    assert code == preemption.EXIT_PEER_LOST == 4, log[-3000:]
    assert log.strip().splitlines()[-1] == (
        f"error: process {killed} of 2 was lost (no heartbeat for 30 s: killed, out of memory or its host is down); "
        f"process {survivor} stops too with exit status 4: resubmit the whole job to resume from the newest "
        "checkpoint"), log[-3000:]
    assert "Traceback" not in log and "Check failure" not in log, log[-3000:]
    assert took < preemption.PEER_TIMEOUT_S + 20, took
    assert port_closed_within(coordinator_port(procs), 15), "the coordination service outlived the job"


def _listening_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s, s.getsockname()[1]


def test_the_coordination_service_outlives_process_0_until_its_clients_go():
    """The child serving the coordination service ignores SIGTERM, stays while a client is connected after process 0
    let it go (here: `shutdown()`, as on process 0's exit), and ends within seconds once no client is left."""
    import socket
    from moe_jax.train import coordinator
    port = portpicker.pick_unused_port()
    service = coordinator.start_service(f"[::]:{port}", 2, heartbeat_timeout=100, shutdown_timeout=300)
    client = socket.create_connection(("127.0.0.1", port))
    try:
        deadline = time.time() + 10
        while coordinator.connected_clients(port) != 1 and time.time() < deadline:
            time.sleep(0.1)
        assert coordinator.connected_clients(port) == 1
        service.proc.send_signal(signal.SIGTERM)
        service.shutdown()
        with pytest.raises(subprocess.TimeoutExpired):
            service.proc.wait(timeout=3)
    finally:
        client.close()
    assert service.proc.wait(timeout=15) == 0
    assert port_closed_within(port, 5)


def test_a_taken_coordinator_port_is_one_line_and_status_2(tmp_path, cache_dir):
    taken, port = _listening_port()
    with taken:
        out = subprocess.run([sys.executable, "-m", "moe_jax.train", *FLAGS, "--workdir", str(tmp_path / "w"),
                              f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", "--process_id=0"],
                             cwd=ROOT, env=_env(4, cache_dir), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip().splitlines() == [
        f"error: --coordinator_address: the coordination service on [::]:{port} did not start (cannot "
        f"listen on port {port}: Address already in use): is its port taken? choose a free one"], out.stderr[-3000:]
