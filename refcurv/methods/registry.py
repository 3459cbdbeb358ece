"""Registry of methods: name → class, with seed reference, summary and hyper-parameters.
The CLI and the notebooks read it."""
from __future__ import annotations

class _Registry(dict):
    """``{name: Method class}``; an unknown name is an :class:`~refcurv.errors.UnknownMethodError`
    (a ``KeyError`` too) that lists the valid names."""

    def __getitem__(self, name):
        if not isinstance(name, str):
            from ..errors import UnknownMethodError

            raise UnknownMethodError(f"a method name must be a str, got {type(name).__name__}; "
                                     f"registered: {', '.join(sorted(self))}")
        return super().__getitem__(name)

    def __missing__(self, name):
        from ..errors import UnknownMethodError

        raise UnknownMethodError(f"unknown method {name!r}; registered: {', '.join(sorted(self))}")


REGISTRY = _Registry()


def register(cls):
    """Class decorator: add a :class:`~refcurv.methods.base.Method` subclass to the registry."""
    if not cls.name or cls.name in REGISTRY:
        raise ValueError(f"method name {cls.name!r} missing or registered twice")
    REGISTRY[cls.name] = cls
    return cls


def describe():
    """``[(name, seed_ref, summary, {hyper-parameter: default})]`` for every registered method."""
    return [(n, c.seed_ref, c.summary, c.hyper_parameters()) for n, c in sorted(REGISTRY.items())]
