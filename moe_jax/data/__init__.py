"""moe_jax's data layer: packed, sharded, deterministic, checkpointable batches of token ids.

    from moe_jax import data
    ds = data.build(config)                       # see dataset.py for what it returns
    batch = next(ds.train_iter)                   # {'inputs', 'targets', 'weights'[, 'segment_ids', 'positions']}
    ckpt_args = ocp.args.Composite(state=..., data=data.checkpoint_save_args(ds.train_iter))
    restore = ocp.args.Composite(state=..., data=data.checkpoint_restore_args(ds.train_iter))
    tok = data.load_tokenizer('runs/x/tokenizer.model')

Modules: sources.py (bible / files / tfds, all read through tfds.data_source), split.py (train/validation by
document hash), tokenizer.py (sentencepiece BPE, cached), pipeline.py (grain packing, batching, exact resume),
cache.py (cache layout, manifests, locks), dataset.py (build). Design notes: docs/data.md.
"""

from moe_jax.data.dataset import Data, build, per_process_batch
from moe_jax.data.errors import DataError
from moe_jax.data.pipeline import checkpoint_restore_args, checkpoint_save_args
from moe_jax.data.tokenizer import Tokenizer, load_tokenizer

__all__ = ["Data", "DataError", "Tokenizer", "build", "checkpoint_restore_args", "checkpoint_save_args",
           "load_tokenizer", "per_process_batch"]
