"""What a spec costs: the per-layer report, and the memory of a training step simulated on fake tensors (and what
fits)."""

from .fit import Choice
from .report import Report, Row
from .simulate import Simulation

__all__ = ["Choice", "Report", "Row", "Simulation"]
