"""Sixteen float32 lanes as one LLVM ``<16 x float>`` value (a zmm register), and the few
operations on it that the kernels write by hand (raw byte addresses, no bounds checks).

For loops that LLVM does not vectorize well by itself: the attention kernels' tiles and softmax
(:mod:`sparseinfer.kernels.attention`) and the CSR kernel's narrow register tiles
(:mod:`sparseinfer.kernels.csr`), which LLVM unrolls into scalar FMAs.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

_L = 16  # float32 lanes of one vector

_VF = ir.VectorType(ir.FloatType(), _L)
_VI = ir.VectorType(ir.IntType(32), _L)


class F32x16(types.Type):
    """Sixteen float32 lanes, an LLVM ``<16 x float>`` value (one zmm register)."""

    def __init__(self) -> None:
        super().__init__(name="f32x16")


f32x16 = F32x16()


@register_model(F32x16)
class _F32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VF)


def _vptr(builder, addr):
    return builder.inttoptr(addr, _VF.as_pointer())


def _splat(builder, x):
    v = builder.insert_element(ir.Constant(_VF, None), x, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(v, ir.Constant(_VF, None), ir.Constant(_VI, [0] * _L))


def _cf(x):
    return ir.Constant(_VF, [float(np.float32(x))] * _L)


def _call(builder, name, ret, args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


@intrinsic
def _vzero(typingctx):
    def codegen(context, builder, sig, args):
        return ir.Constant(_VF, [0.0] * _L)

    return f32x16(), codegen


@intrinsic
def _vld(typingctx, addr):
    """16 floats from byte address ``addr`` (unaligned)."""

    def codegen(context, builder, sig, args):
        return builder.load(_vptr(builder, args[0]), align=4)

    return f32x16(types.intp), codegen


@intrinsic
def _vbc(typingctx, addr):
    """The float at byte address ``addr``, in all 16 lanes."""

    def codegen(context, builder, sig, args):
        x = builder.load(builder.inttoptr(args[0], ir.FloatType().as_pointer()), align=4)
        return _splat(builder, x)

    return f32x16(types.intp), codegen


@intrinsic
def _vset(typingctx, x):
    def codegen(context, builder, sig, args):
        return _splat(builder, args[0])

    return f32x16(types.float32), codegen


@intrinsic
def _vst(typingctx, addr, v):
    def codegen(context, builder, sig, args):
        builder.store(args[1], _vptr(builder, args[0]), align=4)
        return context.get_dummy_value()

    return types.void(types.intp, f32x16), codegen


@intrinsic
def _vstn(typingctx, addr, v, n):
    """Store the first ``n`` lanes of ``v`` (``n`` may be <= 0 or >= 16)."""

    def codegen(context, builder, sig, args):
        n = builder.trunc(args[2], ir.IntType(32))
        lanes = ir.Constant(_VI, list(range(_L)))
        nv = builder.insert_element(ir.Constant(_VI, None), n, ir.Constant(ir.IntType(32), 0))
        nv = builder.shuffle_vector(nv, ir.Constant(_VI, None), ir.Constant(_VI, [0] * _L))
        m = builder.icmp_signed("<", lanes, nv)
        ptr = _vptr(builder, args[0])
        fnty = ir.FunctionType(ir.VoidType(), [_VF, ptr.type, ir.IntType(32), m.type])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.masked.store.v16f32.p0v16f32")
        builder.call(fn, [args[1], ptr, ir.Constant(ir.IntType(32), 4), m])
        return context.get_dummy_value()

    return types.void(types.intp, f32x16, types.intp), codegen


def _binop(fn):
    def impl(typingctx, a, b):
        def codegen(context, builder, sig, args):
            return fn(builder, args[0], args[1])

        return f32x16(f32x16, f32x16), codegen

    return intrinsic(impl)


_vadd = _binop(lambda b, x, y: b.fadd(x, y))
_vsub = _binop(lambda b, x, y: b.fsub(x, y))
_vmul = _binop(lambda b, x, y: b.fmul(x, y))
# vmaxps; a NaN score may be dropped here, but it still makes its exp and so the row sum NaN
_vmax = _binop(lambda b, x, y: b.select(b.fcmp_ordered(">", x, y), x, y))


@intrinsic
def _vfma(typingctx, a, b, c):
    """``a * b + c``, one rounding."""

    def codegen(context, builder, sig, args):
        return _call(builder, "llvm.fma.v16f32", _VF, list(args))

    return f32x16(f32x16, f32x16, f32x16), codegen


def _reduce(builder, v, op):
    for half in (8, 4, 2, 1):
        mask = [(i + half) % _L for i in range(_L)]
        v = op(builder, v, builder.shuffle_vector(v, ir.Constant(_VF, None), ir.Constant(_VI, mask)))
    return builder.extract_element(v, ir.Constant(ir.IntType(32), 0))


@intrinsic
def _hmax(typingctx, v):
    def codegen(context, builder, sig, args):
        return _reduce(builder, args[0], lambda b, x, y: b.select(b.fcmp_ordered(">", x, y), x, y))

    return types.float32(f32x16), codegen


@intrinsic
def _hsum(typingctx, v):
    def codegen(context, builder, sig, args):
        return _reduce(builder, args[0], lambda b, x, y: b.fadd(x, y))

    return types.float32(f32x16), codegen
