"""Cost of the multi-process stop agreement (preemption.AgreedStop.check) against the device alternative.

    python scripts/bench_stop_check.py [--processes 2] [--checks 200]

Starts N local processes (2 simulated CPU devices each, a coordinator on a free port); each times `checks` calls of
AgreedStop.check (a key-value barrier at process 0's coordinator) and 50 calls of
multihost_utils.process_allgather of a one-int stop flag (a device collective). Process 0 prints the medians/p90s.
"""

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(pid: int, n: int, port: int, checks: int) -> None:
    import jax
    import numpy as np
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
    for _ in range(50):
        t0 = time.perf_counter()
        multihost_utils.process_allgather(np.zeros((1,), np.int32))
        gather.append(time.perf_counter() - t0)
    if pid == 0:
        ms = lambda x, q: 1e3 * float(np.percentile(x, q))  # noqa: E731
        print(f"{n} processes: AgreedStop.check median {ms(barrier, 50):.2f} ms, p90 {ms(barrier, 90):.2f} ms; "
              f"process_allgather of the flag median {ms(gather, 50):.2f} ms, p90 {ms(gather, 90):.2f} ms")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--checks", type=int, default=200)
    p.add_argument("--worker", type=int, default=None)
    p.add_argument("--port", type=int, default=0)
    a = p.parse_args()
    if a.worker is not None:
        worker(a.worker, a.processes, a.port, a.checks)
        return
    import portpicker
    port = portpicker.pick_unused_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=ROOT)
    procs = [subprocess.Popen([sys.executable, __file__, "--processes", str(a.processes), "--checks", str(a.checks),
                               "--worker", str(i), "--port", str(port)], env=env,
                              stderr=subprocess.DEVNULL) for i in range(a.processes)]
    sys.exit(max(p.wait() for p in procs))


if __name__ == "__main__":
    main()
