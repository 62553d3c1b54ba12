"""Row-wise layer normalisation, optionally fused with a preceding add.

    s   = x (+ residual)
    out = (s - mean(s)) / sqrt(var(s) + eps) * gamma + beta

over the last axis of ``[M, N]`` rows (biased variance, two-pass, in fp32
with the sums in fp32 - the same arithmetic as the decomposed ONNX pattern
ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/Add and LayerNormalization).

One ``prange`` over blocks of rows; each task owns its rows of ``out``.
``out`` may alias ``x`` (or ``residual``).  Only the two row sums are compiled
with ``fastmath`` (reassociation, so they vectorise).

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

import numpy as np
from numba import njit, prange

__all__ = ["layernorm", "layernorm_packed"]

_ROWS_PER_TASK = 4


@njit(nogil=True, error_model="numpy", fastmath={"reassoc", "contract"}, cache=True)
def _row_sum(a, r, n):
    s = 0.0  # float64: an fp32 mean of a near-constant row is off by an ulp, which 1/sqrt(eps) magnifies
    for j in range(n):
        s += np.float64(a[r, j])
    return s


@njit(nogil=True, error_model="numpy", fastmath={"reassoc", "contract"}, cache=True)
def _row_sqdev(a, r, n, mu):
    s = 0.0
    for j in range(n):
        d = np.float64(a[r, j]) - mu
        s += d * d
    return s


@njit(nogil=True, error_model="numpy", parallel=True, cache=True)
def layernorm_packed(x, residual, gamma, beta, eps, out):
    """out = layernorm(x + residual) (residual may be None); x/out [M, N]."""
    M, N = x.shape
    inv_n = 1.0 / N
    ntask = (M + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for t in prange(ntask):
        for r in range(t * _ROWS_PER_TASK, min(M, (t + 1) * _ROWS_PER_TASK)):
            if residual is not None:
                for j in range(N):
                    out[r, j] = x[r, j] + residual[r, j]
                src = out
            else:
                src = x
            mu = _row_sum(src, r, N) * inv_n
            var = _row_sqdev(src, r, N, mu) * inv_n
            rstd = 1.0 / math.sqrt(var + np.float64(eps))
            for j in range(N):
                out[r, j] = np.float32((np.float64(src[r, j]) - mu) * rstd) * gamma[j] + beta[j]


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
