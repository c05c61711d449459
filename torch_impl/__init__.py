"""Two-batch overlap in PyTorch: batch splitting, overlapped execution, a small MoE model.

This package must not import jax."""
