"""Fused multi-head self-attention (fp32).

Given the projected queries / keys / values as 2-D row-major arrays with one
row per token (``B * S`` rows) - either one fused QKV projection output
``[B*S, 3*H*D]`` or three separate ``[B*S, H*D]`` arrays - and an additive
mask per batch row ``[B, S]`` (0 for visible keys, a large negative number
such as the float32 minimum for padding), computes the per-head context
``[B*S, H*D]`` (heads concatenated, i.e. already "merged"):

    for b, h:
        Qh = q[b*S:(b+1)*S, q_col + h*D : q_col + (h+1)*D]      (same for K, V)
        P  = softmax(Qh @ Kh.T * scale + mask[b][None, :])        (over keys)
        out[b*S:(b+1)*S, h*D:(h+1)*D] = P @ Vh

Kernel design
-------------
Parallel over ``(batch, head)`` tasks in a single ``prange`` over threads;
each thread uses its own slice of three preallocated workspaces (see
:func:`workspace_shapes`) and owns the output block of its task.  All vector
work is written with explicit ``<16 x float>`` operations (the small llvmlite
intrinsics below, on raw byte addresses), as the int8 kernel
(:mod:`sparseinfer.kernels.attention_int8`) does with ``<16 x i32>``.  Per head:

1. K_h is transposed into ``kt [D, Sp]`` (``Sp`` = S rounded up to 32, zero
   columns past S) by 16 x 16 register transposes
   (:func:`sparseinfer.kernels.csr.transpose16`; scalar edges), and V_h copied
   into ``vp [S, Dp]`` (``Dp`` = D rounded up to 32, zero padded); the mask
   row of the batch row is copied next to the score block with ``-inf`` past S.
2. Per block of ``MR`` = 8 query rows (the last one repeats its last row):
   the scores of the block, 8 x S floats that stay in L1, by an 8 x 32
   register tile (16 zmm accumulators; per ``d`` 2 loads of ``kt`` and 8
   broadcasts of Q read straight from ``q``, 16 FMAs) whose epilogue applies
   ``* scale + mask`` with one FMA per vector; then the softmax of the 8 rows
   in lockstep (vector max, ``e = exp(x - max)`` in place, vector sum; the
   exp is the Cephes ``expf`` of :func:`sparseinfer.kernels.elementwise.exp_f32`
   on 16 lanes with FMAs and ``vscalefps`` for ``2^n``); then the context by
   the same tile over the S keys (broadcasts of ``e``, loads of ``vp``) whose
   epilogue multiplies each row by ``1 / sum(e)`` and writes ``out``.  The
   probabilities are never normalised in memory: ``(e @ V) / sum(e)`` instead
   of ``(e / sum(e)) @ V``, one rounding either way.

Numerics: fp32 throughout, FMA accumulation in ``d`` / key order, the exp to
~2 ulp, the max exact, the row sums reassociated (16 lanes, then a tree).
A key whose ``x - max`` is below -87.34 gets weight exactly 0 (the padding
columns' ``-inf`` too); a row whose every key has the float32 minimum as mask
gets uniform weights (as torch / onnxruntime); NaN propagates.

Measured
--------
Zen 5 (2 vCPUs, AVX-512), 2 threads, same process, alternating with the
previous kernel (one 8 x 32 FMA tile per matmul over scalar-transposed K / V
panels, a 5-pass scalar-loop softmax), medians of 30-40 rounds on an idle
machine (``/tmp`` A/B script: ``attention_packed`` on a fused QKV with a
padding mask; load average 1.9 decaying from earlier jobs, CPUs 99% idle),
BERT-base H=12 D=64, old -> new per call:

* B=1 S=128: 0.259 -> 0.139 ms (0.54x);  B=8 S=128: 2.27 -> 1.24 ms (0.55x)
* B=1 S=64: 0.083 -> 0.040 ms;  B=1 S=384: 1.94 -> 1.15 ms
* in the engine (``benchmarks/attention_in_engine.py --batch 1``): the
  Attention step 0.142 ms, the bare kernel 0.135 ms, 1 thread 0.262 ms.

The two vCPUs run the FMA tile at 244 GF/s each and 482 GF/s together (L1
resident), so the matmuls' floor at B=1 S=128 (50 MFLOP) is 0.104 ms; they
take ~0.112 ms.  Stripping parts (2 threads, B=1 S=128): the softmax costs
~0.013 ms, the K^T transposes and V copies ~0.011 ms (the previous kernel's,
stripped the same way but on a loaded machine: ~0.09 and ~0.025 ms).

What did not help / why not
---------------------------
* The softmax one row at a time (max, reduction, exp loop, sum, each waiting
  on the last): 2x slower than 8 rows in lockstep; 4 rows: 1.12x slower.
  The exp with an integer ``2^n`` (two factors, as ``exp_f32``) and an
  overflow check took ~8% more softmax time than ``vscalefps`` (measured
  one row at a time, 1 thread; the arguments are <= 0, so no overflow).
* Reading V straight from the QKV rows for the context tile (no copy):
  4-7% faster for BERT-base, but 10-18% slower when the row stride is a
  multiple of 4 KiB (BERT-large: 3 x 1024 floats = 12 KiB; every V row of
  a tile maps to the same two L1 sets), so V is always copied.
* Not tried: folding the row max into the score tile's epilogue (the max
  pass is 8 loads + 8 ``vmaxps`` per row, a few percent of the softmax).

Feature-major input
-------------------
:func:`attention_fm` / :func:`attention_fm_packed` take Q, K, V as a sparse
Dense (:mod:`sparseinfer.kernels.csr`) can leave its result: feature-major
``src [nch, N, L]``, token ``t = b*S + s`` of feature ``n`` at
``src[t // L, n, t % L]``.  There K_h^T is already in place (feature
``k_col + h*D + d`` of a chunk, tokens along the lanes), so the score tile
reads it where it is (row stride ``4 * L`` bytes) and ``kt`` is not needed;
the 8 queries of a block are adjacent lanes and the tile's Q broadcasts step
``4 * L`` bytes per ``d`` (the ``qs`` argument of :func:`_tile_scores`, 4 for
row-major Q).  Only V moves: 16 x 16 register transposes from ``src`` into
``vp`` instead of row copies.  The context goes either to rows, as in
:func:`attention_packed`, or feature-major (``out_fm [nch', >= H*D, L]``):
two 8-row blocks are staged in 16 rows after V in ``vp``
(:func:`fm_workspace_shapes`) and transposed into the chunk, and the rows
past ``H*D`` of every chunk are zeroed (block padding for the next kernel).
Shapes (:func:`fm_supported`): S and L multiples of 32 (a 32-key tile, a
16-key transpose and a 16-query output block never straddle a chunk, and
there is no key padding: a tile past the batch row would read the next
row's tokens or the garbage lanes past ``B*S``), D a multiple of 16.  Same
arithmetic in the same order as :func:`attention_packed`: bitwise the same
result, in either output layout.

Measured on an Intel Xeon (2 vCPUs, AVX-512; another machine than the
figures above), 2 threads, medians of 5 runs of 300 rounds of 20 calls,
the variants interleaved, fused QKV with a padding mask, H=12 D=64:
B=1 S=128 L=64 ``attention_packed`` 0.214 ms, fm with row output 0.200 ms
(0.94x), fm with feature-major output 0.204 ms (0.95x; the staging
transposes and the zero rows);  B=1 S=384 L=128: 1.79 / 1.76 / 1.75 ms;
B=8 S=128 L=128: ~1.85 ms all three (within the noise);  H=16 (BERT-large
heads at S=128): 0.309 / 0.277 / 0.279 ms.  The generalised
:func:`_tile_scores` compiles ``attention_packed``'s loop to the same
instructions as before (the ``qs = 4`` call site is specialised).

NumPy reference::

    def attention_ref(q, k, v, mask, B, S, H, D, scale, q_col=0, k_col=0, v_col=0):
        out = np.empty((B * S, H * D), np.float32)
        for b in range(B):
            rows = slice(b * S, (b + 1) * S)
            for h in range(H):
                Q = q[rows, q_col + h * D: q_col + (h + 1) * D].astype(np.float64)
                K = k[rows, k_col + h * D: k_col + (h + 1) * D].astype(np.float64)
                V = v[rows, v_col + h * D: v_col + (h + 1) * D].astype(np.float64)
                s = Q @ K.T * scale
                if mask is not None:
                    s = s + mask[b][None, :]
                s = s - s.max(-1, keepdims=True)
                p = np.exp(s)
                p = p / p.sum(-1, keepdims=True)
                out[rows, h * D:(h + 1) * D] = p @ V
        return out
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from sparseinfer.kernels.csr import transpose16
from sparseinfer.kernels.simd import (
    _L,
    _VF,
    _VI,
    _call,
    _cf,
    _hmax,
    _hsum,
    _vadd,
    _vbc,
    _vfma,
    _vld,
    _vmax,
    _vmul,
    _vset,
    _vst,
    _vstn,
    _vsub,
    _vzero,
    f32x16,
)
from sparseinfer.kernels.sparse_formats import aligned_empty

__all__ = [
    "attention",
    "attention_packed",
    "workspace_shapes",
    "make_workspace",
    "attention_fm",
    "attention_fm_packed",
    "fm_supported",
    "fm_workspace_shapes",
    "make_fm_workspace",
]

MR = 8  # query rows per block / register tile
NR = 32  # keys (scores) or output columns (context) per register tile: 2 zmm

_LOG2E = 1.4426950408889634
_EXP_HI = 88.72283935546875
_EXP_LO = -87.3365478515625
_EXP_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)


def _exp_codegen(builder, x, scalef):
    """IR of :func:`_vexp` on the ``<16 x float>`` value ``x``; ``scalef``: ``2^n`` by AVX-512
    ``vscalefps`` (else by building the exponent bits, for CPUs without AVX-512)."""

    def fma(a, b, c):
        return _call(builder, "llvm.fma.v16f32", _VF, [a, b, c])

    under = builder.fcmp_ordered("<", x, _cf(_EXP_LO))
    xc = builder.select(under, _cf(_EXP_LO), x)
    n = _call(builder, "llvm.floor.v16f32", _VF, [fma(xc, _cf(_LOG2E), _cf(0.5))])
    r = fma(n, _cf(-0.693359375), xc)
    r = fma(n, _cf(2.12194440e-4), r)
    r2 = builder.fmul(r, r)
    y = _cf(_EXP_P[0])
    for p in _EXP_P[1:]:
        y = fma(y, r, _cf(p))
    y = fma(y, r2, r)
    y = builder.fadd(y, _cf(1.0))
    zero = ir.Constant(_VF, [0.0] * _L)
    if scalef:
        keep = builder.bitcast(builder.not_(under), ir.IntType(16))
        return _call(builder, "llvm.x86.avx512.mask.scalef.ps.512", _VF, [y, n, zero, keep, ir.Constant(ir.IntType(32), 4)])
    # -126 <= n <= 0 for -87.34 <= x <= 0: 2^n is the normal float with exponent field n + 127
    bits = builder.shl(builder.add(builder.fptosi(n, _VI), ir.Constant(_VI, [127] * _L)), ir.Constant(_VI, [23] * _L))
    return builder.select(under, zero, builder.fmul(y, builder.bitcast(bits, _VF)))


@intrinsic
def _vexp(typingctx, v):
    """exp of 16 lanes ``x <= 0`` (or NaN): the Cephes ``expf`` of
    :func:`sparseinfer.kernels.elementwise.exp_f32` (same range reduction and polynomial, with
    FMAs), 0 below -87.3365, NaN propagates; ``2^n`` by ``vscalefps`` when the CPU Numba targets
    has AVX-512 (one instruction instead of the integer construction and a multiply)."""

    def codegen(context, builder, sig, args):
        features = context.codegen().magic_tuple()[2].split(",")
        return _exp_codegen(builder, args[0], "+avx512f" in features)

    return f32x16(f32x16), codegen


@intrinsic
def _vexp_portable(typingctx, v):
    """:func:`_vexp` without ``vscalefps`` (the path of CPUs without AVX-512; for tests)."""

    def codegen(context, builder, sig, args):
        return _exp_codegen(builder, args[0], False)

    return f32x16(f32x16), codegen


@njit(nogil=True, error_model="numpy", cache=True)
def exp_nonpositive(x, out, portable=False):
    """``out[:] = exp(x)`` by the kernel's vector exp (:func:`_vexp`, for ``x <= 0``; ``portable``:
    the path without AVX-512); ``x`` and ``out`` 1-D contiguous float32 of a length that is a
    multiple of 16 (for tests)."""
    xa = np.intp(x.ctypes.data)
    oa = np.intp(out.ctypes.data)
    for i in range(0, 4 * (x.size // _L * _L), 4 * _L):
        if portable:
            _vst(oa + i, _vexp_portable(_vld(xa + i)))
        else:
            _vst(oa + i, _vexp(_vld(xa + i)))


# --------------------------------------------------------------------------
# workspace
# --------------------------------------------------------------------------


def _round_up(x, m):
    return (x + m - 1) // m * m


def workspace_shapes(S, D, nthreads=None):
    """Shapes of the three float32 workspaces: K^T ``[D, Sp]``, V ``[S, Dp]`` and the score
    block (``MR`` rows of ``Sp``, then the mask row and the reciprocal row sums), per thread."""
    if nthreads is None:
        nthreads = numba.config.NUMBA_NUM_THREADS
    Sp = _round_up(max(S, 1), NR)
    Dp = _round_up(max(D, 1), NR)
    return (nthreads, max(D, 1), Sp), (nthreads, max(S, 1), Dp), (nthreads, MR + 2, Sp)


def make_workspace(S, D, nthreads=None):
    """The workspaces of :func:`workspace_shapes`, 64-byte aligned (contents irrelevant)."""
    return tuple(aligned_empty(s, np.float32) for s in workspace_shapes(S, D, nthreads))


# --------------------------------------------------------------------------
# register tiles: 8 rows x 32 columns
# --------------------------------------------------------------------------


@njit(nogil=True, error_model="numpy", cache=True)
def _tile_scores(qa, ldq, qs, nr, kta, ldk, D, sca, lds, ma, scale):
    """``sc[i, 0:32] = (Q[i, :D] . KT[:D, 0:32]) * scale + m[0:32]`` for i < 8; Q[i, d] at byte
    ``qa + min(i, nr - 1) * ldq + d * qs`` (rows past ``nr`` repeat the last one; ``qs`` is 4 for
    row-major Q, ``4 * L`` for feature-major Q), KT row d at ``kta + d * ldk``, sc row i at
    ``sca + i * lds``, the mask row at ``ma``."""
    q0 = qa
    q1 = qa + ldq * min(1, nr - 1)
    q2 = qa + ldq * min(2, nr - 1)
    q3 = qa + ldq * min(3, nr - 1)
    q4 = qa + ldq * min(4, nr - 1)
    q5 = qa + ldq * min(5, nr - 1)
    q6 = qa + ldq * min(6, nr - 1)
    q7 = qa + ldq * min(7, nr - 1)
    a00 = _vzero()
    a01 = _vzero()
    a10 = _vzero()
    a11 = _vzero()
    a20 = _vzero()
    a21 = _vzero()
    a30 = _vzero()
    a31 = _vzero()
    a40 = _vzero()
    a41 = _vzero()
    a50 = _vzero()
    a51 = _vzero()
    a60 = _vzero()
    a61 = _vzero()
    a70 = _vzero()
    a71 = _vzero()
    wo = kta
    for d in range(D):
        w0 = _vld(wo)
        w1 = _vld(wo + 64)
        wo += ldk
        o = qs * d
        x = _vbc(q0 + o)
        a00 = _vfma(x, w0, a00)
        a01 = _vfma(x, w1, a01)
        x = _vbc(q1 + o)
        a10 = _vfma(x, w0, a10)
        a11 = _vfma(x, w1, a11)
        x = _vbc(q2 + o)
        a20 = _vfma(x, w0, a20)
        a21 = _vfma(x, w1, a21)
        x = _vbc(q3 + o)
        a30 = _vfma(x, w0, a30)
        a31 = _vfma(x, w1, a31)
        x = _vbc(q4 + o)
        a40 = _vfma(x, w0, a40)
        a41 = _vfma(x, w1, a41)
        x = _vbc(q5 + o)
        a50 = _vfma(x, w0, a50)
        a51 = _vfma(x, w1, a51)
        x = _vbc(q6 + o)
        a60 = _vfma(x, w0, a60)
        a61 = _vfma(x, w1, a61)
        x = _vbc(q7 + o)
        a70 = _vfma(x, w0, a70)
        a71 = _vfma(x, w1, a71)
    s = _vset(scale)
    m0 = _vld(ma)
    m1 = _vld(ma + 64)
    _vst(sca, _vfma(a00, s, m0))
    _vst(sca + 64, _vfma(a01, s, m1))
    _vst(sca + lds, _vfma(a10, s, m0))
    _vst(sca + lds + 64, _vfma(a11, s, m1))
    _vst(sca + 2 * lds, _vfma(a20, s, m0))
    _vst(sca + 2 * lds + 64, _vfma(a21, s, m1))
    _vst(sca + 3 * lds, _vfma(a30, s, m0))
    _vst(sca + 3 * lds + 64, _vfma(a31, s, m1))
    _vst(sca + 4 * lds, _vfma(a40, s, m0))
    _vst(sca + 4 * lds + 64, _vfma(a41, s, m1))
    _vst(sca + 5 * lds, _vfma(a50, s, m0))
    _vst(sca + 5 * lds + 64, _vfma(a51, s, m1))
    _vst(sca + 6 * lds, _vfma(a60, s, m0))
    _vst(sca + 6 * lds + 64, _vfma(a61, s, m1))
    _vst(sca + 7 * lds, _vfma(a70, s, m0))
    _vst(sca + 7 * lds + 64, _vfma(a71, s, m1))


@njit(nogil=True, error_model="numpy", cache=True)
def _store_row(oa, acc0, acc1, r, nc):
    if nc >= NR:
        _vst(oa, _vmul(acc0, r))
        _vst(oa + 64, _vmul(acc1, r))
    else:
        _vstn(oa, _vmul(acc0, r), nc)
        _vstn(oa + 64, _vmul(acc1, r), nc - _L)


@njit(nogil=True, error_model="numpy", cache=True)
def _tile_context(ea, lde, S, va, ldv, ra, oa, ldo, nr, nc):
    """``out[i, 0:nc] = (E[i, :S] . V[:S, 0:32]) * r[i]`` for i < nr (<= 8): E row i at byte
    ``ea + i * lde``, V row j at ``va + j * ldv``, r at ``ra``, out row i at ``oa + i * ldo``."""
    a00 = _vzero()
    a01 = _vzero()
    a10 = _vzero()
    a11 = _vzero()
    a20 = _vzero()
    a21 = _vzero()
    a30 = _vzero()
    a31 = _vzero()
    a40 = _vzero()
    a41 = _vzero()
    a50 = _vzero()
    a51 = _vzero()
    a60 = _vzero()
    a61 = _vzero()
    a70 = _vzero()
    a71 = _vzero()
    wo = va
    for j in range(S):
        w0 = _vld(wo)
        w1 = _vld(wo + 64)
        wo += ldv
        x0 = ea + 4 * j
        x = _vbc(x0)
        a00 = _vfma(x, w0, a00)
        a01 = _vfma(x, w1, a01)
        x = _vbc(x0 + lde)
        a10 = _vfma(x, w0, a10)
        a11 = _vfma(x, w1, a11)
        x = _vbc(x0 + 2 * lde)
        a20 = _vfma(x, w0, a20)
        a21 = _vfma(x, w1, a21)
        x = _vbc(x0 + 3 * lde)
        a30 = _vfma(x, w0, a30)
        a31 = _vfma(x, w1, a31)
        x = _vbc(x0 + 4 * lde)
        a40 = _vfma(x, w0, a40)
        a41 = _vfma(x, w1, a41)
        x = _vbc(x0 + 5 * lde)
        a50 = _vfma(x, w0, a50)
        a51 = _vfma(x, w1, a51)
        x = _vbc(x0 + 6 * lde)
        a60 = _vfma(x, w0, a60)
        a61 = _vfma(x, w1, a61)
        x = _vbc(x0 + 7 * lde)
        a70 = _vfma(x, w0, a70)
        a71 = _vfma(x, w1, a71)
    _store_row(oa, a00, a01, _vbc(ra), nc)
    if nr > 1:
        _store_row(oa + ldo, a10, a11, _vbc(ra + 4), nc)
    if nr > 2:
        _store_row(oa + 2 * ldo, a20, a21, _vbc(ra + 8), nc)
    if nr > 3:
        _store_row(oa + 3 * ldo, a30, a31, _vbc(ra + 12), nc)
    if nr > 4:
        _store_row(oa + 4 * ldo, a40, a41, _vbc(ra + 16), nc)
    if nr > 5:
        _store_row(oa + 5 * ldo, a50, a51, _vbc(ra + 20), nc)
    if nr > 6:
        _store_row(oa + 6 * ldo, a60, a61, _vbc(ra + 24), nc)
    if nr > 7:
        _store_row(oa + 7 * ldo, a70, a71, _vbc(ra + 28), nc)


@njit(nogil=True, error_model="numpy", cache=True, inline="always")
def _rowmax8(sca, lds, n16):
    """The maxima of 8 rows of floats (byte address ``sca + i * lds``, ``n16`` columns, a
    multiple of 16), each broadcast to 16 lanes: the first pass of both attention kernels'
    8-row softmax.  Exact (max in any order).  Inlined at Numba IR level, so the 8 results stay
    registers in the caller."""
    r0 = sca
    r1 = sca + lds
    r2 = sca + 2 * lds
    r3 = sca + 3 * lds
    r4 = sca + 4 * lds
    r5 = sca + 5 * lds
    r6 = sca + 6 * lds
    r7 = sca + 7 * lds
    m0 = _vld(r0)
    m1 = _vld(r1)
    m2 = _vld(r2)
    m3 = _vld(r3)
    m4 = _vld(r4)
    m5 = _vld(r5)
    m6 = _vld(r6)
    m7 = _vld(r7)
    nb = 4 * n16
    for j in range(64, nb, 64):
        m0 = _vmax(_vld(r0 + j), m0)
        m1 = _vmax(_vld(r1 + j), m1)
        m2 = _vmax(_vld(r2 + j), m2)
        m3 = _vmax(_vld(r3 + j), m3)
        m4 = _vmax(_vld(r4 + j), m4)
        m5 = _vmax(_vld(r5 + j), m5)
        m6 = _vmax(_vld(r6 + j), m6)
        m7 = _vmax(_vld(r7 + j), m7)
    m0 = _vset(_hmax(m0))
    m1 = _vset(_hmax(m1))
    m2 = _vset(_hmax(m2))
    m3 = _vset(_hmax(m3))
    m4 = _vset(_hmax(m4))
    m5 = _vset(_hmax(m5))
    m6 = _vset(_hmax(m6))
    m7 = _vset(_hmax(m7))
    return m0, m1, m2, m3, m4, m5, m6, m7


@njit(nogil=True, error_model="numpy", cache=True)
def _softmax8(sca, lds, n16, ra):
    """For the 8 score rows at byte ``sca + i * lds`` (``n16`` columns, a multiple of 16):
    ``e = exp(x - max)`` in place and ``r[i] = 1 / sum(e)`` at ``ra + 4 * i``.  The 8 rows go in
    lockstep: one row at a time is a chain of dependent latencies (max, its reduction, exp, sum)
    and ran at half the speed (4 rows at a time: 1.12x slower than 8)."""
    m0, m1, m2, m3, m4, m5, m6, m7 = _rowmax8(sca, lds, n16)
    r0 = sca
    r1 = sca + lds
    r2 = sca + 2 * lds
    r3 = sca + 3 * lds
    r4 = sca + 4 * lds
    r5 = sca + 5 * lds
    r6 = sca + 6 * lds
    r7 = sca + 7 * lds
    nb = 4 * n16
    s0 = _vzero()
    s1 = _vzero()
    s2 = _vzero()
    s3 = _vzero()
    s4 = _vzero()
    s5 = _vzero()
    s6 = _vzero()
    s7 = _vzero()
    for j in range(0, nb, 64):
        e0 = _vexp(_vsub(_vld(r0 + j), m0))
        e1 = _vexp(_vsub(_vld(r1 + j), m1))
        e2 = _vexp(_vsub(_vld(r2 + j), m2))
        e3 = _vexp(_vsub(_vld(r3 + j), m3))
        e4 = _vexp(_vsub(_vld(r4 + j), m4))
        e5 = _vexp(_vsub(_vld(r5 + j), m5))
        e6 = _vexp(_vsub(_vld(r6 + j), m6))
        e7 = _vexp(_vsub(_vld(r7 + j), m7))
        _vst(r0 + j, e0)
        _vst(r1 + j, e1)
        _vst(r2 + j, e2)
        _vst(r3 + j, e3)
        _vst(r4 + j, e4)
        _vst(r5 + j, e5)
        _vst(r6 + j, e6)
        _vst(r7 + j, e7)
        s0 = _vadd(s0, e0)
        s1 = _vadd(s1, e1)
        s2 = _vadd(s2, e2)
        s3 = _vadd(s3, e3)
        s4 = _vadd(s4, e4)
        s5 = _vadd(s5, e5)
        s6 = _vadd(s6, e6)
        s7 = _vadd(s7, e7)
    one = np.float32(1.0)
    _vst_scalar(ra + 0, one / _hsum(s0))
    _vst_scalar(ra + 4, one / _hsum(s1))
    _vst_scalar(ra + 8, one / _hsum(s2))
    _vst_scalar(ra + 12, one / _hsum(s3))
    _vst_scalar(ra + 16, one / _hsum(s4))
    _vst_scalar(ra + 20, one / _hsum(s5))
    _vst_scalar(ra + 24, one / _hsum(s6))
    _vst_scalar(ra + 28, one / _hsum(s7))


@intrinsic
def _vst_scalar(typingctx, addr, x):
    def codegen(context, builder, sig, args):
        builder.store(args[1], builder.inttoptr(args[0], ir.FloatType().as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(types.intp, types.float32), codegen


@intrinsic
def _ld_scalar(typingctx, addr):
    def codegen(context, builder, sig, args):
        return builder.load(builder.inttoptr(args[0], ir.FloatType().as_pointer()), align=4)

    return types.float32(types.intp), codegen


# --------------------------------------------------------------------------
# one head
# --------------------------------------------------------------------------


@njit(nogil=True, error_model="numpy", cache=True)
def _head(qd, Wq, kd, Wk, vd, Wv, od, Wo, q_col, k_col, v_col, mask, b, h, Sq, S, D, scale, kta, vpa, pwa, Sp, Dp):
    row0 = b * S  # keys and values; the queries and the output rows start at b * Sq
    # K_h^T -> kt [D, Sp], 16 x 16 blocks by register transposes, zero columns S..Sp
    kbase = kd + 4 * (row0 * Wk + k_col + h * D)
    S16 = S // _L * _L
    D16 = D // _L * _L
    for j0 in range(0, S16, _L):
        for d0 in range(0, D16, _L):
            transpose16(kbase + 4 * (j0 * Wk + d0), Wk, kta + 4 * (d0 * Sp + j0), Sp)
    for j in range(S16, S):
        for d in range(D):
            _vst_scalar(kta + 4 * (d * Sp + j), _ld_scalar(kbase + 4 * (j * Wk + d)))
    for j in range(S16):
        for d in range(D16, D):
            _vst_scalar(kta + 4 * (d * Sp + j), _ld_scalar(kbase + 4 * (j * Wk + d)))
    for d in range(D):
        for j in range(S, Sp):
            _vst_scalar(kta + 4 * (d * Sp + j), np.float32(0.0))
    # V_h -> vp [S, Dp]
    vbase = vd + 4 * (row0 * Wv + v_col + h * D)
    for j in range(S):
        src = vbase + 4 * j * Wv
        dst = vpa + 4 * j * Dp
        for c in range(0, D16, _L):
            _vst(dst + 4 * c, _vld(src + 4 * c))
        for c in range(D16, D):
            _vst_scalar(dst + 4 * c, _ld_scalar(src + 4 * c))
        for c in range(D, Dp):
            _vst_scalar(dst + 4 * c, np.float32(0.0))
    # the mask row (-inf past S) and the reciprocal sums after the 8 score rows
    ma = pwa + 4 * MR * Sp
    ra = ma + 4 * Sp
    for j in range(Sp):
        if j >= S:
            _vst_scalar(ma + 4 * j, np.float32(-np.inf))
        elif mask is None:
            _vst_scalar(ma + 4 * j, np.float32(0.0))
        else:
            _vst_scalar(ma + 4 * j, mask[b, j])
    n16 = (S + _L - 1) // _L * _L
    lds = 4 * Sp
    for i0 in range(0, Sq, MR):
        nr = min(MR, Sq - i0)
        qa = qd + 4 * ((b * Sq + i0) * Wq + q_col + h * D)
        for j0 in range(0, S, NR):
            _tile_scores(qa, 4 * Wq, 4, nr, kta + 4 * j0, 4 * Sp, D, pwa + 4 * j0, lds, ma + 4 * j0, scale)
        _softmax8(pwa, lds, n16, ra)
        oa = od + 4 * ((b * Sq + i0) * Wo + h * D)
        for c0 in range(0, D, NR):
            _tile_context(pwa, lds, S, vpa + 4 * c0, 4 * Dp, ra, oa + 4 * c0, 4 * Wo, nr, D - c0)


@njit(nogil=True, error_model="numpy", parallel=True, cache=True)
def attention_packed(q, k, v, q_col, k_col, v_col, mask, B, S, H, D, scale, out, kt, vp, pw, nth):
    """Core kernel; see the module docstring.  ``kt, vp, pw`` from
    :func:`make_workspace`; ``nth`` (<= ``kt.shape[0]``) is the number of
    parallel slots, normally ``numba.get_num_threads()``; slot ``t`` handles
    tasks ``t, t + nth, ...`` with workspace slice ``t``.  ``q`` and ``out``
    may hold fewer query rows per batch row than the ``S`` keys (``B * Sq``
    rows, ``Sq = q.shape[0] // B``): the rows of a classifier's last layer
    that its output reads (:mod:`sparseinfer.passes.rows`)."""
    qd = np.intp(q.ctypes.data)
    kd = np.intp(k.ctypes.data)
    vd = np.intp(v.ctypes.data)
    od = np.intp(out.ctypes.data)
    Wq, Wk, Wv, Wo = q.shape[1], k.shape[1], v.shape[1], out.shape[1]
    Sp = kt.shape[2]
    Dp = vp.shape[2]
    ktd = np.intp(kt.ctypes.data)
    vpd = np.intp(vp.ctypes.data)
    pwd = np.intp(pw.ctypes.data)
    kts = kt.strides[0]
    vps = vp.strides[0]
    pws = pw.strides[0]
    ntask = B * H
    Sq = q.shape[0] // B
    for t in prange(nth):
        for task in range(t, ntask, nth):
            b = task // H
            h = task - b * H
            _head(
                qd,
                Wq,
                kd,
                Wk,
                vd,
                Wv,
                od,
                Wo,
                q_col,
                k_col,
                v_col,
                mask,
                b,
                h,
                Sq,
                S,
                D,
                scale,
                ktd + t * kts,
                vpd + t * vps,
                pwd + t * pws,
                Sp,
                Dp,
            )


def attention(q, k, v, mask, B, S, H, D, scale=None, q_col=0, k_col=0, v_col=0, out=None, workspace=None):
    """Checked entry point.  For a fused QKV projection ``qkv [B*S, 3*H*D]``
    call ``attention(qkv, qkv, qkv, mask, B, S, H, D, q_col=0, k_col=H*D,
    v_col=2*H*D)``.  ``mask`` is an additive float32 ``[B, S]`` or None.
    ``q`` may have ``B * Sq`` rows for ``Sq`` queries per batch row against
    the ``S`` keys; the result then has ``B * Sq`` rows."""
    if scale is None:
        scale = 1.0 / np.sqrt(D)
    for a, col in ((q, q_col), (k, k_col), (v, v_col)):
        if a.dtype != np.float32 or not a.flags.c_contiguous or a.ndim != 2:
            raise ValueError("q/k/v must be C-contiguous float32 2-D arrays")
        if (a.shape[0] % max(B, 1) if a is q else a.shape[0] != B * S) or col < 0 or col + H * D > a.shape[1]:
            raise ValueError("q/k/v shape does not match B, S, H, D and column offset")
    Sq = q.shape[0] // max(B, 1)
    if mask is not None:
        mask = np.ascontiguousarray(mask, dtype=np.float32)
        if mask.shape != (B, S):
            raise ValueError("mask must be additive float32 [B, S]")
    if out is None:
        out = np.empty((B * Sq, H * D), dtype=np.float32)
    if out.shape != (B * Sq, H * D) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 [{B * Sq}, {H * D}] array")
    if workspace is None:
        workspace = make_workspace(S, D)
    kt, vp, pw = workspace
    # the kernel addresses these through raw pointers: shapes, dtype and layout must be exact
    if any(a.dtype != np.float32 or not a.flags.c_contiguous for a in workspace) or tuple(a.shape[1:] for a in workspace) != tuple(
        s[1:] for s in workspace_shapes(S, D, 1)
    ):
        raise ValueError(f"workspace does not match S={S}, D={D}; use make_workspace(S, D)")
    nth = max(1, min(numba.get_num_threads(), kt.shape[0], vp.shape[0], pw.shape[0], B * H))
    attention_packed(q, k, v, q_col, k_col, v_col, mask, B, S, H, D, np.float32(scale), out, kt, vp, pw, nth)
    return out


# --------------------------------------------------------------------------
# feature-major input (the result of a sparse Dense, sparseinfer.kernels.csr)
# --------------------------------------------------------------------------


def fm_supported(S, D, L):
    """Whether :func:`attention_fm_packed` takes these shapes: ``S`` (keys = queries per batch
    row) a positive multiple of 32, so that every 32-key tile, 16 x 16 V transpose and 16-row
    output block lies inside one chunk and no key tile reaches past the batch row (no partial
    blocks, no key padding); ``D`` a positive multiple of 16 (the V and output transposes are
    whole 16 x 16 blocks); ``L`` (the lanes of the feature-major arrays) a positive multiple of
    32.  A sparse Dense chooses ``L`` = 16 only for at most 16 tokens, fewer than one ``S``."""
    return S > 0 and S % NR == 0 and D > 0 and D % _L == 0 and L > 0 and L % NR == 0


def fm_workspace_shapes(S, D, nthreads=None):
    """Shapes of the two float32 workspaces of :func:`attention_fm_packed`, per thread: V
    ``[S + 16, Dp]`` (V_h in rows ``0..S``, then the 16 staged context rows of the feature-major
    output) and the score block ``[MR + 2, S]`` (as :func:`workspace_shapes`; ``Sp = S``).  No
    K^T workspace: the scores read K_h^T where it is."""
    if nthreads is None:
        nthreads = numba.config.NUMBA_NUM_THREADS
    Sp = _round_up(max(S, 1), NR)
    Dp = _round_up(max(D, 1), NR)
    return (nthreads, Sp + 2 * MR, Dp), (nthreads, MR + 2, Sp)


def make_fm_workspace(S, D, nthreads=None):
    """The workspaces of :func:`fm_workspace_shapes`, 64-byte aligned (contents irrelevant)."""
    return tuple(aligned_empty(s, np.float32) for s in fm_workspace_shapes(S, D, nthreads))


@njit(nogil=True, error_model="numpy", cache=True)
def _head_fm(sd, Np, L, q_col, k_col, v_col, mask, b, h, S, D, scale, od, Wo, fd, Nf, Lo, fm_out, vpa, pwa, Dp):
    """One (batch, head) task of :func:`attention_fm_packed`: as :func:`_head` with ``Sq = S``;
    token ``t``, feature ``n`` of ``src`` at byte ``sd + 4 * ((t // L) * Np * L + n * L + t % L)``."""
    row0 = b * S
    cs = Np * L  # floats per chunk of src
    # V_h -> vp [S, Dp]: 16 keys x 16 features per register transpose, zero columns D..Dp
    for j0 in range(0, S, _L):
        t = row0 + j0
        va = sd + 4 * ((t // L) * cs + (v_col + h * D) * L + t % L)
        for d0 in range(0, D, _L):
            transpose16(va + 4 * d0 * L, L, vpa + 4 * (j0 * Dp + d0), Dp)
    for j in range(S):
        for c in range(D, Dp, _L):
            _vst(vpa + 4 * (j * Dp + c), _vzero())
    # the mask row and the reciprocal sums after the 8 score rows (no key padding: Sp = S)
    ma = pwa + 4 * MR * S
    ra = ma + 4 * S
    for j in range(S):
        if mask is None:
            _vst_scalar(ma + 4 * j, np.float32(0.0))
        else:
            _vst_scalar(ma + 4 * j, mask[b, j])
    lds = 4 * S
    sta = vpa + 4 * S * Dp  # 16 staged context rows [16, Dp] (feature-major output)
    for i0 in range(0, S, MR):
        t = row0 + i0
        # 8 queries: adjacent lanes of one chunk, feature d of each 4 * L bytes further
        qa = sd + 4 * ((t // L) * cs + (q_col + h * D) * L + t % L)
        for j0 in range(0, S, NR):
            tk = row0 + j0
            kta = sd + 4 * ((tk // L) * cs + (k_col + h * D) * L + tk % L)
            _tile_scores(qa, 4, 4 * L, MR, kta, 4 * L, D, pwa + 4 * j0, lds, ma + 4 * j0, scale)
        _softmax8(pwa, lds, S, ra)
        if fm_out:
            ia = sta + 4 * (i0 % (2 * MR)) * Dp
            for c0 in range(0, D, NR):
                _tile_context(pwa, lds, S, vpa + 4 * c0, 4 * Dp, ra, ia + 4 * c0, 4 * Dp, MR, D - c0)
            if i0 % (2 * MR) == MR:
                t0 = t - MR
                oa = fd + 4 * ((t0 // Lo) * Nf * Lo + h * D * Lo + t0 % Lo)
                for d0 in range(0, D, _L):
                    transpose16(sta + 4 * d0, Dp, oa + 4 * d0 * Lo, Lo)
        else:
            oa = od + 4 * (t * Wo + h * D)
            for c0 in range(0, D, NR):
                _tile_context(pwa, lds, S, vpa + 4 * c0, 4 * Dp, ra, oa + 4 * c0, 4 * Wo, MR, D - c0)


@njit(nogil=True, error_model="numpy", parallel=True, cache=True)
def attention_fm_packed(src, q_col, k_col, v_col, mask, B, S, H, D, scale, out_rows, out_fm, vp, pw, nth):
    """:func:`attention_packed` on a feature-major ``src [nch, Np, L]`` (token ``t = b * S + s``,
    feature ``n`` at ``src[t // L, n, t % L]``; the shapes of :func:`fm_supported`; as many
    queries as keys).  Writes ``out_rows [B*S, H*D]`` row-major, or, when ``out_fm`` has chunks,
    ``out_fm [nch', Nf >= H*D, L']`` feature-major (``L'`` a multiple of 16, ``nch' * L' >= B*S``)
    and then zeros in rows ``H*D..Nf`` of every chunk (block padding for the next kernel; lanes
    past ``B*S`` of the context rows are left as they were).  The unused output is an empty
    placeholder (``(0, H*D)`` / ``(0, 0, 0)``).  ``vp, pw`` from :func:`make_fm_workspace`;
    ``nth`` as for :func:`attention_packed`.  Same arithmetic in the same order as
    :func:`attention_packed`: bitwise the same result."""
    sd = np.intp(src.ctypes.data)
    Np, L = src.shape[1], src.shape[2]
    od = np.intp(out_rows.ctypes.data)
    Wo = out_rows.shape[1]
    fd = np.intp(out_fm.ctypes.data)
    nchf, Nf, Lo = out_fm.shape
    fm_out = nchf > 0
    Dp = vp.shape[2]
    vpd = np.intp(vp.ctypes.data)
    pwd = np.intp(pw.ctypes.data)
    vps = vp.strides[0]
    pws = pw.strides[0]
    ntask = B * H
    hd = H * D
    for t in prange(nth):
        if fm_out:
            for ch in range(t, nchf, nth):
                za = fd + 4 * (ch * Nf + hd) * Lo
                for i in range(0, (Nf - hd) * Lo, _L):
                    _vst(za + 4 * i, _vzero())
        for task in range(t, ntask, nth):
            b = task // H
            h = task - b * H
            _head_fm(
                sd,
                Np,
                L,
                q_col,
                k_col,
                v_col,
                mask,
                b,
                h,
                S,
                D,
                scale,
                od,
                Wo,
                fd,
                Nf,
                Lo,
                fm_out,
                vpd + t * vps,
                pwd + t * pws,
                Dp,
            )


def attention_fm(src, mask, B, S, H, D, scale=None, q_col=0, k_col=0, v_col=0, out=None, fm_out=False, workspace=None):
    """Checked entry point of :func:`attention_fm_packed`.  ``src [nch, Np, L]`` feature-major
    float32 holding at least ``B * S`` tokens (``nch * L >= B * S``), Q, K, V at feature offsets
    ``q_col, k_col, v_col``; ``mask`` as for :func:`attention`.  Returns ``out``: ``[B*S, H*D]``
    row-major, or with ``fm_out`` ``[nch', Nf >= H*D, L]`` feature-major with the lanes of
    ``src`` (allocated 64-byte aligned ``[ceil(B*S / L), H*D, L]`` when None)."""
    if scale is None:
        scale = 1.0 / np.sqrt(D)
    if B < 1 or H < 1:
        raise ValueError("B and H must be positive")
    if not isinstance(src, np.ndarray) or src.dtype != np.float32 or not src.flags.c_contiguous or src.ndim != 3:
        raise ValueError("src must be a C-contiguous float32 [nch, N, L] feature-major array")
    nch, Np, L = src.shape
    if not fm_supported(S, D, L):
        raise ValueError(f"S={S}, D={D}, L={L} not supported (S and L multiples of 32, D of 16; see fm_supported)")
    if nch * L < B * S:
        raise ValueError(f"src holds {nch * L} tokens, fewer than B*S = {B * S}")
    for col in (q_col, k_col, v_col):
        if col < 0 or col + H * D > Np:
            raise ValueError("q/k/v column offset does not fit the features of src")
    if mask is not None:
        mask = np.ascontiguousarray(mask, dtype=np.float32)
        if mask.shape != (B, S):
            raise ValueError("mask must be additive float32 [B, S]")
    hd = H * D
    nchf = -(-B * S // L)
    if out is None:
        out = aligned_empty((nchf, hd, L) if fm_out else (B * S, hd), np.float32)
    if not isinstance(out, np.ndarray) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError("out must be a C-contiguous float32 array")
    if fm_out:
        if out.ndim != 3 or out.shape[0] < nchf or out.shape[1] < hd or out.shape[2] != L:
            raise ValueError(f"out must be feature-major [>= {nchf}, >= {hd}, {L}]")
        out_rows, out_fm = np.empty((0, hd), np.float32), out
    else:
        if out.shape != (B * S, hd):
            raise ValueError(f"out must be a C-contiguous float32 [{B * S}, {hd}] array")
        out_rows, out_fm = out, np.empty((0, 0, 0), np.float32)
    if workspace is None:
        workspace = make_fm_workspace(S, D)
    vp, pw = workspace
    # the kernel addresses these through raw pointers: shapes, dtype and layout must be exact
    if any(a.dtype != np.float32 or not a.flags.c_contiguous or a.ndim != 3 for a in workspace) or tuple(
        a.shape[1:] for a in workspace
    ) != tuple(s[1:] for s in fm_workspace_shapes(S, D, 1)):
        raise ValueError(f"workspace does not match S={S}, D={D}; use make_fm_workspace(S, D)")
    nth = max(1, min(numba.get_num_threads(), vp.shape[0], pw.shape[0], B * H))
    attention_fm_packed(src, q_col, k_col, v_col, mask, B, S, H, D, np.float32(scale), out_rows, out_fm, vp, pw, nth)
    return out
