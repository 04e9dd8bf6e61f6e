"""Training: the loop, optimiser and schedule, checkpoints, metrics and progress display."""
