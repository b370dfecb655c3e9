"""Training a model: the loop, the methods it can train, checkpoints."""
