"""refcurv: a NumPy/SciPy reference and verification suite for curvature-based optimizers."""
from . import backend, curvature, errors, linalg, methods, nn, operators, train, vec
from .errors import (
    ArgumentTypeError,
    ConventionsError,
    DivergenceError,
    DrawsError,
    EmptyBatchError,
    GoldenError,
    HyperParameterError,
    ImplementationError,
    LabelError,
    NewtonConvergenceError,
    NonFiniteError,
    NotSPDError,
    RefcurvError,
    ShapeError,
    StateError,
    UnknownMethodError,
    UnsupportedLayerError,
)
from .vec import flatten, from_order, permutation, to_order, unflatten

__version__ = "0.1.0"

__all__ = [
    "backend", "curvature", "errors", "linalg", "methods", "nn", "operators", "train", "vec",
    "flatten", "unflatten", "permutation", "to_order", "from_order",
    "RefcurvError", "ShapeError", "NonFiniteError", "EmptyBatchError", "LabelError",
    "HyperParameterError", "ArgumentTypeError", "NotSPDError", "NewtonConvergenceError",
    "StateError", "DrawsError", "UnknownMethodError", "DivergenceError", "UnsupportedLayerError",
    "ConventionsError", "ImplementationError", "GoldenError",
]
