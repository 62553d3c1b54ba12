"""Dense matmul kernel vs plain NumPy (float64 reference)."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseinfer.kernels import dense as D

_verf = np.vectorize(math.erf)


def dense_ref(X, W, bias=None, residual=None, act=D.ACT_NONE):
    y = X.astype(np.float64) @ W.astype(np.float64)
    if bias is not None:
        y = y + bias
    if act in (D.ACT_GELU, D.ACT_GELU_EXACT):
        y = 0.5 * y * (1.0 + _verf(y / np.sqrt(2.0)))
    elif act == D.ACT_TANH:
        y = np.tanh(y)
    if residual is not None:
        y = y + residual
    return y


def _tol(K):
    # float32 accumulation over K terms of magnitude <= 1
    return 1e-4 * max(1.0, math.sqrt(K))


def _case(seed, M, K, N, use_bias, use_res, act):
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1, 1, (M, K)).astype(np.float32)
    W = rng.uniform(-1, 1, (K, N)).astype(np.float32)
    bias = rng.uniform(-1, 1, N).astype(np.float32) if use_bias else None
    res = rng.uniform(-1, 1, (M, N)).astype(np.float32) if use_res else None
    Wp = D.pack_weight(W)
    out = np.full((M, N), np.nan, dtype=np.float32)
    D.dense(X, Wp, bias, res, out, act)
    ref = dense_ref(X, W, bias, res, act)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=_tol(K))


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    M=st.integers(1, 40),
    K=st.integers(1, 70),
    N=st.integers(1, 100),
    use_bias=st.booleans(),
    use_res=st.booleans(),
    act=st.sampled_from([D.ACT_NONE, D.ACT_GELU, D.ACT_GELU_EXACT, D.ACT_TANH]),
)
def test_dense_random_shapes(seed, M, K, N, use_bias, use_res, act):
    _case(seed, M, K, N, use_bias, use_res, act)


@pytest.mark.parametrize("M", [1, 7, 8, 9, 255, 256, 257, 300])
def test_dense_row_chunks(M):
    # crosses the MR (8) and MC (256) blocking boundaries
    _case(M, M, 33, 65, True, True, D.ACT_GELU)


@pytest.mark.parametrize("K,N", [(768, 768), (768, 2304), (3072, 768)])
def test_dense_bert_shapes(K, N):
    _case(K + N, 128, K, N, True, False, D.ACT_NONE)


def test_pack_weight_layout():
    W = np.arange(5 * 70, dtype=np.float32).reshape(5, 70)
    Wp = D.pack_weight(W)
    assert Wp.shape == (3, 5, D.NR)
    for p in range(3):
        for j in range(D.NR):
            c = p * D.NR + j
            expect = W[:, c] if c < 70 else np.zeros(5, np.float32)
            np.testing.assert_array_equal(Wp[p, :, j], expect)


def test_gelu_f32_accuracy():
    x = np.linspace(-10, 10, 20001).astype(np.float32)
    got = np.array([D.gelu_f32(np.float32(v)) for v in x[::50]])
    ref = 0.5 * x[::50].astype(np.float64) * (1 + _verf(x[::50] / np.sqrt(2.0)))
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_dense_rejects_bad_shapes():
    Wp = D.pack_weight(np.ones((4, 8), np.float32))
    with pytest.raises(ValueError):
        D.dense(np.ones((3, 5), np.float32), Wp)
    with pytest.raises(ValueError):
        D.dense(np.ones((3, 4), np.float32), Wp, out=np.empty((3, 40), np.float32))
