"""Optimizers of the seed papers, each with a dense and a fast form (see :mod:`.base`)."""
from . import (  # noqa: F401  (registers)
    ginger, hessian_free, kbfgs, kbfgs_mlp, kfac, ngplus, qng, seng, sgd, shampoo, smw, tnt,
)
from .base import Batch, Method
from .registry import REGISTRY, describe

__all__ = ["Batch", "Method", "REGISTRY", "describe"]
