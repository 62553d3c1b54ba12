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
parallel loop.  Below the per-head function every call takes only scalars and
raw byte addresses (``<16 x float>`` / ``<16 x i32>`` intrinsics, as the fp32
kernel): a Numba array argument of a call that is not inlined costs atomic
reference-count updates on entry and exit (and a dozen words of argument
passing); with per-tile calls taking arrays that was 15 % of the 1-thread call
(0.198 -> 0.169 ms at B=1 S=128).

Per head: quantize and pack K (16 keys at a time: per key max, scale and
quantization on vectors, the 16 quantized keys transposed by
:func:`sparseinfer.kernels.csr.transpose16` into ``[D/4, Skp]`` words) and V
(one pass for the column maxima, then 4 keys x 16 columns per packed store),
and the mask row (``-inf`` on the padding keys); then per block of :data:`MR`
= 8 query rows (its scores, 8 x S floats, stay in L1): quantize the 8 Q rows
(4 in lockstep; the next block's rows are prefetched: the rows of a head are
``W`` floats apart, too far for the hardware prefetchers; software prefetch of
K, V and Q rows gained 1-2 %); 8 x 32 register tiles of ``vpdpbusd`` over
``D/4`` groups (16 int32 zmm accumulators, 2 loads + 8 broadcasts per 16
``vpdpbusd``, the :mod:`sparseinfer.kernels.int8` micro-kernel on the layouts
above) whose epilogue does the dequantization, scale and mask and stores the
fp32 scores; an 8-row lockstep softmax (exact row max, exp, quantization to
bytes by the register form of ``vpmovdb``, row sums); the same 8 x 32 tile
over ``S/4`` key groups for the context, whose epilogue writes ``out``.  The
vector forms need ``D % 64 == 0`` (K) / ``D % 16 == 0`` (Q, V); other D use
the scalar loops (:func:`_prep_k`, :func:`_prep_v`, :func:`_prep_q4`), same
results bit for bit.  Indices in those are unsigned (a signed index makes
Numba emit a wraparound select that turns contiguous accesses into gathers).

Hot loop (``inspect_asm`` of :func:`attention_int8_packed`, AVX512-VNNI), the
same for scores and context, unrolled by 2 groups: 4 ``vmovdqu64`` + 16
``vpbroadcastd`` + 32 ``vpdpbusd zmm`` + loop overhead; without VNNI
``_dpbusd`` falls back to ``vpmaddwd``, see :data:`DOT_INSTRUCTION`; without
AVX-512 LLVM splits the 16-lane vectors.

Speed (Zen 5, 2 threads, same process, alternating calls with the previous
version of this kernel, medians of 400 rounds, load average 0.86;
``/tmp``-copy A/B script): B=1 S=128 0.085 ms (was 0.115), B=8 S=128 0.70 ms
(0.96); 150 rounds, load 0.96: B=1 S=64 0.032 ms (0.044), B=1 S=384 0.52 ms
(0.60).  The fp32 kernel (:mod:`sparseinfer.kernels.attention`) takes 0.139 ms
at B=1 S=128.  At S=128 a head takes ~13 us on one core (the 1-thread call,
12 heads: 0.169 ms): the two matmuls ~5 us, the softmax ~2 us, the rest the
quantization of Q, K, V and the per-head setup.  That quantization was mostly
chains of dependent latencies (a row's loads, max, horizontal max, the scale's
division, quantization, horizontal sum), not memory: Q / K / V of a head took
1.94 / 1.83 / 0.83 us on one core with the rows in cache, and 1.28 / 1.16 /
0.80 us once four keys go in lockstep and the four Q rows' parameters are
computed before their bytes (:func:`_prep_k64`, :func:`_prep_q16x4`).  Whole
call, same A/B as above, 600 rounds: B=1 S=128 0.0893 -> 0.0831 ms, B=8 S=128
0.726 -> 0.667 ms, B=1 S=384 0.515 -> 0.507 ms, bit-identical.  (Rows read
head-major instead of at the QKV row stride: 80.0 -> 77.4 us at B=1 S=128, not
worth a layout of its own.)

Feature-major input (:func:`attention_int8_chained`, :func:`attention_int8_fm`): when the
fused Q/K/V projection is the sparse int8 kernel, the plan has it write its result transposed
(``chain[t // L, n, t % L]``, the layout it hands FF1's result to FF2 in) and the heads are
quantized from there.  A key's or query's range is then a lane-wise max / min over the head's
D rows (16 tokens per vector), four rows of quantized keys or queries are one packed word per
lane (:func:`_pack4`; the queries' words transposed 16 x 16 into rows), and a value column's range
is a reduction along its row, its quantized keys transposed 16 columns at a time into ``vq``:
the same operands bit for bit, without the row-major path's horizontal reductions and key
transposition.  Needs ``S`` and ``D`` multiples of 64 (else the plan keeps the row-major
hand-over).  Measured (Zen 5, 2 threads, B=1 S=128 H=12 D=64, alternating calls): 97-104 ->
90-95 us for the call alone; in the 90%-pruned int8 BERT-base run, with the projection's
transposed store in place of its row-major one, the 12 attention steps 0.97-1.00 -> 0.94-0.99
ms and the run 7.30 -> 7.26 ms (same-process alternating plans, medians of 200 runs).

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
from numba.core import cgutils
from numba.extending import intrinsic

from sparseinfer.kernels.attention import _ld_scalar, _rowmax8, _vst_scalar
from sparseinfer.kernels.csr import _prefetch, transpose16
from sparseinfer.kernels.int8 import DOT_INSTRUCTION, HAS_VNNI, _dpbusd, _f32_from_bits, _ordered, _vstore, _vzero, i32x16
from sparseinfer.kernels.simd import _hmax, _hsum, _vadd, _vbc, _vld, _vmax, _vmul, _vset, _vst, _vstn, _vsub, f32x16
from sparseinfer.kernels.simd import _vzero as _fzero
from sparseinfer.kernels.sparse_formats import aligned_empty

__all__ = [
    "MR",
    "KB",
    "HAS_VNNI",
    "DOT_INSTRUCTION",
    "attention_int8",
    "attention_int8_packed",
    "attention_int8_chained",
    "attention_int8_fm",
    "chained_supported",
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


# --------------------------------------------------------------------------
# <16 x i32> / <16 x float> helpers on raw byte addresses (generic LLVM IR: without AVX-512
# LLVM splits them into narrower vectors, so the portable build keeps working)
# --------------------------------------------------------------------------

_VI32 = ir.VectorType(ir.IntType(32), 16)
_VF32 = ir.VectorType(ir.FloatType(), 16)
_VI8 = ir.VectorType(ir.IntType(8), 16)
_PF = 8  # rows prefetched ahead: the head's rows are W floats apart, too far for the hardware prefetchers


def _isplat(builder, x):
    v = builder.insert_element(ir.Constant(_VI32, None), x, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(v, ir.Constant(_VI32, None), ir.Constant(_VI32, [0] * 16))


def _fsplat(builder, x):
    v = builder.insert_element(ir.Constant(_VF32, None), x, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(v, ir.Constant(_VF32, None), ir.Constant(_VI32, [0] * 16))


def _fconst(x):
    return ir.Constant(_VF32, [float(np.float32(x))] * 16)


def _fmin(b, x, y):
    return b.select(b.fcmp_ordered("<", x, y), x, y)


def _fmax(b, x, y):
    return b.select(b.fcmp_ordered(">", x, y), x, y)


def _rint(builder, x):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VF32, [_VF32]), "llvm.rint.v16f32")
    return builder.call(fn, [x])


def _trunc8(context, builder, v):
    """The low bytes of the 16 int32 lanes of ``v``.  With AVX-512 by the register form of
    ``vpmovdb`` (a plain ``trunc`` followed by a store becomes the memory form, which is
    several times slower)."""
    if "+avx512f" in context.codegen().magic_tuple()[2].split(","):
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_VI8, [_VI32, _VI8, ir.IntType(16)]), "llvm.x86.avx512.mask.pmov.db.512"
        )
        return builder.call(fn, [v, ir.Constant(_VI8, None), ir.Constant(ir.IntType(16), 0xFFFF)])
    return builder.trunc(v, _VI8)


@intrinsic
def _ildv(typingctx, addr):
    """16 int32 from byte address ``addr``."""

    def codegen(context, builder, sig, args):
        return builder.load(builder.inttoptr(args[0], _VI32.as_pointer()), align=4)

    return i32x16(types.intp), codegen


@intrinsic
def _ibc(typingctx, addr):
    """The int32 at byte address ``addr`` in all 16 lanes."""

    def codegen(context, builder, sig, args):
        return _isplat(builder, builder.load(builder.inttoptr(args[0], ir.IntType(32).as_pointer()), align=1))

    return i32x16(types.intp), codegen


@intrinsic
def _ld_i32(typingctx, addr):
    def codegen(context, builder, sig, args):
        return builder.load(builder.inttoptr(args[0], ir.IntType(32).as_pointer()), align=4)

    return types.int32(types.intp), codegen


@intrinsic
def _st_i32(typingctx, addr, x):
    def codegen(context, builder, sig, args):
        builder.store(args[1], builder.inttoptr(args[0], ir.IntType(32).as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(types.intp, types.int32), codegen


@intrinsic
def _istv(typingctx, addr, v):
    def codegen(context, builder, sig, args):
        builder.store(args[1], builder.inttoptr(args[0], _VI32.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(types.intp, i32x16), codegen


@intrinsic
def _dq(typingctx, acc, z, k):
    """``float(acc - z * k)`` lane-wise (``z`` an int32 scalar)."""

    def codegen(context, builder, sig, args):
        zk = builder.mul(_isplat(builder, args[1]), args[2])
        return builder.sitofp(builder.sub(args[0], zk), _VF32)

    return f32x16(i32x16, types.int32, i32x16), codegen


@intrinsic
def _i2f(typingctx, acc):
    def codegen(context, builder, sig, args):
        return builder.sitofp(args[0], _VF32)

    return f32x16(i32x16), codegen


@intrinsic
def _exp255v(typingctx, x):
    """255 exp(x) on 16 lanes ``x <= 0``: ``2^t``, ``t = max(x log2(e), -126)`` split into
    ``n + f``, the polynomial of :data:`_C0` ... (by FMAs) times ``2^n`` built from its exponent
    bits; 8.6e-5 relative down to e^-87 (then 255 * 2^-126, 3e-36; ``-inf`` gives 3e-36)."""

    def codegen(context, builder, sig, args):
        def fma(a, b, c):
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VF32, [_VF32] * 3), "llvm.fma.v16f32")
            return builder.call(fn, [a, b, c])

        t = _fmax(builder, builder.fmul(args[0], _fconst(_LOG2E)), _fconst(-126.0))
        fl = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VF32, [_VF32]), "llvm.floor.v16f32")
        n = builder.call(fl, [t])
        f = builder.fsub(t, n)
        p = fma(fma(fma(_fconst(_C3), f, _fconst(_C2)), f, _fconst(_C1)), f, _fconst(_C0))
        bits = builder.shl(builder.add(builder.fptosi(n, _VI32), ir.Constant(_VI32, [127] * 16)), ir.Constant(_VI32, [23] * 16))
        return builder.fmul(p, builder.bitcast(bits, _VF32))

    return f32x16(f32x16), codegen


@intrinsic
def _st_u8(typingctx, addr, e):
    """Store ``rint(e)`` (lanes in [0, 255]) as 16 bytes at ``addr``."""

    def codegen(context, builder, sig, args):
        v = _trunc8(context, builder, builder.fptosi(_rint(builder, args[1]), _VI32))
        builder.store(v, builder.inttoptr(args[0], _VI8.as_pointer()), align=1)
        return context.get_dummy_value()

    return types.void(types.intp, f32x16), codegen


@intrinsic
def _st_i8(typingctx, addr, v):
    """Store the low bytes of the 16 int32 lanes of ``v`` at ``addr``."""

    def codegen(context, builder, sig, args):
        builder.store(_trunc8(context, builder, args[1]), builder.inttoptr(args[0], _VI8.as_pointer()), align=1)
        return context.get_dummy_value()

    return types.void(types.intp, i32x16), codegen


@intrinsic
def _qs8v(typingctx, x, pre, inv):
    """``clip(rint((x * pre) * inv), -127, 127)`` as int32 lanes (``pre``, ``inv`` vectors)."""

    def codegen(context, builder, sig, args):
        y = _rint(builder, builder.fmul(builder.fmul(args[0], args[1]), args[2]))
        y = _fmin(builder, _fmax(builder, y, _fconst(-127.0)), _fconst(127.0))
        return builder.fptosi(y, _VI32)

    return i32x16(f32x16, f32x16, f32x16), codegen


def _qu8_ir(builder, x, pre, inv, zp):
    """``clip(rint((x * pre) * inv) + zp, 0, 255)`` as int32 lanes, all four operands vectors."""
    y = builder.fadd(_rint(builder, builder.fmul(builder.fmul(x, pre), inv)), zp)
    return builder.fptosi(_fmin(builder, _fmax(builder, y, _fconst(0.0)), _fconst(255.0)), _VI32)


@intrinsic
def _qu8v(typingctx, x, pre, inv, zp):
    """``clip(rint((x * pre) * inv) + zp, 0, 255)`` as int32 lanes (scalars ``pre, inv, zp``)."""

    def codegen(context, builder, sig, args):
        return _qu8_ir(builder, args[0], *(_fsplat(builder, a) for a in args[1:]))

    return i32x16(f32x16, types.float32, types.float32, types.float32), codegen


@intrinsic
def _pack4(typingctx, a, b, c, d):
    """``(a & 255) | (b & 255) << 8 | (c & 255) << 16 | d << 24`` lane-wise."""

    def codegen(context, builder, sig, args):
        m = ir.Constant(_VI32, [255] * 16)
        r = builder.and_(args[0], m)
        r = builder.or_(r, builder.shl(builder.and_(args[1], m), ir.Constant(_VI32, [8] * 16)))
        r = builder.or_(r, builder.shl(builder.and_(args[2], m), ir.Constant(_VI32, [16] * 16)))
        return builder.or_(r, builder.shl(args[3], ir.Constant(_VI32, [24] * 16)))

    return i32x16(i32x16, i32x16, i32x16, i32x16), codegen


@intrinsic
def _iadd(typingctx, a, b):
    def codegen(context, builder, sig, args):
        return builder.add(args[0], args[1])

    return i32x16(i32x16, i32x16), codegen


def _ireduce(builder, v, op):
    for half in (8, 4, 2, 1):
        mask = [(i + half) % 16 for i in range(16)]
        v = op(v, builder.shuffle_vector(v, ir.Constant(_VI32, None), ir.Constant(_VI32, mask)))
    return builder.extract_element(v, ir.Constant(ir.IntType(32), 0))


@intrinsic
def _ihsum(typingctx, v):
    def codegen(context, builder, sig, args):
        return _ireduce(builder, args[0], builder.add)

    return types.int32(i32x16), codegen


def _ordered_ir(builder, b):
    """:func:`_ordered` on 16 int32 lanes (float bits <-> order-preserving keys, an involution)."""
    s = builder.and_(builder.ashr(b, ir.Constant(_VI32, [31] * 16)), ir.Constant(_VI32, [0x7FFFFFFF] * 16))
    return builder.xor(b, s)


@intrinsic
def _keys(typingctx, addr):
    """Order-preserving int32 keys (:func:`_ordered`) of the 16 floats at ``addr``."""

    def codegen(context, builder, sig, args):
        return _ordered_ir(builder, builder.load(builder.inttoptr(args[0], _VI32.as_pointer()), align=4))

    return i32x16(types.intp), codegen


@intrinsic
def _imin(typingctx, a, b):
    def codegen(context, builder, sig, args):
        return builder.select(builder.icmp_signed("<", args[0], args[1]), args[0], args[1])

    return i32x16(i32x16, i32x16), codegen


@intrinsic
def _imax(typingctx, a, b):
    def codegen(context, builder, sig, args):
        return builder.select(builder.icmp_signed(">", args[0], args[1]), args[0], args[1])

    return i32x16(i32x16, i32x16), codegen


@intrinsic
def _ihmin(typingctx, v):
    def codegen(context, builder, sig, args):
        return _ireduce(builder, args[0], lambda x, y: builder.select(builder.icmp_signed("<", x, y), x, y))

    return types.int32(i32x16), codegen


@intrinsic
def _ihmax(typingctx, v):
    def codegen(context, builder, sig, args):
        return _ireduce(builder, args[0], lambda x, y: builder.select(builder.icmp_signed(">", x, y), x, y))

    return types.int32(i32x16), codegen


@intrinsic
def _vabs(typingctx, v):
    def codegen(context, builder, sig, args):
        b = builder.and_(builder.bitcast(args[0], _VI32), ir.Constant(_VI32, [0x7FFFFFFF] * 16))
        return builder.bitcast(b, _VF32)

    return f32x16(f32x16), codegen


def _round_up(x, m):
    return (x + m - 1) // m * m


@njit(nogil=True, error_model="numpy", cache=True)
def _layout(S, D):
    """Word offsets of the per-thread regions and the words per thread.

    kq [Dg, Skp] words (4 int8 each), ksc / ksum [Skp], vq [Sg, Dcp] words,
    vsc / vinv / vpre [Dcp], qq [MR, Dg] words, qs / qz / rs [MR], (an empty region: the int32
    block of the scores and context, now kept in the tiles' registers), sc [MR, Skp] float32,
    eq [MR, Se] words (``Se = 4 ceil(S/16)``: whole 16-byte stores), ktmp [16, Dg] words (16
    quantized keys before their transposition), the mask row [Skp] float32; for the head from a
    feature-major projection (:func:`attention_int8_chained`): qq of all rows [Skp, Dg] words,
    their qs / qz [Skp], a transposition buffer [16, max(Sg, Dg)] words and 4 parameter vectors.
    """
    Dg = (D + 3) // 4
    Sg = (S + 3) // 4
    Skp = (S + KB - 1) // KB * KB
    Dcp = (D + KB - 1) // KB * KB
    Se = (S + 15) // 16 * 4
    sizes = (
        Dg * Skp, Skp, Skp, Sg * Dcp, Dcp, Dcp, Dcp, MR * Dg, MR, MR, MR, 0, MR * Skp, MR * Se, 16 * Dg, Skp,
        Skp * Dg, Skp, Skp, 16 * max(Sg, Dg), 64,
    )  # fmt: skip
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


@njit(nogil=True, error_model="numpy", cache=True, inline="always")
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
def _tile_acc(aa, lda, ba, ldb, ng):
    """The 16 accumulators of the register tile ``acc[i, j] = sum_{g < ng, l < 4} a8[aoff + i*lda + 4g + l]
    * b8[boff + g*ldb + 4j + l]`` (bytes at byte addresses; u8 x s8, i < 8, j < 32, int32): ``(row 0 j < 16, row 0 j >= 16, row 1, ...)``."""
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
    wo = ba
    for g in range(ng):
        w0 = _ildv(wo)
        w1 = _ildv(wo + 64)
        wo += ldb
        xo = aa + 4 * g
        x = _ibc(xo)
        a00 = _dpbusd(a00, x, w0)
        a01 = _dpbusd(a01, x, w1)
        x = _ibc(xo + lda)
        a10 = _dpbusd(a10, x, w0)
        a11 = _dpbusd(a11, x, w1)
        x = _ibc(xo + 2 * lda)
        a20 = _dpbusd(a20, x, w0)
        a21 = _dpbusd(a21, x, w1)
        x = _ibc(xo + 3 * lda)
        a30 = _dpbusd(a30, x, w0)
        a31 = _dpbusd(a31, x, w1)
        x = _ibc(xo + 4 * lda)
        a40 = _dpbusd(a40, x, w0)
        a41 = _dpbusd(a41, x, w1)
        x = _ibc(xo + 5 * lda)
        a50 = _dpbusd(a50, x, w0)
        a51 = _dpbusd(a51, x, w1)
        x = _ibc(xo + 6 * lda)
        a60 = _dpbusd(a60, x, w0)
        a61 = _dpbusd(a61, x, w1)
        x = _ibc(xo + 7 * lda)
        a70 = _dpbusd(a70, x, w0)
        a71 = _dpbusd(a71, x, w1)
    return a00, a01, a10, a11, a20, a21, a30, a31, a40, a41, a50, a51, a60, a61, a70, a71


@njit(nogil=True, error_model="numpy", cache=True)
def _tile(a8, aoff, lda, b8, boff, ldb, ng, c8, coff, ldc):
    """:func:`_tile_acc` stored at byte ``coff + i*ldc + 4j`` of ``c8``."""
    a00, a01, a10, a11, a20, a21, a30, a31, a40, a41, a50, a51, a60, a61, a70, a71 = _tile_acc(
        np.intp(a8.ctypes.data) + aoff, lda, np.intp(b8.ctypes.data) + boff, ldb, ng
    )
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
def _zero_bytes(u8, o, n):
    ou = np.uint64(o)
    for d in range(np.uint64(n)):
        u8[ou + d] = 0


@njit(nogil=True, error_model="numpy", cache=True)
def _epi_scores(sca, a0, a1, z, s, k0, k1, f0, f1, m0, m1):
    """One score row of a tile: ``float(acc - z * ksum) * (s * ksc) + mask`` (the scalar
    formula of the module docstring, lane-wise, same rounding)."""
    sv = _vset(s)
    _vst(sca, _vadd(_vmul(_dq(a0, z, k0), _vmul(sv, f0)), m0))
    _vst(sca + 64, _vadd(_vmul(_dq(a1, z, k1), _vmul(sv, f1)), m1))


@njit(nogil=True, error_model="numpy", cache=True)
def _tile_scores(aa, lda, ba, ldb, ng, qza, qsa, sca, lds, ksa, kca, ma):
    """:func:`_tile` for 32 keys with the dequantization, scale and mask in its epilogue: score
    row i (< 8) at byte address ``sca + i * lds``; the key sums, key scales and mask at byte
    addresses ``ksa, kca, ma``; the row zero points / scales at ``qza + 4 i``, ``qsa + 4 i``.  Only
    scalars and addresses cross this and the other per-block calls: an array argument costs an
    atomic reference count update per call, on a counter the threads share."""
    a00, a01, a10, a11, a20, a21, a30, a31, a40, a41, a50, a51, a60, a61, a70, a71 = _tile_acc(aa, lda, ba, ldb, ng)
    k0 = _ildv(ksa)
    k1 = _ildv(ksa + 64)
    f0 = _vld(kca)
    f1 = _vld(kca + 64)
    m0 = _vld(ma)
    m1 = _vld(ma + 64)
    _epi_scores(sca, a00, a01, _ld_i32(qza), _ld_scalar(qsa), k0, k1, f0, f1, m0, m1)
    _epi_scores(sca + lds, a10, a11, _ld_i32(qza + 4), _ld_scalar(qsa + 4), k0, k1, f0, f1, m0, m1)
    _epi_scores(sca + 2 * lds, a20, a21, _ld_i32(qza + 8), _ld_scalar(qsa + 8), k0, k1, f0, f1, m0, m1)
    _epi_scores(sca + 3 * lds, a30, a31, _ld_i32(qza + 12), _ld_scalar(qsa + 12), k0, k1, f0, f1, m0, m1)
    _epi_scores(sca + 4 * lds, a40, a41, _ld_i32(qza + 16), _ld_scalar(qsa + 16), k0, k1, f0, f1, m0, m1)
    _epi_scores(sca + 5 * lds, a50, a51, _ld_i32(qza + 20), _ld_scalar(qsa + 20), k0, k1, f0, f1, m0, m1)
    _epi_scores(sca + 6 * lds, a60, a61, _ld_i32(qza + 24), _ld_scalar(qsa + 24), k0, k1, f0, f1, m0, m1)
    _epi_scores(sca + 7 * lds, a70, a71, _ld_i32(qza + 28), _ld_scalar(qsa + 28), k0, k1, f0, f1, m0, m1)


@njit(nogil=True, error_model="numpy", cache=True)
def _epi_out(oa, a0, a1, r, sv0, sv1, nc):
    """``out[c] = (float(acc[c]) * rs) * sv[c]`` for the first ``nc`` of 32 columns."""
    x0 = _vmul(_vmul(_i2f(a0), r), sv0)
    x1 = _vmul(_vmul(_i2f(a1), r), sv1)
    if nc >= 32:
        _vst(oa, x0)
        _vst(oa + 64, x1)
    else:
        _vstn(oa, x0, nc)
        _vstn(oa + 64, x1, nc - 16)


@njit(nogil=True, error_model="numpy", cache=True)
def _tile_ctx(aa, lda, ba, ldb, ng, oa, ldo, nr, nc, rsa, sva):
    """:func:`_tile` for 32 context columns with the output in its epilogue: rows ``i < nr``
    at byte address ``oa + i * ldo``, columns ``< nc``; ``rs`` at ``rsa + 4 i``, ``sv`` at ``sva``."""
    a00, a01, a10, a11, a20, a21, a30, a31, a40, a41, a50, a51, a60, a61, a70, a71 = _tile_acc(aa, lda, ba, ldb, ng)
    s0 = _vld(sva)
    s1 = _vld(sva + 64)
    _epi_out(oa, a00, a01, _vbc(rsa), s0, s1, nc)
    if nr > 1:
        _epi_out(oa + ldo, a10, a11, _vbc(rsa + 4), s0, s1, nc)
    if nr > 2:
        _epi_out(oa + 2 * ldo, a20, a21, _vbc(rsa + 8), s0, s1, nc)
    if nr > 3:
        _epi_out(oa + 3 * ldo, a30, a31, _vbc(rsa + 12), s0, s1, nc)
    if nr > 4:
        _epi_out(oa + 4 * ldo, a40, a41, _vbc(rsa + 16), s0, s1, nc)
    if nr > 5:
        _epi_out(oa + 5 * ldo, a50, a51, _vbc(rsa + 20), s0, s1, nc)
    if nr > 6:
        _epi_out(oa + 6 * ldo, a60, a61, _vbc(rsa + 24), s0, s1, nc)
    if nr > 7:
        _epi_out(oa + 7 * ldo, a70, a71, _vbc(rsa + 28), s0, s1, nc)


@njit(nogil=True, error_model="numpy", fastmath={"reassoc", "contract"}, cache=True)
def _softmax8(sca, lds, n16, ea, lde, rsa):
    """8 score rows (byte address ``sca + i * lds``, ``n16`` columns, a multiple of 16; columns
    past S hold -inf) in lockstep: the exact row max, ``eq = rint(255 e)`` as bytes at
    ``ea + i * lde``, and ``1 / sum(255 e)`` at ``rsa + 4 i``."""
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
    s0 = _fzero()
    s1 = _fzero()
    s2 = _fzero()
    s3 = _fzero()
    s4 = _fzero()
    s5 = _fzero()
    s6 = _fzero()
    s7 = _fzero()
    eo = ea
    for j in range(0, nb, 64):
        e0 = _exp255v(_vsub(_vld(r0 + j), m0))
        e1 = _exp255v(_vsub(_vld(r1 + j), m1))
        e2 = _exp255v(_vsub(_vld(r2 + j), m2))
        e3 = _exp255v(_vsub(_vld(r3 + j), m3))
        e4 = _exp255v(_vsub(_vld(r4 + j), m4))
        e5 = _exp255v(_vsub(_vld(r5 + j), m5))
        e6 = _exp255v(_vsub(_vld(r6 + j), m6))
        e7 = _exp255v(_vsub(_vld(r7 + j), m7))
        _st_u8(eo, e0)
        _st_u8(eo + lde, e1)
        _st_u8(eo + 2 * lde, e2)
        _st_u8(eo + 3 * lde, e3)
        _st_u8(eo + 4 * lde, e4)
        _st_u8(eo + 5 * lde, e5)
        _st_u8(eo + 6 * lde, e6)
        _st_u8(eo + 7 * lde, e7)
        eo += 16
        s0 = _vadd(s0, e0)
        s1 = _vadd(s1, e1)
        s2 = _vadd(s2, e2)
        s3 = _vadd(s3, e3)
        s4 = _vadd(s4, e4)
        s5 = _vadd(s5, e5)
        s6 = _vadd(s6, e6)
        s7 = _vadd(s7, e7)
    one = np.float32(1.0)
    _vst_scalar(rsa, one / _hsum(s0))
    _vst_scalar(rsa + 4, one / _hsum(s1))
    _vst_scalar(rsa + 8, one / _hsum(s2))
    _vst_scalar(rsa + 12, one / _hsum(s3))
    _vst_scalar(rsa + 16, one / _hsum(s4))
    _vst_scalar(rsa + 20, one / _hsum(s5))
    _vst_scalar(rsa + 24, one / _hsum(s6))
    _vst_scalar(rsa + 28, one / _hsum(s7))


@njit(nogil=True, error_model="numpy", cache=True, inline="always")
def _k_absmax(ra, D):
    """The lane-wise max magnitude over the ``D`` floats of a key row at byte address ``ra``."""
    mx = _vabs(_vld(ra))
    for c in range(64, 4 * D, 64):
        mx = _vmax(mx, _vabs(_vld(ra + c)))
    return mx


@njit(nogil=True, error_model="numpy", cache=True, inline="always")
def _k_quantize(ra, ta, D, sk, pre, inv, scale, ksum, ksc):
    """A key row quantized with its ``_sym_scale`` to the bytes at ``ta``; its sum and scale stored."""
    pv = _vset(pre)
    iv = _vset(inv)
    s = _vzero()
    for c in range(0, 4 * D, 64):
        qv = _qs8v(_vld(ra + c), pv, iv)
        s = _iadd(s, qv)
        _st_i8(ta + c // 4, qv)
    _st_i32(ksum, _ihsum(s))
    _vst_scalar(ksc, sk * scale)


@njit(nogil=True, error_model="numpy", cache=True)
def _prep_k64(kd, base, W, S, D, scale, wa, o_kq, o_ksc, o_ksum, o_tmp, Skp):
    """:func:`_prep_k` for ``D % 64 == 0`` on vectors: 16 keys at a time are quantized into
    ``tmp [16, D/4]`` words and transposed (:func:`transpose16`) into ``kq [D/4, Skp]``.  Four
    keys go in lockstep: one key alone is a chain of dependent latencies (loads, max, horizontal
    max, the scale's division, quantization, horizontal sum); interleaving four took the prep of
    a head (S = 128, D = 64) from 1.83 to ~1.2 us on one core."""
    Dg = D // 4
    izero = _vzero()
    for j0 in range(0, Skp, 16):
        for jj in range(0, 16, 4):
            j = j0 + jj
            ta = wa + 4 * (o_tmp + jj * Dg)
            r0 = kd + 4 * (base + j * W)
            if j + 4 <= S:
                r1 = r0 + 4 * W
                r2 = r1 + 4 * W
                r3 = r2 + 4 * W
                for c in range(0, 4 * D, 64):
                    _prefetch(r0 + 4 * _PF * W + c)
                    _prefetch(r1 + 4 * _PF * W + c)
                    _prefetch(r2 + 4 * _PF * W + c)
                    _prefetch(r3 + 4 * _PF * W + c)
                m0 = _k_absmax(r0, D)
                m1 = _k_absmax(r1, D)
                m2 = _k_absmax(r2, D)
                m3 = _k_absmax(r3, D)
                sk0, pre0, inv0 = _sym_scale(_hmax(m0))
                sk1, pre1, inv1 = _sym_scale(_hmax(m1))
                sk2, pre2, inv2 = _sym_scale(_hmax(m2))
                sk3, pre3, inv3 = _sym_scale(_hmax(m3))
                ks = wa + 4 * (o_ksum + j)
                kc = wa + 4 * (o_ksc + j)
                _k_quantize(r0, ta, D, sk0, pre0, inv0, scale, ks, kc)
                _k_quantize(r1, ta + 4 * Dg, D, sk1, pre1, inv1, scale, ks + 4, kc + 4)
                _k_quantize(r2, ta + 8 * Dg, D, sk2, pre2, inv2, scale, ks + 8, kc + 8)
                _k_quantize(r3, ta + 12 * Dg, D, sk3, pre3, inv3, scale, ks + 12, kc + 12)
                continue
            for i in range(4):  # the last keys and the padding past S, one at a time
                ra = r0 + 4 * i * W
                if j + i < S:
                    sk, pre, inv = _sym_scale(_hmax(_k_absmax(ra, D)))
                    _k_quantize(ra, ta + 4 * i * Dg, D, sk, pre, inv, scale, wa + 4 * (o_ksum + j + i), wa + 4 * (o_ksc + j + i))
                else:
                    for c in range(0, D, 64):
                        _istv(ta + 4 * i * Dg + c, izero)
                    _st_i32(wa + 4 * (o_ksum + j + i), np.int32(0))
                    _vst_scalar(wa + 4 * (o_ksc + j + i), np.float32(0.0))
        for g0 in range(0, Dg, 16):
            transpose16(wa + 4 * (o_tmp + g0), Dg, wa + 4 * (o_kq + g0 * Skp + j0), Skp)


@njit(nogil=True, error_model="numpy", cache=True)
def _prep_v16(vd, base, W, S, D, wa, o_vq, o_vsc, o_vinv, o_vpre, Dcp):
    """:func:`_prep_v` for ``D % 16 == 0`` on vectors (16 columns x 4 keys per packed store)."""
    c0 = 0
    while c0 + 64 <= D:  # 64 columns (one 256-byte run per row) per pass
        m0 = _fzero()
        m1 = _fzero()
        m2 = _fzero()
        m3 = _fzero()
        ra = vd + 4 * (base + c0)
        for j in range(S):
            r = ra + 4 * j * W
            _prefetch(r + 4 * _PF * W)
            _prefetch(r + 4 * _PF * W + 64)
            _prefetch(r + 4 * _PF * W + 128)
            _prefetch(r + 4 * _PF * W + 192)
            m0 = _vmax(m0, _vabs(_vld(r)))
            m1 = _vmax(m1, _vabs(_vld(r + 64)))
            m2 = _vmax(m2, _vabs(_vld(r + 128)))
            m3 = _vmax(m3, _vabs(_vld(r + 192)))
        _vst(wa + 4 * (o_vinv + c0), m0)
        _vst(wa + 4 * (o_vinv + c0) + 64, m1)
        _vst(wa + 4 * (o_vinv + c0) + 128, m2)
        _vst(wa + 4 * (o_vinv + c0) + 192, m3)
        c0 += 64
    for c in range(c0, D, 16):
        mx = _fzero()
        ra = vd + 4 * (base + c)
        for j in range(S):
            mx = _vmax(mx, _vabs(_vld(ra + 4 * j * W)))
        _vst(wa + 4 * (o_vinv + c), mx)
    for d in range(Dcp):
        if d < D:
            sv, pre, inv = _sym_scale(_ld_scalar(wa + 4 * (o_vinv + d)))
        else:
            sv, pre, inv = np.float32(0.0), np.float32(0.0), np.float32(0.0)
        _vst_scalar(wa + 4 * (o_vsc + d), sv)
        _vst_scalar(wa + 4 * (o_vinv + d), inv)
        _vst_scalar(wa + 4 * (o_vpre + d), pre)
    izero = _vzero()
    fz = _fzero()
    Sg = (S + 3) // 4
    for g in range(Sg):
        r0 = vd + 4 * (base + 4 * g * W)
        oa = wa + 4 * (o_vq + g * Dcp)
        full = 4 * g + 4 <= S
        for c in range(0, D, 16):
            pv = _vld(wa + 4 * (o_vpre + c))
            iv = _vld(wa + 4 * (o_vinv + c))
            if full:
                x0 = _vld(r0 + 4 * c)
                x1 = _vld(r0 + 4 * (W + c))
                x2 = _vld(r0 + 4 * (2 * W + c))
                x3 = _vld(r0 + 4 * (3 * W + c))
            else:
                x0 = _vld(r0 + 4 * c)
                x1 = _vld(r0 + 4 * (W + c)) if 4 * g + 1 < S else fz
                x2 = _vld(r0 + 4 * (2 * W + c)) if 4 * g + 2 < S else fz
                x3 = fz
            _istv(oa + 4 * c, _pack4(_qs8v(x0, pv, iv), _qs8v(x1, pv, iv), _qs8v(x2, pv, iv), _qs8v(x3, pv, iv)))
        for c in range(D, Dcp, 16):
            _istv(oa + 4 * c, izero)


@njit(nogil=True, error_model="numpy", cache=True, inline="always")
def _q16_row(ra, oa, D, pre, inv, zp, sc, qsa, qza):
    """Quantize one row (floats at byte address ``ra``, bytes to ``oa``) with its ``_u8_params``."""
    for c in range(0, D, 16):
        _st_i8(oa + c, _qu8v(_vld(ra + 4 * c), pre, inv, zp))
    _vst_scalar(qsa, sc)
    _st_i32(qza, np.int32(zp))


@njit(nogil=True, error_model="numpy", cache=True)
def _prep_q16x4(qd, base, W, nr, D, qa, ldq, qsa, qza):
    """:func:`_prep_q4` for ``D % 16 == 0`` on vectors, 4 rows in lockstep (one row at a time is
    a chain of dependent latencies: loads, range reduction, scale, quantization): row i (< ``nr``,
    which may be <= 0) at word ``base + i * W`` of ``qd``, its bytes at ``qa + i * ldq``; rows
    ``i >= nr`` read row 0 (which must exist) and get zeros."""
    r0 = qd + 4 * base
    r1 = r0 + 4 * W if nr > 1 else r0
    r2 = r0 + 8 * W if nr > 2 else r0
    r3 = r0 + 12 * W if nr > 3 else r0
    z = _vzero()
    lo0 = z
    lo1 = z
    lo2 = z
    lo3 = z
    hi0 = z
    hi1 = z
    hi2 = z
    hi3 = z
    for c in range(0, 4 * D, 64):
        k0 = _keys(r0 + c)
        k1 = _keys(r1 + c)
        k2 = _keys(r2 + c)
        k3 = _keys(r3 + c)
        lo0 = _imin(lo0, k0)
        lo1 = _imin(lo1, k1)
        lo2 = _imin(lo2, k2)
        lo3 = _imin(lo3, k3)
        hi0 = _imax(hi0, k0)
        hi1 = _imax(hi1, k1)
        hi2 = _imax(hi2, k2)
        hi3 = _imax(hi3, k3)
    if nr <= 0:
        lo0 = z
        hi0 = z
    if nr <= 1:
        lo1 = z
        hi1 = z
    if nr <= 2:
        lo2 = z
        hi2 = z
    if nr <= 3:
        lo3 = z
        hi3 = z
    # the four rows' parameters first (each a chain of reductions and divisions), then their bytes
    p0, i0, z0, s0 = _u8_params(_ihmin(lo0), _ihmax(hi0))
    p1, i1, z1, s1 = _u8_params(_ihmin(lo1), _ihmax(hi1))
    p2, i2, z2, s2 = _u8_params(_ihmin(lo2), _ihmax(hi2))
    p3, i3, z3, s3 = _u8_params(_ihmin(lo3), _ihmax(hi3))
    _q16_row(r0, qa, D, p0, i0, z0, s0, qsa, qza)
    _q16_row(r1, qa + ldq, D, p1, i1, z1, s1, qsa + 4, qza + 4)
    _q16_row(r2, qa + 2 * ldq, D, p2, i2, z2, s2, qsa + 8, qza + 8)
    _q16_row(r3, qa + 3 * ldq, D, p3, i3, z3, s3, qsa + 12, qza + 12)


@njit(nogil=True, error_model="numpy", cache=True)
def _prep_kv(kf, kb, vf, vb, kbase, vbase, W_k, W_v, S, D, scale, fw, iw, u8, wa, lay, wb):
    """Quantize and pack K and V of one head (the vector forms where D allows)."""
    Skp = (S + KB - 1) // KB * KB
    Dcp = (D + KB - 1) // KB * KB
    if D % 64 == 0:
        _prep_k64(np.intp(kf.ctypes.data), kbase, W_k, S, D, scale, wa, wb + lay[0], wb + lay[1], wb + lay[2], wb + lay[14], Skp)
    else:
        _prep_k(kf, kb, kbase, W_k, S, D, scale, iw, fw, u8, wb + lay[0], wb + lay[1], wb + lay[2], wb + lay[14], Skp)
    if D % 16 == 0:
        _prep_v16(np.intp(vf.ctypes.data), vbase, W_v, S, D, wa, wb + lay[3], wb + lay[4], wb + lay[5], wb + lay[6], Dcp)
    else:
        _prep_v(vf, vb, vbase, W_v, S, D, iw, fw, wb + lay[3], wb + lay[4], wb + lay[5], wb + lay[6], Dcp)


@njit(nogil=True, error_model="numpy", cache=True)
def _prep_q(qf, qb, qd, qbase, W, nr, D, fw, iw, u8, wa, o_qq, o_qs, o_qz):
    """Quantize the 8 query rows ``qbase + i * W`` (``i < nr``; the others get zeros) into
    ``qq [8, 4*ceil(D/4)]`` bytes at word ``o_qq`` (padding bytes not written); ``qd`` the
    address of ``qf``.  Scalar (array) form: only for ``D % 16 != 0`` and for the tests."""
    Dg4 = 4 * ((D + 3) // 4)
    qbase4 = qbase + 4 * W if nr > 4 else qbase
    if D % 16 == 0:
        _prep_q16x4(qd, qbase, W, nr, D, wa + 4 * o_qq, Dg4, wa + 4 * o_qs, wa + 4 * o_qz)
        _prep_q16x4(qd, qbase4, W, nr - 4, D, wa + 4 * o_qq + 4 * Dg4, Dg4, wa + 4 * o_qs + 16, wa + 4 * o_qz + 16)
    else:
        _prep_q4(qf, qb, qbase, W, nr, D, u8, fw, iw, 4 * o_qq, Dg4, o_qs, o_qz)
        _prep_q4(qf, qb, qbase4, W, nr - 4, D, u8, fw, iw, 4 * o_qq + 4 * Dg4, Dg4, o_qs + 4, o_qz + 4)


# --------------------------------------------------------------------------
# Q, K and V from a feature-major projection (the sparse int8 kernel's chain layout)
# --------------------------------------------------------------------------


def _key_value(builder, k):
    """The float32 lanes of order-preserving int32 keys."""
    return builder.bitcast(_ordered_ir(builder, k), _VF32)


def _store_vectors(builder, addr, values):
    p = builder.inttoptr(addr, _VF32.as_pointer())
    for i, v in enumerate(values):
        builder.store(v, builder.gep(p, [ir.Constant(ir.IntType(32), i)]), align=4)


@intrinsic
def _sym_params_v(typingctx, amax, addr):
    """:func:`_sym_scale` on 16 lanes of max magnitudes: the vectors ``scale, pre, inv`` stored at
    byte address ``addr`` (the same divisions, so the same bits)."""

    def codegen(context, builder, sig, args):
        a = args[0]
        pre = builder.select(builder.fcmp_ordered("<", a, _fconst(_TINY)), _fconst(_BIG), _fconst(1.0))
        inv = builder.fdiv(_fconst(127.0), builder.fmul(a, pre))
        sk = builder.fdiv(a, _fconst(127.0))
        zero = builder.fcmp_ordered("==", a, _fconst(0.0))
        _store_vectors(builder, args[1], [builder.select(zero, _fconst(0.0), v) for v in (sk, pre, inv)])
        return context.get_dummy_value()

    return types.void(f32x16, types.intp), codegen


@intrinsic
def _u8_params_v(typingctx, lo, hi, addr):
    """:func:`_u8_params` on 16 lanes of key ranges: the vectors ``pre, inv, zp, scale`` stored at
    byte address ``addr`` (the same operations in the same order, so the same bits)."""

    def codegen(context, builder, sig, args):
        flo = _key_value(builder, args[0])
        rng = builder.fsub(_key_value(builder, args[1]), flo)
        pre = builder.select(builder.fcmp_ordered("<", rng, _fconst(_TINY)), _fconst(_BIG), _fconst(1.0))
        inv = builder.fdiv(_fconst(255.0), builder.fmul(rng, pre))
        zp = _rint(builder, builder.fmul(builder.fmul(builder.fsub(_fconst(-0.0), flo), pre), inv))
        zp = _fmin(builder, _fmax(builder, zp, _fconst(0.0)), _fconst(255.0))
        f64 = ir.VectorType(ir.DoubleType(), 16)
        sc = builder.fptrunc(builder.fdiv(builder.fpext(rng, f64), ir.Constant(f64, [255.0] * 16)), _VF32)
        zero = builder.fcmp_ordered("==", rng, _fconst(0.0))
        _store_vectors(builder, args[2], [builder.select(zero, _fconst(0.0), v) for v in (pre, inv, zp, sc)])
        return context.get_dummy_value()

    return types.void(i32x16, i32x16, types.intp), codegen


@intrinsic
def _qu8vv(typingctx, x, pre, inv, zp):
    """:func:`_qu8v` with a ``pre, inv, zp`` per lane."""

    def codegen(context, builder, sig, args):
        return _qu8_ir(builder, *args)

    return i32x16(f32x16, f32x16, f32x16, f32x16), codegen


@intrinsic
def _f2i(typingctx, x):
    def codegen(context, builder, sig, args):
        return builder.fptosi(args[0], _VI32)

    return i32x16(f32x16), codegen


@njit(nogil=True, error_model="numpy", cache=True, inline="always")
def _fm_addr(cd, cs, L, t):
    """Byte address of token ``t`` in column 0 of a feature-major ``chain [nchunk, N, L]`` float32
    at ``cd`` (``cs`` bytes per chunk): column ``n`` of the token is ``4 L n`` bytes further."""
    ch = t // L
    return cd + ch * cs + 4 * (t - ch * L)


@njit(nogil=True, error_model="numpy", cache=True, inline="always")
def _fm_next(a, i, L, cs):
    """``(address, lane)`` of the token 16 after the one at ``a`` (lane ``i``, a multiple of 16)."""
    i += 16
    if i == L:
        return a + cs - 4 * (L - 16), 0
    return a + 64, i


@njit(nogil=True, error_model="numpy", cache=True)
def _prep_k_fm(cd, cs, L, t0, col, S, D, scale, wa, o_kq, o_ksc, o_ksum, o_par, Skp):
    """:func:`_prep_k64` from a feature-major projection: the keys ``t0 ..`` (16 per vector) of the
    columns ``col .. col + D``.  A key's range is a lane-wise max over the D rows and four rows of
    quantized keys are one packed word per lane: no transposition.  The same bytes, sums and
    scales as :func:`_prep_k64` on the row-major projection (``S % 16 == 0``, ``D % 4 == 0``)."""
    L4 = 4 * L
    pa = wa + 4 * o_par
    for j0 in range(0, S, 16):
        a = _fm_addr(cd, cs, L, t0 + j0) + col * L4
        m0 = _vabs(_vld(a))
        m1 = _vabs(_vld(a + L4))
        for d in range(2, D, 2):
            m0 = _vmax(m0, _vabs(_vld(a + d * L4)))
            m1 = _vmax(m1, _vabs(_vld(a + (d + 1) * L4)))
        _sym_params_v(_vmax(m0, m1), pa)
        pv = _vld(pa + 64)
        iv = _vld(pa + 128)
        s = _vzero()
        for g in range(D // 4):
            r = a + 4 * g * L4
            q0 = _qs8v(_vld(r), pv, iv)
            q1 = _qs8v(_vld(r + L4), pv, iv)
            q2 = _qs8v(_vld(r + 2 * L4), pv, iv)
            q3 = _qs8v(_vld(r + 3 * L4), pv, iv)
            s = _iadd(s, _iadd(_iadd(q0, q1), _iadd(q2, q3)))
            _istv(wa + 4 * (o_kq + g * Skp + j0), _pack4(q0, q1, q2, q3))
        _istv(wa + 4 * (o_ksum + j0), s)
        _vst(wa + 4 * (o_ksc + j0), _vmul(_vld(pa), _vset(scale)))
    for j0 in range(S, Skp, 16):  # the padding keys
        for g in range(D // 4):
            _istv(wa + 4 * (o_kq + g * Skp + j0), _vzero())
        _istv(wa + 4 * (o_ksum + j0), _vzero())
        _vst(wa + 4 * (o_ksc + j0), _fzero())


@njit(nogil=True, error_model="numpy", cache=True)
def _prep_v_fm(cd, cs, L, t0, col, S, D, wa, o_vq, o_vsc, o_vinv, o_vpre, o_tmp, Dcp):
    """:func:`_prep_v16` from a feature-major projection: a column's range is a max over its row,
    its quantized keys are 4 per word along the row; 16 columns of words are transposed into the
    packed ``vq [S/4, Dcp]``.  The same bytes and scales (``S % 64 == 0``, ``D % 16 == 0``)."""
    L4 = 4 * L
    Sg = S // 4
    a0 = _fm_addr(cd, cs, L, t0) + col * L4  # the head's first token; the next 16 are 64 bytes on
    i0 = t0 % L  # (lane i0 of its chunk), or at lane 0 of the next chunk
    for d in range(D):
        a = a0 + d * L4
        i = i0
        m = _fzero()
        for _ in range(0, S, 16):
            m = _vmax(m, _vabs(_vld(a)))
            a, i = _fm_next(a, i, L, cs)
        sv, pre, inv = _sym_scale(_hmax(m))
        _vst_scalar(wa + 4 * (o_vsc + d), sv)
        _vst_scalar(wa + 4 * (o_vinv + d), inv)
        _vst_scalar(wa + 4 * (o_vpre + d), pre)
    for d in range(D, Dcp):
        _vst_scalar(wa + 4 * (o_vsc + d), np.float32(0.0))
        for g in range(Sg):
            _st_i32(wa + 4 * (o_vq + g * Dcp + d), np.int32(0))
    for d0 in range(0, D, 16):
        for dd in range(16):
            d = d0 + dd
            a = a0 + d * L4
            i = i0
            pv = _vset(_ld_scalar(wa + 4 * (o_vpre + d)))
            iv = _vset(_ld_scalar(wa + 4 * (o_vinv + d)))
            ta = wa + 4 * (o_tmp + dd * Sg)
            for j0 in range(0, S, 16):
                _st_i8(ta + j0, _qs8v(_vld(a), pv, iv))
                a, i = _fm_next(a, i, L, cs)
        for g0 in range(0, Sg, 16):
            transpose16(wa + 4 * (o_tmp + g0), Sg, wa + 4 * (o_vq + g0 * Dcp + d0), Dcp)


@njit(nogil=True, error_model="numpy", cache=True)
def _prep_q_fm(cd, cs, L, t0, col, S, D, wa, o_qq, o_qs, o_qz, o_tmp, o_par):
    """:func:`_prep_q16x4` from a feature-major projection, all ``S`` query rows (16 per
    vector) into ``qq [S, D/4]`` words, ``qs``, ``qz [S]``: a row's range is a lane-wise min / max
    over the D rows, four quantized rows are one word per lane, and 16 x 16 words are transposed
    into rows.  The same bytes and parameters (``S % 16 == 0``, ``D % 64 == 0``)."""
    L4 = 4 * L
    Dg = D // 4
    pa = wa + 4 * o_par
    for i0 in range(0, S, 16):
        a = _fm_addr(cd, cs, L, t0 + i0) + col * L4
        lo = _vzero()
        hi = _vzero()
        for d in range(D):
            k = _keys(a + d * L4)
            lo = _imin(lo, k)
            hi = _imax(hi, k)
        _u8_params_v(lo, hi, pa)
        pv = _vld(pa)
        iv = _vld(pa + 64)
        zv = _vld(pa + 128)
        _vst(wa + 4 * (o_qs + i0), _vld(pa + 192))
        _istv(wa + 4 * (o_qz + i0), _f2i(zv))
        for g in range(Dg):
            r = a + 4 * g * L4
            q0 = _qu8vv(_vld(r), pv, iv, zv)
            q1 = _qu8vv(_vld(r + L4), pv, iv, zv)
            q2 = _qu8vv(_vld(r + 2 * L4), pv, iv, zv)
            q3 = _qu8vv(_vld(r + 3 * L4), pv, iv, zv)
            _istv(wa + 4 * (o_tmp + 16 * g), _pack4(q0, q1, q2, q3))
        for g0 in range(0, Dg, 16):
            transpose16(wa + 4 * (o_tmp + 16 * g0), 16, wa + 4 * (o_qq + i0 * Dg + g0), Dg)


@njit(nogil=True, error_model="numpy", cache=True)
def _head_fm(cd, cs, L, q_col, k_col, v_col, mask, b, h, S, D, scale, of, W_o, fw, iw, u8, lay, wb):
    """:func:`_head` on a feature-major projection (:func:`attention_int8_chained`)."""
    Skp = (S + KB - 1) // KB * KB
    Dcp = (D + KB - 1) // KB * KB
    wa = np.intp(fw.ctypes.data)
    t0 = b * S
    _prep_k_fm(cd, cs, L, t0, k_col + h * D, S, D, scale, wa, wb + lay[0], wb + lay[1], wb + lay[2], wb + lay[20], Skp)
    _prep_v_fm(cd, cs, L, t0, v_col + h * D, S, D, wa, wb + lay[3], wb + lay[4], wb + lay[5], wb + lay[6], wb + lay[19], Dcp)
    _prep_q_fm(cd, cs, L, t0, q_col + h * D, S, D, wa, wb + lay[16], wb + lay[17], wb + lay[18], wb + lay[19], wb + lay[20])
    _attend(fw, iw, 0, 0, True, mask, b, h, S, D, of, W_o, fw, iw, u8, lay, wb)


@njit(nogil=True, error_model="numpy", cache=True)
def _head(qf, qb, kf, kb, vf, vb, W_q, W_k, W_v, q_col, k_col, v_col, mask, b, h, S, D, scale, of, W_o, fw, iw, u8, lay, wb):
    Skp = (S + KB - 1) // KB * KB
    Dcp = (D + KB - 1) // KB * KB
    wa = np.intp(fw.ctypes.data)
    row0 = b * S
    kbase = row0 * W_k + k_col + h * D
    vbase = row0 * W_v + v_col + h * D
    if D % 64 == 0:  # the vector forms, on addresses only
        _prep_k64(np.intp(kf.ctypes.data), kbase, W_k, S, D, scale, wa, wb + lay[0], wb + lay[1], wb + lay[2], wb + lay[14], Skp)
        _prep_v16(np.intp(vf.ctypes.data), vbase, W_v, S, D, wa, wb + lay[3], wb + lay[4], wb + lay[5], wb + lay[6], Dcp)
    else:
        _prep_kv(kf, kb, vf, vb, kbase, vbase, W_k, W_v, S, D, scale, fw, iw, u8, wa, lay, wb)
    _attend(qf, qb, W_q, row0 * W_q + q_col + h * D, False, mask, b, h, S, D, of, W_o, fw, iw, u8, lay, wb)


@njit(nogil=True, error_model="numpy", cache=True)
def _attend(qf, qb, W_q, qbase0, qall, mask, b, h, S, D, of, W_o, fw, iw, u8, lay, wb):
    """The part of a head after K and V are packed: the mask row, then per block of ``MR`` query
    rows their scores, softmax and context.  ``qall``: the Q rows are already quantized, all of
    them (:func:`_prep_q_fm`, in the regions 16-18); else each block quantizes its rows from
    ``qf`` (row ``i`` at word ``qbase0 + i * W_q``)."""
    Dg = (D + 3) // 4
    Sg = (S + 3) // 4
    Skp = (S + KB - 1) // KB * KB
    Dcp = (D + KB - 1) // KB * KB
    Se = (S + 15) // 16 * 4  # words per e row: whole 16-byte stores
    wa = np.intp(fw.ctypes.data)
    oad = np.intp(of.ctypes.data)
    o_kq = wb + lay[0]
    o_ksc = wb + lay[1]
    o_ksum = wb + lay[2]
    o_vq = wb + lay[3]
    o_vsc = wb + lay[4]
    o_qq = wb + lay[7]
    o_qs = wb + lay[8]
    o_qz = wb + lay[9]
    o_rs = wb + lay[10]
    o_sc = wb + lay[12]
    o_eq = wb + lay[13]
    o_m = wb + lay[15]
    row0 = b * S
    # the mask row, -inf on the padding keys (their scores must not reach the row max)
    for j in range(Skp):
        if j >= S:
            fw[o_m + j] = -np.inf
        elif mask is None:
            fw[o_m + j] = 0.0
        else:
            fw[o_m + j] = mask[b, j]
    Dg4 = 4 * Dg
    # padding bytes of the Q rows, never written below: zero once
    for i in range(MR):
        _zero_bytes(u8, 4 * o_qq + i * Dg4 + D, Dg4 - D)
    n16 = Se * 4
    lds = 4 * Skp
    qd = np.intp(qf.ctypes.data)
    qvec = D % 16 == 0
    for i0 in range(0, S, MR):
        nr = min(MR, S - i0)
        qbase = qbase0 + i0 * W_q
        if qall:  # quantized before, all rows: this block's are at row i0
            o_qq = wb + lay[16] + i0 * Dg
            o_qs = wb + lay[17] + i0
            o_qz = wb + lay[18] + i0
        elif qvec:  # the vector form, on addresses only
            qbase4 = qbase + 4 * W_q if nr > 4 else qbase
            _prep_q16x4(qd, qbase, W_q, nr, D, wa + 4 * o_qq, Dg4, wa + 4 * o_qs, wa + 4 * o_qz)
            _prep_q16x4(qd, qbase4, W_q, nr - 4, D, wa + 4 * o_qq + 4 * Dg4, Dg4, wa + 4 * o_qs + 16, wa + 4 * o_qz + 16)
        else:
            _prep_q(qf, qb, qd, qbase, W_q, nr, D, fw, iw, u8, wa, o_qq, o_qs, o_qz)
        if qvec and not qall:  # the next block's query rows, while this block computes
            nb = min(MR, S - i0 - MR)
            for i in range(nb):
                r = qd + 4 * (qbase + (MR + i) * W_q)
                for c in range(0, 4 * D, 64):
                    _prefetch(r + c)
        for j0 in range(0, S, KB):
            _tile_scores(
                wa + 4 * o_qq,
                Dg4,
                wa + 4 * (o_kq + j0),
                4 * Skp,
                Dg,
                wa + 4 * o_qz,
                wa + 4 * o_qs,
                wa + 4 * (o_sc + j0),
                lds,
                wa + 4 * (o_ksum + j0),
                wa + 4 * (o_ksc + j0),
                wa + 4 * (o_m + j0),
            )
        _softmax8(wa + 4 * o_sc, lds, n16, wa + 4 * o_eq, 4 * Se, wa + 4 * o_rs)
        oa = oad + 4 * ((row0 + i0) * W_o + h * D)
        for c0 in range(0, D, KB):
            _tile_ctx(
                wa + 4 * o_eq,
                4 * Se,
                wa + 4 * (o_vq + c0),
                4 * Dcp,
                Sg,
                oa + 4 * c0,
                4 * W_o,
                nr,
                D - c0,
                wa + 4 * o_rs,
                wa + 4 * (o_vsc + c0),
            )


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


@njit(nogil=True, error_model="numpy", parallel=True, cache=True)
def attention_int8_chained(chain, q_col, k_col, v_col, mask, B, S, H, D, scale, out, ws, nth):
    """:func:`attention_int8_packed` with Q, K and V read from a feature-major projection:
    ``chain [nchunk, N, L]`` float32, token ``t`` of column ``n`` at ``chain[t // L, n, t % L]``
    (the layout the sparse int8 kernel writes with ``CHAIN_WRITE``); the heads' columns start at
    ``q_col``, ``k_col``, ``v_col``.  Needs ``S % 64 == 0`` and ``D % 64 == 0``.  Unchecked."""
    lay = _layout(S, D)
    nw = ws.shape[1]
    fw = ws.reshape(ws.size)
    iw = fw.view(np.int32)
    u8 = fw.view(np.uint8)
    of = out.reshape(out.size)
    L = chain.shape[2]
    cs = chain.shape[1] * L * 4
    cd = np.intp(chain.ctypes.data)
    Wo = out.shape[1]
    ntask = B * H
    for t in prange(nth):
        for task in range(t, ntask, nth):
            b = task // H
            h = task - b * H
            _head_fm(cd, cs, L, q_col, k_col, v_col, mask, b, h, S, D, scale, of, Wo, fw, iw, u8, lay, t * nw)


def _checked_rest(mask, B, S, H, D, out, workspace):
    """The checks the two entry points share: ``(mask, out, ws, nth)``."""
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
    return mask, out, ws, max(1, min(numba.get_num_threads(), ws.shape[0], B * H))


def chained_supported(S: int, D: int) -> bool:
    """Whether :func:`attention_int8_chained` takes heads of ``S`` keys and ``D`` columns."""
    return S > 0 and D > 0 and S % 64 == 0 and D % 64 == 0


def attention_int8_fm(chain, mask, B, S, H, D, scale=None, q_col=0, k_col=0, v_col=0, out=None, workspace=None):
    """Checked entry point of :func:`attention_int8_chained`: ``chain [nchunk, N, L]`` float32 holds
    the projection feature-major (``chain[t // L, n, t % L]`` = row ``t``, column ``n`` of
    :func:`attention_int8`'s ``q``); the other arguments and the result as :func:`attention_int8`,
    equal to it bit for bit."""
    if scale is None:
        scale = 1.0 / np.sqrt(D)
    if not chained_supported(S, D):
        raise ValueError(f"the feature-major attention needs S and D multiples of 64, got S={S}, D={D}; use attention_int8")
    if chain.dtype != np.float32 or chain.ndim != 3 or not chain.flags.c_contiguous or chain.shape[2] % 16:
        raise ValueError("chain must be a C-contiguous float32 [nchunk, N, L] array, L a multiple of 16")
    if chain.shape[0] * chain.shape[2] < B * S:
        raise ValueError(f"chain of shape {chain.shape} holds fewer than B*S = {B * S} tokens")
    for col in (q_col, k_col, v_col):
        if col < 0 or col + H * D > chain.shape[1]:
            raise ValueError(f"column offset {col} + H*D = {H * D} exceeds the chain's {chain.shape[1]} columns")
    mask, out, ws, nth = _checked_rest(mask, B, S, H, D, out, workspace)
    attention_int8_chained(chain, q_col, k_col, v_col, mask, B, S, H, D, np.float32(scale), out, ws, nth)
    return out


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
    mask, out, ws, nth = _checked_rest(mask, B, S, H, D, out, workspace)
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
    Dg4 = 4 * ((D + 3) // 4)
    row0 = b * S
    Wk, Wv = k.shape[1], v.shape[1]
    wa = np.intp(fw.ctypes.data)
    _prep_kv(
        kf,
        kf.view(np.int32),
        vf,
        vf.view(np.int32),
        row0 * Wk + k_col + h * D,
        row0 * Wv + v_col + h * D,
        Wk,
        Wv,
        S,
        D,
        scale,
        fw,
        iw,
        u8,
        wa,
        lay,
        0,
    )
    for i0 in range(0, S, MR):
        nr = min(MR, S - i0)
        qbase = (row0 + i0) * q.shape[1] + q_col + h * D
        _prep_q(qf, qf.view(np.int32), np.intp(qf.ctypes.data), qbase, q.shape[1], nr, D, fw, iw, u8, wa, lay[7], lay[8], lay[9])
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
