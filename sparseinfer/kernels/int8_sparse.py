"""Sparse int8 matrix multiplication with a fused dequantization epilogue.

    out = act((xq - zp_x) @ Wq * scale_x[m] * scale_w[n] + bias) + residual

Same quantization scheme, epilogue and ``ACT_*`` codes as the dense int8
kernel (:mod:`sparseinfer.kernels.int8`): activations quantized per row to
uint8 with a zero point, weights symmetric per output channel in int8, int32
accumulation, the zero point removed with the column sums of ``Wq``.  Here
``Wq [K, N]`` is sparse.

Format (:func:`pack_sparse_int8`)
---------------------------------
The unit is a 4 x 1 block: 4 consecutive ``k`` of one output column, the 4
bytes that one 32-bit lane of ``vpdpbusd`` multiplies and sums.  Per output
column (in K panels of ``kb`` rows, as :func:`~sparseinfer.kernels.
sparse_formats.pack_csr`), the nonzero blocks::

    indptr  int64  [npanel * N + 1]   column n of panel b: indptr[b*N + n] : indptr[b*N + n + 1]
    indices int32  [nblocks]          block row g (the block holds k = 4g .. 4g+3), ascending
    data    int32  [nblocks]          the 4 int8 Wq[4g + i, n] as the bytes i = 0..3 of one int32

Any sparsity pattern fits: an unstructured weight just has more nonzero
blocks (at density ``d``, about ``1 - (1 - d)^4`` of them), and ``K`` is zero
padded to a multiple of 4.  ``colsum`` (int32 [N]) sums ``Wq`` over all
``k`` for the zero-point correction.

Kernel design
-------------
As the fp32 sparse kernels (:mod:`sparseinfer.kernels.csr`) it computes
``out.T = Wq.T @ xq.T``, one output column at a time held in registers.
Two parallel regions per call:

1. Quantize + relayout, 16 rows per task: the rows are quantized
   (``_quantize_row`` of the int8 module, the code of ``quantize_rows``)
   and, while they are in L1, relaid out as ``xt [chunk, Kp / 4, L, 4]``
   uint8: per group of 4 ``k`` the 4 bytes of each of ``L`` consecutive
   rows, so one zmm holds 16 rows x 4 k.  Seen as int32 words this is a
   transpose of ``xq [M, Kp / 4]``, done 16 x 16 words at a time in
   registers (:func:`~sparseinfer.kernels.csr.transpose16`).  The rows'
   zero points (as int32) and scales go to ``xs [chunk, 2, L]``.
2. Columns: one part per thread; ``(row chunk, 16 output columns)`` units
   split evenly between the parts, run in tasks of up to ``NB`` = 256
   columns, each part owning its columns of ``out``.  Per nonzero block: one
   broadcast of the packed int32 weight and ``L / 16`` ``vpdpbusd`` (``L =
   128``: 8 zmm accumulators, SSA vector values) with the ``xt`` vectors of
   its group.  With K panels a column's accumulators are parked in the
   thread's slot of ``ot [threads, NB, L]`` between panels.

Epilogue, in the transposed domain: after its last panel a column's
accumulators get ``acc - zp * colsum``, the conversion to float32, ``* (sx
* sw)`` and ``+ bias`` as vector operations (the operations and roundings
of the dense int8 kernel's ``_finish``), are stored to the slot, and the
activation runs over the column there (vectorised over rows).  When the
task's columns are done they are transposed 16 x 16 in registers into
``out``, adding the residual on the way, row block by row block.  The result
is the dense int8 kernel's, bit for bit (the tests check equality), and
``out`` may be ``residual`` itself.

Chaining (``mode``, :func:`quantized_sparse_chain`): when a call's result
is read only by another such call (BERT's FF1 -> FF2), the first writes its
finished columns, activation applied, to a workspace ``chain [chunk, N, L]``
(a column of the result is a row of the next call's ``X.T``: no transpose)
and keeps, per parallel part, the range of every row over its columns as
order-preserving int32 keys (``crange``).  The second combines the parts'
ranges into each row's scale and zero point and quantizes straight from
``chain`` into ``xt``: 4 consecutive rows of ``chain`` are the 4 bytes of a
group, so no relayout either.  Same values, same division and rounding: the
result equals two separate calls bit for bit.  What it saves is the
first call's transposed stores into ``out`` (for N = 3072 the costly,
set-conflicting ones above) and the second call's row-major read, row
quantization and relayout.  Measured on the 90% (4x1) pruned int8 BERT-base,
batch 1, sequence 128, 2 threads, chained and unchained engines alternating
in one process (Zen 5, load < 1): run median 8.76 -> 8.33 ms, and in
``Engine.profile`` the attention-output + FF1 + FF2 steps of the 12 layers
4.72-4.79 -> 4.27-4.36 ms.  The epilogue stores a finished column straight
into its row of ``chain`` and applies the activation there (the column is in
L1); the ranges are taken per task from ``chain``.  It used to go through
the thread's slot of ``ot`` like an unchained column and be copied to
``chain`` per task, by then from L2: 1.5 MB written and read again for
FF1's 128 x 3072 result.  Same-process alternating engines (the previous
kernel and this one): run 7.62 -> 7.35 ms and 8.74 -> 8.55 ms (noisy host),
FF1 alone 200 -> 197 us, the Q/K/V projection (whose result goes to the
int8 attention without ranges) 117 -> 104 us.  Storing the column in the
slot and calling the copy per column, right after its activation, was 1.2-1.3x
slower for FF1 than the per-task copy; the store in place is not.

Without AVX512-VNNI ``_dpbusd`` is the exact ``pmaddwd`` emulation of the
dense int8 module, chosen when the kernel is compiled.

Measured
--------
``benchmarks/sparse_int8_breakeven.py`` (``benchmarks/results/
sparse_int8_breakeven.md``; Zen 5 with VNNI, M = 128, the four BERT-base
shapes summed = one encoder layer, against the dense int8 step
``quantize_rows`` + ``dense_int8_packed``, both including quantization):

* 2 threads: dense int8 1.20 ms per layer; 4x1 blocks at 10% density 2.7x
  faster (0.44 ms), at 5% 3.6x; unstructured at 10% (34% of the blocks
  nonzero) 1.47x.  Break-even at 0.59-0.60 of the blocks for both mask
  kinds (the work is the number of blocks), 0.56-0.65 per shape; the same at
  1 thread; 0.53-0.55 at M = 1024 (4x1 at 10%: 2.4x).  A call with no
  nonzero (quantization, transposes, epilogue, two parallel regions) costs
  0.2 ms per layer, half the time at 10% density.
* K panels of 256 rows (64 groups x 512 B = 32 KiB of ``xt``, which then
  stays in L1: each block reads 8 fresh 64-byte lines, an L2 -> L1
  bandwidth limit otherwise): 2.5x faster at density 1 (0.26x -> 0.66x of
  dense int8), 1.5x at 0.5, 1.15x at 0.2; 2% slower at 0.1, 20% at 0.05,
  where parking the accumulators between panels costs more than it saves;
  hence panels only above ``PANEL_MIN_BLOCK_DENSITY``.  Break-even without
  panels: 0.38.  Panels of 128 rows were slower at every density above 0.2,
  of 512 rows no faster and slower at density 1.  A 64-row chunk (two
  chunks at M = 128, each thread's ``xt`` in L1 for K = 768) fell between
  one panel and panels of 256 rows.
* Epilogue: the first version transposed each 16 x 16 block of int32 sums
  onto the stack and ran the dense int8 kernel's ``_finish`` on it; that
  loop is scalar (a 16-wide loop of unknown trip count is not vectorised,
  and with a constant 16 LLVM unrolls it and then does not SLP-vectorise it,
  as ``out`` may alias the operands): ~2 cycles per element, 190 us for 128
  x 3072 outputs on one thread, 60% of what the whole kernel now takes for
  768 x 3072 at 10% density.  Finishing every 16 columns (128 rows x one 64-byte line each,
  ``4 N`` bytes apart) was 3x slower per column at N = 3072 than at N =
  3088: for N a multiple of 1024 all those lines fall in one L1 set.
  Writing a whole task (up to 256 columns) row block by row block halves
  that; N = 3072 still costs ~2x per column in a call with no nonzero.

Rows: the row chunk is ``L`` rows (16, 32, 64 or 128: the narrowest that
covers ``M``, at most 128); a last partial chunk is computed at full width
and only its rows are stored.  ``x_scale=None`` compiles the integer
variant: ``out`` int32 gets ``(xq - zp) @ Wq`` (``MatMulInteger``), used by
the tests to check the accumulation exactly.

NumPy reference::

    Wq, scale_w = quantize_weight(W)
    xd = (xq[:, :K].astype(np.float64) - zp[:, None]) * scale_x[:, None]
    y = reference.dense(xd, Wq * scale_w.astype(np.float64), bias, residual, activation=...)
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from sparseinfer.kernels.csr import NB, lanes_for, transpose16, transpose16_add
from sparseinfer.kernels.dense import ACT_GELU, ACT_GELU_EXACT, ACT_NONE, ACT_RELU, ACT_TANH, _activate, gelu_f32
from sparseinfer.kernels.int8 import (
    _V,
    DOT_INSTRUCTION,
    HAS_VNNI,
    KG,
    MAX_K,
    _dpbusd,
    _f32_from_bits,
    _ordered,
    _quantize_row,
    _scale_zero_point,
    _vbcast,
    _vload,
    _vstore,
    _vzero,
    i32x16,
    padded_k,
    quantize_weight,
)
from sparseinfer.kernels.sparse_formats import aligned_empty

__all__ = [
    "KB_INT8",
    "PANEL_MIN_BLOCK_DENSITY",
    "HAS_VNNI",
    "DOT_INSTRUCTION",
    "pack_sparse_int8",
    "pack_weight_sparse_int8",
    "workspace_shapes",
    "make_workspace",
    "sparse_int8_kernel",
    "sparse_dense_int8",
    "sparse_matmul_int8",
    "quantized_sparse_dense",
    "quantized_sparse_chain",
    "chain_workspace_shapes",
    "CHAIN_NONE",
    "CHAIN_WRITE",
    "CHAIN_READ",
    "NO_CHAIN",
    "NO_RANGE",
]

FG = 16  # output columns per unit of work (the width of a 16 x 16 transposed block)
RB = 16  # rows per quantize + relayout task
# K panels (measured, module docstring): KB_INT8 rows (64 groups x 128 lanes x 4 B = 32 KiB of xt,
# which stays in L1 while a task's columns sweep it) when more than PANEL_MIN_BLOCK_DENSITY of the
# blocks are nonzero; one panel below that, where parking the accumulators between panels costs
# more than the L2 traffic it saves.
KB_INT8 = 256
PANEL_MIN_BLOCK_DENSITY = 0.15


# --------------------------------------------------------------------------
# weight format
# --------------------------------------------------------------------------


def _block_words(Wq: np.ndarray) -> np.ndarray:
    """``[Kp / 4, N]`` int32: word ``[g, n]`` holds ``Wq[4g + i, n]`` as its byte ``i`` (zero padded)."""
    K, N = Wq.shape
    Kp = padded_k(K)
    full = np.zeros((Kp, N), np.int8)
    full[:K] = Wq
    return np.ascontiguousarray(full.reshape(Kp // KG, KG, N).transpose(0, 2, 1)).view(np.int32).reshape(Kp // KG, N)


def pack_sparse_int8(Wq: np.ndarray, kb: int | None = None) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
    """Pack an already quantized int8 weight ``Wq [K, N]`` (zero point 0) in nonzero 4 x 1 blocks.

    Returns ``((indptr, indices, data), colsum)`` (see the module docstring).
    ``kb``: the K-panel height in rows of ``Wq`` (a multiple of 4; at least
    ``K``: one panel); None picks it from the weight: ``KB_INT8`` rows when
    more than ``PANEL_MIN_BLOCK_DENSITY`` of the blocks are nonzero, else one
    panel.  Any int8 value is allowed, -128 included.
    """
    Wq = np.asarray(Wq)
    if Wq.ndim != 2 or Wq.dtype != np.int8:
        raise ValueError(f"quantized weight must be int8 [K, N], got {Wq.dtype} {Wq.shape}")
    K, N = Wq.shape
    if K > MAX_K:
        raise ValueError(f"K={K} is too large for int32 accumulation (at most {MAX_K})")
    G = padded_k(K) // KG
    words = _block_words(Wq)
    g, n = np.nonzero(words)
    if kb is None:
        kb = KB_INT8 if g.size > PANEL_MIN_BLOCK_DENSITY * G * N else KG * G
    if kb >= KG * G:
        kbg = max(1, G)
    else:
        if kb < KG or kb % KG:
            raise ValueError(f"panel height kb={kb} must be a positive multiple of 4 (the block height)")
        kbg = kb // KG
    npanel = max(1, -(-G // kbg))
    panel = g // kbg
    order = np.lexsort((g, n, panel))  # the kernel's traversal order: panel, column, block row
    g, n, panel = g[order], n[order], panel[order]
    seg = panel * N + n
    counts = np.bincount(seg, minlength=npanel * N) if seg.size else np.zeros(npanel * N, np.int64)
    indptr = np.zeros(npanel * N + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    data = np.ascontiguousarray(words[g, n], np.int32)
    return (indptr, g.astype(np.int32), data), Wq.sum(axis=0, dtype=np.int32)


def pack_weight_sparse_int8(
    W: np.ndarray, kb: int | None = None
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], np.ndarray, np.ndarray]:
    """Quantize ``W [K, N]`` per output channel and pack it: ``(packed, scale_w, colsum)``.

    :func:`~sparseinfer.kernels.int8.quantize_weight` then :func:`pack_sparse_int8`.
    Done once at plan time.  (A weight value small enough to round to 0 drops out.)
    """
    Wq, scale = quantize_weight(W)
    packed, colsum = pack_sparse_int8(Wq, kb)
    return packed, scale, colsum


# --------------------------------------------------------------------------
# workspace
# --------------------------------------------------------------------------


def workspace_shapes(M: int, K: int, lanes: int | None = None) -> dict[str, tuple[int, ...]]:
    """Shapes of the float32 scratch arrays of one call (the kernel views some as bytes / int32):

    ``xq [M, Kp / 4]`` (uint8 [M, Kp], the quantized rows), ``x_scale [M]``,
    ``x_zp [ceil(M / 4)]`` (uint8 [M]), ``xt [nchunk, Kp / 4, L]`` (the
    relaid activations), ``xs [nchunk, 2, L]`` (per chunk: the rows' zero
    points as int32 and their scales, zero past ``M``) and ``ot [threads, NB,
    L]`` (the output columns of each parallel part; ``threads`` =
    NUMBA_NUM_THREADS), with ``L = lanes_for(M)`` unless given.
    """
    M, K = int(M), int(K)
    L = lanes_for(M) if lanes is None else int(lanes)
    nch = max(1, -(-M // L))
    return {
        "xq": (M, padded_k(K) // KG),
        "x_scale": (M,),
        "x_zp": ((M + 3) // 4,),
        "xt": (nch, max(1, padded_k(K) // KG), L),
        "xs": (nch, 2, L),
        "ot": (numba.config.NUMBA_NUM_THREADS, NB, L),
    }


def chain_workspace_shapes(M: int, N: int, lanes: int | None = None) -> dict[str, tuple[int, ...]]:
    """Shapes of the float32 arrays linking a call that writes its ``[M, N]`` result to the next
    call that reads it (``CHAIN_WRITE`` / ``CHAIN_READ``, :func:`sparse_int8_kernel`): ``chain
    [nchunk, N, L]`` (the result transposed per row chunk) and ``crange [threads, nchunk, 2, L]``
    (each parallel part's range of every row, as int32 keys)."""
    M, N = int(M), int(N)
    L = lanes_for(M) if lanes is None else int(lanes)
    nch = max(1, -(-M // L))
    return {"chain": (nch, max(1, N), L), "crange": (numba.config.NUMBA_NUM_THREADS, nch, 2, L)}


def make_workspace(M: int, K: int, lanes: int | None = None) -> dict[str, np.ndarray]:
    """The scratch of :func:`workspace_shapes`, 64-byte aligned, in the kernel's dtypes
    (:func:`as_kernel_operands`)."""
    ws = {name: aligned_empty(shape, np.float32) for name, shape in workspace_shapes(M, K, lanes).items()}
    return as_kernel_operands(ws, M)


def as_kernel_operands(ws: dict[str, np.ndarray], M: int) -> dict[str, np.ndarray]:
    """Views of the float32 scratch arrays of :func:`workspace_shapes` as the kernel takes them:
    ``xq`` uint8 [M, Kp], ``x_scale`` float32 [M], ``x_zp`` uint8 [M]; ``xt``, ``xs``, ``ot`` as they are."""
    return {
        "xq": ws["xq"].view(np.uint8),
        "x_scale": ws["x_scale"],
        "x_zp": ws["x_zp"].view(np.uint8)[:M],
        "xt": ws["xt"],
        "xs": ws["xs"],
        "ot": ws["ot"],
    }


# --------------------------------------------------------------------------
# vector epilogue
# --------------------------------------------------------------------------

_F = ir.VectorType(ir.FloatType(), 16)


def _splat(builder, value, vty):
    vec = builder.insert_element(ir.Constant(vty, None), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(vec, ir.Constant(vty, None), ir.Constant(ir.VectorType(ir.IntType(32), 16), [0] * 16))


@intrinsic
def _vzpfix(typingctx, acc, zp, colsum):
    """``acc - zp * colsum`` in int32 lanes (wrapping, as ``np.int32(acc - zp * colsum)``)."""
    if not (acc == zp == i32x16) or not isinstance(colsum, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        cs = _splat(builder, context.cast(builder, args[2], sig.args[2], types.int32), _V)
        return builder.sub(args[0], builder.mul(args[1], cs))

    return i32x16(acc, zp, colsum), codegen


@intrinsic
def _vdequant(typingctx, acc, zp, colsum, sx, sw):
    """``float32(acc - zp * colsum) * (sx * sw)`` per lane (``sx`` float32 lanes as bits), as
    ``int8._dequant``: the same roundings, so the same bits.  Returns float32 lanes as bits."""
    if not (acc == zp == sx == i32x16) or not isinstance(colsum, types.Integer) or not isinstance(sw, types.Float):
        return None

    def codegen(context, builder, sig, args):
        cs = _splat(builder, context.cast(builder, args[2], sig.args[2], types.int32), _V)
        q = builder.sitofp(builder.sub(args[0], builder.mul(args[1], cs)), _F)
        w = _splat(builder, context.cast(builder, args[4], sig.args[4], types.float32), _F)
        s = builder.fmul(builder.bitcast(args[3], _F), w)
        return builder.bitcast(builder.fmul(q, s), _V)

    return i32x16(acc, zp, colsum, sx, sw), codegen


@intrinsic
def _vaddf(typingctx, v, b):
    """Float32 lanes (as bits) ``+ b``, one rounding each."""
    if v != i32x16 or not isinstance(b, types.Float):
        return None

    def codegen(context, builder, sig, args):
        bv = _splat(builder, context.cast(builder, args[1], sig.args[1], types.float32), _F)
        return builder.bitcast(builder.fadd(builder.bitcast(args[0], _F), bv), _V)

    return i32x16(v, b), codegen


@njit(nogil=True, error_model="numpy", cache=True)
def _activate_column(ot, slot, t, rows, act):
    """The activation on one finished column of the slot (float32), in place."""
    if act == ACT_GELU:
        for i in range(rows):
            ot[slot, t, i] = gelu_f32(ot[slot, t, i])
    elif act != ACT_NONE:
        for i in range(rows):
            ot[slot, t, i] = _activate(ot[slot, t, i], act)


@njit(nogil=True, error_model="numpy", cache=True)
def _store_columns(ot, slot, out, m0, rows, n0, nc, residual):
    """``out[m0 + i, n0 + j] = ot[slot, j, i] (+ residual[m0 + i, n0 + j])`` for ``i < rows``,
    ``j < nc``: 16 x 16 blocks in registers, row block by row block (the stores of one row
    block are ``nc`` contiguous columns per row), the edges scalar.  ``ot`` has ``out``'s dtype.

    Whole tasks at a time rather than every 16 columns: 16 columns of 128 rows are 128 cache
    lines 4 * N bytes apart, which for N a multiple of 1024 all fall in one L1 set (3x slower
    at N = 3072 than with 256 columns per row).
    """
    N = out.shape[1]
    T = ot.shape[2]
    r16 = rows // 16 * 16
    c16 = nc // 16 * 16
    src = ot.ctypes.data + np.uint64(4 * slot * ot.shape[1] * T)
    dst = out.ctypes.data + np.uint64(4 * (m0 * N + n0))
    for i0 in range(0, r16, 16):
        for j0 in range(0, c16, 16):
            s = src + np.uint64(4 * (j0 * T + i0))
            d = dst + np.uint64(4 * (i0 * N + j0))
            if residual is None:
                transpose16(s, T, d, N)
            else:
                transpose16_add(s, T, d, N, residual.ctypes.data + np.uint64(4 * ((m0 + i0) * N + n0 + j0)), N)
    cu = np.uint64(n0)
    for i in range(rows):
        r = m0 + i
        for j in range(0 if i >= r16 else c16, nc):
            v = ot[slot, j, i]
            if residual is not None:
                v += residual[r, cu + np.uint64(j)]
            out[r, cu + np.uint64(j)] = v


# --------------------------------------------------------------------------
# kernel
# --------------------------------------------------------------------------


CHAIN_NONE, CHAIN_WRITE, CHAIN_READ = 0, 1, 2  # the kernel's chain modes (sparse_int8_kernel)
CG = 64  # groups of 4 k per task when a chained input is quantized


@njit(nogil=True, error_model="numpy", cache=True, inline="always")
def _store_acc(ary, off, NV, a0, a1, a2, a3, a4, a5, a6, a7):
    """The ``NV`` accumulators of a column to ``ary`` at byte ``off`` (``NV`` a literal)."""
    _vstore(ary, off, a0)
    if NV > 1:
        _vstore(ary, off + 64, a1)
    if NV > 2:
        _vstore(ary, off + 128, a2)
        _vstore(ary, off + 192, a3)
    if NV > 4:
        _vstore(ary, off + 256, a4)
        _vstore(ary, off + 320, a5)
        _vstore(ary, off + 384, a6)
        _vstore(ary, off + 448, a7)


@njit(nogil=True, error_model="numpy", cache=True)
def _chain_range(chain, crange, slot, ch, j0, nj):
    """Chained result: the task's finished columns are already the next call's rows of ``X.T``
    (``chain[ch, j0 + j, :]``, written by the epilogue); keep the range of each lane (a row of
    the result) over them in ``crange[slot, ch]`` as the order-preserving int32 keys of
    :func:`_row_range` (lower bound in ``[.., 0, :]``, upper in ``[.., 1, :]``; they start at 0, so
    0 is included).  Nothing to do when no ranges are kept (``crange`` = ``NO_RANGE``)."""
    if crange.shape[1] == 0:
        return
    L = chain.shape[2]
    bits = chain.view(np.int32)
    for j in range(nj):
        n = j0 + j
        for i in range(L):
            key = _ordered(bits[ch, n, i])
            crange[slot, ch, 0, i] = min(crange[slot, ch, 0, i], key)
            crange[slot, ch, 1, i] = max(crange[slot, ch, 1, i], key)


@njit(nogil=True, error_model="numpy", cache=True)
def _chain_params(crange, xs, M):
    """The rows' ``DynamicQuantizeLinear`` scale and zero point from the ranges every part of
    the producing call kept (:func:`_chain_range`) into ``xs`` (as :func:`_row_params`; zero
    past ``M``): the row's range is the range of all its values, as :func:`_row_range` finds it."""
    L = xs.shape[2]
    for ch in range((M + L - 1) // L):
        zi = xs[ch, 0].view(np.int32)
        for i in range(L):
            if ch * L + i >= M:
                zi[i] = 0
                xs[ch, 1, i] = 0.0
                continue
            lo = crange[0, ch, 0, i]
            hi = crange[0, ch, 1, i]
            for p in range(1, crange.shape[0]):
                lo = min(lo, crange[p, ch, 0, i])
                hi = max(hi, crange[p, ch, 1, i])
            s, zp = _scale_zero_point(_f32_from_bits(_ordered(lo)), _f32_from_bits(_ordered(hi)))
            zi[i] = np.int32(zp)
            xs[ch, 1, i] = s


@njit(nogil=True, error_model="numpy", cache=True)
def _q8(x, s, zp):
    """``sat_u8(rint(x / s) + zp)`` as an int32, as :func:`~sparseinfer.kernels.int8._quantize_row_with`."""
    return np.int32(min(max(np.rint(x / s) + zp, np.float32(0.0)), np.float32(255.0)))


@njit(nogil=True, error_model="numpy", cache=True)
def _chain_quantize(chain, xt, xs, ch, g0, g1):
    """``xt[ch, g, i]`` for the groups ``g0 .. g1``: the 4 quantized bytes of ``X[ch * L + i,
    4g .. 4g + 3]`` read from the transposed ``chain[ch, k, i]`` (no transpose needed: a group is
    4 rows of ``chain``).  ``k`` past the rows of ``chain`` count as 0 (the padding gets the zero
    point, as in :func:`~sparseinfer.kernels.int8._quantize_row_with`); a row with scale 0 is all
    zeros.  The same division and rounding as the unchained quantization: bit-identical."""
    L = xt.shape[2]
    K = chain.shape[1]
    zi = xs[ch, 0].view(np.int32)
    for g in range(g0, g1):
        k = 4 * g
        if k + 3 < K:
            for i in range(L):
                s = xs[ch, 1, i]
                zp = np.float32(zi[i])
                w = _q8(chain[ch, k, i], s, zp)
                w |= _q8(chain[ch, k + 1, i], s, zp) << 8
                w |= _q8(chain[ch, k + 2, i], s, zp) << 16
                w |= _q8(chain[ch, k + 3, i], s, zp) << 24
                xt[ch, g, i] = w if s != 0 else 0
        else:
            for i in range(L):
                s = xs[ch, 1, i]
                zp = np.float32(zi[i])
                w = np.int32(0)
                for b in range(4):
                    x = chain[ch, k + b, i] if k + b < K else np.float32(0.0)
                    w |= _q8(x, s, zp) << (8 * b)
                xt[ch, g, i] = w if s != 0 else 0


@njit(nogil=True, error_model="numpy", cache=True)
def _relayout(xw, xt, r0, r1, M):
    """``xt[ch, g, i] = xw[ch * L + i, g]`` (int32 words) for the rows ``r0 .. r1`` of one chunk.

    Full 16-row blocks go through :func:`transpose16`; the last task also
    zeroes the lanes past ``M``.
    """
    G = xw.shape[1]
    KX = xt.shape[1]
    L = xt.shape[2]
    ch = r0 // L
    i0 = r0 - ch * L
    rows = r1 - r0
    g16 = 0
    if rows == RB:
        g16 = G // 16 * 16
        xs = xw.ctypes.data
        ts = xt.ctypes.data
        for g in range(0, g16, 16):
            transpose16(xs + np.uint64(4 * (r0 * G + g)), G, ts + np.uint64(4 * ((ch * KX + g) * L + i0)), L)
    for g in range(g16, G):
        for i in range(rows):
            xt[ch, g, i0 + i] = xw[r0 + i, g]
    if r1 == M:
        for g in range(G):
            for i in range(i0 + rows, L):
                xt[ch, g, i] = 0


@njit(nogil=True, error_model="numpy", cache=True)
def _row_params(x_scale, x_zp, xs, r0, r1, M):
    """``xs[ch, 0, i]`` = the zero point (int32 bits) and ``xs[ch, 1, i]`` the scale of row ``ch * L + i``."""
    L = xs.shape[2]
    ch = r0 // L
    i0 = r0 - ch * L
    zi = xs[ch, 0].view(np.int32)
    for i in range(r1 - r0):
        zi[i0 + i] = np.int32(x_zp[r0 + i])
        xs[ch, 1, i0 + i] = 0.0 if x_scale is None else x_scale[r0 + i]
    if r1 == M:
        for i in range(i0 + r1 - r0, L):
            zi[i] = 0
            xs[ch, 1, i] = 0.0


@njit(nogil=True, error_model="numpy", cache=True)
def _columns(
    xt,
    xs,
    ot,
    ch,
    slot,
    indptr,
    indices,
    data,
    N,
    j0,
    nj,
    npanel,
    out,
    m0,
    rows,
    x_scale,
    w_scale,
    colsum,
    bias,
    residual,
    act,
    xnext,
    mm,
    NV,
):
    """Output columns ``j0 .. j0 + nj`` for the rows of chunk ``ch``, K panel by K panel.

    ``NV`` (accumulators per column, ``L / 16``) is a literal: the accumulators are SSA vector
    values and the branches on ``NV`` are pruned at compile time.
    """
    VB = 64 * NV  # bytes of one group of xt / one column of ot / one row of xs / one row of xnext
    chained = xnext.shape[0] > 0
    xbase = ch * xt.shape[1] * VB
    zo = ch * 2 * VB  # the chunk's zero points in xs; its scales follow
    sbase = slot * ot.shape[1] * VB
    for b in range(npanel):
        last = b == npanel - 1
        for n in range(j0, j0 + nj):
            t = n - j0
            so = sbase + t * VB
            a0 = _vzero()
            a1 = _vzero()
            a2 = _vzero()
            a3 = _vzero()
            a4 = _vzero()
            a5 = _vzero()
            a6 = _vzero()
            a7 = _vzero()
            if b > 0:
                a0 = _vload(ot, so)
                if NV > 1:
                    a1 = _vload(ot, so + 64)
                if NV > 2:
                    a2 = _vload(ot, so + 128)
                    a3 = _vload(ot, so + 192)
                if NV > 4:
                    a4 = _vload(ot, so + 256)
                    a5 = _vload(ot, so + 320)
                    a6 = _vload(ot, so + 384)
                    a7 = _vload(ot, so + 448)
            q = b * N + n
            for p in range(np.uint64(indptr[q]), np.uint64(indptr[q + 1])):
                w = _vbcast(data, p * np.uint64(4))
                xo = xbase + np.intp(indices[p]) * VB
                a0 = _dpbusd(a0, _vload(xt, xo), w)
                if NV > 1:
                    a1 = _dpbusd(a1, _vload(xt, xo + 64), w)
                if NV > 2:
                    a2 = _dpbusd(a2, _vload(xt, xo + 128), w)
                    a3 = _dpbusd(a3, _vload(xt, xo + 192), w)
                if NV > 4:
                    a4 = _dpbusd(a4, _vload(xt, xo + 256), w)
                    a5 = _dpbusd(a5, _vload(xt, xo + 320), w)
                    a6 = _dpbusd(a6, _vload(xt, xo + 384), w)
                    a7 = _dpbusd(a7, _vload(xt, xo + 448), w)
            if last:  # the column's epilogue in registers, as int8._finish does it per element
                cs = colsum[n]
                if x_scale is None:
                    a0 = _vzpfix(a0, _vload(xs, zo), cs)
                    if NV > 1:
                        a1 = _vzpfix(a1, _vload(xs, zo + 64), cs)
                    if NV > 2:
                        a2 = _vzpfix(a2, _vload(xs, zo + 128), cs)
                        a3 = _vzpfix(a3, _vload(xs, zo + 192), cs)
                    if NV > 4:
                        a4 = _vzpfix(a4, _vload(xs, zo + 256), cs)
                        a5 = _vzpfix(a5, _vload(xs, zo + 320), cs)
                        a6 = _vzpfix(a6, _vload(xs, zo + 384), cs)
                        a7 = _vzpfix(a7, _vload(xs, zo + 448), cs)
                else:
                    sw = w_scale[n]
                    a0 = _vdequant(a0, _vload(xs, zo), cs, _vload(xs, zo + VB), sw)
                    if NV > 1:
                        a1 = _vdequant(a1, _vload(xs, zo + 64), cs, _vload(xs, zo + VB + 64), sw)
                    if NV > 2:
                        a2 = _vdequant(a2, _vload(xs, zo + 128), cs, _vload(xs, zo + VB + 128), sw)
                        a3 = _vdequant(a3, _vload(xs, zo + 192), cs, _vload(xs, zo + VB + 192), sw)
                    if NV > 4:
                        a4 = _vdequant(a4, _vload(xs, zo + 256), cs, _vload(xs, zo + VB + 256), sw)
                        a5 = _vdequant(a5, _vload(xs, zo + 320), cs, _vload(xs, zo + VB + 320), sw)
                        a6 = _vdequant(a6, _vload(xs, zo + 384), cs, _vload(xs, zo + VB + 384), sw)
                        a7 = _vdequant(a7, _vload(xs, zo + 448), cs, _vload(xs, zo + VB + 448), sw)
                    if bias is not None:
                        bn = bias[n]
                        a0 = _vaddf(a0, bn)
                        a1 = _vaddf(a1, bn)
                        a2 = _vaddf(a2, bn)
                        a3 = _vaddf(a3, bn)
                        a4 = _vaddf(a4, bn)
                        a5 = _vaddf(a5, bn)
                        a6 = _vaddf(a6, bn)
                        a7 = _vaddf(a7, bn)
            if last and chained:  # the finished column straight to its row of the chain
                _store_acc(xnext, (ch * xnext.shape[1] + n) * VB, NV, a0, a1, a2, a3, a4, a5, a6, a7)
                _activate_column(xnext, ch, n, rows, act)
            else:
                _store_acc(ot, so, NV, a0, a1, a2, a3, a4, a5, a6, a7)
                if last and x_scale is not None:
                    _activate_column(ot, slot, t, rows, act)
    if chained:
        _chain_range(xnext, mm, slot, ch, j0, nj)
    else:
        _store_columns(ot, slot, out, m0, rows, j0, nj, residual)


def _make_kernel(NV):
    """The parallel driver for ``L = 16 * NV`` lanes.

    ``NV`` is a closure constant, so it reaches :func:`_columns` as a literal.
    (The driver calls a module-level function: a jitted function held in a
    closure cell would change Numba's cache key in every process.)
    """
    L = 16 * NV

    @njit(nogil=True, error_model="numpy", parallel=True, cache=True)
    def kernel(X, indptr, indices, data, w_scale, colsum, bias, residual, out, act, xq, x_scale, x_zp, xt, xs, ot, chain, crange, mode):
        M = xq.shape[0]
        N = out.shape[1]
        if M == 0 or N == 0:
            return
        # the 16 x 16 transposes and the vector loads address these through raw pointers
        if not (
            xq.flags.c_contiguous and out.flags.c_contiguous and xt.flags.c_contiguous and xs.flags.c_contiguous and ot.flags.c_contiguous
        ):
            raise ValueError("xq, out and the workspace must be C-contiguous")
        if residual is not None and not residual.flags.c_contiguous:
            raise ValueError("residual must be C-contiguous")
        nch = (M + L - 1) // L
        if xt.shape[2] != L or xs.shape[2] != L or ot.shape[2] != L or ot.shape[1] < NB or xt.shape[1] * KG < xq.shape[1]:
            raise ValueError("workspace does not match the kernel (use make_workspace)")
        if xt.shape[0] < nch or xs.shape[0] < nch or xs.shape[1] != 2:
            raise ValueError("workspace has too few row chunks (use make_workspace)")
        xw = xq.view(np.int32)  # [M, Kp / 4]: one word per row and group of 4 k
        xti = xt.view(np.int32)
        otv = ot.view(out.dtype)  # int32 sums, or float32 results
        cr = crange.view(np.int32)  # the chain's row ranges as order-preserving keys
        nparts = ot.shape[0]
        ranged = cr.shape[1] > 0  # CHAIN_WRITE with NO_RANGE: the rows' ranges are not kept
        if mode != CHAIN_NONE:
            if x_scale is None or (mode == CHAIN_READ) != (X is None):
                raise ValueError("a chained call has float32 results, and X only when it writes the chain")
            if chain.shape[0] < nch or chain.shape[2] != L:
                raise ValueError("chain workspace does not match the kernel (use chain_workspace_shapes)")
            if (ranged or mode == CHAIN_READ) and (cr.shape[0] != nparts or cr.shape[1] < nch or cr.shape[2] != 2 or cr.shape[3] != L):
                raise ValueError("chain range workspace does not match the kernel (use chain_workspace_shapes)")
        if mode == CHAIN_WRITE:
            if residual is not None or chain.shape[1] < N:
                raise ValueError("a result written to the chain has no residual and fits its rows")
            if ranged:
                cr[:, :nch] = 0
        if mode == CHAIN_READ:
            G = xq.shape[1] // KG
            if chain.shape[1] > G * KG:
                raise ValueError("the chained input has more columns than K")
            _chain_params(cr, xs, M)
            nblk = (G + CG - 1) // CG
            for t in prange(nch * nblk):
                ch = t // nblk
                g0 = (t - ch * nblk) * CG
                _chain_quantize(chain, xti, xs, ch, g0, min(G, g0 + CG))
        else:
            for t in prange((M + RB - 1) // RB):
                r0 = t * RB
                r1 = min(M, r0 + RB)
                if X is not None:
                    for r in range(r0, r1):
                        _quantize_row(X, r, xq, x_scale, x_zp)
                _relayout(xw, xti, r0, r1, M)
                _row_params(x_scale, x_zp, xs, r0, r1, M)
        npanel = (indptr.shape[0] - 1) // N
        upc = (N + FG - 1) // FG  # units (16 columns) per chunk
        units = nch * upc
        chained = chain if mode == CHAIN_WRITE else chain[:0]
        for s in prange(nparts):
            u = s * units // nparts
            u1 = (s + 1) * units // nparts
            while u < u1:
                ch = u // upc
                uc = u - ch * upc
                nu = min(NB // FG, upc - uc, u1 - u)
                j0 = uc * FG
                m0 = ch * L
                _columns(
                    xti, xs, otv, ch, np.intp(s), indptr, indices, data, N, j0, min(nu * FG, N - j0), npanel, out, m0, min(L, M - m0),
                    x_scale, w_scale, colsum, bias, residual, act, chained, cr, NV,
                )  # fmt: skip
                u += nu

    return kernel


_KERNELS: dict = {}
NO_CHAIN = np.zeros((0, 0, 0), np.float32)  # the chain arguments of an unchained call
NO_RANGE = np.zeros((0, 0, 2, 16), np.float32)


def sparse_int8_kernel(M: int, lanes: int | None = None):
    """The compiled kernel for ``M`` rows (chosen once, at plan time).

    Call it as ``kernel(X, indptr, indices, data, w_scale, colsum, bias,
    residual, out, act, xq, x_scale, x_zp, xt, xs, ot, chain, crange, mode)``:

    * ``X`` float32 [M, K] C-contiguous: quantized into ``xq`` / ``x_scale``
      / ``x_zp`` (per-row ``DynamicQuantizeLinear``, as ``quantize_rows``);
      or None: ``xq`` uint8 [M, Kp], ``x_zp`` uint8 [M] (and ``x_scale``)
      are inputs, already quantized;
    * ``(indptr, indices, data)``, ``colsum`` from :func:`pack_sparse_int8`,
      ``w_scale`` float32 [N];
    * ``bias`` float32 [N] or None, ``residual`` float32 [M, N] or None,
      ``out`` float32 [M, N] C-contiguous (may be ``residual``), ``act`` an
      ``ACT_*`` code; ``x_scale=None`` (with ``X=None``): ``out`` int32 gets
      ``(xq - zp) @ Wq`` (``w_scale``, ``bias``, ``residual`` unused);
    * ``xt``, ``xs``, ``ot``: the workspace of :func:`make_workspace` (the
      same ``lanes``);
    * ``mode`` ``CHAIN_NONE`` (``chain``, ``crange``: ``NO_CHAIN``,
      ``NO_RANGE``); ``CHAIN_WRITE``: the float32 result, activation applied,
      goes to ``chain [nchunk, >= N, L]`` transposed (``chain[ch, n, i] =
      Y[ch * L + i, n]``) with each row's range in ``crange``, and ``out`` is
      not written (pass a ``[0, N]`` array; no residual); with ``crange`` =
      ``NO_RANGE`` the ranges are not kept (a consumer that does not quantize
      per row from them, :func:`~sparseinfer.kernels.attention_int8.
      attention_int8_chained`); ``CHAIN_READ`` (with
      ``X=None``): the input is the ``chain`` / ``crange`` of such a call,
      quantized from there (bit-identical to quantizing ``Y`` row by row) and
      ``xq``, ``x_scale``, ``x_zp`` are not used.  ``chain`` and ``crange``
      from :func:`chain_workspace_shapes`.  A call does not read and write a
      chain both.
    """
    nv = (lanes_for(M) if lanes is None else int(lanes)) // 16
    k = _KERNELS.get(nv)
    if k is None:
        if nv not in (1, 2, 4, 8):
            raise ValueError(f"lanes must be 16, 32, 64 or 128, got {16 * nv}")
        k = _KERNELS[nv] = _make_kernel(nv)
    return k


# --------------------------------------------------------------------------
# checked entry points
# --------------------------------------------------------------------------


def _kernel_and_workspace(M, Kp, workspace):
    """The kernel for ``M`` rows and a workspace for it: ``workspace`` (any from
    :func:`make_workspace` with enough rows and K; its lanes decide the kernel) or a new one."""
    if workspace is None:
        workspace = make_workspace(M, Kp)
    else:
        missing = {"xq", "x_scale", "x_zp", "xt", "xs", "ot"} - set(workspace)
        if missing:
            raise ValueError(f"workspace lacks {sorted(missing)} (use make_workspace)")
    xt, xs, ot = workspace["xt"], workspace["xs"], workspace["ot"]
    L = xt.shape[2] if xt.ndim == 3 else 0
    need = (max(1, -(-M // L)) if L else 1, max(1, Kp // KG))
    for name, a in (("xt", xt), ("xs", xs), ("ot", ot)):
        if a.ndim != 3 or a.dtype != np.float32 or not a.flags.c_contiguous or a.shape[2] != L or L not in (16, 32, 64, 128):
            raise ValueError(f"workspace {name} of shape {a.shape} / {a.dtype} does not fit (use make_workspace)")
    if xt.shape[0] < need[0] or xt.shape[1] < need[1] or xs.shape[0] < need[0] or xs.shape[1] != 2 or ot.shape[1] < NB:
        raise ValueError(f"workspace of shape {xt.shape} is too small for M={M}, Kp={Kp} (use make_workspace)")
    return sparse_int8_kernel(M, L), workspace


def _check(xq, x_zp, packed, colsum, N, workspace):
    if xq.ndim != 2 or xq.dtype != np.uint8 or not xq.flags.c_contiguous:
        raise ValueError("xq must be a C-contiguous uint8 [M, Kp] array (see quantize_rows)")
    M, Kp = xq.shape
    if Kp % KG:
        raise ValueError(f"xq has {Kp} columns, not a multiple of 4 (see padded_k)")
    indptr, indices, data = packed
    if indptr.dtype != np.int64 or indices.dtype != np.int32 or data.dtype != np.int32 or indices.shape != data.shape:
        raise ValueError("packed weight must be (indptr int64, indices int32, data int32); use pack_sparse_int8")
    if N and (indptr.shape[0] < 2 or (indptr.shape[0] - 1) % N):
        raise ValueError(f"indptr of length {indptr.shape[0]} does not match N={N} (pack with pack_sparse_int8)")
    if indices.size and int(indices.max()) * KG >= Kp:
        raise ValueError(f"packed weight has a block at row {int(indices.max()) * KG} >= Kp={Kp} (xq columns)")
    if x_zp.shape != (M,) or x_zp.dtype != np.uint8:
        raise ValueError("x_zp must be uint8 [M]")
    if colsum.shape != (N,) or colsum.dtype != np.int32:
        raise ValueError("colsum must be int32 [N]")
    return _kernel_and_workspace(M, Kp, workspace)


def _check_epilogue(M, N, w_scale, bias, residual, out, act):
    if w_scale.shape != (N,) or w_scale.dtype != np.float32:
        raise ValueError(f"w_scale must be float32 [{N}]")
    if out is None:
        out = np.empty((M, N), dtype=np.float32)
    if out.shape != (M, N) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 [{M}, {N}] array")
    if bias is not None and (bias.shape != (N,) or bias.dtype != np.float32):
        raise ValueError(f"bias must be float32 [{N}]")
    if residual is not None and (residual.shape != (M, N) or residual.dtype != np.float32 or not residual.flags.c_contiguous):
        raise ValueError(f"residual must be a C-contiguous float32 [{M}, {N}] array")
    if act not in (ACT_NONE, ACT_GELU, ACT_GELU_EXACT, ACT_TANH, ACT_RELU):
        raise ValueError(f"unknown activation code {act!r}")
    return out


def sparse_dense_int8(xq, x_scale, x_zp, packed, w_scale, colsum, bias=None, residual=None, out=None, act=ACT_NONE, workspace=None):
    """Checked entry point on already quantized activations (float32 output).

    ``xq``, ``x_scale``, ``x_zp`` as from ``quantize_rows``; ``packed,
    w_scale, colsum`` from :func:`pack_weight_sparse_int8`; ``N`` is
    ``w_scale.shape[0]``.  Returns ``out``, equal bit for bit to
    :func:`~sparseinfer.kernels.int8.dense_int8` on the same operands.
    """
    N = w_scale.shape[0]
    M = xq.shape[0]
    kernel, ws = _check(xq, x_zp, packed, colsum, N, workspace)
    if x_scale.shape != (M,) or x_scale.dtype != np.float32:
        raise ValueError("x_scale must be float32 [M]")
    out = _check_epilogue(M, N, w_scale, bias, residual, out, act)
    kernel(
        None,
        *packed,
        w_scale,
        colsum,
        bias,
        residual,
        out,
        act,
        xq,
        x_scale,
        x_zp,
        ws["xt"],
        ws["xs"],
        ws["ot"],
        NO_CHAIN,
        NO_RANGE,
        CHAIN_NONE,
    )
    return out


def sparse_matmul_int8(xq, x_zp, packed, colsum, out=None, workspace=None):
    """Exact ``(xq - zp[:, None]) @ Wq`` in int32 (``MatMulInteger`` with per-row zero points)."""
    N = colsum.shape[0]
    M = xq.shape[0]
    kernel, ws = _check(xq, x_zp, packed, colsum, N, workspace)
    if out is None:
        out = np.empty((M, N), dtype=np.int32)
    if out.shape != (M, N) or out.dtype != np.int32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous int32 [{M}, {N}] array")
    kernel(
        None, *packed, None, colsum, None, None, out, ACT_NONE, xq, None, x_zp, ws["xt"], ws["xs"], ws["ot"], NO_CHAIN, NO_RANGE, CHAIN_NONE
    )
    return out


def quantized_sparse_dense(X, packed, w_scale, colsum, bias=None, residual=None, out=None, act=ACT_NONE, workspace=None):
    """Checked entry point on float32 activations: quantize the rows of ``X [M, K]`` (as
    ``quantize_rows``, into the workspace) and multiply, in one call of the kernel.

    What a compiled plan runs (calling the kernel of :func:`sparse_int8_kernel` directly).
    ``X`` must be finite.  Returns ``out``.
    """
    X = np.ascontiguousarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D [M, K], got shape {X.shape}")
    M, K = X.shape
    N = w_scale.shape[0]
    Kp = padded_k(K)
    kernel, ws = _kernel_and_workspace(M, Kp, workspace)
    indptr, indices, _ = packed
    if colsum.shape != (N,) or colsum.dtype != np.int32:
        raise ValueError("colsum must be int32 [N]")
    if N and (indptr.shape[0] < 2 or (indptr.shape[0] - 1) % N):
        raise ValueError(f"indptr of length {indptr.shape[0]} does not match N={N} (pack with pack_sparse_int8)")
    if indices.size and int(indices.max()) * KG >= Kp:
        raise ValueError(f"packed weight has a block at row {int(indices.max()) * KG} >= K={K}")
    xq, x_scale, x_zp = ws["xq"], ws["x_scale"], ws["x_zp"]
    if xq.shape[0] < M or xq.shape[1] != Kp or x_scale.shape[0] < M or x_zp.shape[0] < M:
        raise ValueError(f"workspace xq of shape {xq.shape} does not fit M={M}, Kp={Kp} (use make_workspace)")
    out = _check_epilogue(M, N, w_scale, bias, residual, out, act)
    kernel(
        X,
        *packed,
        w_scale,
        colsum,
        bias,
        residual,
        out,
        act,
        xq[:M],
        x_scale[:M],
        x_zp[:M],
        ws["xt"],
        ws["xs"],
        ws["ot"],
        NO_CHAIN,
        NO_RANGE,
        CHAIN_NONE,
    )
    return out


def quantized_sparse_chain(X, first, second, residual=None, out=None, workspace=None):
    """Two chained calls: ``Y = act1(X @ W1 + b1)`` then ``out = act2(Y @ W2 + b2) + residual``,
    with ``Y`` handed over transposed and quantized from there (``CHAIN_WRITE`` / ``CHAIN_READ``).
    ``first`` and ``second`` are ``(packed, w_scale, colsum, bias, act)``.  Equal bit for bit to
    two :func:`quantized_sparse_dense` calls; the checked form of what a plan does for BERT's
    feed-forward pair (:mod:`sparseinfer.runtime.int8_lowering`)."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D [M, K], got shape {X.shape}")
    (p1, s1, c1, b1, a1), (p2, s2, c2, b2, a2) = first, second
    M, K = X.shape
    N1, N2 = s1.shape[0], s2.shape[0]
    if workspace is None:
        workspace = make_workspace(M, max(K, N1))
    kernel, ws = _kernel_and_workspace(M, padded_k(max(K, N1)), workspace)
    L = ws["xt"].shape[2]
    link = {name: aligned_empty(shape, np.float32) for name, shape in chain_workspace_shapes(M, N1, L).items()}
    for packed, colsum, n, k in ((p1, c1, N1, K), (p2, c2, N2, N1)):
        _check(np.empty((M, padded_k(k)), np.uint8), np.empty(M, np.uint8), packed, colsum, n, ws)
    _check_epilogue(M, N1, s1, b1, None, None, a1)
    out = _check_epilogue(M, N2, s2, b2, residual, out, a2)
    xq, xs = ws["xq"], ws["x_scale"]
    if xq.shape[0] < M or xq.shape[1] < padded_k(K) or xs.shape[0] < M:
        raise ValueError(f"workspace xq of shape {xq.shape} does not fit M={M}, K={K} (use make_workspace)")
    xq1 = xq.reshape(-1)[: M * padded_k(K)].reshape(M, padded_k(K))
    xq2 = xq.reshape(-1)[: M * padded_k(N1)].reshape(M, padded_k(N1))
    none = np.empty((0, N1), np.float32)
    kernel(
        X,
        *p1,
        s1,
        c1,
        b1,
        None,
        none,
        a1,
        xq1,
        xs[:M],
        ws["x_zp"][:M],
        ws["xt"],
        ws["xs"],
        ws["ot"],
        link["chain"],
        link["crange"],
        CHAIN_WRITE,
    )
    kernel(
        None,
        *p2,
        s2,
        c2,
        b2,
        residual,
        out,
        a2,
        xq2,
        xs[:M],
        ws["x_zp"][:M],
        ws["xt"],
        ws["xs"],
        ws["ot"],
        link["chain"],
        link["crange"],
        CHAIN_READ,
    )
    return out
