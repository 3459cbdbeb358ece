"""Test support: hypothesis strategies (needs the ``test`` extra), the tolerance model, declared
conventions (:class:`Conventions`), :func:`compare` and the conformance harness
(:func:`check_implementation`, :func:`assert_conforms`; hypothesis is imported when a check runs)."""
from .compare import Verdict, compare
from .conventions import Conventions, ConventionsError

__all__ = ["Conventions", "ConventionsError", "compare", "Verdict"]
from .harness import (Case, CaseResult, ImplementationError, Report, Step, assert_conforms, check_implementation,
                      load_case, run_case)

__all__ += ["Case", "CaseResult", "ImplementationError", "Report", "Step", "assert_conforms", "check_implementation",
            "load_case", "run_case"]
