"""Import of official PyTorch checkpoints (optional extra: `pip install arjax[convert]`)."""
