"""The op registry: which ops the IR knows, from which op-set version, and their NumPy semantics.

Each op is registered with a decorator on its NumPy reference function (see `reference.py`):

    @register("Softmax", since=13)
    def softmax(x, *, axis=-1): ...

Positional parameters are the node's inputs (an omitted optional input arrives as None; a
`*inputs` parameter takes a variable number); keyword-only parameters are its attributes, with
their ONNX defaults. The importer picks, for a model's op-set, the newest registration whose
`since` is ≤ that op-set, as ONNX runtimes do.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

DEFAULT_DOMAIN = ""  # "ai.onnx" is normalised to this


class UnsupportedOpError(NotImplementedError):
    """The model uses an op (or op version / attribute) this engine does not implement."""


@dataclass(frozen=True)
class OpDef:
    op: str
    since: int
    fn: Callable
    domain: str = DEFAULT_DOMAIN
    attrs: dict = field(default_factory=dict)  # attribute name → default (inspect.Parameter.empty if required)
    variadic: bool = False  # takes any number of inputs
    max_inputs: int = 0
    min_inputs: int = 0

    def check_arity(self, n_inputs: int, where: str) -> None:
        if n_inputs < self.min_inputs or (not self.variadic and n_inputs > self.max_inputs):
            expected = f"at least {self.min_inputs}" if self.variadic else f"{self.min_inputs}..{self.max_inputs}"
            raise UnsupportedOpError(f"{where}: {self.op} takes {expected} inputs, got {n_inputs}")


_REGISTRY: dict[tuple[str, str], list[OpDef]] = {}


def normalize_domain(domain: str) -> str:
    return DEFAULT_DOMAIN if domain in ("", "ai.onnx") else domain


def register(op: str, since: int = 1, domain: str = DEFAULT_DOMAIN) -> Callable[[Callable], Callable]:
    """Register `fn` as the semantics of `op` from op-set `since` on. Duplicates are an error."""

    def wrap(fn: Callable) -> Callable:
        sig = inspect.signature(fn)
        attrs, n_pos, n_required, variadic = {}, 0, 0, False
        for p in sig.parameters.values():
            if p.kind is p.KEYWORD_ONLY:
                attrs[p.name] = p.default
            elif p.kind is p.VAR_POSITIONAL:
                variadic = True
            elif p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                n_pos += 1
                n_required += p.default is p.empty
        key = (normalize_domain(domain), op)
        versions = _REGISTRY.setdefault(key, [])
        if any(d.since == since for d in versions):
            raise ValueError(f"op {op!r} (domain {domain!r}) is already registered for since={since}")
        versions.append(
            OpDef(op, since, fn, key[0], attrs, variadic, max_inputs=n_pos, min_inputs=n_required if not variadic else max(n_required, 1))
        )
        versions.sort(key=lambda d: d.since)
        return fn

    return wrap


def lookup(op: str, opset: int, domain: str = DEFAULT_DOMAIN, *, where: str = "") -> OpDef:
    """The registration of `op` in force at `opset`, or a clear UnsupportedOpError."""
    versions = _REGISTRY.get((normalize_domain(domain), op))
    place = f" in {where}" if where else ""
    if not versions:
        dom = f" (domain {domain!r})" if normalize_domain(domain) else ""
        raise UnsupportedOpError(
            f"unsupported op {op!r}{dom}{place} at opset {opset}. Supported ops: {', '.join(supported_ops())}. "
            "Re-export the model with standard ONNX ops (e.g. torch.onnx.export without custom ops), "
            "or open an issue asking for this op."
        )
    usable = [d for d in versions if d.since <= opset]
    if not usable:
        raise UnsupportedOpError(
            f"op {op!r}{place}: opset {opset} is older than any supported version of it "
            f"(supported from opset {versions[0].since}); re-export the model with opset ≥ {versions[0].since}"
        )
    return usable[-1]


def lookup_version(op: str, version: int, domain: str = DEFAULT_DOMAIN) -> OpDef:
    """The registration a node was imported with (its `version` is a registration's `since`)."""
    for d in _REGISTRY.get((normalize_domain(domain), op), ()):
        if d.since == version:
            return d
    return lookup(op, version, domain)


def supported_ops(domain: str = DEFAULT_DOMAIN) -> list[str]:
    """Names of every registered op in `domain`, sorted."""
    dom = normalize_domain(domain)
    return sorted(op for (d, op) in _REGISTRY if d == dom)


def registered() -> list[OpDef]:
    """Every registration (all domains and versions)."""
    return [d for versions in _REGISTRY.values() for d in versions]
