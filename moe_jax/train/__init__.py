"""Training: the compiled step, the loop, checkpoints, the run directory, preemption, metrics."""
