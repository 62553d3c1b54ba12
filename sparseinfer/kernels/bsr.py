"""Block-sparse fp32 matrix multiplication with a fused epilogue.

    out = act(X @ W + bias) + residual

``W [K, N]`` is stored by :func:`~sparseinfer.kernels.sparse_formats.pack_bsr`
in blocks of ``r`` consecutive rows (k) by ``c`` consecutive columns (n).
The engine is the one of :mod:`sparseinfer.kernels.csr` (transposed
activations in an aligned workspace, output columns accumulated in zmm
registers, transposed store with the fused epilogue) with one block instead
of one value per step::

    for i < r:   x = Xt[k0 + i, m0:m0+L]                  (L / 16 vector loads)
                 acc[jj] += W[k0 + i, n0 + jj] * x        for jj < c

so one load of ``X.T`` feeds ``c`` FMAs: with ``c >= 4`` the kernel is bound
by the FMA units instead of the L2 -> L1 bandwidth that limits the
unstructured kernel, and with ``r > 1`` there is one index per ``r`` rows.
The register tile is ``c x L`` with ``L <= chunk_rows(c) = min(128, 256 / c)``
(8 zmm accumulators for ``c = 1``, 16 for ``c >= 2``).

Supported blocks: ``r`` in {1, 2, 4, 8}, ``c`` in {1, 2, 4, 8, 16}.  ``K`` and
``N`` need not be multiples of the block: the packed weight is zero padded
(rows past ``K`` multiply zero rows of ``X.T`` written by the kernel; columns
past ``N`` are computed and not stored).  Each block shape used compiles its
own specialisation (a few seconds, cached on disk).

NumPy reference: ``sparseinfer.graph.reference.dense`` with ``W`` dense.
"""

from __future__ import annotations

import numpy as np

from sparseinfer.kernels.csr import (
    ACT_GELU,
    ACT_GELU_EXACT,
    ACT_NONE,
    ACT_TANH,
    block_kernel,
    check_operands,
    check_workspace,
    lanes_for,
    workspace_shapes,
)
from sparseinfer.kernels.sparse_formats import aligned_empty, pack_bsr

__all__ = [
    "ACT_NONE",
    "ACT_GELU",
    "ACT_GELU_EXACT",
    "ACT_TANH",
    "BLOCK_ROWS",
    "BLOCK_COLS",
    "pack_bsr",
    "chunk_rows",
    "make_workspace",
    "bsr_matmul",
    "bsr_kernel",
    "check_block",
]

BLOCK_ROWS = (1, 2, 4, 8)
BLOCK_COLS = (1, 2, 4, 8, 16)


MIN_CHUNK = 64  # narrowest row chunk chunk_rows picks so that each thread owns whole chunks


def chunk_rows(c: int, m: int = 0, parts: int = 1) -> int:
    """Rows of X per chunk (= lanes of the widest register tile) for blocks ``c`` columns wide.

    At most ``min(128, 256 / c)``; for ``m`` rows split into ``parts`` parallel parts, halved
    (not below ``MIN_CHUNK``) while there are fewer row chunks than parts.  The driver hands
    out work chunk by chunk, so each thread then owns whole row chunks: it transposes its own
    slice of ``X.T``, reads only that slice, and in a chain writes the next kernel's slice that
    it reads again itself, all in its own core's caches.  Measured (Intel Xeon, Sapphire Rapids,
    2 cores, M = 128, 10% density, the four BERT-base shapes, CSR): 64-row chunks 7-27% faster
    per call than one 128-row chunk split by columns with 2 threads, the same within 4% with 1
    thread; BERT-base pruned to 90% unstructured 11% faster end to end.  ``m = 0``: the widest.
    """
    lanes = min(128, 256 // c)
    while m > 0 and lanes > MIN_CHUNK and -(-int(m) // lanes) < parts:
        lanes //= 2
    return lanes


def check_block(block) -> tuple[int, int]:
    """``(r, c)`` if the kernel supports blocks of that shape, else a ValueError that says which do."""
    try:
        r, c = (int(b) for b in block)
    except (TypeError, ValueError):
        raise ValueError(f"block must be a pair (rows, cols), got {block!r}") from None
    if r not in BLOCK_ROWS or c not in BLOCK_COLS:
        raise ValueError(
            f"block {(r, c)} is not supported by the block-sparse kernel: rows must be one of {BLOCK_ROWS} "
            f"and columns one of {BLOCK_COLS} (the CSR kernel handles unstructured sparsity)"
        )
    return r, c


def make_workspace(M: int, K: int, N: int, block) -> tuple[np.ndarray, np.ndarray]:
    """Aligned scratch ``(xt, ot)`` for one block shape (see :func:`sparseinfer.kernels.csr.workspace_shapes`).

    ``xt`` has ``Kp`` (K rounded up to the block) rows and ``lanes = chunk_rows(c)``.
    Allocate once per (M, K, block) at plan time; ``N`` is not needed.
    """
    r, c = check_block(block)
    Kp = max(r, -(-int(K) // r) * r)
    sx, so = workspace_shapes(M, Kp, chunk_rows(c))
    return aligned_empty(sx), aligned_empty(so)


def bsr_kernel(block, M: int):
    """The compiled kernel for ``block = (r, c)`` and ``M`` rows (chosen once, at plan time).

    Call it as ``kernel(X, indptr, indices, data, bias, residual, out, act, xt, ot)``
    with ``(indptr, indices, data) = pack_bsr(W, block)`` and ``(xt, ot) =
    make_workspace(M, K, N, block)``; see
    :func:`sparseinfer.kernels.csr.block_kernel` for the operands.
    """
    r, c = check_block(block)
    return block_kernel(r, c, lanes_for(M, chunk_rows(c)))


def bsr_matmul(X, packed, N, bias=None, residual=None, out=None, act=ACT_NONE, workspace=None):
    """Checked Python entry point around :func:`bsr_kernel`.

    ``packed = pack_bsr(W, block)``; ``N`` is the number of columns of ``W``.
    """
    indptr, indices, data = packed
    if data.ndim != 3:
        raise ValueError(f"block data must be [nblocks, r, c], got shape {data.shape} (pack with pack_bsr)")
    r, c = check_block(data.shape[1:])
    X, residual, out = check_operands(X, bias, residual, out, N, act)
    M, K = X.shape
    nbc = -(-N // c)
    if N and (indptr.shape[0] < 2 or (indptr.shape[0] - 1) % nbc):
        raise ValueError(f"indptr of length {indptr.shape[0]} does not match N={N} with {c}-column blocks")
    if indices.size and int(indices.max()) >= K:
        raise ValueError(f"packed weight has a block at row {int(indices.max())} >= K={K}")
    lanes = chunk_rows(c)
    nch = max(1, -(-M // lanes))
    Kp = -(-K // r) * r
    xt, ot = check_workspace(workspace, nch, Kp, lanes, lambda: make_workspace(M, K, N, (r, c)))
    bsr_kernel((r, c), M)(X, indptr, indices, data, bias, residual, out, act, xt, ot)
    return out
