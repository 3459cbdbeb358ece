"""Optimizers of the seed papers, each with a dense and a fast form (see :mod:`.base`)."""
from . import (  # noqa: F401  (registers)
    adam, ginger, hessian_free, kbfgs, kbfgs_mlp, kfac, natural_gradient, ngplus, qng, seng, sgd, shampoo, smw, tnt,
)
from . import diagnostics, vocabulary
from .base import Batch, Draws, Method, State
from .registry import REGISTRY, describe

__all__ = ["Batch", "Draws", "Method", "State", "REGISTRY", "describe", "diagnostics", "vocabulary"]
