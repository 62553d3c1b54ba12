"""Fused multi-head self-attention with int8 matmuls (``Engine(quantize="int8")``).

Same interface and semantics as :mod:`sparseinfer.kernels.attention` (q/k/v
2-D row-major ``[B*S, *]`` with column offsets, additive ``[B, S]`` mask, out
``[B*S, H*D]`` float32, per-thread workspace), but both matmuls of a head run
on ``vpdpbusd`` (u8 x s8 -> int32, 4 products per lane) and only the softmax
is fp32.

Quantization (per batch row b, head h)
--------------------------------------
* Q: per query row, asymmetric uint8 with a zero point: the range
  ``[min(q, 0), max(q, 0)]`` onto ``[0, 255]`` as ``DynamicQuantizeLinear``
  (but with a multiply by the reciprocal of the scale, not a division):
  ``q ~ sq[i] * (qq[i, d] - zq[i])``.
* K: per key, symmetric int8: ``sk[j] = max_d |k[j, d]| / 127``,
  ``kq = rint(k / sk)``; packed ``[ceil(D/4), Skp, 4]`` (one zmm load = 16
  keys x 4 consecutive d; D zero padded to a multiple of 4, keys to ``Skp``, a
  multiple of :data:`KB`), with the per-key sums ``ksum[j] = sum_d kq[j, d]``.
* scores ``s[i, j] = (acc - zq[i] * ksum[j]) * sq[i] * (sk[j] * scale) + mask[b, j]``,
  ``acc = sum_d qq[i, d] * kq[j, d]`` (int32, exact).
* softmax in fp32: ``e = exp(s - max_j s)`` in ``(0, 1]``, the max element
  exactly 1, quantized with the fixed scale 1/255 and no zero point:
  ``eq = rint(255 e)`` (the max element is 255).  Quantizing ``e`` rather than
  the normalised probabilities uses the whole uint8 range in every row.  The
  exp is a degree-3 polynomial for ``2^f`` (8.6e-5 relative, a fiftieth of a
  quantization step), cheaper than the Cephes ``exp_f32``.
* V: per column d over the S keys of the head, symmetric int8
  ``sv[d] = max_j |v[j, d]| / 127``; packed ``[ceil(S/4), Dcp, 4]`` (keys zero
  padded to a multiple of 4, columns to ``Dcp``, a multiple of :data:`KB`).
* ``out[i, d] = (sum_j eq[i, j] * vq[j, d]) / (255 * sum_j e) * sv[d]``, the
  sum of the fp32 ``e``.  Normalising by the quantized sum ``sum_j eq`` instead
  (an exact convex combination of the dequantized V rows) was measured less
  accurate against the fp32 kernel, up to 2.8x on the max error and 1.8x on
  the rms error (S = 384, scores with std 2.25); never clearly better: the
  keys whose ``e`` rounds to 0 carry mass, and renormalising gives it to the
  other keys instead of dropping it.  ``sum_j e >= 1`` (the max element), so
  a row of zeros or a fully masked row divides by at least 255 (uniform
  weights, as the fp32 kernel).

Measured against the fp32 kernel (B=8, H=12, D=64, random V, scale 1/8), max
``|out - fp32|`` over ``max |fp32|`` / rms error over rms output: 1.5 / 1.2 %
for scores with std 1 (Q, K ~ N(0, 1)), 2.2 / 1.7 % for std 2.25, 4.1 / 1.8 %
for std 4 (peaked rows), at S = 128; 1.1-3.7 % / 1.0-2.0 % over S = 64..384,
with and without padding masks.  The Q / K, V and e quantizations each
contribute about a third.

Quantization inputs must be finite.  Rows / columns whose max magnitude is
below 2^-64 are scaled by 2^64 (exactly) before the reciprocal is taken, so
tiny and subnormal inputs quantize without an infinite reciprocal; all-zero
rows and columns get scale 0 and quantize to 0.

Kernel design
-------------
Parallel over ``(batch, head)`` tasks in a single ``prange`` over threads, as
the fp32 kernel; each thread owns a slice of one float32 workspace
(:func:`workspace_shapes`, viewed as int32 / bytes inside; the regions are
one cache line apart so rows read and written in the same loop are not a
multiple of 4 KiB apart: that "4K aliasing" cost 12 %), no allocation in the
parallel loop.  Per head: quantize and pack K and V, then per block of
:data:`MR` = 8 query rows (its scores, 8 x S floats, stay in L1): quantize the
8 Q rows; 8 x 32 register tiles of ``vpdpbusd`` over ``D/4`` groups (16 int32
zmm accumulators, 2 loads + 8 broadcasts per 16 ``vpdpbusd``, the
:mod:`sparseinfer.kernels.int8` micro-kernel on the layouts above) into an
int32 block; then per 4 rows one pass for the dequantization, mask and row
max (exact, on order-preserving int32 keys of the floats so it vectorises)
and one for exp, quantization and row sum (the rows are short, so a pass
over 4 rows at once halves the fixed cost of the loops, 35 -> 25 ns per
row); the same 8 x 32 tile over ``S/4`` key groups for the context, whose
epilogue writes ``out``.  Indices are unsigned throughout (a signed index
makes Numba emit a wraparound select that turns contiguous accesses into
gathers).

Hot loop (``inspect_asm`` of :func:`attention_int8_packed`, AVX512-VNNI), the
same for scores and context, unrolled by 2 groups: 4 ``vmovdqu64`` + 16
``vpbroadcastd`` + 32 ``vpdpbusd zmm`` + 11 ``addq`` + ``jne``; without VNNI
``_dpbusd`` falls back to ``vpmaddwd``, see :data:`DOT_INSTRUCTION`.

Speed (Zen 5, 2 threads, same process, alternating with the fp32 kernel,
medians): B=1 S=128 0.117 ms (fp32 0.287), B=8 S=128 1.03 ms (2.35), S=64
0.048 / 0.38 ms (0.094 / 0.70), S=384 0.62 / 5.9 ms (1.95 / 16.5): 1.8-2x
at S=64, 2.3-2.5x at S=128, 2.8-3.1x at S=384.  At S=128 a head takes
~15 us on one core, of which the two matmuls are ~4.5 us (at the
``vpdpbusd`` peak); the rest is the quantization of Q, K, V (~4.5 us), the
dequantization (~2 us), the softmax (~2 us) and the output epilogue.

NumPy reference: the fp32 semantics it approximates are those of
:mod:`sparseinfer.kernels.attention` and ``sparseinfer.graph.reference.attention``;
:func:`quantize_head` and :func:`matmul_u8s8` expose the quantized operands and
the integer products for exact tests.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from sparseinfer.kernels.int8 import DOT_INSTRUCTION, HAS_VNNI, _dpbusd, _f32_from_bits, _ordered, _vbcast, _vload, _vstore, _vzero
from sparseinfer.kernels.sparse_formats import aligned_empty

__all__ = [
    "MR",
    "KB",
    "HAS_VNNI",
    "DOT_INSTRUCTION",
    "attention_int8",
    "attention_int8_packed",
    "workspace_shapes",
    "make_workspace",
    "pack_keys",
    "pack_values",
    "matmul_u8s8",
    "quantize_head",
]

MR = 8  # query rows per block / register tile
KB = 32  # keys (scores) or columns (context) per register tile: 2 zmm of int32
_ALIGN = 16  # workspace regions start on 64-byte boundaries (16 words)
_TINY = np.float32(2.0**-64)  # below this max magnitude, scale by _BIG before the reciprocal
_BIG = np.float32(2.0**64)
_ABS = np.int32(0x7FFFFFFF)
_KEY_MIN = np.int32(-(2**31) + 1)  # below the order-preserving key of any float32 but NaN


@intrinsic
def _bits_of(typingctx, x):
    """The 32 bits of a float32 as an int32."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(x), codegen


def _round_up(x, m):
    return (x + m - 1) // m * m


@njit(nogil=True, error_model="numpy", cache=True)
def _layout(S, D):
    """Word offsets of the per-thread regions and the words per thread.

    kq [Dg, Skp] words (4 int8 each), ksc / ksum [Skp], vq [Sg, Dcp] words,
    vsc / vinv / vpre [Dcp], qq [MR, Dg] words, qs / qz / rs [MR], acc [MR, max(Skp, Dcp)]
    int32, sc [MR, Skp] float32, eq [MR, Sg] words, ktmp [Dg] words (one quantized key).
    """
    Dg = (D + 3) // 4
    Sg = (S + 3) // 4
    Skp = (S + KB - 1) // KB * KB
    Dcp = (D + KB - 1) // KB * KB
    sizes = (Dg * Skp, Skp, Skp, Sg * Dcp, Dcp, Dcp, Dcp, MR * Dg, MR, MR, MR, MR * max(Skp, Dcp), MR * Skp, MR * Sg, Dg)
    offs = np.empty(len(sizes) + 1, np.int64)
    o = 0
    for r in range(len(sizes)):
        offs[r] = o
        # + one cache line: regions whose rows are read and written in the same loop (acc,
        # sc, eq) would otherwise sit a multiple of 4 KiB apart, and loads that match an earlier
        # store's address modulo 4 KiB stall (4K aliasing)
        o += (sizes[r] + _ALIGN - 1) // _ALIGN * _ALIGN + _ALIGN
    offs[len(sizes)] = o
    return offs


def workspace_shapes(S: int, D: int, nthreads: int | None = None) -> tuple[tuple[int, int]]:
    """Shape of the one float32 workspace: ``(nthreads, words per thread)``."""
    if nthreads is None:
        nthreads = numba.config.NUMBA_NUM_THREADS
    return ((int(nthreads), int(_layout(max(S, 1), max(D, 1))[-1])),)


def make_workspace(S: int, D: int, nthreads: int | None = None) -> tuple[np.ndarray]:
    """The workspace of :func:`workspace_shapes`, 64-byte aligned."""
    return tuple(aligned_empty(s, np.float32) for s in workspace_shapes(S, D, nthreads))


# --------------------------------------------------------------------------
# quantization helpers (scalar forms; the loops calling them vectorise)
# --------------------------------------------------------------------------


@njit(nogil=True, error_model="numpy", cache=True)
def _q_s8(x, inv):
    """``clip(rint(x * inv), -127, 127)`` as int32."""
    return np.int32(min(max(np.rint(x * inv), np.float32(-127.0)), np.float32(127.0)))


@njit(nogil=True, error_model="numpy", cache=True)
def _sym_scale(amax):
    """``(scale, pre, inv)`` of symmetric int8 for a max magnitude ``amax``: ``q = rint(x * pre * inv)``,
    ``x ~ q * scale``.  ``pre`` (1 or 2^64) keeps ``inv`` finite for tiny ``amax``."""
    if amax == 0:
        return np.float32(0.0), np.float32(0.0), np.float32(0.0)
    pre = _BIG if amax < _TINY else np.float32(1.0)
    return amax / np.float32(127.0), pre, np.float32(127.0) / (amax * pre)


@njit(nogil=True, error_model="numpy", cache=True)
def _prep_k(kf, kb, base, W, S, D, scale, iw, fw, u8, o_kq, o_ksc, o_ksum, o_tmp, Skp):
    """Quantize the S keys (rows ``base + j*W``, D columns) per key and pack them.

    Unsigned indices here and below: Numba's negative-index wraparound select on a signed
    index keeps LLVM from seeing contiguous accesses.  Integer sums are kept in int32
    (``np.int32(s + a)``): Numba widens ``int32 + int32`` to int64, and a vectorised loop
    with int64 lanes stores its bytes one by one."""
    Dg = np.uint64((D + 3) // 4)
    Du = np.uint64(D)
    Wu = np.uint64(W)
    Sku = np.uint64(Skp)
    tb = np.uint64(4 * o_tmp)
    tw = np.uint64(o_tmp)
    kq = np.uint64(o_kq)
    ks = np.uint64(o_ksum)
    kc = np.uint64(o_ksc)
    for d in range(Du, np.uint64(4) * Dg):
        u8[tb + d] = 0
    for j in range(np.uint64(S)):
        rb = np.uint64(base) + j * Wu
        m = np.int32(0)
        for d in range(Du):
            m = max(m, np.int32(kb[rb + d] & _ABS))
        sk, pre, inv = _sym_scale(_f32_from_bits(m))
        s = np.int32(0)
        for d in range(Du):
            a = _q_s8(kf[rb + d] * pre, inv)
            s = np.int32(s + a)
            u8[tb + d] = np.uint8(a & np.int32(255))
        for g in range(Dg):  # the 4 bytes of group g go to key j's word in row g of [Dg, Skp]
            iw[kq + g * Sku + j] = iw[tw + g]
        iw[ks + j] = s
        fw[kc + j] = sk * scale
    for g in range(Dg):
        for j in range(np.uint64(S), Sku):
            iw[kq + g * Sku + j] = 0
    for j in range(np.uint64(S), Sku):
        iw[ks + j] = 0
        fw[kc + j] = 0.0


@njit(nogil=True, error_model="numpy", cache=True)
def _prep_v(vf, vb, base, W, S, D, iw, fw, o_vq, o_vsc, o_vinv, o_vpre, Dcp):
    """Quantize V (rows ``base + j*W``) per column over the S keys and pack it."""
    Du = np.uint64(D)
    Wu = np.uint64(W)
    Dcu = np.uint64(Dcp)
    vi = np.uint64(o_vinv)
    vp = np.uint64(o_vpre)
    for d in range(Du):
        iw[vi + d] = 0
    for j in range(np.uint64(S)):
        rb = np.uint64(base) + j * Wu
        for d in range(Du):
            iw[vi + d] = max(iw[vi + d], np.int32(vb[rb + d] & _ABS))
    vs = np.uint64(o_vsc)
    for d in range(Dcu):
        if d < Du:
            sv, pre, inv = _sym_scale(_f32_from_bits(iw[vi + d]))
        else:
            sv, pre, inv = np.float32(0.0), np.float32(0.0), np.float32(0.0)
        fw[vs + d] = sv
        fw[vi + d] = inv
        fw[vp + d] = pre
    S4 = np.uint64(S // 4)
    for g in range(S4):
        r0 = np.uint64(base) + np.uint64(4) * g * Wu
        r1 = r0 + Wu
        r2 = r1 + Wu
        r3 = r2 + Wu
        ob = np.uint64(o_vq) + g * Dcu
        for d in range(Du):
            inv = fw[vi + d]
            pre = fw[vp + d]
            a = _q_s8(vf[r0 + d] * pre, inv)
            b = _q_s8(vf[r1 + d] * pre, inv)
            c = _q_s8(vf[r2 + d] * pre, inv)
            e = _q_s8(vf[r3 + d] * pre, inv)
            iw[ob + d] = (a & 255) | ((b & 255) << 8) | ((c & 255) << 16) | (e << 24)
        for d in range(Du, Dcu):
            iw[ob + d] = 0
    if S % 4:
        ob = np.uint64(o_vq) + S4 * Dcu
        for d in range(Dcu):
            iw[ob + d] = 0
        for j in range(S % 4):
            rb = np.uint64(base) + (np.uint64(4) * S4 + np.uint64(j)) * Wu
            for d in range(Du):
                a = _q_s8(vf[rb + d] * fw[vp + d], fw[vi + d])
                iw[ob + d] |= (a & 255) << (8 * j)


@njit(nogil=True, error_model="numpy", cache=True)
def _u8_params(lo, hi):
    """``(pre, inv, zp, scale)`` of the uint8 quantization of the range ``[lo, hi]`` (0 in it):
    ``q = sat(rint(x * pre * inv) + zp)``, ``x ~ scale * (q - zp)``; all zero for an empty range."""
    rng = _f32_from_bits(_ordered(hi)) - _f32_from_bits(_ordered(lo))  # >= 0; finite below 1.7e38
    if rng == 0:
        return np.float32(0.0), np.float32(0.0), np.float32(0.0), np.float32(0.0)
    pre = _BIG if rng < _TINY else np.float32(1.0)
    inv = np.float32(255.0) / (rng * pre)
    zp = min(max(np.rint(-_f32_from_bits(_ordered(lo)) * pre * inv), np.float32(0.0)), np.float32(255.0))
    return pre, inv, zp, np.float32(np.float64(rng) / 255.0)


@njit(nogil=True, error_model="numpy", cache=True)
def _q_u8(x, pre, inv, zp):
    return np.uint8(min(max(np.rint(x * pre * inv) + zp, np.float32(0.0)), np.float32(255.0)))


@njit(nogil=True, error_model="numpy", cache=True)
def _prep_q4(qf, qb, base, W, nr, D, u8, fw, iw, o_qq, ldq, o_qs, o_qz):
    """Quantize query rows ``base + i*W``, ``i < 4``, per row to uint8 with a zero point into
    bytes ``o_qq + i*ldq``; rows ``i >= nr`` (``nr`` may be <= 0) read row ``base`` (which must
    exist) and get zeros (scale 0, zero point 0)."""
    Du = np.uint64(D)
    r0 = np.uint64(base)
    r1 = np.uint64(base + (W if nr > 1 else 0))
    r2 = np.uint64(base + (2 * W if nr > 2 else 0))
    r3 = np.uint64(base + (3 * W if nr > 3 else 0))
    lo0 = np.int32(0)
    lo1 = np.int32(0)
    lo2 = np.int32(0)
    lo3 = np.int32(0)
    hi0 = np.int32(0)
    hi1 = np.int32(0)
    hi2 = np.int32(0)
    hi3 = np.int32(0)
    for d in range(Du):
        k0 = _ordered(qb[r0 + d])
        k1 = _ordered(qb[r1 + d])
        k2 = _ordered(qb[r2 + d])
        k3 = _ordered(qb[r3 + d])
        lo0 = min(lo0, k0)
        lo1 = min(lo1, k1)
        lo2 = min(lo2, k2)
        lo3 = min(lo3, k3)
        hi0 = max(hi0, k0)
        hi1 = max(hi1, k1)
        hi2 = max(hi2, k2)
        hi3 = max(hi3, k3)
    zero = np.int32(0)
    p0, i0, z0, s0 = _u8_params(lo0 if nr > 0 else zero, hi0 if nr > 0 else zero)
    p1, i1, z1, s1 = _u8_params(lo1 if nr > 1 else zero, hi1 if nr > 1 else zero)
    p2, i2, z2, s2 = _u8_params(lo2 if nr > 2 else zero, hi2 if nr > 2 else zero)
    p3, i3, z3, s3 = _u8_params(lo3 if nr > 3 else zero, hi3 if nr > 3 else zero)
    o0 = np.uint64(o_qq)
    o1 = o0 + np.uint64(ldq)
    o2 = o1 + np.uint64(ldq)
    o3 = o2 + np.uint64(ldq)
    for d in range(Du):
        u8[o0 + d] = _q_u8(qf[r0 + d], p0, i0, z0)
        u8[o1 + d] = _q_u8(qf[r1 + d], p1, i1, z1)
        u8[o2 + d] = _q_u8(qf[r2 + d], p2, i2, z2)
        u8[o3 + d] = _q_u8(qf[r3 + d], p3, i3, z3)
    fw[o_qs] = s0
    fw[o_qs + 1] = s1
    fw[o_qs + 2] = s2
    fw[o_qs + 3] = s3
    iw[o_qz] = np.int32(z0)
    iw[o_qz + 1] = np.int32(z1)
    iw[o_qz + 2] = np.int32(z2)
    iw[o_qz + 3] = np.int32(z3)


# --------------------------------------------------------------------------
# the register tile: 8 rows x 32 int32 columns
# --------------------------------------------------------------------------


@njit(nogil=True, error_model="numpy", cache=True)
def _tile(a8, aoff, lda, b8, boff, ldb, ng, c8, coff, ldc):
    """``acc[i, j] = sum_{g < ng, l < 4} a8[aoff + i*lda + 4g + l] * b8[boff + g*ldb + 4j + l]``
    (u8 x s8, i < 8, j < 32) as int32, stored at byte ``coff + i*ldc + 4j`` of ``c8``."""
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
    wo = boff
    for g in range(ng):
        w0 = _vload(b8, wo)
        w1 = _vload(b8, wo + 64)
        wo += ldb
        xo = aoff + 4 * g
        x = _vbcast(a8, xo)
        a00 = _dpbusd(a00, x, w0)
        a01 = _dpbusd(a01, x, w1)
        x = _vbcast(a8, xo + lda)
        a10 = _dpbusd(a10, x, w0)
        a11 = _dpbusd(a11, x, w1)
        x = _vbcast(a8, xo + 2 * lda)
        a20 = _dpbusd(a20, x, w0)
        a21 = _dpbusd(a21, x, w1)
        x = _vbcast(a8, xo + 3 * lda)
        a30 = _dpbusd(a30, x, w0)
        a31 = _dpbusd(a31, x, w1)
        x = _vbcast(a8, xo + 4 * lda)
        a40 = _dpbusd(a40, x, w0)
        a41 = _dpbusd(a41, x, w1)
        x = _vbcast(a8, xo + 5 * lda)
        a50 = _dpbusd(a50, x, w0)
        a51 = _dpbusd(a51, x, w1)
        x = _vbcast(a8, xo + 6 * lda)
        a60 = _dpbusd(a60, x, w0)
        a61 = _dpbusd(a61, x, w1)
        x = _vbcast(a8, xo + 7 * lda)
        a70 = _dpbusd(a70, x, w0)
        a71 = _dpbusd(a71, x, w1)
    _vstore(c8, coff, a00)
    _vstore(c8, coff + 64, a01)
    _vstore(c8, coff + 1 * ldc, a10)
    _vstore(c8, coff + 1 * ldc + 64, a11)
    _vstore(c8, coff + 2 * ldc, a20)
    _vstore(c8, coff + 2 * ldc + 64, a21)
    _vstore(c8, coff + 3 * ldc, a30)
    _vstore(c8, coff + 3 * ldc + 64, a31)
    _vstore(c8, coff + 4 * ldc, a40)
    _vstore(c8, coff + 4 * ldc + 64, a41)
    _vstore(c8, coff + 5 * ldc, a50)
    _vstore(c8, coff + 5 * ldc + 64, a51)
    _vstore(c8, coff + 6 * ldc, a60)
    _vstore(c8, coff + 6 * ldc + 64, a61)
    _vstore(c8, coff + 7 * ldc, a70)
    _vstore(c8, coff + 7 * ldc + 64, a71)


# --------------------------------------------------------------------------
# one head
# --------------------------------------------------------------------------


# 255 * 2^f on [0, 1): 1 + f (c1 + f (c2 + f c3)) fitted to the relative error of 2^f (max 8.6e-5,
# i.e. 0.02 of a quantization step at e = 1), times 255, so the exp returns the quantization input
# directly and the row max gives exactly 255 (one visible key: out = its dequantized V row)
_C0 = np.float32(255.0)
_C1 = np.float32(0.6951167583465576 * 255.0)
_C2 = np.float32(0.22764499485492706 * 255.0)
_C3 = np.float32(0.07706703990697861 * 255.0)
_LOG2E = np.float32(1.4426950408889634)


@njit(nogil=True, error_model="numpy", cache=True)
def _exp255(x):
    """255 exp(x) for x <= 0, to 8.6e-5 relative down to e^-87 (then 255 * 2^-126, 3e-36);
    ``-inf`` gives 3e-36.  Branch free, so the loop calling it vectorises."""
    t = max(x * _LOG2E, np.float32(-126.0))
    n = np.floor(t)
    f = t - n
    p = ((_C3 * f + _C2) * f + _C1) * f + _C0
    return p * _f32_from_bits(np.int32((np.int32(n) + np.int32(127)) << np.int32(23)))


@njit(nogil=True, error_model="numpy", cache=True)
def _dequant4(iw, fw, mask, b, o_acc, lda, o_ksum, o_ksc, o_sc, ldc, o_qz, o_qs, S):
    """Four query rows: ``sc[i, j] = (acc[i, j] - zq[i] * ksum[j]) * (sq[i] * ksc[j]) + mask[b, j]``;
    returns the four row maxima, exact, taken on order-preserving int32 keys (so it vectorises)."""
    a0 = np.uint64(o_acc)
    a1 = a0 + np.uint64(lda)
    a2 = a1 + np.uint64(lda)
    a3 = a2 + np.uint64(lda)
    c0 = np.uint64(o_sc)
    c1 = c0 + np.uint64(ldc)
    c2 = c1 + np.uint64(ldc)
    c3 = c2 + np.uint64(ldc)
    z0 = iw[o_qz]
    z1 = iw[o_qz + 1]
    z2 = iw[o_qz + 2]
    z3 = iw[o_qz + 3]
    s0 = fw[o_qs]
    s1 = fw[o_qs + 1]
    s2 = fw[o_qs + 2]
    s3 = fw[o_qs + 3]
    ks = np.uint64(o_ksum)
    kc = np.uint64(o_ksc)
    bu = np.uint64(b)
    m0 = _KEY_MIN
    m1 = _KEY_MIN
    m2 = _KEY_MIN
    m3 = _KEY_MIN
    for j in range(np.uint64(S)):
        k = iw[ks + j]
        f = fw[kc + j]
        x0 = np.float32(np.int32(iw[a0 + j] - z0 * k)) * (s0 * f)
        x1 = np.float32(np.int32(iw[a1 + j] - z1 * k)) * (s1 * f)
        x2 = np.float32(np.int32(iw[a2 + j] - z2 * k)) * (s2 * f)
        x3 = np.float32(np.int32(iw[a3 + j] - z3 * k)) * (s3 * f)
        if mask is not None:
            mj = mask[bu, j]
            x0 += mj
            x1 += mj
            x2 += mj
            x3 += mj
        fw[c0 + j] = x0
        fw[c1 + j] = x1
        fw[c2 + j] = x2
        fw[c3 + j] = x3
        m0 = max(m0, _ordered(_bits_of(x0)))
        m1 = max(m1, _ordered(_bits_of(x1)))
        m2 = max(m2, _ordered(_bits_of(x2)))
        m3 = max(m3, _ordered(_bits_of(x3)))
    return (
        _f32_from_bits(_ordered(m0)),
        _f32_from_bits(_ordered(m1)),
        _f32_from_bits(_ordered(m2)),
        _f32_from_bits(_ordered(m3)),
    )


@njit(nogil=True, error_model="numpy", fastmath={"reassoc", "contract"}, cache=True)
def _softmax4(fw, u8, o_sc, ldc, o_eq, lde, m0, m1, m2, m3, S):
    """Four rows: ``eq[i, j] = rint(255 e)``, ``e = exp(sc[i, j] - m_i)``; returns the four
    ``sum_j 255 e`` (fp32).  ``reassoc`` is for those sums (and lets the polynomial use FMA);
    the maxima are exact and computed before."""
    c0 = np.uint64(o_sc)
    c1 = c0 + np.uint64(ldc)
    c2 = c1 + np.uint64(ldc)
    c3 = c2 + np.uint64(ldc)
    e0 = np.uint64(o_eq)
    e1 = e0 + np.uint64(lde)
    e2 = e1 + np.uint64(lde)
    e3 = e2 + np.uint64(lde)
    t0 = np.float32(0.0)
    t1 = np.float32(0.0)
    t2 = np.float32(0.0)
    t3 = np.float32(0.0)
    for j in range(np.uint64(S)):
        x0 = _exp255(fw[c0 + j] - m0)
        x1 = _exp255(fw[c1 + j] - m1)
        x2 = _exp255(fw[c2 + j] - m2)
        x3 = _exp255(fw[c3 + j] - m3)
        t0 += x0
        t1 += x1
        t2 += x2
        t3 += x3
        u8[e0 + j] = np.uint8(np.rint(x0))
        u8[e1 + j] = np.uint8(np.rint(x1))
        u8[e2 + j] = np.uint8(np.rint(x2))
        u8[e3 + j] = np.uint8(np.rint(x3))
    return t0, t1, t2, t3


@njit(nogil=True, error_model="numpy", cache=True)
def _context_out(iw, fw, of, o_acc, o_vsc, o_out, rs, D):
    """``out[o_out + d] = acc[d] * rs * sv[d]`` for one query row (``acc * rs`` first: it is
    O(127), so a tiny ``sv`` does not underflow the product)."""
    a = np.uint64(o_acc)
    vs = np.uint64(o_vsc)
    o = np.uint64(o_out)
    for d in range(np.uint64(D)):
        of[o + d] = np.float32(iw[a + d]) * rs * fw[vs + d]


@njit(nogil=True, error_model="numpy", cache=True)
def _zero_bytes(u8, o, n):
    ou = np.uint64(o)
    for d in range(np.uint64(n)):
        u8[ou + d] = 0


@njit(nogil=True, error_model="numpy", cache=True)
def _head(qf, qb, kf, kb, vf, vb, W_q, W_k, W_v, q_col, k_col, v_col, mask, b, h, S, D, scale, of, W_o, fw, iw, u8, lay, wb):
    Dg = (D + 3) // 4
    Sg = (S + 3) // 4
    Skp = (S + KB - 1) // KB * KB
    Dcp = (D + KB - 1) // KB * KB
    o_kq = wb + lay[0]
    o_ksc = wb + lay[1]
    o_ksum = wb + lay[2]
    o_vq = wb + lay[3]
    o_vsc = wb + lay[4]
    o_vinv = wb + lay[5]
    o_vpre = wb + lay[6]
    o_qq = wb + lay[7]
    o_qs = wb + lay[8]
    o_qz = wb + lay[9]
    o_rs = wb + lay[10]
    o_acc = wb + lay[11]
    o_sc = wb + lay[12]
    o_eq = wb + lay[13]
    o_tmp = wb + lay[14]
    row0 = b * S
    _prep_k(kf, kb, row0 * W_k + k_col + h * D, W_k, S, D, scale, iw, fw, u8, o_kq, o_ksc, o_ksum, o_tmp, Skp)
    _prep_v(vf, vb, row0 * W_v + v_col + h * D, W_v, S, D, iw, fw, o_vq, o_vsc, o_vinv, o_vpre, Dcp)
    Skc = max(Skp, Dcp)  # row stride of the int32 accumulator block
    Dg4 = 4 * Dg
    # padding bytes of the Q and e rows, never written below: zero once
    for i in range(MR):
        _zero_bytes(u8, 4 * o_qq + i * Dg4 + D, Dg4 - D)
        _zero_bytes(u8, 4 * (o_eq + i * Sg) + S, 4 * Sg - S)
    for i0 in range(0, S, MR):
        nr = min(MR, S - i0)
        qbase = (row0 + i0) * W_q + q_col + h * D
        _prep_q4(qf, qb, qbase, W_q, nr, D, u8, fw, iw, 4 * o_qq, Dg4, o_qs, o_qz)
        qbase4 = qbase + 4 * W_q if nr > 4 else qbase
        _prep_q4(qf, qb, qbase4, W_q, nr - 4, D, u8, fw, iw, 4 * o_qq + 4 * Dg4, Dg4, o_qs + 4, o_qz + 4)
        # raw scores of the block: acc [MR, S] int32
        for j0 in range(0, S, KB):
            _tile(u8, 4 * o_qq, Dg4, u8, 4 * (o_kq + j0), 4 * Skp, Dg, u8, 4 * (o_acc + j0), 4 * Skc)
        for i in range(0, nr, 4):
            m0, m1, m2, m3 = _dequant4(iw, fw, mask, b, o_acc + i * Skc, Skc, o_ksum, o_ksc, o_sc + i * Skp, Skp, o_qz + i, o_qs + i, S)
            t0, t1, t2, t3 = _softmax4(fw, u8, o_sc + i * Skp, Skp, 4 * (o_eq + i * Sg), 4 * Sg, m0, m1, m2, m3, S)
            fw[o_rs + i] = np.float32(1.0) / t0
            fw[o_rs + i + 1] = np.float32(1.0) / t1
            fw[o_rs + i + 2] = np.float32(1.0) / t2
            fw[o_rs + i + 3] = np.float32(1.0) / t3
        # context of the block: acc [MR, D] int32, then out
        for c0 in range(0, D, KB):
            _tile(u8, 4 * o_eq, 4 * Sg, u8, 4 * (o_vq + c0), 4 * Dcp, Sg, u8, 4 * (o_acc + c0), 4 * Skc)
        for i in range(nr):
            _context_out(iw, fw, of, o_acc + i * Skc, o_vsc, (row0 + i0 + i) * W_o + h * D, fw[o_rs + i], D)


@njit(nogil=True, error_model="numpy", parallel=True, cache=True)
def attention_int8_packed(q, k, v, q_col, k_col, v_col, mask, B, S, H, D, scale, out, ws, nth):
    """Core kernel; see the module docstring.  ``ws`` float32 ``[>= nth, words]`` from
    :func:`make_workspace` (its only array); ``nth`` parallel slots, normally
    ``min(numba.get_num_threads(), ws.shape[0], B * H)``.  Unchecked."""
    lay = _layout(S, D)
    nw = ws.shape[1]
    fw = ws.reshape(ws.size)
    iw = fw.view(np.int32)
    u8 = fw.view(np.uint8)
    qf = q.reshape(q.size)
    kf = k.reshape(k.size)
    vf = v.reshape(v.size)
    qb = qf.view(np.int32)
    kb = kf.view(np.int32)
    vb = vf.view(np.int32)
    of = out.reshape(out.size)
    Wq, Wk, Wv, Wo = q.shape[1], k.shape[1], v.shape[1], out.shape[1]
    ntask = B * H
    for t in prange(nth):
        for task in range(t, ntask, nth):
            b = task // H
            h = task - b * H
            _head(qf, qb, kf, kb, vf, vb, Wq, Wk, Wv, q_col, k_col, v_col, mask, b, h, S, D, scale, of, Wo, fw, iw, u8, lay, t * nw)


def attention_int8(q, k, v, mask, B, S, H, D, scale=None, q_col=0, k_col=0, v_col=0, out=None, workspace=None):
    """Checked entry point (the arguments of :func:`sparseinfer.kernels.attention.attention`).
    For a fused QKV projection ``qkv [B*S, 3*H*D]`` call ``attention_int8(qkv, qkv, qkv, mask,
    B, S, H, D, q_col=0, k_col=H*D, v_col=2*H*D)``.  ``mask``: additive float32 ``[B, S]`` or None."""
    if scale is None:
        scale = 1.0 / np.sqrt(D)
    for a, col in ((q, q_col), (k, k_col), (v, v_col)):
        if a.dtype != np.float32 or not a.flags.c_contiguous or a.ndim != 2:
            raise ValueError("q/k/v must be C-contiguous float32 2-D arrays")
        if a.shape[0] != B * S or col < 0 or col + H * D > a.shape[1]:
            raise ValueError(f"q/k/v shape {a.shape} with column offset {col} does not match B={B}, S={S}, H={H}, D={D}")
    if mask is not None:
        mask = np.ascontiguousarray(mask, dtype=np.float32)
        if mask.shape != (B, S):
            raise ValueError(f"mask must be additive float32 [B, S] = [{B}, {S}], got {mask.shape}")
    if out is None:
        out = np.empty((B * S, H * D), dtype=np.float32)
    if out.shape != (B * S, H * D) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 [{B * S}, {H * D}] array")
    if workspace is None:
        workspace = make_workspace(S, D)
    (ws,) = workspace
    if ws.ndim != 2 or ws.dtype != np.float32 or not ws.flags.c_contiguous or ws.shape[1] != workspace_shapes(S, D, 1)[0][1]:
        raise ValueError(f"workspace does not match S={S}, D={D}; use make_workspace(S, D)")
    nth = max(1, min(numba.get_num_threads(), ws.shape[0], B * H))
    attention_int8_packed(q, k, v, q_col, k_col, v_col, mask, B, S, H, D, np.float32(scale), out, ws, nth)
    return out


# --------------------------------------------------------------------------
# the integer part on given operands (for exact tests)
# --------------------------------------------------------------------------


def pack_keys(kq: np.ndarray) -> np.ndarray:
    """int8 ``[N, D]`` (one row per key) -> ``[ceil(D/4), ceil(N/KB)*KB, 4]`` int8, the kernel's K layout."""
    N, D = kq.shape
    Dg, Np = (D + 3) // 4, _round_up(max(N, 1), KB)
    full = np.zeros((Np, 4 * Dg), np.int8)
    full[:N, :D] = kq
    return np.ascontiguousarray(full.reshape(Np, Dg, 4).transpose(1, 0, 2))


def pack_values(vq: np.ndarray) -> np.ndarray:
    """int8 ``[S, D]`` -> ``[ceil(S/4), ceil(D/KB)*KB, 4]`` int8, the kernel's V layout."""
    S, D = vq.shape
    Sg, Dcp = (S + 3) // 4, _round_up(max(D, 1), KB)
    full = np.zeros((4 * Sg, Dcp), np.int8)
    full[:S, :D] = vq
    return np.ascontiguousarray(full.reshape(Sg, 4, Dcp).transpose(0, 2, 1))


@njit(nogil=True, error_model="numpy", cache=True)
def _matmul_u8s8(a, bp, ld, out, acc):
    M, N = out.shape
    Kg = a.shape[1] // 4
    a8 = a.reshape(a.size)
    b8 = bp.reshape(bp.size).view(np.uint8)
    acc8 = acc.view(np.uint8)
    for i0 in range(0, M, MR):
        for j0 in range(0, N, KB):
            _tile(a8, i0 * a.shape[1], a.shape[1], b8, 4 * j0, 4 * ld, Kg, acc8, 0, 4 * KB)
            for i in range(min(MR, M - i0)):
                for j in range(min(KB, N - j0)):
                    out[i0 + i, j0 + j] = acc[i, j]


def matmul_u8s8(a: np.ndarray, packed: np.ndarray, n: int) -> np.ndarray:
    """``a @ B.T`` in int32 by the kernel's register tile: ``a`` uint8 ``[M, 4G]``, ``packed``
    int8 ``[G, Np, 4]`` (:func:`pack_keys` of ``B [n, 4G]``, or :func:`pack_values` of a ``[4G, n]``
    matrix for ``a @ V``)."""
    M = a.shape[0]
    G, Np, four = packed.shape
    if a.dtype != np.uint8 or a.ndim != 2 or a.shape[1] != 4 * G or four != 4 or Np % KB or n > Np:
        raise ValueError(f"operands do not match: a {a.dtype} {a.shape}, packed {packed.shape}, n={n}")
    Mp = _round_up(max(M, 1), MR)
    ap = np.zeros((Mp, 4 * G), np.uint8)
    ap[:M] = a
    out = np.empty((M, n), np.int32)
    _matmul_u8s8(ap, packed, Np, out, np.empty((MR, KB), np.int32))
    return out


@njit(nogil=True, error_model="numpy", cache=True)
def _quantize_head(q, k, v, q_col, k_col, v_col, b, h, S, D, scale, ws, qq, sq, zq):
    lay = _layout(S, D)
    fw = ws.reshape(ws.size)
    iw = fw.view(np.int32)
    u8 = fw.view(np.uint8)
    qf = q.reshape(q.size)
    kf = k.reshape(k.size)
    vf = v.reshape(v.size)
    Skp = (S + KB - 1) // KB * KB
    Dcp = (D + KB - 1) // KB * KB
    Dg4 = 4 * ((D + 3) // 4)
    row0 = b * S
    Wk, Wv = k.shape[1], v.shape[1]
    _prep_k(kf, kf.view(np.int32), row0 * Wk + k_col + h * D, Wk, S, D, scale, iw, fw, u8, lay[0], lay[1], lay[2], lay[14], Skp)
    _prep_v(vf, vf.view(np.int32), row0 * Wv + v_col + h * D, Wv, S, D, iw, fw, lay[3], lay[4], lay[5], lay[6], Dcp)
    for i0 in range(0, S, 4):
        nr = min(4, S - i0)
        qbase = (row0 + i0) * q.shape[1] + q_col + h * D
        _prep_q4(qf, qf.view(np.int32), qbase, q.shape[1], nr, D, u8, fw, iw, 4 * lay[7], Dg4, lay[8], lay[9])
        for d in range(D, Dg4):
            for i in range(nr):
                u8[4 * lay[7] + i * Dg4 + d] = 0
        for i in range(nr):
            for d in range(Dg4):
                qq[i0 + i, d] = u8[4 * lay[7] + i * Dg4 + d]
            sq[i0 + i] = fw[lay[8] + i]
            zq[i0 + i] = iw[lay[9] + i]
    return lay


def quantize_head(q, k, v, S, D, scale, q_col=0, k_col=0, v_col=0, b=0, h=0) -> dict[str, np.ndarray]:
    """The quantized operands the kernel computes for head ``h`` of batch row ``b`` (same
    arguments as :func:`attention_int8`), read back from its workspace: ``qq`` uint8
    ``[S, 4*ceil(D/4)]``, ``sq`` float32 [S], ``zq`` int32 [S]; ``kq`` int8 ``[ceil(D/4), Skp, 4]``,
    ``ksum`` int32 [Skp], ``ksc`` float32 [Skp] (``sk * scale``); ``vq`` int8 ``[ceil(S/4), Dcp, 4]``,
    ``sv`` float32 [Dcp].  For tests of the quantization and packing."""
    (ws,) = make_workspace(S, D, 1)
    ws[:] = np.nan  # nothing may be read that the kernel did not write
    Dg, Sg = (D + 3) // 4, (S + 3) // 4
    Skp, Dcp = _round_up(S, KB), _round_up(D, KB)
    qq = np.empty((S, 4 * Dg), np.uint8)
    sq = np.empty(S, np.float32)
    zq = np.empty(S, np.int32)
    lay = _quantize_head(q, k, v, q_col, k_col, v_col, b, h, S, D, np.float32(scale), ws, qq, sq, zq)
    w = ws[0]

    def region(r, n, dtype):
        return w[lay[r] : lay[r] + n].view(dtype).copy()

    return {
        "qq": qq,
        "sq": sq,
        "zq": zq,
        "kq": region(0, Dg * Skp, np.int8).reshape(Dg, Skp, 4),
        "ksc": region(1, Skp, np.float32),
        "ksum": region(2, Skp, np.int32),
        "vq": region(3, Sg * Dcp, np.int8).reshape(Sg, Dcp, 4),
        "sv": region(4, Dcp, np.float32),
    }
