"""Throughput benchmark of the compiled train step (a wrapper of `python -m moe_jax.bench`; see moe_jax/bench.py).

    python scripts/bench_step.py --configs configs/dense.py,configs/moe.py --batch 4 --seq 512 --rounds 3
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import app  # noqa: E402

from moe_jax import bench  # noqa: E402

if __name__ == "__main__":
    bench.define_flags()
    app.run(bench.main)
