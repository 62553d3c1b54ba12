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
that covers ``M``, at most the chunk) is a compile-time literal, so the accumulator
is a fixed-size stack array that LLVM keeps in registers.  For CSR at ``L``
16 and 32 the nonzero loop is written with explicit ``<16 x float>`` values
(:mod:`sparseinfer.kernels.simd`): LLVM unrolls a 16- or 32-iteration lane
loop before it vectorizes and then emits one scalar FMA per lane (Intel Xeon,
Sapphire Rapids, 2 threads, 10% density, BERT-base shapes: 8-16 rows 365 ->
113 us for 768 x 2304, 529 -> 161 for 3072 x 768; 32 rows 736 -> 138 and
990 -> 208).  Two parallel
regions per call (a Numba region costs ~1 us):

1. ``X`` is transposed, 16 x 16 blocks at a time in registers
   (:func:`transpose16`), into the 64-byte aligned workspace
   ``xt [nchunk, K, lanes]``: chunk ``ch`` holds rows ``ch * lanes ..`` of X as
   columns; lanes past ``M`` are zero.  Alignment matters: loads that
   straddle cache lines made the kernel ~1.5x slower.  The blocks go 16
   rows at a time along k, so that each row of X is read as one run.
2. One part per thread; the ``(row chunk, 16 output columns)`` units are
   split evenly between the parts (fixed 256-column tasks left one of two
   threads idle a third of the time for N = 768), and every part owns its
   blocks of ``out``.  A part runs its units in tasks of up to NB columns; a
   task sweeps its columns K panel by K panel (the panel of ``xt``,
   128 rows x 512 B, is reused by all NB columns), accumulating a column in
   registers and parking it between panels in the thread's slot of the
   aligned ``ot [threads, NB, lanes]`` (a per-thread slot rather than a
   transposed copy of all of ``out``, which at M = 1024 went back to DRAM
   and cost ~1.3x for the block kernels).  In the last panel each finished
   column gets bias and activation in the slot, while it is in L1: in the
   transposed domain bias is one scalar per column and the activation is
   elementwise.  Within a panel the task visits its columns in the order of
   :func:`traversal_order` when the plan gives one (by nonzero count, so
   that the exits of the nonzero loops are predicted).  When the task is
   done, its columns are transposed into ``out`` row band by row band
   (:func:`store_transposed`),
   so that each row gets one contiguous run, with the residual added in
   registers: ``out`` is written once and never read back.

The output path used to transpose every 16 finished columns into ``out`` and
run the row-major epilogue of :mod:`~sparseinfer.kernels.dense` on them:
128 rows x 64 B per group, written and read back.  When the rows of ``out``
(or of ``X`` in step 1) are a multiple of 4 KiB apart, as for N = 3072
(K = 3072), the 16 rows of a transposed block all map to one L1 set (12
ways) and evict each other: the fixed cost of a 768 x 3072 call was 3.7x
that of 768 x 3088.  Now the two cost about the same (for such N the band is
staged in a stack buffer and copied out row by row).

Chaining (:func:`chain_kernel`): with ``xnext`` a call writes its finished
columns, bias and activation applied, straight into the ``xt`` workspace of
the next call (``xnext[ch, n, :] = act(X @ W + bias)[ch * lanes:, n]`` is the
accumulator itself, no transpose), with ``xready`` a call skips step 1, and
``xres`` adds a residual held in that layout.  The plan keeps a value in
this feature-major layout when its producer and all its readers take it
(:mod:`sparseinfer.runtime.feature_major`): in BERT the feed-forward
intermediate and, with the LayerNorm and attention kernels' feature-major
variants, the residual stream, the Q/K/V projection and the context, so that
no sparse step transposes its input or its result.

Measured (``benchmarks/results/sparse_breakeven.md``; Zen 5, 2 threads,
M = 128, the four BERT-base shapes, 10% density): 3.3x faster than the
dense kernel unstructured, 5.2-5.6x with 1 x 4 / 4 x 4 / 1 x 8 blocks;
break-even near 50% density unstructured, above 90% for those blocks.
Fixed cost of a CSR call (``d = 0``: transposes, stores, epilogue, parallel
regions; ``benchmarks/sparse_fixed_cost.py``, M = 128, 2 threads, BERT's
epilogues), before -> after the output path above: 768 x 2304 80 -> 55 us,
768 x 768 40 -> 27 us, 768 x 3072 (bias + GELU) 282 -> 104 us, 3072 x 768
139 -> 112 us; FF1 + FF2 as a chained pair 181 us against 354 us as two
calls before.  That is a quarter to a third of a call at 10% density
(240, 92, 360 and 345 us), and 25-30 us of FF1's was the GELU (less since ``gelu_f32``
uses FMAs and a reciprocal: ~25% faster per element).  What did not help: two accumulator sets
per column to break the FMA dependency chain (more instructions, slower);
64-row tiles (half the FMAs per index load; on Zen 5, whose two vCPUs share a
core: with two threads on separate cores, one 64-row chunk per thread is
faster, see :func:`sparseinfer.kernels.bsr.chunk_rows`); sorting columns by nonzero
count (branch mispredictions are not the limit); a separate function per
column (LLVM did not inline it; the call cost 25%).  The limit of the
unstructured kernel is L2 -> L1 bandwidth for the rows of ``xt`` (each FMA
reads a fresh 64-byte line): with the same nonzeros and all rows in L1 the
compute is ~1.5x faster.  K panels (``kb = 128`` rows at 128 lanes: 64 KiB of
``xt``, :func:`~sparseinfer.kernels.sparse_formats.panel_rows`) recover part of that
for K = 3072 (re-measured at 10% density: panels of 32 to 256 rows, no
panels, and tasks of 64 or 128 columns were all slower than ``kb = 128``,
``NB = 256``).

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
from numba.core import cgutils
from numba.extending import intrinsic

from sparseinfer.kernels.dense import ACT_GELU, ACT_GELU_EXACT, ACT_NONE, ACT_TANH, _activate, gelu_f32, stack_f32
from sparseinfer.kernels.simd import _vfma, _vld, _vset, _vst, _vzero
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
    "chain_kernel",
    "chain_workspace",
    "NO_NEXT",
    "NO_ORDER",
    "traversal_order",
    "task_spans",
    "narrow_indices",
    "FEW_ROWS",
    "few_rows_kernel",
]

MT = 128  # rows of X per chunk (= lanes of the widest register tile, 8 zmm)
NB = 256  # output columns per task
KS = 64  # rows of W per transposition task
FG = 16  # output columns per unit of work
STAGE = NB + 16  # row stride of the staging buffer of store_transposed (not a multiple of 4 KiB)
STAGE16 = 16 * STAGE
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


def _transpose_codegen(with_res):
    """Codegen of :func:`transpose16` (``with_res``: and of :func:`transpose16_add`)."""

    def codegen(context, builder, signature, args):
        s, ss, d, ds = args[:4]
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
        if with_res:
            r, rs = args[4:]
            rsb = builder.mul(rs, four)
            for i in range(16):
                addr = builder.add(r, builder.mul(rsb, ir.Constant(i64, i)))
                rows[i] = builder.fadd(rows[i], builder.load(builder.inttoptr(addr, vp), align=4))
        for i in range(16):
            addr = builder.add(d, builder.mul(dsb, ir.Constant(i64, i)))
            builder.store(rows[i], builder.inttoptr(addr, vp), align=4)
        return context.get_dummy_value()

    return codegen


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
    return types.void(types.uintp, types.intp, types.uintp, types.intp), _transpose_codegen(False)


@intrinsic
def transpose16_add(typingctx, src, sstride, dst, dstride, res, rstride):
    """:func:`transpose16` plus a residual: ``dst[j * dstride + i] = src[i * sstride + j] + res[j * rstride + i]``."""
    if not all(isinstance(t, types.Integer) for t in (src, sstride, dst, dstride, res, rstride)):
        return None
    return types.void(types.uintp, types.intp, types.uintp, types.intp, types.uintp, types.intp), _transpose_codegen(True)


@intrinsic
def _prefetch(typingctx, addr):
    """Prefetch the cache line of byte address ``addr`` into L1 (never faults)."""

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        i8p = ir.PointerType(ir.IntType(8))
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0i8")
        builder.call(fn, [builder.inttoptr(args[0], i8p), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(types.intp), codegen


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
    # 16 rows at a time, along k: each row of X is read as one contiguous run (with the
    # blocks in k-major order, rows whose stride is a multiple of 4 KiB, K = 3072, took 2x as long)
    for i0 in range(0, r16, 16):
        for kk in range(k0, k16, 16):
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
def store_transposed(ot, slot, t0, out, m0, rows, n0, nc, residual):
    """``out[m0 + i, n0 + j] = ot[slot, t0 + j, i] (+ residual[m0 + i, n0 + j])`` for ``i < rows``, ``j < nc <= NB``.

    Row band by row band: each of the 16 rows of a band gets one contiguous
    run of ``nc`` floats, and the residual is added in registers, so ``out``
    is written once and never read.  When the rows of ``out`` are a multiple
    of 4 KiB apart (N a multiple of 1024) the 16 stores of a 16 x 16
    transpose all fall in one L1 set (12 ways) and evict each other before
    they complete; the band is then transposed into a stack buffer and
    copied out row by row (N = 3072: 1.6x faster; slower for other N).
    """
    N = out.shape[1]
    T = ot.shape[2]
    r16 = rows // 16 * 16
    c16 = nc // 16 * 16
    ts = ot.ctypes.data + np.uint64(4 * slot * ot.shape[1] * T)
    os_ = out.ctypes.data
    cu = np.uint64(n0)
    if N % 1024 == 0:
        stage = numba.carray(stack_f32(STAGE16), (16, STAGE))
        sg = stage.ctypes.data
        for i0 in range(0, r16, 16):
            for j0 in range(0, c16, 16):
                transpose16(ts + np.uint64(4 * ((t0 + j0) * T + i0)), T, sg + np.uint64(4 * j0), STAGE)
            for i in range(16):
                r = m0 + i0 + i
                for j in range(c16):
                    v = stage[i, j]
                    if residual is not None:
                        v += residual[r, cu + np.uint64(j)]
                    out[r, cu + np.uint64(j)] = v
    else:
        for i0 in range(0, r16, 16):
            for j0 in range(0, c16, 16):
                src = ts + np.uint64(4 * ((t0 + j0) * T + i0))
                off = np.uint64(4 * ((m0 + i0) * N + n0 + j0))
                if residual is None:
                    transpose16(src, T, os_ + off, N)
                else:
                    transpose16_add(src, T, os_ + off, N, residual.ctypes.data + off, N)
    for i in range(r16, rows):
        r = m0 + i
        for j in range(nc):
            v = ot[slot, t0 + j, i]
            if residual is not None:
                v += residual[r, cu + np.uint64(j)]
            out[r, cu + np.uint64(j)] = v
    for i in range(r16):
        r = m0 + i
        for j in range(c16, nc):
            v = ot[slot, t0 + j, i]
            if residual is not None:
                v += residual[r, cu + np.uint64(j)]
            out[r, cu + np.uint64(j)] = v


# --------------------------------------------------------------------------
# compute (shared with the block-sparse kernels)
# --------------------------------------------------------------------------


@njit(nogil=True, error_model="numpy", cache=True)
def _bias_act(a, s, t0, nc, bias, n0, act, L):
    """``a[s, t0 + j, :L] = act(a[s, t0 + j, :L] + bias[n0 + j])`` for ``j < nc``: the epilogue
    in the transposed domain, where bias is one scalar per row of ``a``."""
    if bias is None and act == ACT_NONE:
        return
    for jj in range(nc):
        bv = np.float32(0.0) if bias is None else bias[n0 + jj]
        r = t0 + jj
        if act == ACT_NONE:
            for j in range(L):
                a[s, r, j] += bv
        elif act == ACT_GELU:
            for j in range(L):
                a[s, r, j] = gelu_f32(a[s, r, j] + bv)
        else:
            for j in range(L):
                a[s, r, j] = _activate(a[s, r, j] + bv, act)


@njit(nogil=True, error_model="numpy", inline="always")
def _resume(acc, ot, slot, t, first, C, L):
    """The accumulators of the column parked at row ``t`` of the thread's slot: zeros in its first panel."""
    if C == 1 and L <= 32:  # whole vectors: the narrow CSR loop of _accumulate loads them so (scalar stores would stall it)
        ap = acc.ctypes.data
        op = ot.ctypes.data + np.uint64(slot * ot.strides[0] + t * ot.strides[1])
        for v in range(L // 16):
            _vst(ap + np.uint64(64 * v), _vzero() if first else _vld(op + np.uint64(64 * v)))
    elif first:
        for c in range(C):
            for j in range(L):
                acc[c, j] = 0.0
    else:
        for c in range(C):
            for j in range(L):
                acc[c, j] = ot[slot, t + c, j]


@njit(nogil=True, error_model="numpy", fastmath={"contract"}, inline="always")
def _accumulate(acc, w, xt, ch, indptr, indices, data, q, R, C, L):
    """``acc[c, :L] += W[k + i, n + c] * xt[ch, k + i, :L]`` over the nonzero blocks of segment ``q``
    of the pack.  Inlined into the caller (at Numba IR level, so ``R, C, L`` stay literals)."""
    if R == 1 and C == 1 and L <= 32:
        # CSR on a narrow tile: explicit vectors.  LLVM unrolls a j loop of 16 or 32 iterations
        # before it vectorizes, and then emits one scalar FMA per lane (6-8x slower per nonzero)
        ap = acc.ctypes.data
        a0 = _vld(ap)
        a1 = _vld(ap + np.uint64(64)) if L == 32 else a0
        xb = xt.ctypes.data + np.uint64(ch * xt.strides[0])
        rs = np.uint64(xt.strides[1])
        for p in range(np.uint64(indptr[q]), np.uint64(indptr[q + 1])):
            xa = xb + np.uint64(indices[p]) * rs
            wv = _vset(data[p, 0, 0])
            a0 = _vfma(wv, _vld(xa), a0)
            if L == 32:
                a1 = _vfma(wv, _vld(xa + np.uint64(64)), a1)
        _vst(ap, a0)
        if L == 32:
            _vst(ap + np.uint64(64), a1)
        return
    for p in range(np.uint64(indptr[q]), np.uint64(indptr[q + 1])):
        k0 = np.uint64(indices[p])
        if R == 1 and C == 1:  # CSR: a scalar weight (the stack copy below costs ~3% here)
            wv = data[p, 0, 0]
            for j in range(L):
                acc[0, j] += wv * xt[ch, k0, j]
        else:
            for i in range(R):
                for c in range(C):
                    w[c] = data[p, i, c]
                for j in range(L):
                    x = xt[ch, k0 + np.uint64(i), j]
                    for c in range(C):
                        acc[c, j] += w[c] * x


@njit(nogil=True, error_model="numpy", fastmath={"contract"}, cache=True)
def _block_columns(
    xt, ot, ch, slot, indptr, indices, data, nbc, j0, nj, npanel, out, m0, rows, bias, residual, act, xnext, xres, order, R, C, L
):
    """Block columns ``j0 .. j0 + nj`` (output columns ``C * j0 ..``) for the rows of chunk ``ch``.

    ``R, C, L`` are literals (``C * L <= ACC``), so the ``C x L`` accumulator
    tile and the ``C`` values of a block row are stack arrays that LLVM keeps
    in registers (one load of ``xt`` feeds ``C`` FMAs).  Each K panel is swept
    over all the block columns, so the panel of ``xt`` is reused by all of
    them; between panels a column lives in ``ot[slot]``.  In the last panel a
    finished column goes to ``ot[slot]``, or straight to ``xnext[ch, n]``
    when the result feeds the next kernel in its transposed layout, and gets
    bias and activation there while it is in L1 (in the transposed domain
    bias is one scalar per column and the activation elementwise; applied to
    the accumulators instead, the GELU loop is not unrolled, the tile no
    longer lives in registers and the whole kernel ran ~25% slower; column
    by column costs the same as in groups of 16, and works in any order).
    At the end the task's columns are transposed into ``out`` with the
    residual (:func:`store_transposed`).  With an ``order``
    (:func:`traversal_order`), position ``jj`` of panel ``b`` is block
    column ``order[b, jj]`` and its nonzeros are segment ``b * nbc + jj`` of
    the pack.  The nonzero loop (:func:`_accumulate`) is inlined by Numba, not left to LLVM: as
    a call (arguments on the stack, vzeroupper) it cost ~25% at 10% density.  The last panel has
    its own loop so that the parking loop carries no epilogue branches (with them, and the
    stack copy of a scalar weight, the kernel spent ~3% more per layer).
    """
    acc = numba.carray(stack_f32(ACC), (C, L))
    w = numba.carray(stack_f32(16), (C,))
    N = out.shape[1]
    tonext = xnext.shape[0] > 0
    ordered = order.shape[0] > 0
    # every panel but the last: columns are parked in the slot between panels
    for b in range(npanel - 1):
        for jj in range(j0, j0 + nj):
            jb = np.int64(order[b, jj]) if ordered else jj
            t = (jb - j0) * C  # row of the column in the thread's slot
            _resume(acc, ot, slot, t, b == 0, C, L)
            _accumulate(acc, w, xt, ch, indptr, indices, data, b * nbc + jj, R, C, L)
            for c in range(C):
                for j in range(L):
                    ot[slot, t + c, j] = acc[c, j]
    # the last panel: a finished column goes to the slot or to xnext, with bias and activation
    b = npanel - 1
    for jj in range(j0, j0 + nj):
        jb = np.int64(order[b, jj]) if ordered else jj
        n = jb * C
        t = (jb - j0) * C
        _resume(acc, ot, slot, t, b == 0, C, L)
        _accumulate(acc, w, xt, ch, indptr, indices, data, b * nbc + jj, R, C, L)
        nc = min(n + C, N) - n
        if tonext:
            for c in range(C):
                if n + c < N:  # block padding columns are computed, never stored
                    for j in range(L):
                        xnext[ch, n + c, j] = acc[c, j]
            if nc > 0:
                _bias_act(xnext, ch, n, nc, bias, n, act, L)
                if xres is not None:  # a residual in the same layout: one vector add per column
                    for c in range(nc):
                        for j in range(L):
                            xnext[ch, n + c, j] += xres[ch, n + c, j]
        else:
            for c in range(C):
                for j in range(L):
                    ot[slot, t + c, j] = acc[c, j]
            if nc > 0:
                _bias_act(ot, slot, t, nc, bias, n, act, L)
    if not tonext:
        store_transposed(ot, slot, 0, out, m0, rows, j0 * C, min(nj * C, N - j0 * C), residual)


@njit(nogil=True, cache=True)
def part_units(s, nparts, nch, nbc, C):
    """The units ``u .. u1`` of part ``s`` of ``nparts``, with ``(units per chunk, block columns
    per unit)``.  The work is (row chunk, group of FG output columns) units in chunk-major order,
    split evenly between the parts.  Shared by the driver and :func:`task_spans`."""
    per_fg = max(1, FG // C)
    upc = (nbc + per_fg - 1) // per_fg
    units = nch * upc
    return s * units // nparts, (s + 1) * units // nparts, upc, per_fg


@njit(nogil=True, cache=True)
def task_at(u, u1, upc, per_fg, C, nbc):
    """The task of the driver that starts at unit ``u`` of a part ending before unit ``u1``
    (``upc`` units of ``per_fg`` block columns per row chunk): ``(chunk, first block column,
    block columns, units)``.  Shared by the driver and :func:`traversal_order`."""
    ch = u // upc
    uc = u - ch * upc
    nu = min(NB // (per_fg * C), upc - uc, u1 - u)
    j0 = uc * per_fg
    nj = min(nu * per_fg, nbc - j0)
    return ch, j0, nj, nu


def _make_kernel(R, C, L):
    """Compile-time specialisation of the parallel driver for ``R x C`` blocks and ``L`` lanes.

    ``R, C, L`` are closure constants, so they reach :func:`_block_columns` as
    literals.  (A ``numba.literally`` argument would do the same but makes
    every call from Python go through the dispatcher's compile path: ~3 ms.)
    Numba's on-disk cache keys closures by their constants, so each
    specialisation is compiled once per machine.  The chaining modes
    (``xready``, ``xnext``) are run-time arguments, not constants: one
    compilation serves chained and plain calls.
    """

    @njit(nogil=True, error_model="numpy", parallel=True, cache=True)
    def kernel(X, indptr, indices, data, bias, residual, out, act, xt, ot, xnext, xready, order, xres=None):
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
        tonext = xnext.shape[0] > 0
        if tonext and (xnext.shape[0] < nch or xnext.shape[1] < N or xnext.shape[2] != W):
            raise ValueError("xnext must be a workspace [>= chunks, >= N, lanes of xt] (use chain_workspace)")
        if order.shape[0] > 0:
            if order.shape[0] != npanel + 1 or order.shape[1] < nbc:
                raise ValueError("order must be [panels + 1, block columns] (use traversal_order)")
            if order[npanel, 0] != nch or order[npanel, 1] != ot.shape[0]:
                raise ValueError("order was made for other row chunks or parts (traversal_order with this call's M, lanes and ot.shape[0])")
        if xres is not None and (not tonext or xres.shape[0] < nch or xres.shape[1] < N or xres.shape[2] != W):
            raise ValueError("xres is the residual of a result written to xnext, in its layout: [>= chunks, >= N, lanes of xt]")
        if residual is not None:
            if tonext:
                raise ValueError("a result written to xnext takes its residual as xres, in its layout, not row-major")
            if not residual.flags.c_contiguous:
                raise ValueError("residual must be C-contiguous")
        if not xready:
            nks = (Kp + KS - 1) // KS
            for t in prange(nch * nks):
                ch = t // nks
                kb = t - ch * nks
                transpose_block(X, xt, ch, kb * KS, kb * KS + KS, Kp, L)
        if tonext:  # rows past N: the next kernel's block padding multiplies them by zero
            for ch in range(nch):
                for k in range(N, xnext.shape[1]):
                    for j in range(L):
                        xnext[ch, k, j] = 0.0
        # One part per slot of ot (= thread); a part runs its units in tasks of at most NB columns.
        nparts = ot.shape[0]
        for s in prange(nparts):
            u, u1, upc, per_fg = part_units(s, nparts, nch, nbc, C)
            while u < u1:
                ch, j0, nj, nu = task_at(u, u1, upc, per_fg, C, nbc)
                m0 = ch * W
                rows = min(W, M - m0)
                _block_columns(
                    xt, ot, ch, s, indptr, indices, d3, nbc, j0, nj, npanel, out, m0, rows, bias, residual, act, xnext, xres, order, R, C, L
                )
                u += nu

    return kernel


_DRIVERS: dict = {}
NO_NEXT = np.zeros((0, 0, 0), np.float32)
NO_ORDER = np.zeros((0, 0), np.int32)


def chain_kernel(R: int, C: int, L: int):
    """The compiled driver for ``R x C`` blocks and an ``L``-lane register tile (built once).

    Signature ``kernel(X, indptr, indices, data, bias, residual, out, act, xt, ot, xnext, xready, order, xres=None)``:
    the operands of :func:`block_kernel`, plus ``order`` (:data:`NO_ORDER`, or the
    traversal order that :func:`traversal_order` made for this call's rows and
    threads, with the pack it reordered) and the two chaining modes

    * ``xready``: ``X.T`` is already in ``xt`` (a previous call wrote it
      there as its ``xnext``); the transposition is skipped and only
      ``X.shape[0]`` (= M) is read, so ``X`` may be an ``[M, 0]`` placeholder;
    * ``xnext``: a workspace ``[>= nchunk, >= N, lanes of xt]`` (from
      :func:`chain_workspace`), or an empty ``[0, 0, 0]`` array for none.
      Given, the result ``Y = act(X @ W + bias)`` is written into it
      transposed, ``xnext[ch, n, i] = Y[ch * lanes + i, n]``, with zeros in
      rows ``N ..`` (the next kernel's block padding); lanes past M hold
      values that only ever reach lanes past M.  That is the ``xt`` operand
      of the next call, with ``xready=True``.  ``out`` is then not written
      and only ``out.shape[1]`` (= N) is read (an ``[0, N]`` placeholder
      will do); ``residual`` (row-major) must be None;
    * ``xres`` (optional, only with ``xnext``): a residual in the layout of
      ``xnext`` (``[>= nchunk, >= N, lanes]``), added after the activation:
      ``xnext = act(X @ W + bias) + residual``, one vector add per column
      while it is in L1 (the layout in which the plan keeps BERT's residual
      stream between the sparse steps, :mod:`sparseinfer.runtime.feature_major`).
    """
    key = (int(R), int(C), int(L))
    k = _DRIVERS.get(key)
    if k is None:
        if C * L > ACC or L % 16:
            raise ValueError(f"register tile {C} x {L} does not fit {ACC} floats (16 zmm)")
        k = _DRIVERS[key] = _make_kernel(*key)
    return k


def block_kernel(R: int, C: int, L: int):
    """The compiled kernel for ``R x C`` blocks and an ``L``-lane register tile (built once).

    Signature ``kernel(X, indptr, indices, data, bias, residual, out, act, xt, ot)``
    computing ``out[:] = act(X @ W + bias) + residual``:
    X float32 [M, K] C-contiguous; ``(indptr, indices, data)`` from
    :func:`~sparseinfer.kernels.sparse_formats.pack_bsr` (``data [nblk, R, C]``)
    or, for ``R = C = 1``, :func:`~sparseinfer.kernels.sparse_formats.pack_csr`;
    bias float32 [N] or None; residual float32 [M, N] C-contiguous or None;
    out float32 [M, N] preallocated, not overlapping X or residual; act an ``ACT_*``
    constant; ``xt [nchunk, >= Kp, lanes]`` (``nchunk * lanes >= M``,
    ``L <= lanes``) and ``ot [>= threads, NB, lanes]`` the aligned workspace.
    (The driver of :func:`chain_kernel` without chaining.)
    """
    drive = chain_kernel(R, C, L)

    def kernel(X, indptr, indices, data, bias, residual, out, act, xt, ot):
        drive(X, indptr, indices, data, bias, residual, out, act, xt, ot, NO_NEXT, False, NO_ORDER)

    return kernel


def chain_workspace(M: int, N: int, lanes: int) -> np.ndarray:
    """Aligned ``xnext [ceil(M / lanes), Kp, lanes]`` for a result of ``N`` columns handed to a
    kernel with ``lanes``-row chunks (``Kp``: N rounded up to 8, the tallest block the next
    kernel may use, whose padding rows the producing call zeroes)."""
    nch = max(1, -(-int(M) // lanes))
    return aligned_empty((nch, max(8, -(-int(N) // 8) * 8), lanes))


def task_spans(nbc: int, C: int, nch: int, parts: int) -> list[tuple[int, int]]:
    """``(first block column, block columns)`` of every task the driver runs for ``nch`` row
    chunks split into ``parts`` parts (all chunks, all parts; see :func:`task_at`)."""
    spans = []
    for s in range(parts):
        u, u1, upc, per_fg = part_units(s, parts, nch, nbc, C)
        while u < u1:
            _, j0, nj, nu = task_at(u, u1, upc, per_fg, C, nbc)
            spans.append((int(j0), int(nj)))
            u += nu
    return spans


def traversal_order(packed, N: int, C: int, M: int, lanes: int, parts: int | None = None):
    """Reorder a pack so that each task visits its columns by nonzero count, panel by panel.

    Returns ``(indptr, indices, data, order)`` for :func:`chain_kernel` with
    ``M`` rows, ``lanes``-row chunks and ``parts`` parts (``ot.shape[0]``,
    default NUMBA_NUM_THREADS): within every span of block columns that no
    task boundary of any row chunk cuts, the columns of a panel are sorted
    by their number of nonzeros (ties in column order), and the segments are
    stored in that order, so the kernel still reads the pack front to back.
    A pack of one panel keeps its order, with :data:`NO_ORDER` (its
    segments are long; sorted, the 1 x 4 model ran ~5% slower).  Why: the
    nonzero loop of one column and panel is ~13 iterations at 10% density,
    and a count that changes from one column to the next makes its exit a
    branch mispredicted about once per column; sorted, runs of equal counts
    are predicted.  Measured
    (M = 128, 2 threads, the four BERT-base shapes at 10% density): 5-7%
    faster per layer, BERT-base pruned to 90% unstructured 6% faster end to end.
    An order is only valid for the row chunks and parts it was made for;
    its last row records them, and the kernel refuses it for others.
    The returned row indices are narrowed to int16 when every one fits
    (:func:`narrow_indices`).
    """
    indptr, indices, data = packed
    nbc = -(-int(N) // int(C))
    npanel = (indptr.shape[0] - 1) // max(1, nbc)
    if npanel == 1:  # long segments: their loop exits cost little, and the pack keeps its order
        return indptr, narrow_indices(indices), data, NO_ORDER
    parts = numba.config.NUMBA_NUM_THREADS if parts is None else int(parts)
    nch = max(1, -(-int(M) // int(lanes)))
    cuts = sorted({0, nbc}.union(*({j0, j0 + nj} for j0, nj in task_spans(nbc, C, nch, parts))))
    counts = np.diff(indptr).reshape(npanel, nbc)
    order = np.zeros((npanel + 1, max(nbc, 2)), np.int32)
    order[npanel, :2] = nch, parts  # what the order was made for: the kernel checks it
    for b in range(npanel):
        for a, e in zip(cuts[:-1], cuts[1:]):
            order[b, a:e] = a + np.argsort(counts[b, a:e], kind="stable")
    seg = (np.arange(npanel)[:, None] * nbc + order[:npanel, :nbc]).ravel()
    cnt = counts.ravel()[seg]
    new_ptr = np.zeros_like(indptr)
    np.cumsum(cnt, out=new_ptr[1:])
    src = np.repeat(indptr[:-1][seg] - new_ptr[:-1], cnt) + np.arange(int(new_ptr[-1]))
    return new_ptr, narrow_indices(indices[src]), np.ascontiguousarray(data[src]), order


def narrow_indices(indices: np.ndarray) -> np.ndarray:
    """The row indices of a pack as int16 when all fit (K below 32768, as in every BERT-family
    layer), else as they are.  The kernels take either (each dtype is its own compilation); a
    nonzero then streams 6 bytes from memory instead of 8, and with ~70 MB of nonzeros per run
    of a 90%-pruned BERT-base that made the four layer shapes ~3% faster (M = 128, 2 threads).
    The packs of :mod:`~sparseinfer.kernels.sparse_formats` stay int32; this is the executor's
    own copy."""
    if indices.dtype == np.int16 or (indices.size and int(indices.max()) > np.iinfo(np.int16).max):
        return np.ascontiguousarray(indices)
    return indices.astype(np.int16)


# --------------------------------------------------------------------------
# a few rows
# --------------------------------------------------------------------------

FEW_ROWS = 4  # at most this many rows of X go to few_rows_kernel
FEW_ROWS_AHEAD = 512  # nonzeros that few_rows_kernel prefetches ahead


@njit(nogil=True, error_model="numpy", fastmath={"contract"}, inline="always")
def _csr_dot(X, m, indptr, indices, data, q):
    """``sum_p data[p] * X[m, indices[p]]`` over segment ``q`` of a CSR pack, in four partial sums
    (one sum is a chain of dependent FMAs: 4 cycles per nonzero instead of ~1)."""
    p = np.uint64(indptr[q])
    e = np.uint64(indptr[q + 1])
    a0 = np.float32(0.0)
    a1 = np.float32(0.0)
    a2 = np.float32(0.0)
    a3 = np.float32(0.0)
    while p + np.uint64(4) <= e:
        a0 += data[p] * X[m, np.uint64(indices[p])]
        a1 += data[p + np.uint64(1)] * X[m, np.uint64(indices[p + np.uint64(1)])]
        a2 += data[p + np.uint64(2)] * X[m, np.uint64(indices[p + np.uint64(2)])]
        a3 += data[p + np.uint64(3)] * X[m, np.uint64(indices[p + np.uint64(3)])]
        p += np.uint64(4)
    while p < e:
        a0 += data[p] * X[m, np.uint64(indices[p])]
        p += np.uint64(1)
    return (a0 + a1) + (a2 + a3)


@njit(nogil=True, error_model="numpy", fastmath={"contract"}, parallel=True, cache=True)
def few_rows_kernel(X, indptr, indices, data, bias, residual, out, act, nparts):
    """``out = act(X @ W + bias) + residual`` for a CSR weight and at most :data:`FEW_ROWS` rows
    of X (a classifier's last layer computes one: :mod:`sparseinfer.passes.rows`).

    ``(indptr, indices, data)`` is :func:`~sparseinfer.kernels.sparse_formats.pack_csr`, best
    with one panel (``kb = K``: plain compressed columns). A part (``nparts``, one per thread)
    owns a range of output columns; panel after panel, it adds the dot product of each column's
    segment with the rows of X (read in place, four partial sums) to ``out``, so that it reads the
    pack in runs, and prefetches :data:`FEW_ROWS_AHEAD` nonzeros ahead.

    Why: the column kernel computes a chunk of at least 16 rows, and with 16 lanes its CSR loop
    runs far below the 128-lane loop (BERT-base FF1 at 10% density, 2 threads, weights in cache:
    one row 522-766 us, 16 rows 571 us, 128 rows 365 us). This kernel takes FF1 or FF2 on one
    row in 67-100 us with the weights in cache; in a run they come from DRAM (caches flushed: FF1
    270 us with 128-row panels, 178 with one panel, 123 with the prefetch). It stays ahead of
    the column kernel up to 4 rows. Blocks keep the column kernel (1 x 4 on one row: 65 us; a
    block loop here was slower).
    """
    M = X.shape[0]
    N = out.shape[1]
    npanel = (indptr.shape[0] - 1) // max(N, 1)
    dd = data.ctypes.data
    di = indices.ctypes.data
    isz = indices.itemsize
    for s in prange(nparts):
        n0 = s * N // nparts
        n1 = (s + 1) * N // nparts
        for m in range(M):
            for n in range(n0, n1):
                out[m, n] = 0.0
        # panel by panel, so that the part reads its share of each panel's segments as one run
        for b in range(npanel):
            for n in range(n0, n1):
                q = b * N + n
                p0 = indptr[q]
                for p in range(p0, indptr[q + 1], 16):  # the weights come from DRAM: ask ahead
                    _prefetch(dd + 4 * (p + FEW_ROWS_AHEAD))
                    _prefetch(di + isz * (p + FEW_ROWS_AHEAD))
                for m in range(M):
                    out[m, n] += _csr_dot(X, m, indptr, indices, data, q)
        for m in range(M):
            for n in range(n0, n1):
                v = _activate(out[m, n] + (np.float32(0.0) if bias is None else bias[n]), act)
                if residual is not None:
                    v += residual[m, n]
                out[m, n] = v


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
    """Validate the dense operands of a sparse matmul; returns ``(X, residual, out)`` (X and
    residual C-contiguous: the kernels address them through raw pointers)."""
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
    return X, (None if residual is None else np.ascontiguousarray(residual)), out


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
    Checks and dispatch happen here (at most :data:`FEW_ROWS` rows go to
    :func:`few_rows_kernel`); a compiled plan calls the kernel of
    :func:`csr_kernel` directly with a preallocated workspace.
    """
    indptr, indices, data = packed
    X, residual, out = check_operands(X, bias, residual, out, N, act)
    M, K = X.shape
    if N and (indptr.shape[0] < 2 or (indptr.shape[0] - 1) % N):
        raise ValueError(f"indptr of length {indptr.shape[0]} does not match N={N} (pack with pack_csr)")
    if indices.size and int(indices.max()) >= K:
        raise ValueError(f"packed weight has row index {int(indices.max())} >= K={K}")
    if M <= FEW_ROWS:  # the workspace is not used
        few_rows_kernel(X, indptr, indices, data, bias, residual, out, act, numba.get_num_threads())
        return out
    nch = max(1, -(-M // MT))
    xt, ot = check_workspace(workspace, nch, K, MT, lambda: make_workspace(M, K))
    csr_kernel(M)(X, indptr, indices, data, bias, residual, out, act, xt, ot)
    return out
