"""Lower a Dense node whose weight the layout pass stored as CSR or r x c blocks, and chain
consecutive sparse Dense steps through the kernels' transposed workspace.

The sparse kernels compute ``out.T = W.T @ X.T``: they transpose their input into a workspace
``xt`` and their result back into row-major ``out`` (:mod:`sparseinfer.kernels.csr`). When a
sparse Dense's output is read by nothing but one other sparse Dense, as its ``x`` input, and is
not a graph output (BERT's feed-forward pair: FF1 768 -> 3072 with GELU, read only by FF2
3072 -> 768), both transposes of the intermediate are wasted. Such a pair is *chained*: the
producer writes its result, bias and activation applied, straight into the consumer's ``xt``
(the kernel's ``xnext`` mode) and the consumer skips its input transposition (``xready``). The
intermediate tensor then never exists in row-major form: the plan gives it no arena buffer and
it is never in a run's ``env``. A chain needs a producer without residual (the residual is
row-major) and both kernels with the same row chunk (``chunk_rows`` of the block width, the
rows and the threads: 64 for CSR at 128 rows and 2 threads), so that one ``xt`` layout serves
both; otherwise each step is lowered on its own.

The chained ``xt`` lives in the plan's per-arena workspaces. Chains of the same shape whose
live ranges (producer step to consumer step) do not overlap share one array.
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
    """A producer -> consumer pair of sparse Dense steps sharing the consumer's ``xt``."""

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


def find_chains(graph: Graph) -> dict[str, Chain]:
    """The chainable producer -> consumer pairs of fp32 sparse Dense nodes, by intermediate value."""
    from .plan import dense_operands

    def link(node: Node, consumer: Node) -> tuple[str, tuple[int, ...]] | None:
        bp, bq = sparse_block(graph, node), sparse_block(graph, consumer)
        if bp is None or bq is None:
            return None
        p, q = dense_operands(graph, node), dense_operands(graph, consumer)
        lanes = chunk_lanes(bp[1], p.m)
        if p.residual is not None or lanes != chunk_lanes(bq[1], q.m) or p.m != q.m or q.k != p.n:
            return None
        if p.m <= k_csr.FEW_ROWS and (1, 1) in (bp, bq):  # CSR on a few rows: few_rows_kernel, row-major
            return None
        return "Sparse", k_csr.chain_workspace(p.m, p.n, lanes).shape

    return link_chains(graph, link)


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
    """The kernel step of a sparse Dense; chained to its neighbours where ``plan.sparse_chains`` says."""
    from .plan import Step, _out_rows, _rows

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
    src = plan.sparse_chains.get(ops.x)
    src = src if src is not None and src.consumer is node else None
    dst = plan.sparse_chains.get(node.outputs[0])
    ws = [f"Sparse__ws{i}__{'x'.join(map(str, s))}" for i, s in enumerate((xt_shape, ot_shape))]
    if src is not None:
        ws[0] = src.workspace
    for name, shape in zip(ws, (xt_shape, ot_shape)):
        plan.workspaces.setdefault(name, shape)
    if dst is not None:
        plan.workspaces[dst.workspace] = dst.shape
    x_rows = np.empty((m, 0), np.float32)  # only its row count is read when X.T is ready in xt
    flops = 2 * m * int(np.count_nonzero(weight))

    def run(env, out, arena):
        x = x_rows if src is not None else _rows(env[ops.x])
        res = None if ops.residual is None else _rows(env[ops.residual])
        xnext = k_csr.NO_NEXT if dst is None else arena[dst.workspace]
        kernel(x, indptr, indices, data, ops.bias, res, out, ops.act, arena[ws[0]], arena[ws[1]], xnext, src is not None, order)

    if dst is None:
        return plan._kernel(node, lambda env, out, arena: run(env, _out_rows(out), arena), flops)
    no_out = np.empty((0, n), np.float32)  # only its column count is read: the result goes to xnext
    return Step(node, "kernel", lambda env, arena: run(env, no_out, arena), flops, buffer=False)


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
