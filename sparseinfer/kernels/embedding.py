"""The steps before the first encoder layer: embedding lookup + LayerNorm, and the mask row.

``embedding_layernorm`` gathers one row of each table per token, sums them and layer-normalises
the sum, in one pass over each output row:

    s   = tables[0][ids[0][r]] + tables[1][ids[1][r]] + ...      (float32 adds, in this order)
    out = (s - mean(s)) / sqrt(var(s) + eps) * gamma + beta       (exactly as ``norm.layernorm_packed``)

A constant addend (the position embeddings an exporter folded to a [1, S, H] constant) is a table
too: the planner gives it a constant index array. The sums are float32 and left to right, so the
result is bit-identical to the Gather/Add/LayerNormalization steps it replaces. Indices follow
ONNX Gather: ``-n <= i < n``, negative ones count from the end; the kernel checks them all before
writing anything and returns the flat position (``t * M + r``) of the first bad one, or -1.

``attention_mask_row`` computes the additive attention mask row [B, S] from an integer padding
mask, as exporters spell it out (Cast, ``1 - m``, then ``* big_negative`` or ``Where``).

NumPy references: ``embedding`` and ``attention_mask_row`` in ``sparseinfer/graph/reference.py``.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .norm import normalize_row

__all__ = ["MAX_TERMS", "attention_mask_row", "embedding_layernorm", "embedding_layernorm_serial", "pad_terms", "readonly"]

_ROWS_PER_TASK = 8
MAX_TERMS = 4  # tables per call; `pad_terms` pads the tuples to this many (fixed arity: one loop per count)


@njit(nogil=True, error_model="numpy", cache=True)
def _first_bad_index(ids, tables, count):
    m = ids[0].shape[0]
    for t in range(count):
        n = tables[t].shape[0]
        idx = ids[t]
        for r in range(m):
            if idx[r] < -n or idx[r] >= n:
                return t * m + r
    return -1


@njit(nogil=True, error_model="numpy", cache=True)
def _embed_rows(ids, tables, count, gamma, beta, eps, out, r0, r1):
    """Rows r0..r1-1. The tuples are unpacked once per block of rows, not per row: every array
    reference taken is an atomic reference-count update (per row, that cost a third of the time).
    Padded entries (t >= count) are a valid (ids[0], tables[0]) pair: their row views are safe."""
    n_cols = out.shape[1]
    t0, t1, t2, t3 = tables
    d0, d1, d2, d3 = ids
    for r in range(r0, r1):
        i0, i1, i2, i3 = d0[r], d1[r], d2[r], d3[r]
        a = t0[i0 + t0.shape[0] if i0 < 0 else i0]  # 1-D rows: a loop over them vectorises
        b = t1[i1 + t1.shape[0] if i1 < 0 else i1]
        c = t2[i2 + t2.shape[0] if i2 < 0 else i2]
        d = t3[i3 + t3.shape[0] if i3 < 0 else i3]
        o = out[r]
        # one loop per term count; the adds stay left to right, in float32, as the Add chain's
        if count == 1:
            for j in range(n_cols):
                o[j] = a[j]
        elif count == 2:
            for j in range(n_cols):
                o[j] = a[j] + b[j]
        elif count == 3:
            for j in range(n_cols):
                o[j] = (a[j] + b[j]) + c[j]
        else:
            for j in range(n_cols):
                o[j] = ((a[j] + b[j]) + c[j]) + d[j]
        normalize_row(out, r, n_cols, out, gamma, beta, eps)  # norm.layernorm_packed's arithmetic: the same bits


@njit(nogil=True, error_model="numpy", parallel=True, cache=True)
def embedding_layernorm(ids, tables, count, gamma, beta, eps, out):
    """out[r] = layernorm(sum_{t < count} tables[t][ids[t][r]]); ids: a 4-tuple of int64 [M],
    tables: a 4-tuple of float32 [n_t, N] (entries from `count` on are not added; pad with a valid
    (ids, table) pair, as `pad_terms` does),
    out float32 [M, N]. Returns -1, or the flat position t * M + r of the first index out of
    range (then `out` is untouched). Parallel over blocks of rows."""
    bad = _first_bad_index(ids, tables, count)
    if bad >= 0:
        return bad
    m = out.shape[0]
    ntask = (m + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for task in prange(ntask):
        _embed_rows(ids, tables, count, gamma, beta, eps, out, task * _ROWS_PER_TASK, min(m, (task + 1) * _ROWS_PER_TASK))
    return -1


@njit(nogil=True, error_model="numpy", cache=True)
def embedding_layernorm_serial(ids, tables, count, gamma, beta, eps, out):
    """`embedding_layernorm` on the calling thread (no parallel region)."""
    bad = _first_bad_index(ids, tables, count)
    if bad >= 0:
        return bad
    _embed_rows(ids, tables, count, gamma, beta, eps, out, 0, out.shape[0])
    return -1


def pad_terms(ids: tuple, tables: tuple) -> tuple[tuple, tuple, int]:
    """(ids, tables, count) as the kernels take them: padded to MAX_TERMS entries with repeats of
    the first (never read), every array a read-only view (a tuple holds one array type, and a
    constant from a model file may be read-only already; a view costs no copy)."""
    count = len(tables)
    if not 1 <= count <= MAX_TERMS or len(ids) != count:
        raise ValueError(f"embedding_layernorm takes 1..{MAX_TERMS} (ids, table) pairs, got {len(ids)} ids and {count} tables")
    pad = MAX_TERMS - count
    return tuple(readonly(a) for a in (*ids, *(ids[0],) * pad)), tuple(readonly(a) for a in (*tables, *(tables[0],) * pad)), count


def readonly(a: np.ndarray) -> np.ndarray:
    """`a` as a read-only array (a view of it if it is writeable)."""
    if not a.flags.writeable:
        return a
    v = a.view()
    v.flags.writeable = False
    return v


@njit(nogil=True, error_model="numpy", cache=True)
def attention_mask_row(mask, where, value, out):
    """out[b, s] from the integer padding mask [B, S], d = float32(1) - float32(mask[b, s]):
    `where`: value if d != 0 else d (the SDPA exports' Where); else d * value (eager exports).
    Float32 arithmetic throughout, as the exported Cast/Sub/Mul steps."""
    one = np.float32(1.0)
    v = np.float32(value)
    b_n, s_n = mask.shape
    for b in range(b_n):
        for s in range(s_n):
            d = one - np.float32(mask[b, s])
            if where:
                out[b, s] = v if d != 0 else d
            else:
                out[b, s] = d * v
