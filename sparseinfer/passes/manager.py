"""Passes, the context they run in, and instruments that watch them.

A pass has a `name`, an `opt_level` and the names of passes it `requires` to have run before it.
`Sequential` runs its passes in declared order; for each one, a name in `ctx.disabled` wins (the
pass is skipped), then a name in `ctx.required` (it runs), then `opt_level <= ctx.opt_level`.
Timing and IR dumps are instruments: passes themselves never print.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..graph import Graph


class PassError(RuntimeError):
    """A pass failed or left the graph invalid."""


class PassInstrument:
    """Hooks called around every pass. Subclass and override what you need."""

    def run_before_pass(self, graph: Graph, pass_: Pass) -> None:
        pass

    def run_after_pass(self, graph: Graph, pass_: Pass, changed: int) -> None:
        pass


@dataclass
class PassContext:
    """What a pipeline run is allowed to do: optimisation level, per-pass switches, settings."""

    opt_level: int = 2
    disabled: set[str] = field(default_factory=set)
    required: set[str] = field(default_factory=set)
    config: dict[str, Any] = field(default_factory=dict)
    instruments: list[PassInstrument] = field(default_factory=list)
    validate: bool = False  # check the IR after every pass (debugging)
    ran: list[str] = field(default_factory=list)  # names of the passes that ran, in order

    def enabled(self, p: Pass) -> bool:
        if p.name in self.disabled:
            return False
        return p.name in self.required or p.opt_level <= self.opt_level


class Pass:
    """A graph rewrite. `run` edits the graph in place and returns how many changes it made."""

    name: str = "pass"
    opt_level: int = 1
    requires: tuple[str, ...] = ()

    def run(self, graph: Graph, ctx: PassContext) -> int:
        raise NotImplementedError

    def __call__(self, graph: Graph, ctx: PassContext | None = None) -> Graph:
        """Apply this pass alone (with its own instrumentation and validation)."""
        ctx = ctx or PassContext()
        _run_one(self, graph, ctx)
        return graph

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, opt_level={self.opt_level})"


class FunctionPass(Pass):
    """A pass made from a function `fn(graph, ctx) -> changes`."""

    def __init__(self, fn: Callable[[Graph, PassContext], int], name: str, opt_level: int = 1, requires: Iterable[str] = ()) -> None:
        self.fn, self.name, self.opt_level, self.requires = fn, name, opt_level, tuple(requires)
        self.__doc__ = fn.__doc__

    def run(self, graph: Graph, ctx: PassContext) -> int:
        return int(self.fn(graph, ctx) or 0)


def function_pass(name: str, opt_level: int = 1, requires: Iterable[str] = ()) -> Callable[[Callable], FunctionPass]:
    """Decorator: turn `fn(graph, ctx) -> changes` into a Pass."""
    return lambda fn: FunctionPass(fn, name, opt_level, requires)


def _run_one(p: Pass, graph: Graph, ctx: PassContext) -> int:
    missing = [r for r in p.requires if r not in ctx.ran]
    if missing:
        raise PassError(f"pass {p.name!r} requires {missing} to have run before it (ran: {ctx.ran})")
    for inst in ctx.instruments:
        inst.run_before_pass(graph, p)
    changed = p.run(graph, ctx)
    ctx.ran.append(p.name)
    if ctx.validate:
        try:
            graph.validate()
        except ValueError as exc:
            raise PassError(f"pass {p.name!r} left the graph invalid: {exc}") from exc
    for inst in ctx.instruments:
        inst.run_after_pass(graph, p, changed)
    return changed


class Sequential(Pass):
    """Runs passes in declared order, honouring the context's switches."""

    def __init__(self, passes: Sequence[Pass], name: str = "sequential", opt_level: int = 0) -> None:
        self.passes, self.name, self.opt_level = list(passes), name, opt_level

    def run(self, graph: Graph, ctx: PassContext) -> int:
        total = 0
        for p in self.passes:
            if ctx.enabled(p):
                total += _run_one(p, graph, ctx)
        return total

    def __iter__(self):
        return iter(self.passes)


# ----------------------------------------------------------------------------- instruments


class PassTimings(PassInstrument):
    """Wall time and change count per pass run."""

    def __init__(self) -> None:
        self.records: list[tuple[str, float, int]] = []
        self._starts: list[float] = []  # a stack: a Sequential's inner passes start and end inside it

    def run_before_pass(self, graph: Graph, pass_: Pass) -> None:
        self._starts.append(time.perf_counter())

    def run_after_pass(self, graph: Graph, pass_: Pass, changed: int) -> None:
        self.records.append((pass_.name, time.perf_counter() - self._starts.pop(), changed))

    def table(self) -> str:
        rows = [f"{'pass':<28}{'ms':>10}{'changes':>10}"]
        rows += [f"{n:<28}{1e3 * t:>10.2f}{c:>10}" for n, t, c in self.records]
        return "\n".join(rows)


class IRDump(PassInstrument):
    """The IR text after each pass (and before the first), for reading or diffing."""

    def __init__(self, only: Iterable[str] | None = None) -> None:
        self.only = set(only) if only is not None else None
        self.dumps: list[tuple[str, str]] = []

    def run_before_pass(self, graph: Graph, pass_: Pass) -> None:
        if not self.dumps:
            self.dumps.append(("input", str(graph)))

    def run_after_pass(self, graph: Graph, pass_: Pass, changed: int) -> None:
        if self.only is None or pass_.name in self.only:
            self.dumps.append((pass_.name, str(graph)))
