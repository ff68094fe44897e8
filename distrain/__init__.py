"""distrain: one PyTorch training loop for a laptop CPU, a GPU node and a SLURM cluster."""
__version__ = "0.1.0"
