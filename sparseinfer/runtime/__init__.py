"""Lowering an optimized Graph to kernel calls, and the Engine that runs them."""

from .engine import Engine, InputError

__all__ = ["Engine", "InputError"]
