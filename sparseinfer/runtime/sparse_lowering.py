"""Lower a Dense node whose weight the layout pass stored as CSR or r x c blocks.

The sparse kernels compute ``out.T = W.T @ X.T``: a step transposes its input into a workspace
``xt`` and its result back into row-major ``out`` (:mod:`sparseinfer.kernels.csr`), unless the
plan keeps the value feature-major (:mod:`sparseinfer.runtime.feature_major`): then the input is
the kernel's ``xt`` itself (``xready``), the result goes straight into the output's
feature-major buffer (``xnext``, bias and activation applied) and a feature-major residual is
added there (``xres``). BERT's feed-forward intermediate (FF1 768 -> 3072 with GELU, read only
by FF2) never exists row-major; nor, when the steps around them take the layout, do the
residual stream, the Q/K/V projection and the context.

Pairs of steps on the sparse int8 kernel (:mod:`sparseinfer.runtime.int8_lowering`)
share a workspace instead (:func:`link_chains`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..graph import Graph, Node
from ..graph.reference import ENGINE_DOMAIN
from ..kernels import bsr as k_bsr
from ..kernels import csr as k_csr
from ..kernels.sparse_formats import pack_bsr, pack_csr, panel_rows

if TYPE_CHECKING:
    from .plan import DenseOperands, Plan, Step


@dataclass(frozen=True)
class Chain:
    """A producer -> consumer pair of steps sharing a workspace (the sparse int8 kernel: int8_lowering)."""

    value: str  # the intermediate tensor (producer output, consumer x)
    producer: Node
    consumer: Node
    workspace: str  # arena name of the shared xt
    shape: tuple[int, int, int]


def sparse_block(graph: Graph, node: Node) -> tuple[int, int] | None:
    """``(r, c)`` (``(1, 1)`` for CSR) if ``node`` is a Dense the plan runs on the fp32 sparse kernels."""
    from .plan import dense_operands  # here, not at import: plan imports this module

    if node.domain != ENGINE_DOMAIN or node.op != "Dense" or node.attrs.get("quantize") == "int8":
        return None
    layout = node.attrs.get("layout", "dense")
    if layout not in ("csr", "bsr") or dense_operands(graph, node) is None:
        return None
    return (1, 1) if layout == "csr" else tuple(int(b) for b in node.attrs["block"])


def link_chains(
    graph: Graph, link: Callable[[Node, Node], tuple[str, tuple[int, ...]] | None], through: bool = True, x_only: bool = True
) -> dict[str, Chain]:
    """The producer -> consumer pairs of ``graph`` that ``link`` accepts, by intermediate value.

    A candidate pair: the producer has one output, read by nothing but one node, as that node's
    ``x`` input (only; with ``x_only=False`` as any of its inputs, e.g. an attention's q, k and v
    at once), and not a graph output. ``link(producer, consumer)`` says whether the two steps can
    share a workspace: ``(prefix, shape)`` of the shared array, or None. Chains of the same prefix
    and shape whose live ranges (producer step to consumer step) do not overlap share one array.
    ``through=False``: a node that consumes a chain does not also produce one."""
    readers: dict[str, list[Node]] = {}
    for node in graph.nodes:
        for name in dict.fromkeys(node.inputs):  # each reading node once
            if name:
                readers.setdefault(name, []).append(node)
    order = {id(node): i for i, node in enumerate(graph.nodes)}
    outputs = set(graph.outputs)
    chains: dict[str, Chain] = {}
    consumers: set[int] = set()
    busy: dict[tuple, list[int]] = {}  # (prefix, shape) -> step index up to which each array is in use
    for node in graph.nodes:
        if len(node.outputs) != 1 or (not through and id(node) in consumers):
            continue
        value = node.outputs[0]
        users = readers.get(value, [])
        if value in outputs or len(users) != 1:
            continue
        consumer = users[0]
        if x_only and (consumer.inputs[0] != value or value in consumer.inputs[1:]):
            continue
        linked = link(node, consumer)
        if linked is None:
            continue
        prefix, shape = linked
        start, end = order[id(node)], order[id(consumer)]
        ends = busy.setdefault((prefix, shape), [])
        slot = next((i for i, e in enumerate(ends) if e < start), len(ends))
        if slot == len(ends):
            ends.append(end)
        else:
            ends[slot] = end
        name = f"{prefix}__chain{slot}__{'x'.join(map(str, shape))}"
        chains[value] = Chain(value, node, consumer, name, shape)
        consumers.add(id(consumer))
    return chains


def chunk_lanes(c: int, m: int) -> int:
    """The row chunk of a sparse Dense step with blocks ``c`` wide on ``m`` rows, split into one
    part per Numba thread (:func:`sparseinfer.kernels.bsr.chunk_rows`)."""
    return k_bsr.chunk_rows(c, m, k_csr.numba.config.NUMBA_NUM_THREADS)


def engine_pack(weight: np.ndarray, block: tuple[int, int] | None, m: int, lanes: int, parts: int):
    """The pack a sparse Dense step on ``m`` rows in ``lanes``-row chunks and ``parts`` parts
    hands its kernel: CSR (``block`` None) or ``r x c`` blocks in K panels of 64 KiB of the
    chunk's ``xt`` (:func:`~sparseinfer.kernels.sparse_formats.panel_rows`; blocks wider than a
    column in one panel), in the traversal order of those chunks and parts
    (:func:`~sparseinfer.kernels.csr.traversal_order`): ``(indptr, indices, data, order)``."""
    c = 1 if block is None else block[1]
    if block is None:
        packed = pack_csr(weight, kb=panel_rows(lanes))
    else:
        packed = pack_bsr(weight, block, kb=panel_rows(lanes) if c == 1 else None)
    return k_csr.traversal_order(packed, weight.shape[1], c, m, lanes, parts)


def lower_sparse_dense(plan: Plan, node: Node, layout: str, ops: DenseOperands) -> Step:
    """The kernel step of a sparse Dense, reading and writing feature-major where
    ``plan.feature_major`` says (:mod:`sparseinfer.runtime.feature_major`)."""
    from .plan import _out_rows, _rows

    m, k, n, weight = ops.m, ops.k, ops.n, ops.weight
    if layout == "csr" and m <= k_csr.FEW_ROWS:
        return _lower_few_rows(plan, node, ops)
    if layout == "csr":
        block, r, c = None, 1, 1
    else:
        block = tuple(node.attrs["block"])
        r, c = k_bsr.check_block(block)
    lanes = chunk_lanes(c, m)
    kernel = k_csr.chain_kernel(r, c, k_csr.lanes_for(m, lanes))
    # steps run one after another and the scratch does not outlive a step: share it per shape
    xt_shape, ot_shape = k_csr.workspace_shapes(m, max(r, -(-k // r) * r), lanes)
    # a column-wide pack depends on this call's row chunks and threads (engine_pack): plans with
    # other chunks hold their own
    parts = ot_shape[0]
    key = ("sparse", ops.w, block) + ((xt_shape[0], parts, lanes) if c == 1 else ())
    indptr, indices, data, order = plan.weights.get(key, lambda: engine_pack(weight, block, m, lanes, parts))
    fm = plan.feature_major
    fm_x, fm_out = ops.x in fm, node.outputs[0] in fm
    fm_res = ops.residual is not None and ops.residual in fm
    ws = [f"Sparse__ws{i}__{'x'.join(map(str, s))}" for i, s in enumerate((xt_shape, ot_shape))]
    for name, shape in zip(ws, (xt_shape, ot_shape)):
        if not (name == ws[0] and fm_x):  # a feature-major x is the kernel's xt itself
            plan.workspaces.setdefault(name, shape)
    x_rows = np.empty((m, 0), np.float32)  # only its row count is read when X.T is ready in xt
    no_out = np.empty((0, n), np.float32)  # only its column count is read when the result goes to xnext
    flops = 2 * m * int(np.count_nonzero(weight))

    def run(env, out, arena):
        x, xt = (x_rows, env[ops.x]) if fm_x else (_rows(env[ops.x]), arena[ws[0]])
        res = None if ops.residual is None or fm_res else _rows(env[ops.residual])
        xres = env[ops.residual] if fm_res else None
        if fm_out:
            kernel(x, indptr, indices, data, ops.bias, res, no_out, ops.act, xt, arena[ws[1]], out, fm_x, order, xres)
        else:
            kernel(x, indptr, indices, data, ops.bias, res, _out_rows(out), ops.act, xt, arena[ws[1]], k_csr.NO_NEXT, fm_x, order)

    return plan._kernel(node, run, flops)


def _lower_few_rows(plan: Plan, node: Node, ops: DenseOperands) -> Step:
    """A CSR Dense on at most ``FEW_ROWS`` rows (:func:`~sparseinfer.kernels.csr.few_rows_kernel`:
    a pack of one panel, row-major in and out, never chained)."""
    from .plan import _out_rows, _rows

    def make_pack():  # one panel: each column's nonzeros in one run
        indptr, indices, data = pack_csr(ops.weight, kb=max(1, ops.k))
        return indptr, k_csr.narrow_indices(indices), data

    indptr, indices, data = plan.weights.get(("sparse_rows", ops.w), make_pack)
    parts = max(1, k_csr.numba.config.NUMBA_NUM_THREADS)
    flops = 2 * ops.m * int(np.count_nonzero(ops.weight))

    def run(env, out, arena):
        res = None if ops.residual is None else _rows(env[ops.residual])
        k_csr.few_rows_kernel(_rows(env[ops.x]), indptr, indices, data, ops.bias, res, _out_rows(out), ops.act, parts)

    return plan._kernel(node, run, flops)
