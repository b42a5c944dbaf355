"""dist_ckpt: distributed, multi-rank checkpoints for PyTorch jobs."""
