"""Throughput benchmark of the compiled train step (a wrapper of `python -m moe_jax.bench`; see moe_jax/bench.py).

    python scripts/bench_step.py --config configs/moe.py --baseline configs/dense.py --batch 4 --seq 512 --rounds 3

Needs the package installed (`pip install -e .` in the repository root).
"""

from moe_jax.tools import bench
from moe_jax import cli

if __name__ == "__main__":
    cli.run(bench.main, bench.define_flags)
