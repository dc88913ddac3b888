"""What every training run shares: the core both loops use, checkpoints, resume, the run directory, metrics."""
