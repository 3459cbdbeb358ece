"""Optimizers of the seed papers, each with a dense and a fast form (see :mod:`.base`)."""
from . import hessian_free, kfac, ngplus, seng, sgd, smw  # noqa: F401  (registers)
from .base import Batch, Method
from .registry import REGISTRY, describe

__all__ = ["Batch", "Method", "REGISTRY", "describe"]
