"""XLA:CPU's thread pool sized for the whole machine whatever the process is pinned to, so that a rerun on the same
machine computes the same bits however it is pinned (`taskset`, a scheduler's cpuset).

Why: XLA:CPU runs each dot on an intra-op thread pool that it sizes, when the backend starts, by the CPUs the process
may run on (sched_getaffinity). A dot with a long contraction and a small output -- every weight gradient of a
projection ([tokens, M]^T [tokens, N] -> [M, N] with M, N ~ 128) and of the router ([tokens, M]^T [tokens, E]) -- is
split along the contraction into partial sums, one per block of the pool's threads, which are then added: how many
blocks there are depends on the pool's size, and so does the rounding (measured: the [2048, 128]^T [2048, 128]
product differs in its last bits between 1 and 2 schedulable CPUs; the forward products and the input gradients do
not). The committed studies ran one per core (`taskset -c N`: a pool of 1); rerun unpinned on the same 2-core machine
(a pool of 2) the same code gave other gradients from the first step, and a training run drifted: a dense arm's test
loss in the 8th digit, an MoE arm's, whose top-k routing turns last-bit differences into different expert choices, in
the 3rd (4.485114 -> 4.486401; docs/decisions.md). Runs with the same pool size were bit-identical, pinned or not.

`start()` widens the process's CPU set to the whole machine, starts the backends (the pool is created then, sized
for every CPU), and puts every thread of the process back on the CPUs it was pinned to: the work stays where the user
put it, the partial sums are an unpinned run's ($MOE_JAX_CPU_POOL=N sizes it for N CPUs instead). Call it before anything starts a JAX backend (after
`jax.distributed.initialize`, which must come first). Where the CPU set cannot be widened (not Linux; a cpuset that
forbids the other CPUs), the pool follows the pinning and `start()` says so in its result.
"""

from __future__ import annotations

import os


def _set_all_threads(cpus) -> None:
    """Put every thread of this process on `cpus` (sched_setaffinity is per thread on Linux)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, PermissionError):  # a thread that ended meanwhile, or one we may not move
            pass


ENV = "MOE_JAX_CPU_POOL"  # the pool's size: default, every CPU of the machine


def pool_size() -> int:
    """$MOE_JAX_CPU_POOL (an integer from 1 to os.cpu_count()), else os.cpu_count(); a bad value is a ConfigError."""
    from moe_jax.config.schema import ConfigError
    cpus = os.cpu_count() or 1
    text = os.environ.get(ENV, "").strip()
    if not text:
        return cpus
    if not text.isdigit() or not 1 <= int(text) <= cpus:
        raise ConfigError(f"${ENV}={text!r}: give the XLA:CPU thread pool's size, an integer from 1 to {cpus} (this "
                          "machine's CPUs), or unset it for all of them")
    return int(text)


def start() -> dict:
    """Start JAX's backends with XLA:CPU's pool sized for `pool_size()` CPUs (all of the machine's unless
    $MOE_JAX_CPU_POOL says otherwise: =1 reproduces runs made pinned to one CPU before this module existed), then
    restore the pinning (module docstring). Returns {'cpus': the machine's CPU count, 'pinned_to': how many CPUs the
    process may run on, 'pool': how many the pool was sized for, or None when the backends had already started
    (nothing changed)}."""
    import jax
    from jax._src import xla_bridge

    size = pool_size()
    if not hasattr(os, "sched_getaffinity"):  # not Linux: no pinning to undo
        jax.devices()
        return {"cpus": os.cpu_count(), "pinned_to": None, "pool": None}
    pinned = os.sched_getaffinity(0)
    info = {"cpus": os.cpu_count(), "pinned_to": len(pinned), "pool": None}
    if xla_bridge.backends_are_initialized():
        return info
    try:
        os.sched_setaffinity(0, range(size))
    except OSError:  # a cpuset that does not allow it: the pool follows the pinning
        pass
    try:
        info["pool"] = len(os.sched_getaffinity(0))
        jax.devices()
    finally:
        if os.sched_getaffinity(0) != pinned:
            _set_all_threads(pinned)
    return info
