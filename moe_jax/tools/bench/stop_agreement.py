"""`--mode stop-agreement`: the cost of the multi-process stop agreement (preemption.AgreedStop.check) against the
device alternative.

    python -m moe_jax.bench --mode stop-agreement [--processes 2] [--checks 200]

Starts --processes local processes (2 simulated CPU devices each, a coordinator on a free port); each times --checks
calls of AgreedStop.check (a key-value barrier at process 0's coordinator) after 20 untimed ones, and 50 calls of
multihost_utils.process_allgather of a one-int stop flag (a device collective). Process 0's medians and 90th
percentiles are reported.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

from moe_jax import cli

FLAGS_READ = ("processes", "checks")
RESULT = "stop-agreement result: "  # the line of process 0 that carries its numbers to the parent
WORKER = "import sys; from moe_jax.tools.bench import stop_agreement as s; s.worker(*map(int, sys.argv[1:]))"
GATHERS = 50


def _ms(times: list[float], q: float) -> float:
    return 1e3 * float(np.percentile(times, q))


def worker(pid: int, n: int, port: int, checks: int) -> None:
    """One of the n processes: time the checks and the gathers; process 0 prints the RESULT line."""
    import jax
    from jax.experimental import multihost_utils

    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=n, process_id=pid)
    from moe_jax.train import preemption

    stop = preemption.AgreedStop(preemption.LocalStop(), run_key="bench")
    for s in range(20):  # warm-up
        stop.check(s)
    barrier = []
    for s in range(20, 20 + checks):
        t0 = time.perf_counter()
        stop.check(s)
        barrier.append(time.perf_counter() - t0)
    gather = []
    for _ in range(GATHERS):
        t0 = time.perf_counter()
        multihost_utils.process_allgather(np.zeros((1,), np.int32))
        gather.append(time.perf_counter() - t0)
    if pid == 0:
        print(RESULT + json.dumps({"processes": n, "checks": checks, "gathers": GATHERS,
                                   "agreed_stop_check_ms": {"median": _ms(barrier, 50), "p90": _ms(barrier, 90)},
                                   "process_allgather_ms": {"median": _ms(gather, 50), "p90": _ms(gather, 90)}}),
              flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(processes: int = 2, checks: int = 200, out=print, timeout_s: float = 600) -> dict:
    """Start the processes, wait for them, print and return process 0's numbers."""
    if processes < 1 or checks < 1:
        raise cli.UsageError(f"--processes {processes} --checks {checks}: both must be >= 1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    path = os.pathsep.join([root] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2", PYTHONPATH=path)
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(i), str(processes), str(port), str(checks)], env=env,
                              stdout=subprocess.PIPE if i == 0 else subprocess.DEVNULL,
                              stderr=subprocess.PIPE if i == 0 else subprocess.DEVNULL, text=True)
             for i in range(processes)]
    try:
        stdout, stderr = procs[0].communicate(timeout=timeout_s)
        codes = [procs[0].returncode] + [p.wait(timeout=timeout_s) for p in procs[1:]]
    finally:  # none outlives the benchmark (a timeout, an interrupt)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    lines = [ln for ln in stdout.splitlines() if ln.startswith(RESULT)]
    if any(codes) or not lines:
        raise RuntimeError(f"stop-agreement processes exited with {codes}; process 0's stderr ends:\n{stderr[-3000:]}")
    r = json.loads(lines[-1][len(RESULT):])
    b, g = r["agreed_stop_check_ms"], r["process_allgather_ms"]
    out(f"{processes} processes: AgreedStop.check median {b['median']:.2f} ms, p90 {b['p90']:.2f} ms; "
        f"process_allgather of the flag median {g['median']:.2f} ms, p90 {g['p90']:.2f} ms")
    return r


def from_flags() -> dict:
    """`--mode stop-agreement` from the command line."""
    from absl import flags

    FLAGS = flags.FLAGS
    return run(FLAGS.processes, FLAGS.checks, out=lambda s: print(s, flush=True))
