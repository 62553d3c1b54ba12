"""Sparse weight formats for the sparse matmul kernels (built once, at plan time).

Both formats compress ``W [K, N]`` by *output column* (they are CSR / BSR of
``W.T``), because the kernels compute ``Y.T = W.T @ X.T`` with each output
column held in vector registers (see :mod:`sparseinfer.kernels.csr`).  Both
are also split into *K panels* of ``kb`` rows: panel ``b`` holds the nonzeros
with ``b * kb <= k < (b + 1) * kb``, so that the kernel can sweep all output
columns of a task over one panel of ``X.T`` while that panel stays in L1.
``kb = K`` (one panel) gives the plain format.

CSR (unstructured), from :func:`pack_csr`::

    indptr  int64   [npanel * N + 1]   column n of panel b: indptr[b*N + n] : indptr[b*N + n + 1]
    indices int32   [nnz]              row k of W of each nonzero (ascending within a segment)
    data    float32 [nnz]              W[k, n]

BSR with blocks of ``r`` rows (consecutive k) by ``c`` columns (consecutive
n), from :func:`pack_bsr`.  A block is kept if any of its ``r * c`` values is
nonzero (the zeros inside a kept block are stored).  Dimensions that the
block does not divide are zero padded (the padding rows multiply zero rows of
``X.T`` that the kernel writes; padding columns are computed and not
stored)::

    indptr  int64   [npanel * ceil(N / c) + 1]   block column j (columns j*c .. j*c+c-1) of panel b
    indices int32   [nblocks]                    first row k0 of each block (a multiple of r)
    data    float32 [nblocks, r, c]              W[k0 + i, j*c + jj]  (zero outside W)

``npanel = max(1, ceil(Kp / kb))`` with ``Kp = K`` rounded up to a multiple
of ``r``; ``kb`` must be a multiple of ``r``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["KB_CSR", "KB_BSR_NARROW", "PANEL_BYTES", "panel_rows", "pack_csr", "pack_bsr", "aligned_empty", "density"]

# K panels: for kernels that do one FMA per X.T load (CSR and blocks one column wide) a panel
# is 64 KiB of X.T, ``panel_rows(lanes)`` rows of W (128 rows at 128 lanes: 1.2-1.3x faster
# than no panels at K = 3072; at 64 lanes, 256 rows beat 128 by 4-6% on all four BERT-base
# shapes). Blocks 2+ columns wide have none: they are FMA bound and lose 1.5-4x when columns go
# through memory between panels.
PANEL_BYTES = 64 * 1024


def panel_rows(lanes: int) -> int:
    """Rows of W per K panel for row chunks of ``lanes`` rows: ``PANEL_BYTES`` of X.T."""
    return max(1, PANEL_BYTES // (4 * int(lanes)))


KB_CSR = panel_rows(128)
KB_BSR_NARROW = panel_rows(128)


def aligned_empty(shape, dtype=np.float32, align: int = 64) -> np.ndarray:
    """Uninitialised C-contiguous array whose data starts on an ``align``-byte boundary.

    The kernels' vector loads from the transposed activations are 64-byte
    loads; when they straddle cache lines the unstructured kernel runs ~1.5x
    slower, and NumPy only guarantees 16-byte alignment.
    """
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in np.atleast_1d(shape))
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buf = np.empty(nbytes + align, dtype=np.uint8)
    off = (-buf.ctypes.data) % align
    return buf[off : off + nbytes].view(dtype).reshape(shape)


def density(W: np.ndarray) -> float:
    """Fraction of nonzero entries of ``W`` (1.0 for an empty W)."""
    return float(np.count_nonzero(W)) / W.size if W.size else 1.0


def _check_weight(W) -> np.ndarray:
    W = np.asarray(W, dtype=np.float32)
    if W.ndim != 2:
        raise ValueError(f"weight must be 2-D [K, N], got shape {W.shape}")
    return W


def _check_kb(kb: int, r: int) -> int:
    kb = int(kb)
    if kb < r or kb % r:
        raise ValueError(f"panel height kb={kb} must be a positive multiple of the block height r={r}")
    return kb


def pack_csr(W: np.ndarray, kb: int = KB_CSR) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unstructured compression of ``W [K, N]`` by output column, in K panels of ``kb`` rows.

    Exact zeros are dropped; every other value (including NaN) is kept.
    """
    W = _check_weight(W)
    K, N = W.shape
    kb = _check_kb(kb, 1)
    npanel = max(1, -(-K // kb))
    # order nonzeros by (panel, column, row): that is the kernel's traversal order
    k, n = np.nonzero(W)
    panel = k // kb
    order = np.lexsort((k, n, panel))
    k, n, panel = k[order], n[order], panel[order]
    seg = panel * N + n
    counts = np.bincount(seg, minlength=npanel * N) if seg.size else np.zeros(npanel * N, np.int64)
    indptr = np.zeros(npanel * N + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return indptr, k.astype(np.int32), W[k, n].astype(np.float32)


def pack_bsr(W: np.ndarray, block: tuple[int, int], kb: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Block compression of ``W [K, N]`` with ``block = (r, c)``, in K panels of ``kb`` rows.

    ``K`` and ``N`` need not be multiples of ``r`` and ``c``: W is zero padded
    (see the module docstring).  ``kb=None`` picks the measured default
    (``KB_BSR_NARROW`` rows for ``c = 1``, one panel otherwise); a ``kb`` of
    at least K means one panel.
    """
    W = _check_weight(W)
    try:
        r, c = (int(b) for b in block)
    except (TypeError, ValueError):
        raise ValueError(f"block must be a pair (rows, cols), got {block!r}") from None
    if r < 1 or c < 1:
        raise ValueError(f"block shape must be positive, got {(r, c)}")
    K, N = W.shape
    Kp = -(-K // r) * r
    Np = -(-N // c) * c
    if kb is None:
        kb = KB_BSR_NARROW if c == 1 and KB_BSR_NARROW % r == 0 else Kp
    if kb >= Kp:
        kb = max(r, Kp)
    kb = _check_kb(kb, r)
    Wp = np.zeros((Kp, Np), dtype=np.float32)
    Wp[:K, :N] = W
    nbr, nbc = Kp // r, Np // c
    blocks = Wp.reshape(nbr, r, nbc, c).transpose(0, 2, 1, 3)  # [block row, block col, r, c]
    keep = np.any(blocks != 0, axis=(2, 3))
    br, bc = np.nonzero(keep)
    npanel = max(1, -(-Kp // kb))
    panel = br * r // kb
    order = np.lexsort((br, bc, panel))
    br, bc, panel = br[order], bc[order], panel[order]
    seg = panel * nbc + bc
    counts = np.bincount(seg, minlength=npanel * nbc) if seg.size else np.zeros(npanel * nbc, np.int64)
    indptr = np.zeros(npanel * nbc + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    data = np.ascontiguousarray(blocks[br, bc], dtype=np.float32).reshape(-1, r, c)
    return indptr, (br * r).astype(np.int32), data
