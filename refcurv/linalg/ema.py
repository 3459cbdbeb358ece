"""Exponential moving averages of outer products and their low-rank inverse forms, as dense
matrices (QNG's product form, Ginger's damped inverse): the references the fast low-rank
updates are checked against, public for users. Each function names its seed and equation.
"""
from __future__ import annotations
