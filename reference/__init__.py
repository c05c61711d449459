"""The spec of two-batch overlap, in JAX: how a batch is split and what a forward outputs.

This package must not import torch."""
