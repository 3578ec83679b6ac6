"""Mixed context window fine-tuning: rows to forward passes, parallelism, the step, checkpoints, validation."""
