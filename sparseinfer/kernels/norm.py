"""Row-wise layer normalisation, optionally fused with a preceding add.

    s   = x (+ residual)
    out = (s - mean(s)) / sqrt(var(s) + eps) * gamma + beta

over the last axis of ``[M, N]`` rows (biased variance, two passes: the
semantics of the decomposed ONNX pattern ReduceMean/Sub/Pow/ReduceMean/Add/
Sqrt/Div/Mul/Add and of LayerNormalization).

Arithmetic (:func:`normalize_row`): the row sum in float64 (an fp32 mean of a
near-constant row is off by an ulp, which ``1/sqrt(eps)`` magnifies); the
mean split into a float32 head and tail ``mh + ml``, so that the deviations
``(s - mh) - ml`` are float32 and exact where ``s`` is near the mean; the sum
of their squares in float32 (16 lanes; the variance needs only a relative
accuracy); ``rstd`` rounded to float32, and the output
``dev * rstd * gamma + beta`` in float32.  A row whose float32 sum of
squares overflows (deviations beyond ~1e19) or is NaN takes the float64 path
throughout.  Against the previous all-float64 deviations and normalisation:
within 1e-6 of it on BERT-like rows, 11.5 -> 9.4 us per 128 x 768 call (2
threads, Zen 5; ``/tmp``-copy A/B, medians of 2000 calls), a float32 vector
being 16 lanes where a float64 one is 8 and needs two conversions.

One ``prange`` over blocks of rows; each task owns its rows of ``out``.
``out`` may alias ``x`` (or ``residual``).  Only the row sums are compiled
with ``fastmath`` (reassociation, so they vectorise); the deviation is a
function of its own, compiled without it, so that its two subtractions keep
their order when it is inlined into a reassociating loop.

Feature-major rows (:func:`layernorm_fm`, :func:`layernorm_rows_fm`).  The
sparse Dense kernels (:mod:`sparseinfer.kernels.csr`) keep activations as
``xt [chunks, >= N, L]``, token ``t`` of feature ``n`` at
``xt[t // L, n, t % L]``, so that BERT's residual stream need not be
transposed between them.  There a LayerNorm is lane-wise: each lane is a
token, and the reductions over features are vertical vector adds, one row of
``xt`` at a time.  A task is ``W`` lanes of a chunk (64, halved while the
tasks are fewer than the threads; vectors ``W`` lanes wide, ``W / 16`` zmm)
and makes three passes over its rows: float64 sums, feature by feature;
float32 sums of the squared deviations, feature by feature in blocks of 32
features whose sums are then added (one chain of 768 is 10 ulp from float64
where ``layernorm_packed``'s reassociated sums are 3; blocks of 32: 3.5); the
outputs.  ``rows_out`` is filled 16 tokens at a time from 16 x 16 tiles
transposed in L1.  Per token this is :func:`normalize_row`'s arithmetic,
float64 path included (chosen per token; lanes past ``M`` never choose it
and never reach a row of ``rows_out``; the vector arithmetic is explicit LLVM
instructions without fastmath flags, with FMAs where ``contract`` forms them
in ``normalize_row``); only the order of the sums differs,
so the normalised values are within 5 ulp of ``layernorm_packed`` (300
random shapes), and all outputs of a call hold the same bits.
:func:`layernorm_rows_fm` (row-major in) takes the statistics row by row with
``normalize_row``'s own reductions, then transposes 16 x 16 tiles of ``x``
into ``out`` and normalises them there: ``layernorm_packed``'s bits,
transposed.  At M = 128, N = 768, L = 64, 2 threads (Xeon, Sapphire Rapids;
variants interleaved in rounds, medians of 4000 calls): ``layernorm_packed``
13.4-13.8 us; fm -> fm 12.6; fm -> rows 15.5-15.8, fm -> both 18.0-18.6,
rows -> fm 17.7-18.0.  fm -> fm is bound by L2: each task's 196 KiB are read
three times (pass 3 takes 5.5 ns per row of 64 lanes from L2, 2.9 in L1;
narrower tasks that fit L1 lose more to the latency of their sums); packed
rows stay in L1 between their passes.  The transposes cost the rest: 16 ns
per 16 x 16 tile in L1, 20-35 from L2.

NumPy reference::

    def layernorm_ref(x, gamma, beta, eps, residual=None):
        s = x.astype(np.float64)
        if residual is not None:
            s = s + residual
        mu = s.mean(-1, keepdims=True)
        var = ((s - mu) ** 2).mean(-1, keepdims=True)
        return ((s - mu) / np.sqrt(var + eps) * gamma + beta).astype(np.float32)
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

from sparseinfer.kernels.csr import transpose16
from sparseinfer.kernels.dense import stack_f32
from sparseinfer.kernels.sparse_formats import aligned_empty

__all__ = [
    "layernorm",
    "layernorm_packed",
    "layernorm_fm",
    "layernorm_rows_fm",
    "layernorm_feature_major",
    "layernorm_to_feature_major",
]

_ROWS_PER_TASK = 4


@njit(nogil=True, error_model="numpy", fastmath={"reassoc", "contract"}, cache=True)
def _row_sum(a, r, n):
    s = 0.0  # float64: an fp32 mean of a near-constant row is off by an ulp, which 1/sqrt(eps) magnifies
    for j in range(n):
        s += np.float64(a[r, j])
    return s


@njit(nogil=True, error_model="numpy", cache=True)
def _deviation(v, mh, ml):
    """``v - mean`` in float32, the mean given as ``mh + ml`` (no ``reassoc``: the order stays)."""
    return (v - mh) - ml


@njit(nogil=True, error_model="numpy", fastmath={"reassoc", "contract"}, cache=True)
def _row_sqdev(a, r, n, mh, ml):
    s = np.float32(0.0)
    for j in range(n):
        d = _deviation(a[r, j], mh, ml)
        s += d * d
    return s


@njit(nogil=True, error_model="numpy", fastmath={"reassoc", "contract"}, cache=True)
def _row_sqdev64(a, r, n, mu):
    s = 0.0
    for j in range(n):
        d = np.float64(a[r, j]) - mu
        s += d * d
    return s


@njit(nogil=True, error_model="numpy", fastmath={"contract"}, cache=True)
def normalize_row(src, r, n, out, gamma, beta, eps):
    """``out[r, :n] = layernorm(src[r, :n]) * gamma + beta`` (see the module docstring; ``out``
    may be ``src``). The embedding kernel calls it too, so both compute the same bits."""
    mu = _row_sum(src, r, n) / n
    mh = np.float32(mu)
    ml = np.float32(mu - np.float64(mh))
    ss = _row_sqdev(src, r, n, mh, ml)
    if ss < np.float32(np.inf):
        rstd = np.float32(1.0 / math.sqrt(np.float64(ss) / n + np.float64(eps)))
        for j in range(n):
            out[r, j] = _deviation(src[r, j], mh, ml) * rstd * gamma[j] + beta[j]
    else:  # float32 squares overflowed (deviations beyond ~1e19), or a NaN: all in float64
        rstd64 = 1.0 / math.sqrt(_row_sqdev64(src, r, n, mu) / n + np.float64(eps))
        for j in range(n):
            out[r, j] = np.float32((np.float64(src[r, j]) - mu) * rstd64) * gamma[j] + beta[j]


@njit(nogil=True, error_model="numpy", parallel=True, cache=True)
def layernorm_packed(x, residual, gamma, beta, eps, out):
    """out = layernorm(x + residual) (residual may be None); x/out [M, N]."""
    M, N = x.shape
    ntask = (M + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for t in prange(ntask):
        for r in range(t * _ROWS_PER_TASK, min(M, (t + 1) * _ROWS_PER_TASK)):
            if residual is not None:
                for j in range(N):
                    out[r, j] = x[r, j] + residual[r, j]
                normalize_row(out, r, N, out, gamma, beta, eps)
            else:
                normalize_row(x, r, N, out, gamma, beta, eps)


def layernorm(x, gamma, beta, eps=1e-12, residual=None, out=None):
    """Checked entry point around :func:`layernorm_packed`."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError("x must be 2-D [rows, features]")
    M, N = x.shape
    gamma = np.ascontiguousarray(gamma, dtype=np.float32)
    beta = np.ascontiguousarray(beta, dtype=np.float32)
    if gamma.shape != (N,) or beta.shape != (N,):
        raise ValueError("gamma / beta must be [N]")
    if residual is not None:
        residual = np.ascontiguousarray(residual, dtype=np.float32)
        if residual.shape != (M, N):
            raise ValueError("residual must be [M, N]")
    if out is None:
        out = np.empty((M, N), dtype=np.float32)
    layernorm_packed(x, residual, gamma, beta, np.float32(eps), out)
    return out


# --------------------------------------------------------------------------
# feature-major ("fm") rows: xt[c, n, l] = x[c * L + l, n]
# --------------------------------------------------------------------------
# Vectors of 16, 32 or 64 lanes of float32 or float64 (sparseinfer.kernels.simd has 16 float32 lanes
# only): each operation below is one LLVM instruction on all lanes, with no fastmath flags.


class _Vec(types.Type):
    """``width`` float32 or float64 lanes, one LLVM vector value (``width / 16`` zmm of float32)."""

    def __init__(self, bits, width):
        self.bits = bits
        self.width = width
        super().__init__(name=f"f{bits}x{width}")


@register_model(_Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _ir_vec(fe_type.bits, fe_type.width))


def _ir_vec(bits, width):
    return ir.VectorType(ir.FloatType() if bits == 32 else ir.DoubleType(), width)


def _ir_splat(builder, x, vty):
    v = builder.insert_element(ir.Constant(vty, None), x, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(v, ir.Constant(vty, None), ir.Constant(ir.VectorType(ir.IntType(32), vty.count), [0] * vty.count))


def _ir_ptr(builder, addr, ty):
    return builder.inttoptr(addr, ty.as_pointer())


def _width(w):
    return w.literal_value if isinstance(w, types.IntegerLiteral) else None


def _f32(v):
    return isinstance(v, _Vec) and v.bits == 32


@intrinsic
def _vzero(typingctx, bits, width):
    """A vector of zeros: ``bits`` 32 or 64, ``width`` lanes (both literal ints)."""
    b, w = _width(bits), _width(width)
    if b not in (32, 64) or w is None:
        return None

    def codegen(context, builder, sig, args):
        return ir.Constant(_ir_vec(b, w), [0.0] * w)

    return _Vec(b, w)(bits, width), codegen


@intrinsic
def _vload(typingctx, addr, width):
    """``width`` float32 from byte address ``addr`` (unaligned, no bounds check)."""
    w = _width(width)
    if w is None or not isinstance(addr, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return builder.load(_ir_ptr(builder, args[0], _ir_vec(32, w)), align=4)

    return _Vec(32, w)(addr, width), codegen


@intrinsic
def _vstore(typingctx, addr, v):
    """Store the float32 vector ``v`` at byte address ``addr``."""
    if not _f32(v) or not isinstance(addr, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        builder.store(args[1], _ir_ptr(builder, args[0], args[1].type), align=4)
        return context.get_dummy_value()

    return types.void(addr, v), codegen


@intrinsic
def _load1(typingctx, addr):
    """The float32 at byte address ``addr``."""
    if not isinstance(addr, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return builder.load(_ir_ptr(builder, args[0], ir.FloatType()), align=4)

    return types.float32(addr), codegen


@intrinsic
def _vsplat(typingctx, x, width):
    """The float32 ``x`` in all ``width`` lanes."""
    w = _width(width)
    if w is None or x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return _ir_splat(builder, args[0], _ir_vec(32, w))

    return _Vec(32, w)(x, width), codegen


@intrinsic
def _vsum64(typingctx, acc, v):
    """``acc + float64(v)``, lane by lane (one rounding per lane)."""
    if not (isinstance(acc, _Vec) and acc.bits == 64 and _f32(v) and v.width == acc.width):
        return None

    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], builder.fpext(args[1], args[0].type))

    return acc(acc, v), codegen


@intrinsic
def _vmean_split(typingctx, acc, n):
    """``(mh, ml)``: the mean ``mu = acc / n`` (float64) as a float32 head ``mh = float32(mu)`` and tail
    ``ml = float32(mu - mh)``, lane by lane."""
    if not (isinstance(acc, _Vec) and acc.bits == 64 and isinstance(n, types.Integer)):
        return None
    vt = _Vec(32, acc.width)

    def codegen(context, builder, sig, args):
        dty = args[0].type
        nd = _ir_splat(builder, builder.sitofp(args[1], ir.DoubleType()), dty)
        mu = builder.fdiv(args[0], nd)
        mh = builder.fptrunc(mu, _ir_vec(32, acc.width))
        ml = builder.fptrunc(builder.fsub(mu, builder.fpext(mh, dty)), mh.type)
        return context.make_tuple(builder, sig.return_type, [mh, ml])

    return types.UniTuple(vt, 2)(acc, n), codegen


@intrinsic
def _vdev(typingctx, v, mh, ml):
    """``(v - mh) - ml`` in float32: two roundings, in this order."""
    if not (_f32(v) and v == mh == ml):
        return None

    def codegen(context, builder, sig, args):
        return builder.fsub(builder.fsub(args[0], args[1]), args[2])

    return v(v, v, v), codegen


@intrinsic
def _vadd(typingctx, a, b):
    if not (_f32(a) and a == b):
        return None

    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], args[1])

    return a(a, a), codegen


@intrinsic
def _vmul(typingctx, a, b):
    if not (_f32(a) and a == b):
        return None

    def codegen(context, builder, sig, args):
        return builder.fmul(args[0], args[1])

    return a(a, a), codegen


@intrinsic
def _vfma(typingctx, a, b, c):
    """``a * b + c``, one rounding (what ``contract`` makes of it in :func:`normalize_row`)."""
    if not (_f32(a) and a == b == c):
        return None

    def codegen(context, builder, sig, args):
        ty = args[0].type
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ty, [ty] * 3), f"llvm.fma.v{a.width}f32")
        return builder.call(fn, list(args))

    return a(a, a, a), codegen


@intrinsic
def _vrstd(typingctx, ss, n, eps):
    """``float32(1 / sqrt(float64(ss) / n + eps))`` lane by lane (``eps`` a float64)."""
    if not (_f32(ss) and isinstance(n, types.Integer) and eps == types.float64):
        return None

    def codegen(context, builder, sig, args):
        dty = _ir_vec(64, ss.width)
        nd = _ir_splat(builder, builder.sitofp(args[1], ir.DoubleType()), dty)
        v = builder.fadd(builder.fdiv(builder.fpext(args[0], dty), nd), _ir_splat(builder, args[2], dty))
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(dty, [dty]), f"llvm.sqrt.v{ss.width}f64")
        r = builder.fdiv(ir.Constant(dty, [1.0] * ss.width), builder.call(fn, [v]))
        return builder.fptrunc(r, args[0].type)

    return ss(ss, n, eps), codegen


@intrinsic
def _vnot_finite(typingctx, ss):
    """Bit ``i`` set where lane ``i`` of ``ss`` is not ``< inf`` (inf or NaN), as a uint64."""
    if not (_f32(ss) and ss.width <= 64):
        return None

    def codegen(context, builder, sig, args):
        w = ss.width
        m = builder.fcmp_unordered(">=", args[0], ir.Constant(args[0].type, [float("inf")] * w))
        return builder.zext(builder.bitcast(m, ir.IntType(w)), ir.IntType(64))

    return types.uint64(ss), codegen


_ALL_LANES = np.uint64(0xFFFFFFFFFFFFFFFF)
_SS_BLOCK = 32
_ROW_STATS = 3 * 64  # floats of mh, ml, rstd for up to 64 lanes


@njit(nogil=True, error_model="numpy", fastmath={"contract"}, cache=True)
def _normalize_token64(col, n, gamma, beta, eps, out, c, lane, rows_out, t):
    """The float64 path of :func:`normalize_row` for one token whose features are ``col[:n]``:
    written to ``out[c, :n, lane]`` and/or ``rows_out[t, :n]`` (an empty array for none)."""
    s = 0.0
    for j in range(n):
        s += np.float64(col[j])
    mu = s / n
    ss = 0.0
    for j in range(n):
        d = np.float64(col[j]) - mu
        ss += d * d
    rstd64 = 1.0 / math.sqrt(ss / n + np.float64(eps))
    for j in range(n):
        y = np.float32((np.float64(col[j]) - mu) * rstd64) * gamma[j] + beta[j]
        if out.shape[0] > 0:
            out[c, j, lane] = y
        if rows_out.shape[0] > 0:
            rows_out[t, j] = y


def _make_fm_block(W):
    """:func:`layernorm_fm` on the ``W`` lanes ``l0 .. l0 + W`` of chunk ``c`` (``W`` 16, 32 or 64,
    a closure constant: the vectors are ``W`` lanes wide, ``W / 16`` zmm of float32)."""

    @njit(nogil=True, error_model="numpy", cache=True)
    def fm_block(x, c, l0, M, gamma, beta, eps, out, rows_out):
        N = gamma.shape[0]
        L = x.shape[2]
        t0 = c * L + l0
        nv = min(W, M - t0)  # tokens in these lanes
        has_out = out.shape[0] > 0
        has_rows = rows_out.shape[0] > 0
        step = np.uint64(4 * L)
        if has_out:
            ob = out.ctypes.data + np.uint64(4 * (c * out.shape[1] * L + l0))
            for n in range(N, out.shape[1]):  # padding rows: the next sparse kernel's zero rows of X.T
                _vstore(ob + np.uint64(n) * step, _vzero(32, W))
            ostep = step
        else:  # rows_out only: a 16 x 16 tile of results at a time on the stack
            ob = numba.carray(stack_f32(256), (256,)).ctypes.data
            ostep = np.uint64(64)
        if nv <= 0:
            return
        xb = x.ctypes.data + np.uint64(4 * (c * x.shape[1] * L + l0))
        # pass 1: float64 sums, feature by feature (one vector add per feature and W lanes)
        acc = _vzero(64, W)
        a = xb
        for _ in range(N):
            acc = _vsum64(acc, _vload(a, W))
            a += step
        mh, ml = _vmean_split(acc, N)
        # pass 2: float32 sums of the squared deviations, over blocks of _SS_BLOCK features
        ss = _vzero(32, W)
        a = xb
        for n0 in range(0, N, _SS_BLOCK):
            part = _vzero(32, W)
            for _ in range(min(_SS_BLOCK, N - n0)):
                d = _vdev(_vload(a, W), mh, ml)
                part = _vfma(d, d, part)
                a += step
            ss = _vadd(ss, part)
        rstd = _vrstd(ss, N, np.float64(eps))
        bad = _vnot_finite(ss) & (_ALL_LANES if nv >= 64 else (np.uint64(1) << np.uint64(nv)) - np.uint64(1))
        if bad != 0:  # rare: keep the inputs of the float64 tokens (out may be x)
            saved = np.empty((W, N), np.float32)
            for i in range(nv):
                if (bad >> np.uint64(i)) & np.uint64(1):
                    for n in range(N):
                        saved[i, n] = x[c, n, l0 + i]
        # pass 3: dev * rstd * gamma + beta
        if not has_rows:
            o = ob
            a = xb
            for n in range(N):
                y = _vmul(_vdev(_vload(a, W), mh, ml), rstd)
                _vstore(o, _vfma(y, _vsplat(gamma[n], W), _vsplat(beta[n], W)))
                a += step
                o += step
        else:  # 16 tokens at a time: 16 x 16 tiles, transposed into rows_out while in L1
            st = numba.carray(stack_f32(_ROW_STATS), (3, W))
            sb = st.ctypes.data
            _vstore(sb, mh)
            _vstore(sb + np.uint64(4 * W), ml)
            _vstore(sb + np.uint64(8 * W), rstd)
            for g in range(0, nv, 16):
                ng = min(16, nv - g)
                gb = np.uint64(4 * g)
                mh16 = _vload(sb + gb, 16)
                ml16 = _vload(sb + np.uint64(4 * W) + gb, 16)
                rstd16 = _vload(sb + np.uint64(8 * W) + gb, 16)
                for n0 in range(0, N, 16):
                    nf = min(16, N - n0)
                    a = xb + np.uint64(n0) * step + gb
                    d0 = ob + np.uint64(n0) * ostep + gb if has_out else ob
                    o = d0
                    for j in range(nf):
                        y = _vmul(_vdev(_vload(a, 16), mh16, ml16), rstd16)
                        _vstore(o, _vfma(y, _vsplat(gamma[n0 + j], 16), _vsplat(beta[n0 + j], 16)))
                        a += step
                        o += ostep
                    if nf == 16 and ng == 16:
                        transpose16(d0, ostep // np.uint64(4), rows_out.ctypes.data + np.uint64(4 * ((t0 + g) * N + n0)), N)
                    else:
                        for i in range(ng):
                            for j in range(nf):
                                rows_out[t0 + g + i, n0 + j] = _load1(d0 + np.uint64(j) * ostep + np.uint64(4 * i))
        if bad != 0:
            for i in range(nv):
                if (bad >> np.uint64(i)) & np.uint64(1):
                    _normalize_token64(saved[i], N, gamma, beta, eps, out, c, l0 + i, rows_out, t0 + i)

    return fm_block


_fm_block16 = _make_fm_block(16)
_fm_block32 = _make_fm_block(32)
_fm_block64 = _make_fm_block(64)


@njit(nogil=True, error_model="numpy", cache=True)
def _fm_width(L, nch, nth):
    """Lanes per task: 64 (four zmm per feature: independent chains of adds, and a quarter of the
    loop overhead of 16), halved while the tasks are fewer than the ``nth`` threads."""
    W = 64
    while W > 16 and (L % W != 0 or nch * (L // W) < nth):
        W //= 2
    return W


@njit(nogil=True, error_model="numpy", cache=True)
def _fm_task(x, c, l0, W, M, gamma, beta, eps, out, rows_out):
    if W == 64:
        _fm_block64(x, c, l0, M, gamma, beta, eps, out, rows_out)
    elif W == 32:
        _fm_block32(x, c, l0, M, gamma, beta, eps, out, rows_out)
    else:
        _fm_block16(x, c, l0, M, gamma, beta, eps, out, rows_out)


@njit(nogil=True, error_model="numpy", parallel=True, cache=True)
def layernorm_fm(x, gamma, beta, eps, out, rows_out, M, nth):
    """LayerNorm of the first ``M`` tokens of the feature-major ``x [nch, >= N, L]`` (N = gamma.size)
    into the feature-major ``out [>= nch, >= N, L]`` (zeros in rows ``N ..``; ``out`` may be ``x``)
    and/or the row-major ``rows_out [M, N]``; an output not wanted is an empty array
    (``[0, 0, 0]``, ``[0, N]``). Lanes of ``out`` past ``M`` hold anything. ``nth``: the threads
    the tasks are split for (``numba.get_num_threads()``; :func:`_fm_width`)."""
    N = gamma.shape[0]
    nch, Nx, L = x.shape
    has_out = out.shape[0] > 0
    has_rows = rows_out.shape[0] > 0
    if L % 16 != 0 or Nx < N or M > nch * L or M < 0:
        raise ValueError("x must be [chunks, >= N, lanes] with lanes a multiple of 16 and chunks * lanes >= M")
    if has_out and (out.shape[0] * L < M or out.shape[1] < N or out.shape[2] != L):
        raise ValueError("out must be [>= chunks, >= N, lanes of x]")
    if has_rows and (rows_out.shape[0] != M or rows_out.shape[1] != N):
        raise ValueError("rows_out must be [M, N]")
    if not (has_out or has_rows or M == 0):
        raise ValueError("neither out nor rows_out was given")
    if not (x.flags.c_contiguous and out.flags.c_contiguous and rows_out.flags.c_contiguous):
        raise ValueError("x, out and rows_out must be C-contiguous")
    if M == 0:
        return
    nch = (M + L - 1) // L
    W = _fm_width(L, nch, nth)
    nb = L // W
    for task in prange(nch * nb):
        c = task // nb
        _fm_task(x, c, (task - c * nb) * W, W, M, gamma, beta, eps, out, rows_out)


@njit(nogil=True, error_model="numpy", cache=True)
def _rows_block(x, c, l0, W, gamma, beta, eps, out):
    """:func:`layernorm_rows_fm` for the tokens of lanes ``l0 .. l0 + W`` of chunk ``c``, 16 at a
    time: their mean and ``rstd`` row by row (the reductions of :func:`normalize_row`), then, 16
    features at a time, a 16 x 16 tile of ``x`` transposed into ``out`` and normalised there."""
    M, N = x.shape
    L = out.shape[2]
    t0 = c * L + l0
    nv = min(W, M - t0)
    step = np.uint64(4 * L)
    ob = out.ctypes.data + np.uint64(4 * (c * out.shape[1] * L + l0))
    for n in range(N, out.shape[1]):
        for i in range(0, W, 16):
            _vstore(ob + np.uint64(n) * step + np.uint64(4 * i), _vzero(32, 16))
    st = numba.carray(stack_f32(48), (3, 16))  # mh, ml, rstd of each token; zeros past M
    sb = st.ctypes.data
    xb = x.ctypes.data
    for g in range(0, nv, 16):
        ng = min(16, nv - g)
        bad = 0  # bit i: token g + i takes the float64 path
        for i in range(16):
            st[0, i] = st[1, i] = st[2, i] = 0.0
            if i < ng:
                r = t0 + g + i
                mu = _row_sum(x, r, N) / N
                mh = np.float32(mu)
                ml = np.float32(mu - np.float64(mh))
                ss = _row_sqdev(x, r, N, mh, ml)
                if ss < np.float32(np.inf):
                    st[0, i] = mh
                    st[1, i] = ml
                    st[2, i] = np.float32(1.0 / math.sqrt(np.float64(ss) / N + np.float64(eps)))
                else:
                    bad |= 1 << i
        mh16 = _vload(sb, 16)
        ml16 = _vload(sb + np.uint64(64), 16)
        rstd16 = _vload(sb + np.uint64(128), 16)
        gb = ob + np.uint64(4 * g)
        for n0 in range(0, N, 16):
            nf = min(16, N - n0)
            o0 = gb + np.uint64(n0) * step
            if nf == 16 and ng == 16:
                transpose16(xb + np.uint64(4 * ((t0 + g) * N + n0)), N, o0, L)
            else:
                for j in range(nf):
                    for i in range(16):
                        out[c, n0 + j, l0 + g + i] = x[t0 + g + i, n0 + j] if i < ng else np.float32(0.0)
            o = o0
            for j in range(nf):
                y = _vmul(_vdev(_vload(o, 16), mh16, ml16), rstd16)
                _vstore(o, _vfma(y, _vsplat(gamma[n0 + j], 16), _vsplat(beta[n0 + j], 16)))
                o += step
        if bad:  # rare: squares that overflowed, or a NaN
            no_rows = np.empty((0, N), np.float32)
            for i in range(ng):
                if (bad >> i) & 1:
                    _normalize_token64(x[t0 + g + i], N, gamma, beta, eps, out, c, l0 + g + i, no_rows, t0 + g + i)


@njit(nogil=True, error_model="numpy", parallel=True, cache=True)
def layernorm_rows_fm(x, gamma, beta, eps, out, nth):
    """LayerNorm of the row-major ``x [M, N]`` into the feature-major ``out [>= ceil(M / L), >= N, L]``
    (zeros in rows ``N ..``; lanes past ``M``: anything; ``out`` must not overlap ``x``): the same
    bits as :func:`layernorm_packed`, transposed. ``nth`` as for :func:`layernorm_fm`."""
    M, N = x.shape
    L = out.shape[2]
    if gamma.shape[0] != N or L % 16 != 0 or out.shape[1] < N or out.shape[0] * L < M:
        raise ValueError("out must be [>= ceil(M / lanes), >= N, lanes] with lanes a multiple of 16")
    if not (x.flags.c_contiguous and out.flags.c_contiguous):
        raise ValueError("x and out must be C-contiguous")
    if M == 0:
        return
    nch = (M + L - 1) // L
    W = _fm_width(L, nch, nth)
    nb = L // W
    for task in prange(nch * nb):
        c = task // nb
        l0 = (task - c * nb) * W
        _rows_block(x, c, l0, W, gamma, beta, eps, out)


_NO_FM = np.empty((0, 0, 0), np.float32)


def _fm_operand(a, name):
    if not (isinstance(a, np.ndarray) and a.dtype == np.float32 and a.ndim == 3 and a.flags.c_contiguous):
        raise ValueError(f"{name} must be a C-contiguous float32 array [chunks, features, lanes]")
    if a.shape[2] == 0 or a.shape[2] % 16:
        raise ValueError(f"{name} has {a.shape[2]} lanes, not a positive multiple of 16")
    return a


def _gamma_beta(gamma, beta, N=None):
    gamma = np.ascontiguousarray(gamma, dtype=np.float32)
    beta = np.ascontiguousarray(beta, dtype=np.float32)
    if gamma.ndim != 1 or (N is not None and gamma.shape[0] != N) or beta.shape != gamma.shape:
        raise ValueError("gamma / beta must be [N]")
    return gamma, beta


def layernorm_feature_major(x, gamma, beta, M, eps=1e-12, out=None, rows_out=None):
    """Checked entry point around :func:`layernorm_fm`: LayerNorm of the first ``M`` tokens of the
    feature-major ``x [chunks, >= N, lanes]`` (N = gamma.size) into ``out`` (feature-major
    ``[>= ceil(M / lanes), >= N, lanes]``, may be ``x``) and/or ``rows_out`` (``[M, N]``); at least
    one of them must be given.  Returns ``(out, rows_out)``, None for the one not given."""
    x = _fm_operand(x, "x")
    nch, Nx, L = x.shape
    gamma, beta = _gamma_beta(gamma, beta)
    N = gamma.shape[0]
    if N > Nx:
        raise ValueError(f"gamma / beta have {N} features, x only {Nx}")
    if isinstance(M, bool) or not isinstance(M, (int, np.integer)) or M < 0:
        raise ValueError("M must be a non-negative int")
    M = int(M)
    if M > nch * L:
        raise ValueError(f"x holds {nch * L} tokens ({nch} chunks of {L} lanes), fewer than M = {M}")
    if out is None and rows_out is None:
        raise ValueError("give out (feature-major) and/or rows_out (row-major): neither was given")
    if out is not None:
        out = _fm_operand(out, "out")
        if out.shape[2] != L or out.shape[1] < N or out.shape[0] * L < M:
            raise ValueError(f"out must be [>= {-(-M // L)}, >= {N}, {L}], got {out.shape}")
        if out is not x and np.may_share_memory(out, x):
            raise ValueError("out must be x itself or not overlap it")
    if rows_out is not None:
        if not (isinstance(rows_out, np.ndarray) and rows_out.dtype == np.float32 and rows_out.flags.c_contiguous):
            raise ValueError("rows_out must be a C-contiguous float32 array [M, N]")
        if rows_out.shape != (M, N):
            raise ValueError(f"rows_out must be [{M}, {N}], got {rows_out.shape}")
        if np.may_share_memory(rows_out, x) or (out is not None and np.may_share_memory(rows_out, out)):
            raise ValueError("rows_out must not overlap x or out")
    layernorm_fm(
        x,
        gamma,
        beta,
        np.float32(eps),
        _NO_FM if out is None else out,
        np.empty((0, N), np.float32) if rows_out is None else rows_out,
        M,
        numba.get_num_threads(),
    )
    return out, rows_out


def layernorm_to_feature_major(x, gamma, beta, eps=1e-12, lanes=64, out=None):
    """Checked entry point around :func:`layernorm_rows_fm`: LayerNorm of the row-major ``x [M, N]``
    into a feature-major ``out [>= ceil(M / lanes), >= N, lanes]`` (allocated, 64-byte aligned,
    when None; zeros in rows ``N ..``); returns ``out``."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError("x must be 2-D [rows, features]")
    M, N = x.shape
    gamma, beta = _gamma_beta(gamma, beta, N)
    if out is None:
        if isinstance(lanes, bool) or not isinstance(lanes, (int, np.integer)) or lanes <= 0 or lanes % 16:
            raise ValueError(f"lanes must be a positive multiple of 16, got {lanes!r}")
        out = aligned_empty((-(-M // int(lanes)), N, int(lanes)))
    else:
        out = _fm_operand(out, "out")
        L = out.shape[2]
        if out.shape[1] < N or out.shape[0] * L < M:
            raise ValueError(f"out must be [>= {-(-M // L)}, >= {N}, {L}], got {out.shape}")
        if np.may_share_memory(out, x):
            raise ValueError("out must not overlap x")
    layernorm_rows_fm(x, gamma, beta, np.float32(eps), out, numba.get_num_threads())
    return out
