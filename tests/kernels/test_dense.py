"""Dense matmul kernel against the Dense op of the NumPy reference (float64 inside)."""

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sparseinfer.graph import reference
from sparseinfer.kernels import dense as D
from tests.tolerances import tolerance

# kernel activation code → the reference Dense `activation` attribute (both GELU kernels are erf-form)
ACTIVATION = {D.ACT_NONE: "none", D.ACT_GELU: "gelu", D.ACT_GELU_EXACT: "gelu", D.ACT_TANH: "tanh", D.ACT_RELU: "relu"}


def run_dense(X, W, bias=None, res=None, act=D.ACT_NONE):
    """The kernel into an `out` pre-filled with NaN (so an element it forgets to write shows)."""
    out = np.full((X.shape[0], W.shape[1]), np.nan, dtype=np.float32)
    return D.dense(X, D.pack_weight(W), bias, res, out, act)


def expected(X, W, bias=None, res=None, act=D.ACT_NONE):
    return reference.dense(X, W, bias, res, activation=ACTIVATION[act])


def _case(seed, M, K, N, use_bias, use_res, act, x_kind="random", w_zero=False):
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1, 1, (M, K)).astype(np.float32)
    if x_kind == "zero":
        X[:] = 0.0
    elif x_kind == "zero_rows":
        X[rng.random(M) < 0.5] = 0.0
    W = np.zeros((K, N), np.float32) if w_zero else rng.uniform(-1, 1, (K, N)).astype(np.float32)
    bias = rng.uniform(-1, 1, N).astype(np.float32) if use_bias else None
    res = rng.uniform(-1, 1, (M, N)).astype(np.float32) if use_res else None
    out = run_dense(X, W, bias, res, act)
    np.testing.assert_allclose(out, expected(X, W, bias, res, act), **tolerance("dense", np.float32, k=K))


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    M=st.integers(1, 40),
    K=st.integers(1, 70),
    N=st.integers(1, 100),
    use_bias=st.booleans(),
    use_res=st.booleans(),
    act=st.sampled_from(sorted(ACTIVATION)),
    x_kind=st.sampled_from(["random", "zero", "zero_rows"]),
    w_zero=st.booleans(),
)
@example(seed=0, M=1, K=1, N=1, use_bias=True, use_res=True, act=D.ACT_GELU, x_kind="random", w_zero=False)
@example(seed=1, M=9, K=33, N=65, use_bias=False, use_res=False, act=D.ACT_NONE, x_kind="random", w_zero=False)
@example(seed=2, M=17, K=5, N=33, use_bias=True, use_res=True, act=D.ACT_TANH, x_kind="zero", w_zero=True)
def test_dense_random_shapes(seed, M, K, N, use_bias, use_res, act, x_kind, w_zero):
    # M, N not multiples of the 8 x 32 register block; all-zero X / W and zero rows of X
    _case(seed, M, K, N, use_bias, use_res, act, x_kind, w_zero)


@pytest.mark.parametrize("M", [1, 7, 8, 9, 255, 256, 257, 300])
def test_dense_row_chunks(M):
    # crosses the MR (8) and MC (256) blocking boundaries
    _case(M, M, 33, 65, True, True, D.ACT_GELU)


@pytest.mark.parametrize("K,N", [(768, 768), (768, 2304), (3072, 768)])
def test_dense_bert_shapes(K, N):
    _case(K + N, 128, K, N, True, False, D.ACT_NONE)


@pytest.mark.parametrize("M,K", [(0, 7), (5, 0)], ids=["no-rows", "no-columns"])
def test_dense_empty_operands(M, K):
    """M = 0 gives an empty output; K = 0 gives act(bias) + residual, as in the reference."""
    rng = np.random.default_rng(M + K)
    X = rng.uniform(-1, 1, (M, K)).astype(np.float32)
    W = rng.uniform(-1, 1, (K, 40)).astype(np.float32)
    bias = rng.uniform(-1, 1, 40).astype(np.float32)
    res = rng.uniform(-1, 1, (M, 40)).astype(np.float32)
    for act in ACTIVATION:
        out = run_dense(X, W, bias, res, act)
        assert out.shape == (M, 40)
        np.testing.assert_allclose(out, expected(X, W, bias, res, act), **tolerance("dense", np.float32, k=max(K, 1)))


@pytest.mark.parametrize("act", sorted(ACTIVATION), ids=lambda a: f"act{a}")
def test_dense_propagates_nan_and_inf_like_the_reference(act):
    """A NaN in X makes its whole output row NaN (NaN * 0 is NaN, also in the padded panel columns);
    ±Inf gives ±Inf or NaN (Inf - Inf) exactly where the reference does; other rows are unaffected."""
    rng = np.random.default_rng(act)
    M, K, N = 19, 37, 70  # remainder rows and a partial last panel
    X = rng.uniform(-1, 1, (M, K)).astype(np.float32)
    W = rng.uniform(-1, 1, (K, N)).astype(np.float32)
    bias = rng.uniform(-1, 1, N).astype(np.float32)
    X[2, 3] = np.nan  # inside a full 8-row block
    X[17, 0] = np.nan  # a remainder row
    X[5, 9] = np.inf
    X[9, 36] = -np.inf
    out = run_dense(X, W, bias, None, act)
    ref = expected(X, W, bias, None, act)
    assert np.isnan(out[[2, 17]]).all()
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
    np.testing.assert_array_equal(np.isinf(out), np.isinf(ref))
    np.testing.assert_array_equal(np.signbit(out[np.isinf(ref)]), np.signbit(ref[np.isinf(ref)]))
    finite = np.isfinite(ref)
    assert finite.sum(axis=1)[[0, 1, 3, 4, 6, 7, 8]].min() == N  # clean rows stay finite
    np.testing.assert_allclose(out[finite], ref[finite], **tolerance("dense", np.float32, k=K))


def test_dense_nan_in_weight_bias_or_residual_stays_in_its_column_or_element():
    rng = np.random.default_rng(7)
    M, K, N = 10, 12, 40
    X = rng.uniform(-1, 1, (M, K)).astype(np.float32)
    W = rng.uniform(-1, 1, (K, N)).astype(np.float32)
    bias = rng.uniform(-1, 1, N).astype(np.float32)
    res = rng.uniform(-1, 1, (M, N)).astype(np.float32)
    W[4, 33] = np.nan  # column 33, in the second (partial) panel
    bias[1] = np.nan
    res[8, 20] = np.nan
    out = run_dense(X, W, bias, res, D.ACT_GELU)
    ref = expected(X, W, bias, res, D.ACT_GELU)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
    assert np.isnan(out).sum() == 2 * M + 1  # columns 1 and 33, element (8, 20)
    ok = ~np.isnan(ref)
    np.testing.assert_allclose(out[ok], ref[ok], **tolerance("dense", np.float32, k=K))


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
    x = np.linspace(-10, 10, 401).astype(np.float32)
    got = np.array([D.gelu_f32(np.float32(v)) for v in x])
    np.testing.assert_allclose(got, reference.gelu(x.astype(np.float64)), **tolerance("gelu", np.float32))


def test_dense_rejects_bad_shapes():
    Wp = D.pack_weight(np.ones((4, 8), np.float32))
    with pytest.raises(ValueError):
        D.dense(np.ones((3, 5), np.float32), Wp)
    with pytest.raises(ValueError):
        D.dense(np.ones((3, 4), np.float32), Wp, out=np.empty((3, 40), np.float32))
