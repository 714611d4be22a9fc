"""The training loop, checkpoints and logging."""
