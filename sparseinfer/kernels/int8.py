"""Dense int8 matrix multiplication with a fused dequantization epilogue.

    out = act((xq - zp_x) @ Wq * scale_x[m] * scale_w[n] + bias) + residual

Quantization scheme
-------------------
* Weights: symmetric, per output channel, int8 in ``[-127, 127]``:
  ``scale_w[n] = max_k |W[k, n]| / 127``, ``Wq = rint(W / scale_w)``
  (:func:`pack_weight_int8`, at plan time).
* Activations: dynamic, per row (token), asymmetric uint8, exactly
  ``DynamicQuantizeLinear`` applied to each row
  (:func:`sparseinfer.graph.reference.dynamic_quantize_linear`):
  the range ``[min(x, 0), max(x, 0)]`` is mapped onto ``[0, 255]`` with
  ``scale = (hi - lo) / 255``, ``zp = rint(-lo / scale)``,
  ``xq = sat(rint(x / scale) + zp)`` (:func:`quantize_rows`).
  Unsigned activations are what VNNI wants (``vpdpbusd`` multiplies *unsigned*
  bytes by *signed* bytes); a symmetric int8 activation would have to be
  shifted by 128 to feed it, i.e. it is the same kernel with ``zp = 128``
  and half the resolution, so there is no symmetric variant.
* Accumulation in int32: ``acc[m, n] = sum_k xq[m, k] * Wq[k, n]``; the zero
  point is removed in the epilogue with the column sums of ``Wq``:
  ``sum_k (xq - zp) * Wq = acc - zp * colsum[n]`` (exact in int32 for
  ``K <= MAX_K``).

Packing: ``Wq`` is stored as ``[ceil(N / NR) panels][ceil(K / 4)][NR][4]``
int8, i.e. the 4 consecutive ``k`` of one output column share a 32-bit lane;
``K`` is zero padded to a multiple of 4 and ``N`` to a multiple of ``NR``.
The quantized activations are ``[M, Kp]`` uint8 with ``Kp = 4 * ceil(K / 4)``
(the padding bytes hold the zero point, so they dequantize to 0).

Kernel design
-------------
The micro-kernel keeps an ``MR x NR`` = 8 x 32 block of int32 accumulators in
16 zmm registers.  Per group of 4 ``k`` it loads two 64-byte vectors of the
packed panel (32 columns x 4 k), broadcasts 4 bytes of each of the 8 rows of
``xq`` and issues 16 ``vpdpbusd`` (the non-saturating form: the 4 u8 x s8
products are summed into the int32 lane without intermediate saturation, as
the integer algebra above assumes; not ``vpdpbusds``, which saturates the
lane, nor ``vpmaddubsw``, which saturates pairs of products to int16).
The vectors are a Numba type of their own (:class:`I32x16`, an LLVM
``<16 x i32>``), so the accumulators are SSA values and need no help from
SROA; ``_dpbusd`` emits ``llvm.x86.avx512.vpdpbusd.512`` when the target has
AVX512-VNNI.  Otherwise it emulates it exactly with 16-bit lanes: the low
bytes (k = 0, 2) and the high bytes (k = 1, 3) of each 32-bit lane,
zero-extended for ``xq`` and sign-extended for ``Wq``, each go through one
``pmaddwd`` (``llvm.x86.avx512.pmaddw.d.512`` with AVX512-BW, two
``llvm.x86.avx2.pmadd.wd`` with AVX2, generic IR elsewhere).  The choice is
made when the kernel is compiled, from the CPU features Numba targets (also
part of Numba's cache key), see :data:`DOT_INSTRUCTION`; the planner can
read it to prefer fp32 where int8 does not pay.

Hot loop (``inspect_asm`` of :func:`dense_int8_packed`), per group of 4 k:

* AVX512-VNNI: 2 ``vmovdqu64`` + 8 ``vpbroadcastd`` + 16 ``vpdpbusd zmm``;
  ~1 TOPS on one Zen 5 core (``M = 1024, K = N = 768``), i.e. 2
  ``vpdpbusd`` per cycle: the compute peak.
* AVX512-BW only: 32 ``vpmaddwd`` + 32 ``vpaddd`` + 22 shifts/ands;
  2.5x slower than VNNI, still ~1.5x faster than the fp32 kernel.
* AVX2: 64 ``vpmaddwd ymm`` + 64 ``vpaddd`` and accumulator spills (32 ymm
  accumulators in 16 registers); ~2x faster than the fp32 kernel built for
  AVX2 on the same machine.
* (A generic-IR emulation of ``pmaddwd``, shuffles + ``sext`` + ``mul``, was
  matched by LLVM to 4 ``vpmaddwd`` per call, 6x slower than VNNI.)

Register blocks measured on one thread (``M = 1024, K = N = 768``, VNNI):
8 x 32, 6 x 64, 4 x 64, 14 x 32, 8 x 48 within 3% of each other, 12 x 32
2.5x slower; 8 x 32 keeps the fp32 kernel's panel width.

After the K loop the accumulators go to a stack buffer and the epilogue
(dequantize, ``bias``, ``act``, ``residual``; the ``ACT_*`` codes and the
activation functions of :mod:`sparseinfer.kernels.dense`) writes the block
to ``out`` while it is in L1.  No ``fastmath`` anywhere in this module:
float32 ``int -> float`` conversion, one multiply by ``scale_x * scale_w``
(rounded once to float32), then ``+ bias``.

Parallelism: as in the fp32 kernel, one ``prange`` over tasks
``(row chunk of MC rows, column panel)``; each task owns its block of
``out``.  Passing ``x_scale=None`` instead compiles the raw integer kernel
(``out`` int32, ``out = (xq - zp) @ Wq``): the ``MatMulInteger`` semantics,
used by the tests to check the accumulation exactly.

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
from numba.core import cgutils
from numba.core.registry import cpu_target
from numba.extending import intrinsic, models, register_model

from sparseinfer.kernels.dense import ACT_GELU, ACT_NONE, _activate, gelu_f32
from sparseinfer.kernels.sparse_formats import aligned_empty

__all__ = [
    "MR",
    "NR",
    "MC",
    "MAX_K",
    "HAS_VNNI",
    "DOT_INSTRUCTION",
    "quantize_rows",
    "quantize_tensor",
    "quantize_static",
    "quantize_weight",
    "pack_quantized",
    "pack_weight_int8",
    "padded_k",
    "dense_int8",
    "dense_int8_packed",
    "matmul_int8",
]

MR = 8  # rows of the register block
NR = 32  # columns of the register block (= packed panel width, 2 zmm of int32)
MC = 256  # rows per parallel task
KG = 4  # k per 32-bit lane (vpdpbusd sums 4 products)
_BLOCK = MR * NR  # a literal for _stack_i32
# (xq - zp) * w with xq, zp in [0, 255], |w| <= 127: the int32 accumulator
# (sum of xq * w) and the zero-point term stay below 2^31 for K up to this.
MAX_K = (2**31 - 1) // (255 * 128)

_FEATURES = cpu_target.target_context.codegen().magic_tuple()[2].split(",")
HAS_VNNI = "+avx512vnni" in _FEATURES
DOT_INSTRUCTION = "vpdpbusd" if HAS_VNNI else "vpmaddwd"


# --------------------------------------------------------------------------
# a 512-bit int32 vector type and the few operations the kernel needs
# --------------------------------------------------------------------------

_V = ir.VectorType(ir.IntType(32), 16)
_V16x32 = ir.VectorType(ir.IntType(16), 32)
_I8P = ir.PointerType(ir.IntType(8))


class I32x16(types.Type):
    """Sixteen int32 lanes, an LLVM ``<16 x i32>`` value (one zmm register)."""

    def __init__(self) -> None:
        super().__init__(name="i32x16")


i32x16 = I32x16()


@register_model(I32x16)
class _I32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V)


def _byte_ptr(context, builder, aryty, ary, offset):
    """``&ary.data[offset bytes]`` (no bounds check: callers keep offsets in range)."""
    data = context.make_array(aryty)(context, builder, ary).data
    return builder.gep(builder.bitcast(data, _I8P), [offset], inbounds=True)


@intrinsic
def _vzero(typingctx):
    def codegen(context, builder, sig, args):
        return ir.Constant(_V, None)

    return i32x16(), codegen


@intrinsic
def _vload(typingctx, ary, offset):
    """64 bytes of ``ary`` from byte ``offset``, as 16 int32 lanes."""
    if not isinstance(ary, types.Array) or not isinstance(offset, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        ptr = _byte_ptr(context, builder, sig.args[0], args[0], args[1])
        return builder.load(builder.bitcast(ptr, _V.as_pointer()), align=1)

    return i32x16(ary, offset), codegen


@intrinsic
def _vbcast(typingctx, ary, offset):
    """The 4 bytes of ``ary`` at byte ``offset``, broadcast to all 16 lanes."""
    if not isinstance(ary, types.Array) or not isinstance(offset, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        ptr = _byte_ptr(context, builder, sig.args[0], args[0], args[1])
        word = builder.load(builder.bitcast(ptr, ir.IntType(32).as_pointer()), align=1)
        vec = builder.insert_element(ir.Constant(_V, None), word, ir.Constant(ir.IntType(32), 0))
        return builder.shuffle_vector(vec, ir.Constant(_V, None), ir.Constant(_V, [0] * 16))

    return i32x16(ary, offset), codegen


@intrinsic
def _vstore(typingctx, ary, offset, vec):
    """Store the 16 lanes of ``vec`` to ``ary`` at byte ``offset``."""
    if not isinstance(ary, types.Array) or vec != i32x16:
        return None

    def codegen(context, builder, sig, args):
        ptr = _byte_ptr(context, builder, sig.args[0], args[0], args[1])
        builder.store(args[2], builder.bitcast(ptr, _V.as_pointer()), align=1)
        return context.get_dummy_value()

    return types.void(ary, offset, vec), codegen


def _pmaddwd(builder, a, b, features):
    """``pmaddwd`` on ``<32 x i16>``: int32 lane j = a[2j] * b[2j] + a[2j+1] * b[2j+1].

    The x86 intrinsic where the target has it (LLVM turned the generic IR
    below into 4 ``vpmaddwd`` per call instead of 1), else generic IR.
    """
    if "+avx512bw" in features:
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V, [_V16x32, _V16x32]), "llvm.x86.avx512.pmaddw.d.512")
        return builder.call(fn, [a, b])
    undef = ir.Constant(_V16x32, None)
    if "+avx2" in features:
        v16 = ir.VectorType(ir.IntType(16), 16)
        v8 = ir.VectorType(ir.IntType(32), 8)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8, [v16, v16]), "llvm.x86.avx2.pmadd.wd")
        halves = []
        for h in range(2):
            idx = ir.Constant(ir.VectorType(ir.IntType(32), 16), list(range(16 * h, 16 * h + 16)))
            halves.append(builder.call(fn, [builder.shuffle_vector(a, undef, idx), builder.shuffle_vector(b, undef, idx)]))
        return builder.shuffle_vector(halves[0], halves[1], ir.Constant(_V, list(range(16))))
    even = ir.Constant(_V, list(range(0, 32, 2)))
    odd = ir.Constant(_V, list(range(1, 32, 2)))
    ae = builder.sext(builder.shuffle_vector(a, undef, even), _V)
    ao = builder.sext(builder.shuffle_vector(a, undef, odd), _V)
    be = builder.sext(builder.shuffle_vector(b, undef, even), _V)
    bo = builder.sext(builder.shuffle_vector(b, undef, odd), _V)
    return builder.add(builder.mul(ae, be, flags=["nsw"]), builder.mul(ao, bo, flags=["nsw"]), flags=["nsw"])


@intrinsic
def _dpbusd(typingctx, acc, a, b):
    """``acc + sum over each lane's 4 bytes of u8(a) * s8(b)`` (``vpdpbusd``, non-saturating)."""
    if not (acc == a == b == i32x16):
        return None

    def codegen(context, builder, sig, args):
        acc, a, b = args
        features = context.codegen().magic_tuple()[2].split(",")
        if "+avx512vnni" in features:
            fnty = ir.FunctionType(_V, [_V, _V, _V])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.vpdpbusd.512")
            return builder.call(fn, [acc, a, b])
        # Portable form.  Seen as 16-bit lanes, each 32-bit lane holds bytes (0, 1) and (2, 3):
        # the low bytes (k = 0, 2) and the high bytes (k = 1, 3) each form one pmaddwd.
        a = builder.bitcast(a, _V16x32)
        b = builder.bitcast(b, _V16x32)
        eight = ir.Constant(_V16x32, [8] * 32)
        a_lo = builder.and_(a, ir.Constant(_V16x32, [0xFF] * 32))  # zero-extended u8
        a_hi = builder.lshr(a, eight)
        b_lo = builder.ashr(builder.shl(b, eight), eight)  # sign-extended s8
        b_hi = builder.ashr(b, eight)
        acc = builder.add(acc, _pmaddwd(builder, a_lo, b_lo, features))
        return builder.add(acc, _pmaddwd(builder, a_hi, b_hi, features))

    return i32x16(acc, a, b), codegen


@intrinsic
def _stack_i32(typingctx, n):
    """Pointer to ``n`` (a literal int) int32 slots on the stack (entry-block ``alloca``)."""
    if not isinstance(n, types.IntegerLiteral):
        return None
    size = n.literal_value

    def codegen(context, builder, signature, args):
        ptr = cgutils.alloca_once(builder, ir.ArrayType(ir.IntType(32), size))
        return builder.bitcast(ptr, ir.IntType(32).as_pointer())

    return types.CPointer(types.int32)(n), codegen


# --------------------------------------------------------------------------
# activation quantization
# --------------------------------------------------------------------------


def padded_k(K: int) -> int:
    """Row length of the quantized activations and packed weights: ``K`` rounded up to 4."""
    return (K + KG - 1) // KG * KG


@intrinsic
def _f32_from_bits(typingctx, bits):
    """Reinterpret the 32 bits of an int32 as a float32."""
    if bits != types.int32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(bits), codegen


@njit(nogil=True, error_model="numpy", cache=True)
def _ordered(bits):
    """Map float32 bits to an int32 with the same order (finite values; an involution)."""
    return np.int32(bits ^ ((bits >> 31) & 0x7FFFFFFF))


@njit(nogil=True, error_model="numpy", cache=True)
def _row_range(x, r):
    """``(min(x[r]), max(x[r]))`` with 0 included, exact for finite ``x``.

    Done on order-preserving integer keys of the float bits: an integer
    min/max reduction vectorises (``vpminsd`` / ``vpmaxsd``), a float one does
    not without ``nnan`` on the select, which Numba cannot express.
    """
    xi = x.view(np.int32)
    ru = np.uint64(r)
    lo = np.int32(0)
    hi = np.int32(0)
    for k in range(x.shape[1]):
        key = _ordered(xi[ru, np.uint64(k)])
        lo = min(lo, key)
        hi = max(hi, key)
    return _f32_from_bits(_ordered(lo)), _f32_from_bits(_ordered(hi))


@njit(nogil=True, error_model="numpy", cache=True)
def _scale_zero_point(lo, hi):
    """DynamicQuantizeLinear's ``(scale, zero point)`` (both float32) of the range ``[lo, hi]``
    (0 included): the difference in float64, the scale rounded once to float32."""
    s = np.float32((np.float64(hi) - np.float64(lo)) / 255.0)
    if s == 0:
        return s, np.float32(0.0)
    return s, min(max(np.rint(-lo / s), np.float32(0.0)), np.float32(255.0))


@njit(nogil=True, error_model="numpy", cache=True)
def _quantize_row_with(x, r, out, s, zp):
    """Row ``r``: ``out = sat_u8(rint(x / s) + zp)`` (all zeros when ``s == 0``), padding = ``zp``."""
    K = np.uint64(x.shape[1])
    Kp = np.uint64(out.shape[1])
    ru = np.uint64(r)
    if s == 0:
        for k in range(Kp):
            out[ru, k] = 0
        return
    for k in range(K):
        # a true division (not a multiply by 1/s): bit-identical to the reference
        q = np.rint(x[ru, k] / s) + zp
        out[ru, k] = np.uint8(min(max(q, np.float32(0.0)), np.float32(255.0)))
    for k in range(K, Kp):
        out[ru, k] = np.uint8(zp)


@njit(nogil=True, error_model="numpy", cache=True)
def _quantize_row(x, r, out, scale, zero_point):
    lo, hi = _row_range(x, r)
    s, zp = _scale_zero_point(lo, hi)
    _quantize_row_with(x, r, out, s, zp)
    scale[r] = s
    zero_point[r] = np.uint8(zp)


@njit(nogil=True, error_model="numpy", parallel=True, cache=True)
def quantize_rows(x, out, scale, zero_point):
    """Per-row ``DynamicQuantizeLinear``: ``x`` float32 [M, K] -> ``out`` uint8 [M, Kp].

    ``scale`` float32 [M], ``zero_point`` uint8 [M]; columns ``K..Kp`` of
    ``out`` get the zero point.  Rounding is half to even (``np.rint``) and
    saturating; ``x`` must be finite.
    """
    for r in prange(x.shape[0]):
        _quantize_row(x, r, out, scale, zero_point)


@njit(nogil=True, error_model="numpy", parallel=True, cache=True)
def quantize_tensor(x, out, scale, zero_point):
    """Per-tensor ``DynamicQuantizeLinear``: one scale and zero point for all of ``x`` float32
    [M, K] (the range of every element, 0 included) -> ``out`` uint8 [M, Kp].

    ``scale`` float32 [M] and ``zero_point`` uint8 [M] get that one value in every row (the
    form :func:`dense_int8_packed` reads); bit-identical to the reference
    ``DynamicQuantizeLinear`` of the whole tensor.  ``x`` must be finite.
    """
    M = x.shape[0]
    lo_rows = scale  # scratch until the end: the row minima
    hi_rows = np.empty(M, np.float32)
    for r in prange(M):
        lo, hi = _row_range(x, r)
        lo_rows[r] = lo
        hi_rows[r] = hi
    lo = np.float32(0.0)
    hi = np.float32(0.0)
    for r in range(M):
        lo = min(lo, lo_rows[r])
        hi = max(hi, hi_rows[r])
    s, zp = _scale_zero_point(lo, hi)
    for r in prange(M):
        _quantize_row_with(x, r, out, s, zp)
        scale[r] = s
        zero_point[r] = np.uint8(zp)


@njit(nogil=True, error_model="numpy", parallel=True, cache=True)
def quantize_static(x, out, scale, zero_point, s, zp):
    """``QuantizeLinear(x, s, zp)`` to uint8 with a fixed float32 scale ``s > 0`` and uint8 zero
    point ``zp``: ``out = sat_u8(rint(x / s) + zp)``, the division in float32 as the reference does.

    ``scale`` / ``zero_point`` [M] get ``s`` / ``zp`` in every row; padding columns get ``zp``.
    """
    zf = np.float32(zp)
    for r in prange(x.shape[0]):
        _quantize_row_with(x, r, out, s, zf)
        scale[r] = s
        zero_point[r] = zp


# --------------------------------------------------------------------------
# weight packing
# --------------------------------------------------------------------------


def pack_quantized(Wq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pack an already quantized int8 weight ``Wq [K, N]`` (zero point 0) for the kernel.

    Returns ``(packed, colsum)``: ``packed`` int8 ``[ceil(N / NR), Kp / 4, NR, 4]``
    with ``packed[p, g, j, i] = Wq[4 g + i, p NR + j]`` (64-byte aligned, zero
    padded), ``colsum`` int32 [N], the column sums of ``Wq``.  Any int8 value
    is allowed, -128 included.
    """
    Wq = np.asarray(Wq)
    if Wq.ndim != 2 or Wq.dtype != np.int8:
        raise ValueError(f"quantized weight must be int8 [K, N], got {Wq.dtype} {Wq.shape}")
    K, N = Wq.shape
    if K > MAX_K:
        raise ValueError(f"K={K} is too large for int32 accumulation (at most {MAX_K})")
    Kp = padded_k(K)
    npan = (N + NR - 1) // NR
    full = np.zeros((Kp, npan * NR), np.int8)
    full[:K, :N] = Wq
    packed = aligned_empty((npan, Kp // KG, NR, KG), np.int8)
    packed[:] = full.reshape(Kp // KG, KG, npan, NR).transpose(2, 0, 3, 1)
    return packed, Wq.sum(axis=0, dtype=np.int32)


def quantize_weight(W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel quantization of ``W [K, N]``: ``(Wq int8, scale_w float32 [N])``.

    ``scale_w = max_k |W[:, n]| / 127`` (0 for an all-zero column),
    ``Wq = clip(rint(W / scale_w), -127, 127)`` with the division in float64.
    """
    W = np.asarray(W, dtype=np.float32)
    if W.ndim != 2:
        raise ValueError(f"weight must be 2-D, got shape {W.shape}")
    if not np.isfinite(W).all():
        raise ValueError("weight has NaN or Inf values; int8 quantization needs finite weights")
    scale = (np.abs(W).max(axis=0, initial=0.0) / np.float32(127.0)).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float64)
    return np.clip(np.rint(W.astype(np.float64) / safe), -127, 127).astype(np.int8), scale


def pack_weight_int8(W: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize ``W [K, N]`` per output channel and pack it: ``(packed, scale_w, colsum)``.

    :func:`quantize_weight` then :func:`pack_quantized`.  Done once at plan time.
    """
    Wq, scale = quantize_weight(W)
    packed, colsum = pack_quantized(Wq)
    return packed, scale, colsum


# --------------------------------------------------------------------------
# micro-kernels
# --------------------------------------------------------------------------


@njit(nogil=True, error_model="numpy", cache=True)
def _dequant(acc, zp, colsum, sx, sw):
    return np.float32(np.int32(acc - zp * colsum)) * (sx * sw)


@njit(nogil=True, error_model="numpy", cache=True)
def _finish(buf, nr, r0, c0, nc, x_scale, x_zp, w_scale, colsum, bias, residual, out, act):
    """Epilogue of one block: ``buf[:nr, :nc]`` (raw int32 sums) -> ``out[r0:, c0:]``.

    ``x_scale is None`` compiles the integer variant: ``out = acc - zp * colsum``.
    """
    cu = np.uint64(c0)  # unsigned column indices: no wraparound select, contiguous loops
    if x_scale is None:
        for i in range(nr):
            r = r0 + i
            zp = np.int32(x_zp[r])
            for j in range(nc):
                c = cu + np.uint64(j)
                out[r, c] = buf[i, j] - zp * colsum[c]
        return
    for i in range(nr):
        r = r0 + i
        zp = np.int32(x_zp[r])
        sx = x_scale[r]
        if act == ACT_NONE:
            for j in range(nc):
                c = cu + np.uint64(j)
                v = _dequant(buf[i, j], zp, colsum[c], sx, w_scale[c])
                if bias is not None:
                    v += bias[c]
                if residual is not None:
                    v += residual[r, c]
                out[r, c] = v
        elif act == ACT_GELU:
            for j in range(nc):
                c = cu + np.uint64(j)
                v = _dequant(buf[i, j], zp, colsum[c], sx, w_scale[c])
                if bias is not None:
                    v += bias[c]
                v = gelu_f32(v)
                if residual is not None:
                    v += residual[r, c]
                out[r, c] = v
        else:
            for j in range(nc):
                c = cu + np.uint64(j)
                v = _dequant(buf[i, j], zp, colsum[c], sx, w_scale[c])
                if bias is not None:
                    v += bias[c]
                v = _activate(v, act)
                if residual is not None:
                    v += residual[r, c]
                out[r, c] = v


@njit(nogil=True, error_model="numpy", cache=True)
def _tile8(xq, wp, p, r0, nc, x_scale, x_zp, w_scale, colsum, bias, residual, out, act):
    """Block ``out[r0:r0+8, p*NR : p*NR+nc]``: 8 rows x panel ``p``."""
    ngrp = wp.shape[1]
    ldx = xq.shape[1]
    wo = p * ngrp * (NR * KG)
    x0 = r0 * ldx
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
    for g in range(ngrp):
        w0 = _vload(wp, wo)
        w1 = _vload(wp, wo + 64)
        wo += NR * KG
        xo = x0 + g * KG
        x = _vbcast(xq, xo)
        a00 = _dpbusd(a00, x, w0)
        a01 = _dpbusd(a01, x, w1)
        x = _vbcast(xq, xo + ldx)
        a10 = _dpbusd(a10, x, w0)
        a11 = _dpbusd(a11, x, w1)
        x = _vbcast(xq, xo + 2 * ldx)
        a20 = _dpbusd(a20, x, w0)
        a21 = _dpbusd(a21, x, w1)
        x = _vbcast(xq, xo + 3 * ldx)
        a30 = _dpbusd(a30, x, w0)
        a31 = _dpbusd(a31, x, w1)
        x = _vbcast(xq, xo + 4 * ldx)
        a40 = _dpbusd(a40, x, w0)
        a41 = _dpbusd(a41, x, w1)
        x = _vbcast(xq, xo + 5 * ldx)
        a50 = _dpbusd(a50, x, w0)
        a51 = _dpbusd(a51, x, w1)
        x = _vbcast(xq, xo + 6 * ldx)
        a60 = _dpbusd(a60, x, w0)
        a61 = _dpbusd(a61, x, w1)
        x = _vbcast(xq, xo + 7 * ldx)
        a70 = _dpbusd(a70, x, w0)
        a71 = _dpbusd(a71, x, w1)
    buf = numba.carray(_stack_i32(_BLOCK), (MR, NR))
    _vstore(buf, 0, a00)
    _vstore(buf, 64, a01)
    _vstore(buf, 128, a10)
    _vstore(buf, 192, a11)
    _vstore(buf, 256, a20)
    _vstore(buf, 320, a21)
    _vstore(buf, 384, a30)
    _vstore(buf, 448, a31)
    _vstore(buf, 512, a40)
    _vstore(buf, 576, a41)
    _vstore(buf, 640, a50)
    _vstore(buf, 704, a51)
    _vstore(buf, 768, a60)
    _vstore(buf, 832, a61)
    _vstore(buf, 896, a70)
    _vstore(buf, 960, a71)
    _finish(buf, MR, r0, p * NR, nc, x_scale, x_zp, w_scale, colsum, bias, residual, out, act)


@njit(nogil=True, error_model="numpy", cache=True)
def _tile1(xq, wp, p, r, nc, x_scale, x_zp, w_scale, colsum, bias, residual, out, act):
    """One row (the ``M % MR`` remainder) x panel ``p``."""
    ngrp = wp.shape[1]
    wo = p * ngrp * (NR * KG)
    xo = r * xq.shape[1]
    a0 = _vzero()
    a1 = _vzero()
    for g in range(ngrp):
        x = _vbcast(xq, xo + g * KG)
        a0 = _dpbusd(a0, x, _vload(wp, wo))
        a1 = _dpbusd(a1, x, _vload(wp, wo + 64))
        wo += NR * KG
    buf = numba.carray(_stack_i32(NR), (1, NR))
    _vstore(buf, 0, a0)
    _vstore(buf, 64, a1)
    _finish(buf, 1, r, p * NR, nc, x_scale, x_zp, w_scale, colsum, bias, residual, out, act)


@njit(nogil=True, error_model="numpy", parallel=True, cache=True)
def dense_int8_packed(xq, x_scale, x_zp, wp, w_scale, colsum, bias, residual, out, act):
    """``out[:] = act(dequant(xq) @ dequant(Wq) + bias) + residual``, unchecked.

    xq: uint8 [M, Kp] C-contiguous (from :func:`quantize_rows`); x_scale:
    float32 [M] or None (then ``out`` is int32 [M, N] and gets
    ``(xq - zp) @ Wq``); x_zp: uint8 [M]; wp, w_scale, colsum: from
    :func:`pack_weight_int8`; bias: float32 [N] or None; residual: float32
    [M, N] or None; out: float32 [M, N] C-contiguous, preallocated, may be
    ``residual`` itself (each element is read before it is written; unlike the
    fp32 kernel no raw product is stored first); act: an ``ACT_*`` code of
    :mod:`sparseinfer.kernels.dense`.
    """
    M = xq.shape[0]
    N = out.shape[1]
    npan = wp.shape[0]
    nchunk = (M + MC - 1) // MC
    for t in prange(nchunk * npan):
        chunk = t // npan
        p = t - chunk * npan
        nc = min(NR, N - p * NR)
        rbeg = chunk * MC
        rend = min(M, rbeg + MC)
        nfull = (rend - rbeg) // MR
        for rb in range(nfull):
            _tile8(xq, wp, p, rbeg + rb * MR, nc, x_scale, x_zp, w_scale, colsum, bias, residual, out, act)
        for r in range(rbeg + nfull * MR, rend):
            _tile1(xq, wp, p, r, nc, x_scale, x_zp, w_scale, colsum, bias, residual, out, act)


# --------------------------------------------------------------------------
# checked entry points
# --------------------------------------------------------------------------


def _check_common(xq, x_zp, packed, colsum, N):
    if xq.ndim != 2 or xq.dtype != np.uint8 or not xq.flags.c_contiguous:
        raise ValueError("xq must be a C-contiguous uint8 [M, Kp] array (see quantize_rows)")
    M, Kp = xq.shape
    if packed.ndim != 4 or packed.dtype != np.int8 or packed.shape[2:] != (NR, KG) or not packed.flags.c_contiguous:
        raise ValueError(f"packed weight has shape {packed.shape} / dtype {packed.dtype}; use pack_weight_int8")
    if packed.shape[1] * KG != Kp:
        raise ValueError(f"xq has {Kp} columns but the packed weight has K padded to {packed.shape[1] * KG}")
    if not (packed.shape[0] - 1) * NR < N <= packed.shape[0] * NR:
        raise ValueError(f"N={N} does not match {packed.shape[0]} panels of {NR} columns")
    if x_zp.shape != (M,) or x_zp.dtype != np.uint8:
        raise ValueError("x_zp must be uint8 [M]")
    if colsum.shape != (N,) or colsum.dtype != np.int32:
        raise ValueError("colsum must be int32 [N]")


def dense_int8(xq, x_scale, x_zp, packed, w_scale, colsum, bias=None, residual=None, out=None, act=ACT_NONE):
    """Checked entry point around :func:`dense_int8_packed` (float32 output).

    ``N`` is ``w_scale.shape[0]``.  Returns ``out``.
    """
    N = w_scale.shape[0]
    _check_common(xq, x_zp, packed, colsum, N)
    M = xq.shape[0]
    if x_scale.shape != (M,) or x_scale.dtype != np.float32:
        raise ValueError("x_scale must be float32 [M]")
    if w_scale.dtype != np.float32:
        raise ValueError("w_scale must be float32 [N]")
    if out is None:
        out = np.empty((M, N), dtype=np.float32)
    if out.shape != (M, N) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 [{M}, {N}] array")
    if bias is not None and (bias.shape != (N,) or bias.dtype != np.float32):
        raise ValueError("bias must be float32 [N]")
    if residual is not None and (residual.shape != (M, N) or residual.dtype != np.float32):
        raise ValueError("residual must be float32 [M, N]")
    dense_int8_packed(xq, x_scale, x_zp, packed, w_scale, colsum, bias, residual, out, act)
    return out


def matmul_int8(xq, x_zp, packed, colsum, out=None):
    """Exact ``(xq - zp[:, None]) @ Wq`` in int32 (``MatMulInteger`` with per-row zero points)."""
    N = colsum.shape[0]
    _check_common(xq, x_zp, packed, colsum, N)
    M = xq.shape[0]
    if out is None:
        out = np.empty((M, N), dtype=np.int32)
    if out.shape != (M, N) or out.dtype != np.int32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous int32 [{M}, {N}] array")
    dense_int8_packed(xq, None, x_zp, packed, None, colsum, None, None, out, ACT_NONE)
    return out
