"""Errors raised for bad input. Every message names the node, op or dimension and what to do.

An error's fields are numbers, taken by its constructor as keywords named as the attributes:
``autoparallelize`` sends a planning error from rank 0 to every rank as JSON and makes it again.
"""

from __future__ import annotations


class AutoparError(Exception):
    """Base class of every error autopar raises on purpose."""


class TraceError(AutoparError):
    """The model could not be captured as a graph."""


class UnknownGPUError(AutoparError):
    """The hardware name is not in the table."""


class ShardingError(AutoparError):
    """A requested layout cannot be applied (a mesh axis does not divide a dimension, ...)."""


class InfeasibleBudgetError(AutoparError):
    """No plan fits the memory budget. ``min_budget_bytes`` is the smallest budget that fits."""

    def __init__(self, message: str, min_budget_bytes: int) -> None:
        super().__init__(message)
        self.min_budget_bytes = min_budget_bytes


class SolverTimeLimitError(AutoparError):
    """The ILP's time limit ran out before the solver found any plan (none is made up).
    ``n_vars``: the size of the problem it was given."""

    def __init__(self, message: str, n_vars: int) -> None:
        super().__init__(message)
        self.n_vars = n_vars


class ProfileError(AutoparError):
    """A profile database that cannot be read or does not fit the plan asked for."""


class StalePlanError(AutoparError):
    """A saved plan was made for another graph, mesh or format version."""


class PlanFormatError(AutoparError):
    """A plan file cannot be read."""


class KernelError(AutoparError):
    """A fused kernel cannot run here (no Triton, no compiler, no CUDA): the message says
    which kernel, why, and what to do; ``backend="torch"`` always works."""
