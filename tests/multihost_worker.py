"""`python tests/multihost_worker.py ROWS_DIR <moe_jax.train flags>`: the train CLI, recording which rows each process
feeds to the devices. Every call of train_step.to_global (train and eval batches, in order) appends one JSON line
[sha1 of each row's inputs] to ROWS_DIR/p<process_index>.jsonl. Used by tests/test_multihost.py only."""

import hashlib
import json
import os
import sys


def main():
    rows_dir = sys.argv.pop(1)
    os.makedirs(rows_dir, exist_ok=True)
    import jax
    from moe_jax import cli
    from moe_jax.train import __main__ as train
    from moe_jax.train import step as train_step

    to_global = train_step.to_global

    def recording(batch, shardings):
        hashes = [hashlib.sha1(row.tobytes()).hexdigest()[:16] for row in batch["inputs"]]
        with open(os.path.join(rows_dir, f"p{jax.process_index()}.jsonl"), "a") as f:
            f.write(json.dumps(hashes) + "\n")
        return to_global(batch, shardings)

    train_step.to_global = recording
    cli.run(train.main, train.define_flags)


if __name__ == "__main__":
    main()
