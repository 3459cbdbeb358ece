"""refcurv: a NumPy/SciPy reference and verification suite for curvature-based optimizers."""
from . import backend, curvature, errors, nn, vec
from .errors import (
    ArgumentTypeError,
    EmptyBatchError,
    HyperParameterError,
    LabelError,
    NonFiniteError,
    RefcurvError,
    ShapeError,
)
from .vec import flatten, from_order, permutation, to_order, unflatten

__version__ = "0.1.0"

__all__ = [
    "backend", "curvature", "errors", "nn", "vec",
    "flatten", "unflatten", "permutation", "to_order", "from_order",
    "RefcurvError", "ShapeError", "NonFiniteError", "EmptyBatchError", "LabelError",
    "HyperParameterError", "ArgumentTypeError",
]
