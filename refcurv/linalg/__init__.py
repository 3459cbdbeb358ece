"""Backend-neutral linear-algebra kernels (design §4-§5)."""
from . import batched, damping, ema, gfim, kronecker, lowrank, quasi_newton, roots, sketch, tensor, woodbury

__all__ = ["batched", "woodbury", "quasi_newton", "damping", "roots", "lowrank", "sketch", "tensor", "kronecker",
           "ema", "gfim"]
