"""Training application: Trainer, backends, checkpoints, optimizer, logging."""
