"""Element-wise fp32 kernels: GELU (erf form), add, vectorisable exp / erf.

All kernels take raw arrays and a preallocated ``out`` (which may alias an
input), are ``nogil`` and parallelise with one ``prange`` over row blocks.

NumPy references::

    def gelu_ref(x):                      # exact erf form
        return (0.5 * x * (1.0 + np.vectorize(math.erf)(x / np.sqrt(2.0)))).astype(np.float32)

    def add_ref(a, b):                     # b broadcast over rows if 1-D
        return (a + b).astype(np.float32)

    def exp_ref(x):
        return np.exp(x.astype(np.float64)).astype(np.float32)

    def take_ref(x3, idx):                 # x3 [pre, dim, post], idx int64 in [0, dim)
        return x3[:, idx, :]
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from sparseinfer.kernels.dense import erf_f32, gelu_f32

__all__ = [
    "gelu",
    "gelu_exact",
    "add",
    "add_bias",
    "exp_f32",
    "erf_f32",
    "gelu_f32",
    "take",
]

_ROWS_PER_TASK = 8


@intrinsic
def _i32_as_f32(typingctx, v):
    """Reinterpret the bits of an int32 as a float32."""
    if not isinstance(v, types.Integer) or v.bitwidth != 32:
        return None
    sig = types.float32(v)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


_F = np.float32
_LOG2E = _F(1.4426950408889634)
_LN2_HI = _F(0.693359375)
_LN2_LO = _F(-2.12194440e-4)
_EXP_HI = _F(88.72283935546875)  # log(FLT_MAX)
_EXP_LO = _F(-87.3365478515625)  # below this the result is < FLT_MIN -> 0
_HALF = _F(0.5)
_ONE = _F(1.0)
# Cephes expf polynomial for exp(r) - 1 - r on [-ln2/2, ln2/2]
_P0 = _F(1.9875691500e-4)
_P1 = _F(1.3981999507e-3)
_P2 = _F(8.3334519073e-3)
_P3 = _F(4.1665795894e-2)
_P4 = _F(1.6666665459e-1)
_P5 = _F(5.0000001201e-1)


@njit(nogil=True, error_model="numpy", cache=True)
def exp_f32(x):
    """float32 exp (Cephes expf), no libm call so loops using it vectorise.

    Max relative error vs float64 exp about 2 ulp on [-87.3, 88.7]; returns
    0 for x < -87.3365 (no subnormal results) and +inf above log(FLT_MAX);
    NaN propagates.
    """
    if x > _EXP_HI:
        return np.float32(np.inf)
    underflow = x < _EXP_LO
    x = max(x, _EXP_LO)
    n = np.floor(x * _LOG2E + _HALF)
    r = x - n * _LN2_HI
    r = r - n * _LN2_LO
    r2 = r * r
    y = _P0
    y = y * r + _P1
    y = y * r + _P2
    y = y * r + _P3
    y = y * r + _P4
    y = y * r + _P5
    y = y * r2 + r + _ONE
    # 2**n as two factors so that n = 128 (x close to log(FLT_MAX)) works
    ni = np.int32(n)
    n1 = ni >> np.int32(1)
    s1 = _i32_as_f32(np.int32((n1 + np.int32(127)) << np.int32(23)))
    s2 = _i32_as_f32(np.int32((ni - n1 + np.int32(127)) << np.int32(23)))
    res = y * s1 * s2
    if underflow:
        return np.float32(0.0)
    return res


@njit(nogil=True, error_model="numpy", parallel=True, cache=True)
def gelu(x, out):
    """out = gelu(x) (erf form, float32-accurate rational erf), x/out [M, N]."""
    M, N = x.shape
    ntask = (M + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for t in prange(ntask):
        for r in range(t * _ROWS_PER_TASK, min(M, (t + 1) * _ROWS_PER_TASK)):
            for j in range(N):
                out[r, j] = gelu_f32(x[r, j])


@njit(nogil=True, error_model="numpy", parallel=True, cache=True)
def gelu_exact(x, out):
    """out = gelu(x) using ``math.erf`` (scalar libm call, slower)."""
    M, N = x.shape
    ntask = (M + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for t in prange(ntask):
        for r in range(t * _ROWS_PER_TASK, min(M, (t + 1) * _ROWS_PER_TASK)):
            for j in range(N):
                v = np.float64(x[r, j])
                out[r, j] = 0.5 * v * (1.0 + math.erf(v * 0.7071067811865476))


@njit(nogil=True, error_model="numpy", parallel=True, cache=True)
def add(a, b, out):
    """out = a + b, all [M, N]."""
    M, N = a.shape
    ntask = (M + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for t in prange(ntask):
        for r in range(t * _ROWS_PER_TASK, min(M, (t + 1) * _ROWS_PER_TASK)):
            for j in range(N):
                out[r, j] = a[r, j] + b[r, j]


@njit(nogil=True, error_model="numpy", parallel=True, cache=True)
def add_bias(a, bias, out):
    """out = a + bias[None, :], a/out [M, N], bias [N]."""
    M, N = a.shape
    ntask = (M + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for t in prange(ntask):
        for r in range(t * _ROWS_PER_TASK, min(M, (t + 1) * _ROWS_PER_TASK)):
            for j in range(N):
                out[r, j] = a[r, j] + bias[j]


@njit(nogil=True, error_model="numpy", cache=True)
def take(x3, idx, out3):
    """``out3[a, i, :] = x3[a, idx[i], :]`` for ``x3 [pre, dim, post]`` and indices already
    checked to lie in ``[0, dim)``: a ``Gather`` with constant indices (the [CLS] row before
    BERT's pooler).  Serial: the copies are a few rows.  As a kernel step it costs a few us
    where the NumPy reference step cost 40-110 us inside a run (its code cold after the layers)."""
    for a in range(x3.shape[0]):
        for i in range(idx.shape[0]):
            j = idx[i]
            for c in range(x3.shape[2]):
                out3[a, i, c] = x3[a, j, c]
