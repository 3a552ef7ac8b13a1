"""autopar: automatic parallelization for PyTorch models.

``autoparallelize(model, example_inputs, device_mesh)`` traces the model, lets an ILP choose
how every tensor is sharded over the mesh, and returns a module that runs on
torch.distributed with the same numbers as the single-device model.
"""

from autopar.api import autoparallelize, make_plan
from autopar.errors import (
    AutoparError,
    InfeasibleBudgetError,
    KernelError,
    PlanFormatError,
    ProfileError,
    ShardingError,
    SolverTimeLimitError,
    StalePlanError,
    TraceError,
    UnknownGPUError,
)
from autopar.solver.plan import Plan, load_plan

__all__ = [
    "AutoparError",
    "InfeasibleBudgetError",
    "KernelError",
    "Plan",
    "PlanFormatError",
    "ProfileError",
    "ShardingError",
    "SolverTimeLimitError",
    "StalePlanError",
    "TraceError",
    "UnknownGPUError",
    "autoparallelize",
    "load_plan",
    "make_plan",
]
__version__ = "0.1.0"
