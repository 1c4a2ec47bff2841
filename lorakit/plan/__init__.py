"""The Plan: what a spec does to a model, decided once (make_plan); what lorakit remembers of a model; one record per
tensor."""

from .make import make_plan
from .plan import Plan, Target
from .state import Source, State

__all__ = ["Plan", "Source", "State", "Target", "make_plan"]
