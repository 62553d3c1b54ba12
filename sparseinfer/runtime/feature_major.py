"""Which activations a plan keeps feature-major between its steps.

The sparse Dense kernels compute ``out.T = W.T @ X.T``: they read their input as ``xt [nch, K,
lanes]`` (token ``t``, feature ``k`` at ``xt[t // lanes, k, t % lanes]``) and accumulate each
output column over the lanes (:mod:`sparseinfer.kernels.csr`). Row-major tensors between them
cost a transposition on the way in and one on the way out of every sparse step. In the
*feature-major* layout those vanish, and the steps between BERT's sparse matmuls work in it as
well: a LayerNorm is lane-wise there (:func:`~sparseinfer.kernels.norm.layernorm_fm`), the
attention reads K^T in place and writes the context for the output projection
(:func:`~sparseinfer.kernels.attention.attention_fm_packed`), and a residual is one vector add
per output column (the sparse kernel's ``xres``). In a BERT layer the residual stream, the fused
Q/K/V projection, the context and the feed-forward intermediate then never exist row-major:

    LN -> QKV -> attention -> output projection (+ LN's value) -> LN -> FF1 -> FF2 (+ value) -> LN

A value is kept feature-major when every step that reads it can read it so, and its producer
can write it so (:func:`find_feature_major`). Graph outputs stay row-major, and so does a value
that any other step reads (a reference step, a dense matmul, the classifier's few rows). Such a
value gets an arena buffer of shape :func:`fm_shape` instead of its own; the steps of the plan
look it up in ``plan.feature_major``. The lanes are the sparse kernels' row chunk
(:func:`~sparseinfer.runtime.sparse_lowering.chunk_lanes`: 64 for BERT-base at 128 rows and 2
threads); a sparse step whose chunk differs takes no part.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import numpy as np

from ..graph import Graph, Node
from ..graph.reference import ENGINE_DOMAIN
from ..kernels import attention as k_attention
from ..kernels import csr as k_csr

if TYPE_CHECKING:
    from .plan import Plan


def fm_shape(graph: Graph, name: str, lanes: int) -> tuple[int, int, int]:
    """``[chunks, rows, lanes]`` of value ``name`` held feature-major: its ``M`` tokens (all axes
    but the last) in chunks of ``lanes``, its ``N`` features rounded up to 8 (the tallest block a
    sparse kernel reading it may use; the writer zeroes those rows)."""
    shape = graph.info(name).shape
    m, n = int(np.prod(shape[:-1])), int(shape[-1])
    return max(1, -(-m // lanes)), max(8, -(-n // 8) * 8), lanes


def sparse_lanes(graph: Graph, node: Node) -> int | None:
    """The row chunk of ``node`` if it is a sparse Dense on the chunked kernel (not a few rows)."""
    from .plan import dense_operands
    from .sparse_lowering import chunk_lanes, sparse_block

    block = sparse_block(graph, node)
    if block is None:
        return None
    m = dense_operands(graph, node).m
    if block == (1, 1) and m <= k_csr.FEW_ROWS:
        return None
    return chunk_lanes(block[1], m)


def fm_attention(graph: Graph, node: Node, lanes: int) -> bool:
    """Whether ``node`` is an fp32 attention step that can read a fused Q/K/V projection held
    feature-major (queries = keys, a mask the step takes, heads the kernel takes)."""
    from .plan import attention_mask_ok

    if node.domain != ENGINE_DOMAIN or node.op != "Attention":
        return False
    q, k, v = node.inputs[:3]
    if not q == k == v or graph.info(q).dtype != np.float32 or not attention_mask_ok(graph, node):
        return False
    b, sq = graph.info(q).shape[:2]
    s = graph.info(k).shape[1]
    if sq != s or (node.attrs.get("quantize") == "int8"):  # the int8 attention has its own chain
        return False
    hd = node.attrs.get("hidden", 0) or graph.info(q).shape[2]
    return k_attention.fm_supported(s, hd // node.attrs["num_heads"], lanes)


def find_feature_major(plan: Plan) -> dict[str, tuple[int, int, int]]:
    """The values of ``plan.graph`` to keep feature-major, with their arena shapes (:func:`fm_shape`).

    Start from every output of a step that can write it feature-major and drop, until nothing
    changes, a value that is a graph output or has a reader that cannot read it so: a sparse
    Dense reads its ``x`` so, and its residual when its own result is feature-major (the
    kernel adds a residual in the layout of its result); an attention its Q/K/V
    (:func:`fm_attention`); a LayerNorm its input. A sparse Dense with a residual writes its
    result feature-major only if the residual is; an attention only if its input is."""
    from .plan import layernorm_operands

    graph = plan.graph
    lanes_of = {id(n): sparse_lanes(graph, n) for n in graph.nodes}
    counts = Counter(v for v in lanes_of.values() if v is not None)
    if not counts:
        return {}
    lanes = counts.most_common(1)[0][0]
    dense = {id(n) for n in graph.nodes if lanes_of[id(n)] == lanes}
    attention = {id(n) for n in graph.nodes if fm_attention(graph, n, lanes)}
    norm = {id(n) for n in graph.nodes if layernorm_operands(graph, n) is not None}
    producer = {n.outputs[0]: n for n in graph.nodes if len(n.outputs) == 1 and id(n) in dense | attention | norm}
    readers: dict[str, list[Node]] = {}
    for node in graph.nodes:
        for name in dict.fromkeys(node.inputs):
            if name:
                readers.setdefault(name, []).append(node)
    outputs = set(graph.outputs)
    fm = {v for v in producer if v not in outputs and (graph.info(v).rank or 0) >= 2}

    def reads_fm(node: Node, value: str) -> bool:
        slots = [i for i, name in enumerate(node.inputs) if name == value]
        if id(node) in dense:
            return all(i == 0 or (i == 3 and node.outputs[0] in fm) for i in slots)
        if id(node) in attention:
            return slots == [0, 1, 2]
        return id(node) in norm and slots == [0]

    def writes_fm(value: str) -> bool:
        node = producer[value]
        if id(node) in dense:
            res = node.inputs[3] if len(node.inputs) > 3 else ""
            return not res or res in fm
        if id(node) in attention:
            return node.inputs[0] in fm
        return True

    changed = True
    while changed:
        keep = {v for v in fm if writes_fm(v) and all(reads_fm(r, v) for r in readers.get(v, ()))}
        changed = keep != fm
        fm = keep
    return {v: fm_shape(graph, v, lanes) for v in graph.values if v in fm}
