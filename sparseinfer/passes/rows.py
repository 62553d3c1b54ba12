"""Compute only the rows that are read: a Gather of rows moves up, ahead of the row-wise ops.

A sequence classifier reads one token of its last encoder layer (BERT's pooler is
``Gather(hidden, 0, axis=1)``), yet the graph computes the whole layer for every token. Everything
after the layer's attention is row-wise (Dense, LayerNormalization, elementwise ops: row ``i`` of
the result depends on row ``i`` of the inputs only), and a row of the attention's result depends on
its own query row and on all keys and values. So

    Gather(f(x, r), rows) = f(Gather(x, rows), Gather(r, rows))                 (f row-wise)
    Gather(Attention(q, k, v), rows) = Attention(Gather(q, rows), k, v)

and the Gather can move up until it meets a value that something else reads in full (the last
layer's input: the keys and values need every token). In BERT-base at sequence length 128 the
last layer's query projection, attention, output projection, both LayerNorms and feed-forward
pair then run on one row instead of 128: all of that layer's work but its K and V projections.

What moves: a Gather with constant integer indices (in range, fewer than the axis holds) on an
axis that is not the last, of a value read only by Gathers with the same axis and indices, and
not a graph output, whose producer is

* a Dense (fp32 semantics; the engine may still run it in int8) or a LayerNormalization over the
  last axis: its input, and a Dense's residual, are gathered;
* an Attention, on axis 1 (the sequence axis), whose mask does not vary by query row: its
  queries are gathered, its keys and values are not;
* a unary elementwise op (:data:`UNARY`), or a binary one (:data:`BINARY`) whose operands are
  gathered where they vary along the axis and read as they are where they broadcast over it.

QDense does not take part: its dynamic quantization takes the scale of the whole input, so its
rows are not independent. A scalar index (the pooler's) drops the axis; the moved ops then keep
it with one row, and the Gather that is left selects row 0 of one. Each row read is computed by
the same ops from the same operands, so the reference executor gives the same outputs; the engine
may run a step on a few rows with another kernel (CSR: :func:`~sparseinfer.kernels.csr.few_rows_kernel`),
which rounds differently (the tests compare with onnxruntime on the original model). Disable with
``PassContext(disabled={"hoist_row_gather"})``.
"""

from __future__ import annotations

import numpy as np

from ..graph import Graph, Node, TensorInfo
from ..graph.reference import ENGINE_DOMAIN
from .fusion import Index, until_stable
from .manager import PassContext, function_pass

UNARY = frozenset({"Abs", "Cast", "Erf", "Exp", "Gelu", "Identity", "Neg", "Relu", "Sigmoid", "Sqrt", "Tanh"})
BINARY = frozenset({"Add", "Sub", "Mul", "Div"})


def _rows_selected(graph: Graph, gather: Node) -> tuple[int, np.ndarray] | None:
    """``(axis, indices as non-negative 1-D int64)`` of a Gather that selects fewer rows than its
    input's (static) axis holds, on an axis other than the last; else None."""
    if gather.domain != "" or gather.op != "Gather":
        return None
    x, idx = gather.inputs
    shape = graph.info(x).shape
    ids = graph.const(idx)
    if shape is None or ids is None or ids.dtype.kind not in "iu" or ids.ndim > 1:
        return None
    axis = int(gather.attrs.get("axis", 0))
    if not -len(shape) <= axis < len(shape) - 1:
        return None
    axis %= len(shape)
    dim = shape[axis]
    if not isinstance(dim, int) or ids.size >= dim or ((ids < -dim) | (ids >= dim)).any():
        return None
    return axis, np.where(ids < 0, ids + dim, ids).astype(np.int64).reshape(-1)


def _row_inputs(graph: Graph, node: Node, axis: int) -> list[int] | None:
    """Positions of the inputs of ``node`` to gather when its result is gathered on ``axis``, or
    None when the result's rows on that axis do not each come from the same rows of the inputs."""
    out = graph.info(node.outputs[0]).shape
    if len(node.outputs) != 1 or out is None:
        return None
    rank = len(out)
    if node.domain == ENGINE_DOMAIN and node.op == "Dense":
        x = graph.info(node.inputs[0]).shape
        residual = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3] else None
        if x is None or len(x) != rank or (residual is not None and graph.info(residual).shape != out):
            return None
        return [0] + ([3] if residual is not None else [])
    if node.domain == ENGINE_DOMAIN and node.op == "Attention":
        mask = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3] else None
        ms = None if mask is None else graph.info(mask).shape
        if axis != 1 or rank != 3 or (mask is not None and (ms is None or (len(ms) >= 2 and ms[-2] != 1))):
            return None
        return [0]
    if node.domain != "":
        return None
    if node.op == "LayerNormalization":
        if int(node.attrs.get("axis", -1)) % rank != rank - 1 or any(graph.const(i) is None for i in node.inputs[1:] if i):
            return None
        return [0]
    if node.op in UNARY and len(node.inputs) == 1:
        return [0] if graph.info(node.inputs[0]).shape == out else None
    if node.op in BINARY and len(node.inputs) == 2:
        picked = []
        for i, name in enumerate(node.inputs):
            shape = graph.info(name).shape
            if shape is None or len(shape) > rank:
                return None
            pos = axis - (rank - len(shape))  # the operand's own axis under right-aligned broadcasting
            if pos >= 0 and shape[pos] != 1:
                if shape[pos] != out[axis] or shape[:pos] != out[axis - pos : axis]:
                    return None  # varies along the axis but not row for row with the result
                picked.append(i)
        return picked
    return None


def _same_rows(graph: Graph, node: Node, value: str, axis: int, ids: np.ndarray, ndim: int) -> bool:
    """Whether ``node`` is a Gather of ``value`` selecting ``ids`` on ``axis`` with ``ndim``-D indices."""
    if node.op != "Gather" or node.domain != "" or node.inputs[0] != value:
        return False
    sel = _rows_selected(graph, node)
    return sel is not None and sel[0] == axis and np.array_equal(sel[1], ids) and graph.const(node.inputs[1]).ndim == ndim


def _gathered(graph: Graph, name: str, axis: int, ids: np.ndarray, before: Node) -> str:
    """The rows ``ids`` on ``axis`` of ``name``, from a Gather placed before ``before`` (an existing
    one if the graph has it: the residual of a layer is gathered once for both of its readers)."""
    at = graph.nodes.index(graph.current(before))
    for i, node in enumerate(graph.nodes):
        if _same_rows(graph, node, name, axis, ids, 1):
            if i > at:  # move it up: it reads nothing but `name`, which `before` reads too
                info = graph.info(node.outputs[0])
                graph.remove_node(node)
                graph.add_node(node, [info], index=at)
            return node.outputs[0]
    shape = list(graph.info(name).shape)
    shape[axis] = ids.size
    idx = graph.add_constant(graph.fresh_name(f"{name}_rows"), ids)
    out = graph.fresh_name(f"{name}_rows")
    node = Node("Gather", (name, idx), (out,), {"axis": axis}, name=graph.fresh_name("hoist_row_gather"))
    graph.add_node(node, [TensorInfo(graph.info(name).dtype, tuple(shape))], index=at)
    return out


def _hoist_one(graph: Graph, ix: Index, gather: Node) -> bool:
    """Move ``gather`` (and the identical Gathers beside it) above its input's producer."""
    sel = _rows_selected(graph, gather)
    if sel is None:
        return False
    axis, ids = sel
    value = gather.inputs[0]
    ndim = graph.const(gather.inputs[1]).ndim
    readers = ix.cons.get(value, [])
    if value in graph.outputs or not all(_same_rows(graph, r, value, axis, ids, ndim) for r in readers):
        return False
    if any(r.outputs[0] in graph.outputs for r in readers[1:]):  # one of them would lose its name
        return False
    producer = ix.prod.get(value)
    picked = None if producer is None else _row_inputs(graph, producer, axis)
    if picked is None:
        return False
    inputs = list(producer.inputs)
    for i in picked:
        inputs[i] = _gathered(graph, inputs[i], axis, ids, producer)
    shape = list(graph.info(value).shape)
    shape[axis] = ids.size
    info = TensorInfo(graph.info(value).dtype, tuple(shape))
    first, rest = readers[0], readers[1:]
    if ndim == 0:  # the moved op keeps the axis with one row; the Gather left behind takes row 0 of it
        out = graph.fresh_name(f"{value}_rows")
        graph.replace_node(producer, producer.replace(inputs=tuple(inputs), outputs=(out,)))
        graph.set_info(out, info)
        zero = graph.add_constant(graph.fresh_name(f"{value}_row0"), np.array(0, np.int64))
        graph.replace_node(first, first.replace(inputs=(out, zero)))
    else:  # the moved op writes the Gather's result itself
        graph.remove_node(first)
        graph.replace_node(producer, producer.replace(inputs=tuple(inputs), outputs=first.outputs))
        graph.set_info(first.outputs[0], info)
    for r in rest:
        graph.replace_uses(r.outputs[0], first.outputs[0])
    return True


@function_pass("hoist_row_gather", opt_level=2)
def hoist_row_gather(graph: Graph, ctx: PassContext) -> int:
    """Gathers of rows moved above the row-wise ops that produce their input (module docstring),
    until none moves; the result is how many ops were moved."""
    return until_stable(graph, _hoist_one)
