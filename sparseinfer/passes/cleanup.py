"""Cleanup passes: constant folding, no-op elimination, dead-code elimination."""

from __future__ import annotations

import numpy as np

from ..graph import Graph
from ..graph.registry import lookup_version
from ..graph.shapes import _concrete, infer_shapes
from .manager import PassContext, function_pass

# Folding a node whose result would be larger than this many elements is not worth the memory.
FOLD_LIMIT = 1 << 24


@function_pass("fold_constants", opt_level=1)
def fold_constants(graph: Graph, ctx: PassContext) -> int:
    """Evaluate, once, every node whose inputs are constants, and every shape computation that
    shape inference resolved (Shape → Gather → Concat chains once dims are bound)."""
    known = infer_shapes(graph)
    folded = 0
    for node in graph.nodes:
        if any(o in graph.outputs for o in node.outputs) or not node.outputs:
            continue
        values = [_concrete(known.get(o)) for o in node.outputs if o]
        if values and all(v is not None for v in values):
            arrays = [v.astype(graph.info(o).dtype or v.dtype) for o, v in zip([o for o in node.outputs if o], values)]
        elif all(not i or graph.const(i) is not None for i in node.inputs):
            infos = [graph.info(o) for o in node.outputs if o]
            if any(not i.is_static or int(np.prod(i.shape)) > FOLD_LIMIT for i in infos):
                continue
            fn = lookup_version(node.op, node.version, node.domain).fn
            result = fn(*(graph.const(i) if i else None for i in node.inputs), **node.attrs)
            result = result if isinstance(result, tuple) else (result,)
            arrays = [np.asarray(r) for r, o in zip(result, node.outputs) if o]
        else:
            continue
        graph.remove_node(node)
        for name, arr in zip([o for o in node.outputs if o], arrays):
            graph.add_constant(name, arr)
        folded += 1
    return folded


def _is_noop(graph: Graph, node) -> bool:
    if node.op == "Identity":
        return True
    if node.op == "Dropout":
        training = node.inputs[2] if len(node.inputs) > 2 else ""
        if training and (graph.const(training) is None or bool(graph.const(training))):
            return False  # training-mode dropout is not the identity (and the reference refuses it)
        mask = node.outputs[1] if len(node.outputs) > 1 else ""
        return not mask or (not graph.consumers(mask) and mask not in graph.outputs)
    src, out = graph.info(node.inputs[0]), graph.info(node.outputs[0])
    if node.op == "Cast":
        return src.dtype == out.dtype
    if node.op in ("Reshape", "Expand", "Squeeze", "Unsqueeze", "Flatten"):
        return src.is_static and src.shape == out.shape
    if node.op == "Transpose":
        perm = node.attrs.get("perm")
        return perm is not None and list(perm) == sorted(perm)
    return False


@function_pass("eliminate_noops", opt_level=1)
def eliminate_noops(graph: Graph, ctx: PassContext) -> int:
    """Remove nodes that return their input unchanged (Identity, inference Dropout, same-type Cast,
    same-shape Reshape/Expand, identity Transpose). Graph outputs keep their names."""
    removed = 0
    for stale in graph.nodes:
        node = graph.current(stale)  # an earlier removal may have rewired its input
        if node.outputs[0] in graph.outputs or not _is_noop(graph, node):
            continue
        graph.replace_uses(node.outputs[0], node.inputs[0])
        graph.remove_node(node)
        removed += 1
    return removed


@function_pass("eliminate_dead_code", opt_level=0)
def eliminate_dead_code(graph: Graph, ctx: PassContext) -> int:
    """Drop nodes and constants that no graph output depends on."""
    return graph.remove_unused()
