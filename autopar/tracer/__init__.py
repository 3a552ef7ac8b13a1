"""Capture a model as a torch.fx graph with shapes, dtypes and parameter names on every node."""

from autopar.tracer.export import Traced, trace

__all__ = ["Traced", "trace"]
