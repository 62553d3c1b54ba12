"""Unstructured-sparse matmul kernel and the CSR format vs the NumPy reference (float64 Dense)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseinfer.graph.reference import dense as dense_ref
from sparseinfer.kernels import csr as C
from sparseinfer.kernels.sparse_formats import aligned_empty, density, pack_csr
from tests.tolerances import tolerance

ACTS = {C.ACT_NONE: "none", C.ACT_GELU: "gelu", C.ACT_GELU_EXACT: "gelu", C.ACT_TANH: "tanh"}


def sparse_weight(rng, K, N, dens, empty_rows=0, empty_cols=0):
    W = rng.uniform(-1, 1, (K, N)).astype(np.float32)
    W[rng.random((K, N)) >= dens] = 0.0
    if empty_rows:
        W[rng.choice(K, min(K, empty_rows), replace=False)] = 0.0
    if empty_cols:
        W[:, rng.choice(N, min(N, empty_cols), replace=False)] = 0.0
    return W


def unpack_csr(indptr, indices, data, K, N):
    """Dense W from the CSR format (inverse of pack_csr), for format tests."""
    W = np.zeros((K, N), np.float32)
    npanel = (len(indptr) - 1) // N
    for b in range(npanel):
        for n in range(N):
            q = b * N + n
            for p in range(indptr[q], indptr[q + 1]):
                W[indices[p], n] += data[p]
    return W


def operands(seed, M, K, N, dens, use_bias, use_res, empty_rows=0, empty_cols=0):
    """Random ``X [M, K]``, sparse ``W [K, N]``, and bias and residual (or None)."""
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1, 1, (M, K)).astype(np.float32)
    W = sparse_weight(rng, K, N, dens, empty_rows, empty_cols)
    bias = rng.uniform(-1, 1, N).astype(np.float32) if use_bias else None
    res = rng.uniform(-1, 1, (M, N)).astype(np.float32) if use_res else None
    return X, W, bias, res


def check(seed, M, K, N, dens, use_bias, use_res, act, kb=None, empty_rows=0, empty_cols=0, workspace=None):
    X, W, bias, res = operands(seed, M, K, N, dens, use_bias, use_res, empty_rows, empty_cols)
    packed = pack_csr(W) if kb is None else pack_csr(W, kb)
    out = np.full((M, N), np.nan, np.float32)  # every element must be written
    C.csr_matmul(X, packed, N, bias, res, out, act, workspace=workspace)
    ref = dense_ref(X, W, bias, res, activation=ACTS[act])
    np.testing.assert_allclose(out, ref, **tolerance("csr", np.float32, K))


# the weight, density and epilogue drawn by both kernels' property tests (see operands())
OPERANDS = dict(
    K=st.integers(1, 300),
    N=st.integers(1, 300),
    dens=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)),
    use_bias=st.booleans(),
    use_res=st.booleans(),
    act=st.sampled_from(list(ACTS)),
)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    M=st.sampled_from([1, 2, 15, 16, 17, 40, 64, 127, 128, 129, 200, 300]),
    **OPERANDS,
    kb=st.sampled_from([None, 1, 16, 50, 10_000]),
    empty_rows=st.integers(0, 20),
    empty_cols=st.integers(0, 20),
)
def test_csr_random(seed, M, K, N, dens, use_bias, use_res, act, kb, empty_rows, empty_cols):
    # M crosses the 16/32/64/128-lane tiles and 128-row chunks, N the 16-column finish
    # groups and 256-column tasks, K the 16 x 16 transposes and the K panels.
    check(seed, M, K, N, dens, use_bias, use_res, act, kb, empty_rows, empty_cols)


@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (1, 5, 1), (3, 1, 7), (1, 768, 33), (17, 1, 1)])
@pytest.mark.parametrize("dens", [0.0, 1.0])
def test_csr_degenerate(M, K, N, dens):
    check(M + K + N, M, K, N, dens, True, True, C.ACT_GELU)


def test_csr_empty_operands():
    # K = 0: out = act(bias) + residual; M = 0 and N = 0: nothing to do
    rng = np.random.default_rng(0)
    bias = rng.uniform(-1, 1, 5).astype(np.float32)
    res = rng.uniform(-1, 1, (3, 5)).astype(np.float32)
    X, W = np.zeros((3, 0), np.float32), np.zeros((0, 5), np.float32)
    out = C.csr_matmul(X, pack_csr(W), 5, bias, res, act=C.ACT_TANH)
    np.testing.assert_allclose(out, dense_ref(X, W, bias, res, activation="tanh"), **tolerance("csr", np.float32, 1))
    assert C.csr_matmul(np.zeros((0, 4), np.float32), pack_csr(np.ones((4, 5), np.float32)), 5).shape == (0, 5)
    assert C.csr_matmul(np.ones((2, 4), np.float32), pack_csr(np.ones((4, 0), np.float32)), 0).shape == (2, 0)


@pytest.mark.parametrize("K,N", [(768, 768), (768, 2304), (3072, 768)])
def test_csr_bert_shapes(K, N):
    check(K + N, 128, K, N, 0.1, True, True, C.ACT_NONE)


def test_csr_workspace_reuse():
    # one workspace (sized for the largest call, filled with NaN) reused for smaller M:
    # stale lanes must never reach the output
    K, N = 70, 40
    ws = C.make_workspace(300, K, N)
    ws[0][:] = np.nan
    ws[1][:] = np.nan
    for M in (300, 130, 5, 1):
        check(M, M, K, N, 0.3, True, False, C.ACT_NONE, workspace=ws)


def test_csr_workspace_too_small():
    with pytest.raises(ValueError, match="workspace"):
        C.csr_matmul(np.ones((200, 8), np.float32), pack_csr(np.ones((8, 4), np.float32)), 4, workspace=C.make_workspace(100, 8, 4))


def test_csr_operand_errors():
    packed = pack_csr(np.ones((8, 4), np.float32))
    X = np.ones((3, 8), np.float32)
    with pytest.raises(ValueError, match="bias"):
        C.csr_matmul(X, packed, 4, bias=np.ones(5, np.float32))
    with pytest.raises(ValueError, match="residual"):
        C.csr_matmul(X, packed, 4, residual=np.ones((3, 5), np.float32))
    with pytest.raises(ValueError, match="indptr"):
        C.csr_matmul(X, packed, 3)
    with pytest.raises(ValueError, match="row index"):
        C.csr_matmul(np.ones((3, 4), np.float32), packed, 4)
    with pytest.raises(ValueError, match="activation"):
        C.csr_matmul(X, packed, 4, act=99)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    K=st.integers(0, 40),
    N=st.integers(1, 40),
    dens=st.floats(0.0, 1.0),
    kb=st.integers(1, 50),
)
def test_pack_csr_roundtrip(seed, K, N, dens, kb):
    rng = np.random.default_rng(seed)
    W = sparse_weight(rng, K, N, dens)
    indptr, indices, data = pack_csr(W, kb)
    assert indptr.dtype == np.int64 and indices.dtype == np.int32 and data.dtype == np.float32
    npanel = max(1, -(-K // kb))
    assert indptr.shape == (npanel * N + 1,) and indptr[0] == 0 and np.all(np.diff(indptr) >= 0)
    assert len(indices) == len(data) == np.count_nonzero(W) == indptr[-1]
    # each segment: rows inside its panel, ascending
    for q in range(npanel * N):
        seg = indices[indptr[q] : indptr[q + 1]]
        b = q // N
        assert np.all((seg >= b * kb) & (seg < (b + 1) * kb)) and np.all(np.diff(seg) > 0)
    np.testing.assert_array_equal(unpack_csr(indptr, indices, data, K, N), W)


def test_pack_csr_errors():
    with pytest.raises(ValueError, match="2-D"):
        pack_csr(np.ones(4, np.float32))
    with pytest.raises(ValueError, match="kb"):
        pack_csr(np.ones((4, 4), np.float32), kb=0)


def test_helpers():
    a = aligned_empty((3, 5, 7))
    assert a.shape == (3, 5, 7) and a.ctypes.data % 64 == 0 and a.flags.c_contiguous
    assert density(np.array([[0, 1], [2, 0]], np.float32)) == 0.5
    assert [C.lanes_for(m) for m in (1, 16, 17, 33, 64, 65, 1000)] == [16, 16, 32, 64, 64, 128, 128]


def test_csr_kernel_rejects_strided_x():
    # the kernel's transposes read X through a raw pointer: a strided view must be refused
    X = np.ones((4, 16), np.float32)[:, ::2]
    ws = C.make_workspace(4, 8, 3)
    with pytest.raises(ValueError, match="C-contiguous"):
        C.csr_kernel(4)(X, *pack_csr(np.ones((8, 3), np.float32)), None, None, np.empty((4, 3), np.float32), C.ACT_NONE, *ws)


def test_csr_strided_residual():
    # the transposed store reads the residual through a raw pointer: csr_matmul hands the kernel a
    # contiguous copy of a strided one, and the kernel refuses a strided residual
    rng = np.random.default_rng(5)
    X = rng.uniform(-1, 1, (40, 30)).astype(np.float32)
    W = sparse_weight(rng, 30, 20, 0.5)
    res = rng.uniform(-1, 1, (20, 40)).astype(np.float32).T  # a strided [40, 20] view
    out = C.csr_matmul(X, pack_csr(W), 20, None, res)
    np.testing.assert_allclose(out, dense_ref(X, W, None, res), **tolerance("csr", np.float32, 30))
    with pytest.raises(ValueError, match="residual"):
        C.csr_kernel(40)(X, *pack_csr(W), None, res, np.empty((40, 20), np.float32), C.ACT_NONE, *C.make_workspace(40, 30))


@pytest.mark.parametrize("N", [1024, 2048])
def test_csr_rows_4k_apart(N):
    # rows of out a multiple of 4 KiB apart take the staged store (with and without residual)
    check(N, 130, 40, N, 0.2, True, True, C.ACT_GELU)
    check(N + 1, 33, 40, N, 0.2, False, False, C.ACT_NONE)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    M=st.integers(1, C.FEW_ROWS),
    **OPERANDS,
    one_panel=st.booleans(),
    narrow=st.booleans(),
    parts=st.integers(1, 3),
)
def test_few_rows_kernel(seed, M, K, N, dens, use_bias, use_res, act, one_panel, narrow, parts):
    """The kernel for a classifier's last rows, on packs of one panel (as the plan stores them)
    or 128-row panels, int16 or int32 row indices, any number of parts."""
    X, W, bias, res = operands(seed, M, K, N, dens, use_bias, use_res)
    indptr, indices, data = pack_csr(W, K) if one_panel else pack_csr(W)
    if narrow:
        indices = C.narrow_indices(indices)
    out = np.full((M, N), np.nan, np.float32)
    C.few_rows_kernel(X, indptr, indices, data, bias, res, out, act, parts)
    ref = dense_ref(X, W, bias, res, activation=ACTS[act])
    np.testing.assert_allclose(out, ref, **tolerance("csr", np.float32, K))
