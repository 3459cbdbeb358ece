"""From-scratch autodiff for MLPs and conv nets (see :mod:`refcurv.nn.model`)."""
from .layers import Conv2d, Flatten, Linear, ReLU, SequenceMean, Sigmoid, Softplus, Tanh
from .losses import BCE, MSE, CrossEntropy
from .model import Sequential

__all__ = [
    "Linear", "Conv2d", "ReLU", "Tanh", "Sigmoid", "Softplus", "Flatten", "SequenceMean",
    "Sequential", "MSE", "CrossEntropy", "BCE",
]
