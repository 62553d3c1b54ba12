"""Unstructured-sparse fp32 matrix multiplication with a fused epilogue.

    out = act(X @ W + bias) + residual

``X [M, K]`` activations (row-major), ``W [K, N]`` a constant weight stored by
:func:`~sparseinfer.kernels.sparse_formats.pack_csr` (nonzeros grouped by
output column, in K panels).  Same epilogue semantics and ``ACT_*`` constants
as :mod:`sparseinfer.kernels.dense`.  This module also holds the engine shared
with the block-sparse kernels (:mod:`sparseinfer.kernels.bsr`): CSR is the
``1 x 1`` block case.

Kernel design
-------------
The kernel computes ``out.T = W.T @ X.T`` so that every nonzero ``W[k, n]`` is
one broadcast and a contiguous axpy over a tile of ``L`` rows of ``X``::

    acc[0:L] += W[k, n] * Xt[k, m0:m0+L]      (acc = column n of out, L / 16 zmm registers)

With ``L = 128`` one nonzero costs one index load, one broadcast and 8
vector FMAs with a memory operand.  ``L`` (16, 32, 64 or 128: the narrowest
that covers ``M``, at most 128) is a compile-time literal, so the accumulator
is a fixed-size stack array that LLVM keeps in registers.  Two parallel
regions per call (a Numba region costs ~1 us):

1. ``X`` is transposed, 16 x 16 blocks at a time in registers
   (:func:`transpose16`), into the 64-byte aligned workspace
   ``xt [nchunk, K, lanes]``: chunk ``ch`` holds rows ``ch * lanes ..`` of X as
   columns; lanes past ``M`` are zero.  Alignment matters: loads that
   straddle cache lines made the kernel ~1.5x slower.
2. One part per thread; the ``(row chunk, 16 output columns)`` units are
   split evenly between the parts (fixed 256-column tasks left one of two
   threads idle a third of the time for N = 768), and every part owns its
   blocks of ``out``.  A part runs its units in tasks of up to NB columns; a
   task sweeps its columns K panel by K panel (the panel of ``xt``,
   128 rows x 512 B, is reused by all NB columns), accumulating a column in
   registers and parking it between panels in the thread's slot of the
   aligned ``ot [threads, NB, lanes]`` (a per-thread slot rather than a
   transposed copy of all of ``out``, which at M = 1024 went back to DRAM
   and cost ~1.3x for the block kernels).  In the last panel every 16
   finished columns are transposed into ``out`` (:func:`transpose16` again)
   and get the epilogue of :mod:`~sparseinfer.kernels.dense` while they are
   in L1.

Measured (``benchmarks/results/sparse_breakeven.md``; Zen 5, 2 threads,
M = 128, the four BERT-base shapes, 10% density): 3.3x faster than the
dense kernel unstructured, 5.2-5.6x with 1 x 4 / 4 x 4 / 1 x 8 blocks;
break-even near 50% density unstructured, above 90% for those blocks.  The
fixed cost of a call (``d = 0``: transposes, per-column stores, parallel
regions) is about a third of the time at 10% density, so keeping
activations transposed between consecutive sparse layers would pay.  What did not help: two accumulator sets
per column to break the FMA dependency chain (more instructions, slower);
64-row tiles (half the FMAs per index load); sorting columns by nonzero
count (branch mispredictions are not the limit); a separate function per
column (LLVM did not inline it; the call cost 25%).  The limit of the
unstructured kernel is L2 -> L1 bandwidth for the rows of ``xt`` (each FMA
reads a fresh 64-byte line): with the same nonzeros and all rows in L1 the
compute is ~1.5x faster.  K panels (``kb = 128`` rows) recover part of that
for K = 3072.

Rows: the row chunk is ``lanes`` rows; a last partial chunk is computed at
full width and only its rows are stored.  Small ``M`` (below 16) wastes most
of each vector: the kernel is meant for ``M = batch * seq``.

NumPy reference: ``sparseinfer.graph.reference.dense`` with ``W`` dense.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from sparseinfer.kernels.dense import ACT_GELU, ACT_GELU_EXACT, ACT_NONE, ACT_TANH, _epilogue_block, stack_f32
from sparseinfer.kernels.sparse_formats import aligned_empty, pack_csr

__all__ = [
    "ACT_NONE",
    "ACT_GELU",
    "ACT_GELU_EXACT",
    "ACT_TANH",
    "MT",
    "NB",
    "pack_csr",
    "lanes_for",
    "workspace_shapes",
    "make_workspace",
    "csr_matmul",
    "csr_kernel",
    "block_kernel",
]

MT = 128  # rows of X per chunk (= lanes of the widest register tile, 8 zmm)
NB = 256  # output columns per task
KS = 64  # rows of W per transposition task
FG = 16  # output columns finished (transposed + epilogue) at a time
ACC = 256  # floats of the accumulator tile (16 zmm): C * L <= ACC


def lanes_for(rows: int, widest: int = MT) -> int:
    """Narrowest register-tile width (16, 32, 64, ...) covering ``rows``, at most ``widest``."""
    lanes = 16
    while lanes < min(rows, widest):
        lanes *= 2
    return lanes


def workspace_shapes(M: int, K: int, lanes: int = MT) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Shapes of the scratch ``(xt, ot)``: ``xt [ceil(M / lanes), K, lanes]`` holds X.T,
    ``ot [threads, NB, lanes]`` the output columns of each of the kernel's parallel parts
    (one per thread: ``threads`` = NUMBA_NUM_THREADS; the kernel splits its work
    into ``ot.shape[0]`` parts)."""
    nch = max(1, -(-int(M) // lanes))
    return (nch, max(1, int(K)), lanes), (numba.config.NUMBA_NUM_THREADS, NB, lanes)


def make_workspace(M: int, K: int, N: int = 0, lanes: int = MT) -> tuple[np.ndarray, np.ndarray]:
    """Aligned scratch ``(xt, ot)`` (see :func:`workspace_shapes`; ``N`` is not needed).

    Allocate once per (M, K) at plan time; the kernels overwrite it on every call.
    """
    sx, so = workspace_shapes(M, K, lanes)
    return aligned_empty(sx), aligned_empty(so)


# --------------------------------------------------------------------------
# transposes
# --------------------------------------------------------------------------


def _transpose_masks():
    """Shuffle masks of the 4-stage block-swap network that transposes 16 x 16.

    Stage ``b`` (8, 4, 2, 1) pairs rows ``i`` and ``i + b`` and swaps their
    off-diagonal ``b``-wide column blocks; LLVM lowers the masks to
    vshuff64x2 / vinsertf64x4 / vunpck*pd / vpermt2ps.
    """
    stages = []
    for b in (8, 4, 2, 1):
        lo = [c if not (c & b) else 16 + c - b for c in range(16)]
        hi = [c + b if not (c & b) else 16 + c for c in range(16)]
        stages.append((b, lo, hi))
    return stages


_MASKS = _transpose_masks()


@intrinsic
def transpose16(typingctx, src, sstride, dst, dstride):
    """``dst[j * dstride + i] = src[i * sstride + j]`` for a 16 x 16 float32 block.

    ``src``/``dst`` are byte addresses (``arr.ctypes.data`` + offset), strides
    are in elements.  16 unaligned vector loads, 64 shuffles, 16 stores: about
    3x faster than the best scalar loop nest (LLVM does not find this
    network by itself).
    """
    if not all(isinstance(t, types.Integer) for t in (src, sstride, dst, dstride)):
        return None
    sig = types.void(types.uintp, types.intp, types.uintp, types.intp)

    def codegen(context, builder, signature, args):
        s, ss, d, ds = args
        i64 = ir.IntType(64)
        vp = ir.VectorType(ir.FloatType(), 16).as_pointer()
        four = ir.Constant(i64, 4)
        ssb = builder.mul(ss, four)
        dsb = builder.mul(ds, four)
        rows = []
        for i in range(16):
            addr = builder.add(s, builder.mul(ssb, ir.Constant(i64, i)))
            rows.append(builder.load(builder.inttoptr(addr, vp), align=4))
        for b, lo, hi in _MASKS:
            mlo = ir.Constant(ir.VectorType(ir.IntType(32), 16), lo)
            mhi = ir.Constant(ir.VectorType(ir.IntType(32), 16), hi)
            for i in range(16):
                if not i & b:
                    x, y = rows[i], rows[i + b]
                    rows[i] = builder.shuffle_vector(x, y, mlo)
                    rows[i + b] = builder.shuffle_vector(x, y, mhi)
        for i in range(16):
            addr = builder.add(d, builder.mul(dsb, ir.Constant(i64, i)))
            builder.store(rows[i], builder.inttoptr(addr, vp), align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit(nogil=True, error_model="numpy", cache=True)
def transpose_block(X, xt, ch, k0, k1, kpad, lanes):
    """``xt[ch, k, i] = X[ch * W + i, k]`` for ``k0 <= k < k1`` (``W = xt.shape[2]``).

    Lanes past the last row of X up to ``lanes`` (the tile width the compute
    loop reads) are zeroed, and so are rows ``K <= k < kpad`` (block padding).  Full
    16 x 16 blocks go through :func:`transpose16`, the edges are scalar.
    """
    M, K = X.shape
    W = xt.shape[2]
    KX = xt.shape[1]
    m0 = ch * W
    rows = min(W, M - m0)
    ke = min(k1, K)
    r16 = rows // 16 * 16
    k16 = k0 + (ke - k0) // 16 * 16
    xs = X.ctypes.data
    ts = xt.ctypes.data
    for kk in range(k0, k16, 16):
        for i0 in range(0, r16, 16):
            src = xs + np.uint64(4 * ((m0 + i0) * K + kk))
            dst = ts + np.uint64(4 * ((ch * KX + kk) * W + i0))
            transpose16(src, K, dst, W)
    for k in range(k16, ke):
        for i in range(r16):
            xt[ch, k, i] = X[m0 + i, k]
    for k in range(k0, ke):
        for i in range(r16, rows):
            xt[ch, k, i] = X[m0 + i, k]
        for i in range(rows, lanes):
            xt[ch, k, i] = 0.0
    for k in range(max(K, k0), min(k1, kpad)):
        for i in range(lanes):
            xt[ch, k, i] = 0.0


@njit(nogil=True, error_model="numpy", cache=True)
def store_transposed(ot, slot, t0, out, m0, rows, n0, nc):
    """``out[m0 + i, n0 + j] = ot[slot, t0 + j, i]`` for ``i < rows``, ``j < nc``."""
    N = out.shape[1]
    T = ot.shape[2]
    r16 = rows // 16 * 16
    c16 = nc // 16 * 16
    ts = ot.ctypes.data + np.uint64(4 * slot * ot.shape[1] * T)
    os_ = out.ctypes.data
    for j0 in range(0, c16, 16):
        for i0 in range(0, r16, 16):
            transpose16(ts + np.uint64(4 * ((t0 + j0) * T + i0)), T, os_ + np.uint64(4 * ((m0 + i0) * N + n0 + j0)), N)
    cu = np.uint64(n0)
    for i in range(r16, rows):
        r = m0 + i
        for j in range(nc):
            out[r, cu + np.uint64(j)] = ot[slot, t0 + j, i]
    for i in range(r16):
        r = m0 + i
        for j in range(c16, nc):
            out[r, cu + np.uint64(j)] = ot[slot, t0 + j, i]


# --------------------------------------------------------------------------
# compute (shared with the block-sparse kernels)
# --------------------------------------------------------------------------


@njit(nogil=True, error_model="numpy", cache=True)
def _finish(ot, slot, t0, out, m0, rows, n0, nc, bias, residual, act):
    """Write ``ot[slot, t0:t0+nc, :rows]`` transposed into ``out[m0:, n0:]`` (columns < N); epilogue."""
    nc = min(nc, out.shape[1] - n0)
    if nc > 0:
        store_transposed(ot, slot, t0, out, m0, rows, n0, nc)
        _epilogue_block(out, m0, rows, n0, nc, bias, residual, act)


@njit(nogil=True, error_model="numpy", fastmath={"contract"}, cache=True)
def _block_columns(xt, ot, ch, slot, indptr, indices, data, nbc, j0, nj, npanel, out, m0, rows, bias, residual, act, R, C, L):
    """Block columns ``j0 .. j0 + nj`` (output columns ``C * j0 ..``) for the rows of chunk ``ch``.

    ``R, C, L`` are literals (``C * L <= ACC``), so the ``C x L`` accumulator
    tile and the ``C`` values of a block row are stack arrays that LLVM keeps
    in registers (one load of ``xt`` feeds ``C`` FMAs).  Each K panel is swept
    over all the block columns, so the panel of ``xt`` is reused by all of
    them; between panels a column lives in ``ot[slot]``.  In the last panel every
    ``FG`` finished columns are written out.  The column body is inline on
    purpose: as a separate function LLVM did not inline it, and the call
    (arguments on the stack, vzeroupper) cost ~25% at 10% density.
    """
    acc = numba.carray(stack_f32(ACC), (C, L))
    w = numba.carray(stack_f32(16), (C,))
    per_fg = max(1, FG // C)
    for b in range(npanel):
        last = b == npanel - 1
        for jb in range(j0, j0 + nj):
            n = jb * C
            t = (jb - j0) * C  # row of the column in the thread's slot
            if b == 0:
                for c in range(C):
                    for j in range(L):
                        acc[c, j] = 0.0
            else:
                for c in range(C):
                    for j in range(L):
                        acc[c, j] = ot[slot, t + c, j]
            q = b * nbc + jb
            for p in range(np.uint64(indptr[q]), np.uint64(indptr[q + 1])):
                k0 = np.uint64(indices[p])
                for i in range(R):
                    for c in range(C):
                        w[c] = data[p, i, c]
                    for j in range(L):
                        x = xt[ch, k0 + np.uint64(i), j]
                        for c in range(C):
                            acc[c, j] += w[c] * x
            for c in range(C):
                for j in range(L):
                    ot[slot, t + c, j] = acc[c, j]
            if last:
                i = jb - j0
                if i % per_fg == per_fg - 1 or jb == j0 + nj - 1:
                    g0 = (jb - i % per_fg) * C
                    _finish(ot, slot, g0 - j0 * C, out, m0, rows, g0, n + C - g0, bias, residual, act)


def _make_kernel(R, C, L):
    """Compile-time specialisation of the parallel driver for ``R x C`` blocks and ``L`` lanes.

    ``R, C, L`` are closure constants, so they reach :func:`_block_columns` as
    literals.  (A ``numba.literally`` argument would do the same but makes
    every call from Python go through the dispatcher's compile path: ~3 ms.)
    Numba's on-disk cache keys closures by their constants, so each
    specialisation is compiled once per machine.
    """

    @njit(nogil=True, error_model="numpy", parallel=True, cache=True)
    def kernel(X, indptr, indices, data, bias, residual, out, act, xt, ot):
        M, K = X.shape
        N = out.shape[1]
        if M == 0 or N == 0:
            return
        # the 16 x 16 transposes address these through raw pointers
        if not (X.flags.c_contiguous and out.flags.c_contiguous and xt.flags.c_contiguous and ot.flags.c_contiguous):
            raise ValueError("X, out and the workspace must be C-contiguous")
        if ot.shape[1] < NB:
            raise ValueError("workspace ot is too small (use make_workspace)")
        d3 = data.reshape((data.shape[0], R, C))  # a view; CSR data is 1-D
        W = xt.shape[2]
        nbc = (N + C - 1) // C
        Kp = (K + R - 1) // R * R
        npanel = (indptr.shape[0] - 1) // nbc
        nch = (M + W - 1) // W
        nks = (Kp + KS - 1) // KS
        for t in prange(nch * nks):
            ch = t // nks
            kb = t - ch * nks
            transpose_block(X, xt, ch, kb * KS, kb * KS + KS, Kp, L)
        # One part per slot of ot (= thread).  The work is (row chunk, group of FG
        # output columns) units in chunk-major order, split evenly between the
        # parts; a part runs its units in tasks of at most NB columns.
        per_fg = max(1, FG // C)  # block columns per unit
        upc = (nbc + per_fg - 1) // per_fg  # units per chunk
        units = nch * upc
        nparts = ot.shape[0]
        for s in prange(nparts):
            u = s * units // nparts
            u1 = (s + 1) * units // nparts
            while u < u1:
                ch = u // upc
                uc = u - ch * upc
                nu = min(NB // (per_fg * C), upc - uc, u1 - u)
                j0 = uc * per_fg
                m0 = ch * W
                rows = min(W, M - m0)
                nj = min(nu * per_fg, nbc - j0)
                _block_columns(xt, ot, ch, s, indptr, indices, d3, nbc, j0, nj, npanel, out, m0, rows, bias, residual, act, R, C, L)
                u += nu

    return kernel


_KERNELS: dict = {}


def block_kernel(R: int, C: int, L: int):
    """The compiled kernel for ``R x C`` blocks and an ``L``-lane register tile (built once).

    Signature ``kernel(X, indptr, indices, data, bias, residual, out, act, xt, ot)``
    computing ``out[:] = act(X @ W + bias) + residual``:
    X float32 [M, K] C-contiguous; ``(indptr, indices, data)`` from
    :func:`~sparseinfer.kernels.sparse_formats.pack_bsr` (``data [nblk, R, C]``)
    or, for ``R = C = 1``, :func:`~sparseinfer.kernels.sparse_formats.pack_csr`;
    bias float32 [N] or None; residual float32 [M, N] or None; out float32
    [M, N] preallocated, not overlapping X or residual; act an ``ACT_*``
    constant; ``xt [nchunk, >= Kp, lanes]`` (``nchunk * lanes >= M``,
    ``L <= lanes``) and ``ot [>= threads, NB, lanes]`` the aligned workspace.
    """
    key = (int(R), int(C), int(L))
    k = _KERNELS.get(key)
    if k is None:
        if C * L > ACC or L % 16:
            raise ValueError(f"register tile {C} x {L} does not fit {ACC} floats (16 zmm)")
        k = _KERNELS[key] = _make_kernel(*key)
    return k


# --------------------------------------------------------------------------
# CSR entry points
# --------------------------------------------------------------------------


def csr_kernel(M: int):
    """The compiled CSR kernel for ``M`` rows (chosen once, at plan time).

    Call it as ``kernel(X, indptr, indices, data, bias, residual, out, act, xt, ot)``
    with ``(indptr, indices, data) = pack_csr(W)`` and ``(xt, ot) =
    make_workspace(M, K, N)``; see :func:`block_kernel` for the operands.
    """
    return block_kernel(1, 1, lanes_for(M))


def check_operands(X, bias, residual, out, N, act):
    """Validate the dense operands of a sparse matmul; returns ``(X, out)``."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D [M, K], got shape {X.shape}")
    M = X.shape[0]
    if out is None:
        out = np.empty((M, N), dtype=np.float32)
    if out.shape != (M, N) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 array of shape {(M, N)}, got {out.dtype} {out.shape}")
    if bias is not None and (bias.shape != (N,) or bias.dtype != np.float32):
        raise ValueError(f"bias must be float32 of shape ({N},), got {bias.dtype} {bias.shape}")
    if residual is not None and (residual.shape != (M, N) or residual.dtype != np.float32):
        raise ValueError(f"residual must be float32 of shape {(M, N)}, got {residual.dtype} {residual.shape}")
    if act not in (ACT_NONE, ACT_GELU, ACT_GELU_EXACT, ACT_TANH):
        raise ValueError(f"unknown activation code {act!r}")
    return X, out


def check_workspace(ws, nch, krows, lanes, make):
    """Return ``ws`` if it is a usable ``(xt, ot)`` workspace, else ``make()`` when ``ws`` is None."""
    if ws is None:
        return make()
    xt, ot = ws
    for name, a, need in (("xt", xt, (nch, krows)), ("ot", ot, (1, NB))):
        if a.ndim != 3 or a.shape[0] < need[0] or a.shape[1] < need[1] or a.shape[2] != lanes or a.dtype != np.float32:
            raise ValueError(f"workspace {name} of shape {a.shape} is too small: need [{need[0]}, {need[1]}, {lanes}] (use make_workspace)")
        if not a.flags.c_contiguous:
            raise ValueError(f"workspace {name} must be C-contiguous (use make_workspace)")
    return xt, ot


def csr_matmul(X, packed, N, bias=None, residual=None, out=None, act=ACT_NONE, workspace=None):
    """Checked Python entry point around :func:`csr_kernel`.

    ``packed = pack_csr(W)``; ``N`` is the number of columns of ``W``.
    Checks and dispatch happen here; a compiled plan calls the kernel of
    :func:`csr_kernel` directly with a preallocated workspace.
    """
    indptr, indices, data = packed
    X, out = check_operands(X, bias, residual, out, N, act)
    M, K = X.shape
    if N and (indptr.shape[0] < 2 or (indptr.shape[0] - 1) % N):
        raise ValueError(f"indptr of length {indptr.shape[0]} does not match N={N} (pack with pack_csr)")
    if indices.size and int(indices.max()) >= K:
        raise ValueError(f"packed weight has row index {int(indices.max())} >= K={K}")
    nch = max(1, -(-M // MT))
    xt, ot = check_workspace(workspace, nch, K, MT, lambda: make_workspace(M, K))
    csr_kernel(M)(X, indptr, indices, data, bias, residual, out, act, xt, ot)
    return out
