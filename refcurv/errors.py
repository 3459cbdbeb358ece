"""Typed exceptions. Every message names the offending argument.

All refcurv errors derive from :class:`RefcurvError`; each also derives from the
built-in exception a caller would naturally catch (``ValueError``/``TypeError``).
"""


class RefcurvError(Exception):
    """Base class of all refcurv errors."""


class ShapeError(RefcurvError, ValueError):
    """An array has the wrong shape (or layers do not chain)."""


class NonFiniteError(RefcurvError, ValueError):
    """An array contains NaN or Inf."""


class EmptyBatchError(RefcurvError, ValueError):
    """A batch has no samples."""


class LabelError(RefcurvError, ValueError):
    """Targets are out of range or of the wrong kind for the loss."""


class HyperParameterError(RefcurvError, ValueError):
    """A constructor or function argument has an invalid value."""


class ArgumentTypeError(RefcurvError, TypeError):
    """An argument has the wrong type."""


class NotSPDError(RefcurvError, ValueError):
    """A matrix that must be symmetric positive definite is not (numerically), or a
    curvature pair violates ``sᵀy > 0`` where positive definiteness depends on it."""


class NewtonConvergenceError(RefcurvError, ArithmeticError):
    """An iteration (the coupled Newton inverse root) stopped before reaching its tolerance."""


class StateError(RefcurvError, TypeError):
    """A method was handed a state it did not make: another method's, an empty one, ``None``,
    or one missing a field. The message names the method and the missing fields."""


class DrawsError(RefcurvError, TypeError):
    """A step was handed random draws that do not fit it: made for another method, missing a
    field the method consumes, or of the wrong shape. The message names the method and field."""


class UnknownMethodError(RefcurvError, KeyError):
    """A method name that is not registered; the message lists the registered names."""

    def __str__(self):  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


class DivergenceError(RefcurvError, ArithmeticError):
    """A training run diverged: the loss or the parameters became non-finite. The message
    names the step."""


class UnsupportedLayerError(RefcurvError, ValueError):
    """A foreign model (e.g. a ``torch.nn.Sequential`` handed to :mod:`refcurv.torch`) holds
    a layer, or a layer setting, that refcurv's model family cannot represent. The message
    names the layer, its position and what is supported."""


class ImplementationError(RefcurvError, ValueError):
    """An ``impl`` returned something that is not a result of the declared form: ``None``,
    a wrong shape, count or dtype. The message names what was expected."""


class ConventionsError(RefcurvError, ValueError):
    """Declared conventions that are unknown or contradict each other or the quantity."""


class GoldenError(RefcurvError, ValueError):
    """A golden-vector directory that cannot be trusted: a missing file, a tampered array,
    a malformed manifest or an unknown schema version (one line naming what is wrong)."""
