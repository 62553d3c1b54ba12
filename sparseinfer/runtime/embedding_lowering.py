"""Lower the Embedding and AttentionMaskRow nodes (the steps before the first encoder layer).

Embedding runs `kernels.embedding.embedding_layernorm`: every term becomes a (table, indices)
pair. A gather term reads its indices from the run (int64, flattened); a constant addend (a [1, S,
H] position table folded by the exporter, say) is a table of its P distinct rows with a constant
index array r % P, so the kernel adds every term the same way and in the chain's order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..graph import Node
from ..kernels import embedding as k_embedding

if TYPE_CHECKING:
    from .plan import Plan, Step

# Up to this many rows run on the calling thread: below it a parallel region costs more than it
# saves (measured, 2 threads, rows of 768: 8 rows 3 us serial / 5 us parallel, 16 rows 5 / 5,
# 32 rows 9 / 7, 128 rows 37 / 20; in a BERT-base run, caches cold, 128 rows ~145 / ~100 us).
SERIAL_ROWS = 16


def _addend_table(c: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """A float32 constant broadcast to `shape` ([..., H]) as (table [P, H], row index [M] of each
    output row): the rows repeat with period P = the product of the dims it spans."""
    h, m = shape[-1], int(np.prod(shape[:-1]))
    c = c.reshape((1,) * (len(shape) - c.ndim) + c.shape)
    lead = c.shape[:-1]
    first = next((k for k, d in enumerate(lead) if d != 1), len(lead))  # dims before it are broadcast
    if all(d == s for d, s in zip(lead[first:], shape[first:-1])):
        p = int(np.prod(shape[first:-1]))
        table = np.broadcast_to(c.reshape(-1, c.shape[-1]) if c.shape[-1] == h else c.reshape(-1, 1), (p, h))
    else:  # broadcast along an inner dim too: spell every row out
        p = m
        table = np.broadcast_to(c, shape).reshape(m, h)
    return np.ascontiguousarray(table, np.float32), np.arange(m, dtype=np.int64) % p


def lower_embedding(plan: Plan, node: Node) -> Step | None:
    """A kernel step for an Embedding node, or None (the reference step runs it) when the
    LayerNorm parameters are not constants of the row width or a table is not float32 [n, H]."""
    g = plan.graph
    scale, bias, *operands = node.inputs
    out_shape = g.info(node.outputs[0]).shape
    h, m = out_shape[-1], int(np.prod(out_shape[:-1]))
    if g.const(scale) is None or (bias and g.const(bias) is None) or g.info(node.outputs[0]).dtype != np.float32:
        return None
    try:  # ONNX lets scale and bias broadcast (e.g. shape [1]); the kernel reads h of each
        gamma = np.ascontiguousarray(np.broadcast_to(g.const(scale).reshape(-1), (h,)), np.float32)
        beta = np.zeros(h, np.float32) if not bias else np.ascontiguousarray(np.broadcast_to(g.const(bias).reshape(-1), (h,)), np.float32)
    except ValueError:
        return None
    tables, ids = [], []  # ids: a value name (read at run time) or a constant index array
    k = 0
    for kind in node.attrs["terms"]:
        if kind == "gather":
            table, idx = g.const(operands[k]), operands[k + 1]
            k += 2
            if table is None or table.dtype != np.float32 or table.ndim != 2 or table.shape[1] != h:
                return None
            if g.info(idx).dtype not in (np.int64, np.int32) or int(np.prod(g.info(idx).shape)) != m:
                return None
            tables.append(np.ascontiguousarray(table))
            ids.append(idx)
        else:
            c = g.const(operands[k])
            k += 1
            if c is None or c.dtype != np.float32:
                return None
            table, rows = _addend_table(c, tuple(out_shape))
            tables.append(table)
            ids.append(rows)
    if len(tables) > k_embedding.MAX_TERMS:
        return None
    # padded once; per run only the index arrays read from the run are swapped in
    static_ids, tables, count = k_embedding.pad_terms(tuple(np.zeros(m, np.int64) if isinstance(i, str) else i for i in ids), tables)
    runtime = [(t, name) for t, name in enumerate(ids) if isinstance(name, str)]
    eps = np.float32(node.attrs.get("epsilon", 1e-5))
    kernel = k_embedding.embedding_layernorm_serial if m <= SERIAL_ROWS else k_embedding.embedding_layernorm

    def call(env, out, arena):
        run_ids = list(static_ids)
        for t, name in runtime:
            run_ids[t] = k_embedding.readonly(np.ascontiguousarray(env[name], np.int64).reshape(-1))
        bad = kernel(tuple(run_ids), tables, count, gamma, beta, eps, out.reshape(m, h))
        if bad >= 0:
            t, r = divmod(bad, m)
            n = tables[t].shape[0]
            raise IndexError(
                f"node {node.name or node.op}: Gather: index {run_ids[t][r]} is out of range for an axis of size {n} "
                f"(input {ids[t]!r}, flat position {r}); valid indices are {-n}..{n - 1}"
            )

    return plan._kernel(node, call)


def lower_attention_mask_row(plan: Plan, node: Node) -> Step | None:
    """A kernel step for an AttentionMaskRow node (integer mask [B, S] → float32 [B, 1, 1, S])."""
    g = plan.graph
    mask = node.inputs[0]
    mi = g.info(mask)
    if mi.dtype not in (np.int64, np.int32) or mi.rank != 2 or node.attrs.get("mode", "mul") not in ("mul", "where"):
        return None
    where = node.attrs.get("mode", "mul") == "where"
    value = np.float32(node.attrs.get("value", -3.4028234663852886e38))
    b, s = mi.shape

    def call(env, out, arena):
        k_embedding.attention_mask_row(np.ascontiguousarray(env[mask]), where, value, out.reshape(b, s))

    return plan._kernel(node, call)
