"""Settings, step builders, the training engine, run folders and checkpoints."""
