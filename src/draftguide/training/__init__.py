"""Training data and training of drafts: data making, prompt sources, the draft trainer, test-time training."""
